"""Faithfulness by perturbation (REFERENCE.md section 4, the paper's protocol) and ground truth.

For each sample the tokens are ordered by a method's relevance and perturbed in 11 steps,
``f = 0, 0.1, ..., 1``, ``k = ceil(f N)`` tokens at step ``f``:

* **generation**: start from all tokens masked, re-insert the ``k`` most relevant (at ``f = 1``
  the input is restored exactly; asserted);
* **pruning**: start from the full input, mask the ``k`` least relevant (= LeRF);
* **morf**: mask the ``k`` *most* relevant first.

Metrics, each the trapezoid area over ``f`` in [0, 1]: **AUAC**, the softmax probability of the
target token (higher is better for generation and pruning); **AU-MSE**, the squared difference
between the original and the perturbed target logit (lower is better); and the area under the
target logit for MoRF / LeRF. The 11 perturbed inputs of a sample run as one batch.

Every family runs it (HookedTransformer, TransformerBridge in either hook naming): the forwards go
through the family in eval mode; hooks are read by the name asked for (in a bridge's default
naming ``hook.name`` is the bridge's own name, not the HookedTransformer alias); only the explained
position is unembedded, by slicing the unembedding's input, which every family computes per position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from lens_palrp.analyses.common import in_eval_mode
from lens_palrp.engine import explain
from lens_palrp.hooks import family_for
from lens_palrp.inputs import prepare_tokens
from lens_palrp.similarity import explain_similarity, mean_pool

FRACTIONS = torch.linspace(0, 1, 11, dtype=torch.float64)
MODES = ("generation", "pruning", "morf")


def trapezoid(values: Tensor, fractions: Tensor = FRACTIONS) -> Tensor:
    """Area under ``values[..., steps]`` over ``fractions`` (x from 0 to 1)."""
    v = values.double()
    dx = (fractions[1:] - fractions[:-1]).to(v.device)
    return ((v[..., 1:] + v[..., :-1]) * 0.5 * dx).sum(-1)


def perturbation_order(relevance: Tensor, perturbable: Tensor, descending: bool) -> Tensor:
    """Positions sorted by relevance (stable: ties keep position order), non-perturbable last."""
    key = relevance.double().clone()
    fill = -math.inf if descending else math.inf
    key[~perturbable] = fill
    return torch.sort(key, descending=descending, stable=True).indices


def perturbed_inputs(tokens: Tensor, relevance: Tensor, perturbable: Tensor, mode: str,
                     mask_token: int, fractions: Tensor = FRACTIONS) -> Tensor:
    """``[steps, pos]`` inputs of one sample for ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n = int(perturbable.sum())
    order = perturbation_order(relevance, perturbable, descending=mode in ("generation", "morf"))
    out = []
    for f in fractions.tolist():
        k = math.ceil(f * n - 1e-9)
        chosen = order[:k]
        if mode == "generation":  # everything masked except the k most relevant
            x = torch.where(perturbable, torch.full_like(tokens, mask_token), tokens)
            x[chosen] = tokens[chosen]
        else:  # mask the k least (pruning) / most (morf) relevant
            x = tokens.clone()
            x[chosen] = mask_token
        out.append(x)
    inputs = torch.stack(out)
    if mode == "generation" and not torch.equal(inputs[-1], tokens):
        raise AssertionError("generation at f = 1 must restore the input exactly")
    return inputs


def default_mask_token(model) -> int:
    """UNK when the vocabulary has one, else a neutral token (pad, else eos)."""
    tok = getattr(model, "tokenizer", None)
    for name in ("unk_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(tok, name, None) if tok is not None else None
        if value is not None:
            return int(value)
    raise ValueError("the model's tokenizer has no unk / pad / eos token: pass mask_token")


@dataclass
class PerturbationResult:
    """Per-sample curves ``{method: {mode: {"prob" | "logit": [samples, steps]}}}`` and metrics."""

    curves: Dict[str, Dict[str, Dict[str, Tensor]]]
    original_logit: Tensor
    fractions: Tensor = field(default_factory=lambda: FRACTIONS.clone())

    def metrics(self) -> Dict[str, Dict[str, Tensor]]:
        """Per-sample metrics ``{method: {metric: [samples]}}``."""
        out = {}
        for method, modes in self.curves.items():
            m = {}
            for mode in ("generation", "pruning"):
                if mode in modes:
                    m[f"{mode}_auac"] = trapezoid(modes[mode]["prob"], self.fractions)
                    err = (modes[mode]["logit"] - self.original_logit[:, None]) ** 2
                    m[f"{mode}_au_mse"] = trapezoid(err, self.fractions)
            if "morf" in modes:
                m["morf_logit"] = trapezoid(modes["morf"]["logit"], self.fractions)
            if "pruning" in modes:
                m["lerf_logit"] = trapezoid(modes["pruning"]["logit"], self.fractions)
            out[method] = m
        return out

    def summary(self, n_boot: int = 1000, seed: int = 0) -> List[dict]:
        """Mean and 95% bootstrap interval per method and metric (seeded)."""
        rows = []
        for method, metrics in self.metrics().items():
            for name, values in metrics.items():
                mean, low, high = bootstrap_mean(values, n_boot, seed)
                rows.append({"method": method, "metric": name, "mean": mean, "ci_low": low,
                             "ci_high": high, "n": int(values.numel())})
        return rows

    def figure(self, mode: str = "generation", quantity: str = "prob"):
        import plotly.graph_objects as go

        fig = go.Figure()
        for method, modes in self.curves.items():
            if mode in modes:
                fig.add_trace(go.Scatter(x=self.fractions.tolist(), y=modes[mode][quantity].mean(0).tolist(),
                                         mode="lines+markers", name=method))
        fig.update_layout(title=f"Perturbation curves ({mode}, mean {quantity} of the target)",
                          xaxis_title="fraction of tokens", yaxis_title=f"target {quantity}")
        return fig


def bootstrap_mean(values: Tensor, n_boot: int = 1000, seed: int = 0):
    """Mean and the 2.5% / 97.5% quantiles of the bootstrap distribution of the mean."""
    v = values.double().flatten().cpu()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(v), (n_boot, len(v)), generator=g)
    means = v[idx].mean(1)
    return float(v.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


# ------------------------------------------------------------------------------- methods
@in_eval_mode
def rollout_matrix(model, tokens: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """Abnar & Zuidema (2020): ``prod_l (A_l + I) / 2`` with heads averaged and rows renormalized,
    ``[batch, pos, pos]`` (row = query position)."""
    family = family_for(model)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(family.n_layers)]
    missing = [n for n in names if not family.has_hook(n)]
    if missing:
        raise NotImplementedError(f"attention rollout reads the attention patterns, but this {family.name} "
                                  f"has no hook point {missing[0]!r}")
    patterns = {}

    def keeper(name):
        def keep(act, hook=None):
            patterns[name] = act.detach().double()
            return act
        return keep

    with torch.no_grad():
        family.forward(tokens, attention_mask, [(n, keeper(n)) for n in names])
    rollout = None
    for name in names:
        a = patterns[name].mean(1)  # [batch, q, k]
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def attention_rollout(model, tokens: Tensor, attention_mask: Optional[Tensor], positions: Tensor) -> Tensor:
    """Attention rollout map: the rollout row of the explained position."""
    rollout = rollout_matrix(model, tokens, attention_mask)
    rows = torch.arange(tokens.shape[0], device=rollout.device)
    return rollout[rows, positions.to(rollout.device)]


METHOD_NAMES = ("random", "grad_x_input", "attention_rollout", "cp_lrp", "attn_lrp", "pe_only",
                "pa_lrp", "pa_lrp_abs")


_EXPLAINED = ("grad_x_input", "cp_lrp", "attn_lrp", "pa_lrp")


def _explained_methods(methods: Sequence[str]) -> List[str]:
    """The ``explain`` runs the requested maps need (PE-only and "abs" read the PA-LRP run)."""
    need = set(methods)
    return [m for m in _EXPLAINED if m in need or (m == "pa_lrp" and need & {"pe_only", "pa_lrp_abs"})]


def _maps(methods: Sequence[str], explained, shape, seed: int, rollout: Callable[[], Tensor]) -> Dict[str, Tensor]:
    """``{method: map}`` from the ``explain`` results; ``rollout()`` is called only if asked."""
    maps: Dict[str, Tensor] = {}
    for method in methods:
        if method == "random":
            g = torch.Generator().manual_seed(seed)
            maps[method] = torch.rand(shape, generator=g, dtype=torch.float64)
        elif method == "attention_rollout":
            maps[method] = rollout().double().cpu()
        elif method in ("grad_x_input", "cp_lrp", "attn_lrp"):
            maps[method] = explained[method].semantic.double().cpu()
        elif method == "pe_only":
            maps[method] = explained["pa_lrp"].combined("relu", "positional").double().cpu()
        elif method == "pa_lrp":
            maps[method] = explained["pa_lrp"].combined("relu").double().cpu()
        elif method == "pa_lrp_abs":
            maps[method] = explained["pa_lrp"].combined("abs").double().cpu()
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHOD_NAMES}")
    return maps


@in_eval_mode
def relevance_maps(model, tokens: Tensor, attention_mask: Optional[Tensor], target: Tensor,
                   positions: Tensor, methods: Sequence[str] = METHOD_NAMES, seed: int = 0) -> Dict[str, Tensor]:
    """``{method: [batch, pos]}`` relevance maps on identical inputs.

    LRP baselines use their signed token relevance (as AttnLRP's own evaluation does); PA-LRP the
    paper's Eq. 11 ("relu") or the authors' "abs" aggregation; PE-only the positional sinks alone.
    """
    explained = {m: explain(model, tokens, target, method=m, position=positions, attention_mask=attention_mask)
                 for m in _explained_methods(methods)}
    return _maps(methods, explained, tokens.shape, seed,
                 lambda: attention_rollout(model, tokens, attention_mask, positions))


def _unembedding_input(family) -> str:
    """Where the positions not explained can be dropped: the unembedding's input. Not the last
    block's output: a Hugging Face model (GPT-2) reshapes the final norm's output to the input's
    length, which fails on a bridge."""
    return "unembed.hook_in" if family.has_hook("unembed.hook_in") else family.final_hidden_hook


@in_eval_mode
def perturbation_test(model, prompts, targets=None, methods: Sequence[str] = METHOD_NAMES,
                      modes: Sequence[str] = MODES, mask_token: Optional[int] = None, seed: int = 0,
                      protect_first: bool = True, progress: bool = True,
                      maps: Optional[Dict[str, Tensor]] = None) -> PerturbationResult:
    """Run the protocol on ``prompts`` (strings or a LongTensor) explaining ``targets`` (token ids
    at each prompt's last token; default: the model's prediction there).

    ``protect_first`` keeps position 0 (BOS / CLS) out of the perturbation. ``maps`` can pass
    precomputed relevance maps ``{method: [batch, pos]}``.
    """
    from tqdm.auto import tqdm

    family = family_for(model)
    device = next(model.parameters()).device
    prepared = prepare_tokens(family, prompts, None, None, device)
    tokens, mask = prepared.tokens, prepared.attention_mask
    batch, n_pos = tokens.shape
    mask = torch.ones_like(tokens) if mask is None else mask
    lengths = mask.sum(-1)
    positions = (lengths - 1).cpu()
    rows = torch.arange(batch, device=device)
    with torch.no_grad():
        logits = family.forward(tokens, None if bool(mask.all()) else mask, [])
    last = logits[rows, positions.to(device)]
    if targets is None:
        targets = last.argmax(-1).cpu()
    targets = torch.as_tensor(targets).reshape(-1).long().cpu()
    original_logit = last[rows, targets.to(device)].double().cpu()
    mask_token = default_mask_token(model) if mask_token is None else int(mask_token)
    if maps is None:
        maps = relevance_maps(model, tokens, None if bool(mask.all()) else mask, targets, positions,
                              methods, seed)
    perturbable = mask.bool().cpu().clone()
    if protect_first:
        perturbable[:, 0] = False
    slice_at = _unembedding_input(family)
    curves = {m: {mode: {"prob": torch.zeros(batch, len(FRACTIONS), dtype=torch.float64),
                         "logit": torch.zeros(batch, len(FRACTIONS), dtype=torch.float64)}
                  for mode in modes} for m in maps}
    for i in tqdm(range(batch), disable=not progress, desc="perturbation"):
        n = int(lengths[i])

        def last_only(act, hook=None, n=n):
            # only the explained position reaches the unembedding (a 262k vocabulary is most of
            # the cost of a forward on short inputs)
            return act[:, n - 1 : n]

        for method, relevance in maps.items():
            stacked = [perturbed_inputs(tokens[i, :n].cpu(), relevance[i, :n], perturbable[i, :n], mode, mask_token)
                       for mode in modes]
            inputs = torch.cat(stacked).to(device)
            with torch.no_grad():
                out = family.forward(inputs, None, [(slice_at, last_only)])[:, -1].double()
            probs = out.softmax(-1)[:, int(targets[i])].cpu()
            logit = out[:, int(targets[i])].cpu()
            for j, mode in enumerate(modes):
                sl = slice(j * len(FRACTIONS), (j + 1) * len(FRACTIONS))
                curves[method][mode]["prob"][i] = probs[sl]
                curves[method][mode]["logit"][i] = logit[sl]
    return PerturbationResult(curves, original_logit)


# ------------------------------------------------------------------------------- ground truth
def ground_truth_scores(relevance: Tensor, relevant: Tensor, valid: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Per sample: the share of the *positive* relevance mass on the truly relevant positions, and
    whether the top-1 position is one of them ("pointing")."""
    r = relevance.double()
    if valid is not None:
        r = torch.where(valid.bool(), r, torch.full_like(r, -math.inf))
    positive = r.clamp(min=0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    total = positive.sum(-1)
    share = (positive * relevant.double()).sum(-1) / torch.where(total == 0, torch.ones_like(total), total)
    pointing = relevant.bool().gather(-1, r.argmax(-1, keepdim=True)).squeeze(-1).double()
    return {"mass_share": share, "pointing": pointing}


# ------------------------------------------------------------------------------- sentence similarity
@dataclass
class SimilarityResult:
    """Per-pair similarity curves ``{method: {mode: [pairs, steps]}}`` under perturbation."""

    curves: Dict[str, Dict[str, Tensor]]
    original: Tensor
    fractions: Tensor = field(default_factory=lambda: FRACTIONS.clone())

    def metrics(self) -> Dict[str, Dict[str, Tensor]]:
        """``{mode}_au_sim`` (area under the similarity; generation / pruning: higher is better,
        morf: lower) and ``{mode}_au_mse`` (squared change of the similarity; lower is better)."""
        out = {}
        for method, modes in self.curves.items():
            out[method] = {}
            for mode, curve in modes.items():
                out[method][f"{mode}_au_sim"] = trapezoid(curve, self.fractions)
                out[method][f"{mode}_au_mse"] = trapezoid((curve - self.original[:, None]) ** 2, self.fractions)
        return out


@in_eval_mode
def similarity_perturbation_test(model, pairs, methods: Sequence[str] = METHOD_NAMES,
                                 modes: Sequence[str] = MODES, removal: str = "attention",
                                 mask_token: Optional[int] = None, seed: int = 0,
                                 progress: bool = True) -> SimilarityResult:
    """The protocol for sentence similarity (e.g. all-MiniLM-L6-v2).

    One sentence of a pair is perturbed by its own relevance map (``lp.explain_similarity``) while
    the other stays whole, then the other way round; a pair's curve is the mean of the two
    directions, the cosine similarity of the mean-pooled embeddings at each step. [CLS] and [SEP]
    are protected. ``removal="attention"`` (default) removes a token from the attention mask and
    the pooling, so a removed token is simply absent (positions of the rest unchanged);
    ``removal="mask_token"`` replaces it with ``mask_token`` ([UNK] by default) instead.

    Why one side at a time: perturbing both sentences together drives both towards the same
    "empty" embedding, so their similarity *rises* as tokens are removed and the curve measures
    that drift rather than the explanation.
    """
    from tqdm.auto import tqdm

    if removal not in ("attention", "mask_token"):
        raise ValueError(f"removal must be 'attention' or 'mask_token', got {removal!r}")
    family = family_for(model)
    device = next(model.parameters()).device
    if removal == "mask_token":
        mask_token = default_mask_token(model) if mask_token is None else int(mask_token)
    hook = family.final_hidden_hook
    curves = {m: {mode: torch.zeros(len(pairs), len(FRACTIONS), dtype=torch.float64) for mode in modes}
              for m in methods}
    original = torch.zeros(len(pairs), dtype=torch.float64)

    def pooled(tokens: Tensor, mask: Tensor) -> Tensor:
        store = {}

        def grab(act, hook=None):
            store["h"] = act.detach()
            return act

        with torch.no_grad():
            family.forward(tokens.to(device), mask.to(device), [(hook, grab)])
        return mean_pool(store["h"].double(), mask.to(store["h"].device)).cpu()

    removed = -1  # sentinel id for removed tokens
    for i, (a, b) in enumerate(tqdm(pairs, disable=not progress, desc="similarity perturbation")):
        needed = _explained_methods(methods) or ["grad_x_input"]  # one run gives the tokens
        explained = {m: explain_similarity(model, a, b, method=m) for m in needed}
        ref = explained[needed[0]]
        tokens, mask = ref.tokens.cpu(), ref.attention_mask.cpu()
        original[i] = float(ref.target_value.sum())
        lengths = mask.sum(-1)
        whole = pooled(tokens, mask)
        # rollout: averaged over the rows that are pooled (the real tokens)
        maps = _maps(methods, explained, tokens.shape, seed + i,
                     lambda: mean_pool(rollout_matrix(model, tokens.to(device), mask.to(device)).cpu(), mask))
        for m, relevance in maps.items():
            rows, masks = [], []
            for r in range(2):
                n = int(lengths[r])
                perturbable = torch.zeros(tokens.shape[1], dtype=torch.bool)
                perturbable[1 : n - 1] = True
                for mode in modes:
                    if removal == "attention":
                        steps = perturbed_inputs(tokens[r], relevance[r], perturbable, mode, removed)
                        rows.append(torch.where(steps == removed, tokens[r], steps))
                        masks.append(mask[r] * (steps != removed).long())
                    else:
                        rows.append(perturbed_inputs(tokens[r], relevance[r], perturbable, mode, mask_token))
                        masks.append(mask[r].expand(len(FRACTIONS), -1))
            embeddings = pooled(torch.cat(rows), torch.cat(masks)).view(2, len(modes), len(FRACTIONS), -1)
            for j, mode in enumerate(modes):
                sims = [torch.nn.functional.cosine_similarity(embeddings[r, j], whole[1 - r][None], dim=-1)
                        for r in range(2)]
                curves[m][mode][i] = (sims[0] + sims[1]) / 2
    return SimilarityResult(curves, original)
