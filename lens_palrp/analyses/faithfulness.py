"""Faithfulness by perturbation (the paper's protocol: docs/evaluation.md) and ground truth.

For each sample the tokens are ordered by a method's relevance and perturbed in 11 steps,
``f = 0, 0.1, ..., 1``, ``k = ceil(f N)`` tokens at step ``f``:

* **generation**: start from all tokens masked, re-insert the ``k`` most relevant (at ``f = 1``
  the input is restored exactly);
* **pruning**: start from the full input, mask the ``k`` least relevant (= LeRF);
* **morf**: mask the ``k`` *most* relevant first.

Metrics, each the trapezoid area over ``f`` in [0, 1]: **AUAC**, the softmax probability of the
target token (higher is better for generation and pruning); **AU-MSE**, the squared difference
between the original and the perturbed target logit (lower is better); and the area under the
target logit for MoRF / LeRF. The 11 perturbed inputs of a sample run as one batch.

The three protocols (next-token ``perturbation_test``, ``similarity_perturbation_test`` here and
``vision.vision_perturbation_test``) share one loop, ``perturbation_curves``: for every unit (a
sample, a sentence pair, a batch of images) and every map it decides which positions each step
removes, has the protocol build the perturbed input and score it, and files the scores as curves.
A protocol is a ``Perturbation``: its fractions, its step sizes, how it removes a position and
how it scores a batch of perturbed inputs (docs/evaluation.md).

Every family runs it (HookedTransformer, TransformerBridge in either hook naming): the forwards go
through the family in eval mode; hooks are read by the name asked for (in a bridge's default
naming ``hook.name`` is the bridge's own name, not the HookedTransformer alias); only the explained
position is unembedded, by slicing the unembedding's input, which every family computes per position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from lens_palrp.analyses.common import in_eval_mode, takes_hf_models
from lens_palrp.engine import explain
from lens_palrp.hooks import family_for
from lens_palrp.inputs import prepare_tokens
from lens_palrp.similarity import explain_similarity, mean_pool

FRACTIONS = torch.linspace(0, 1, 11, dtype=torch.float64)
MODES = ("generation", "pruning", "morf")


def trapezoid(values: Tensor, fractions: Tensor = FRACTIONS) -> Tensor:
    """Area under ``values[..., steps]`` over ``fractions`` (x from 0 to 1)."""
    v = values.double()
    return torch.trapezoid(v, fractions.to(v.device, torch.float64), dim=-1)


# ------------------------------------------------------------------------------- the shared loop
def perturbation_order(relevance: Tensor, perturbable: Tensor, descending: bool) -> Tensor:
    """Positions sorted by relevance along the last dim (stable: ties keep position order),
    non-perturbable last."""
    key = relevance.double().clone()
    fill = -math.inf if descending else math.inf
    key[~perturbable] = fill
    return torch.sort(key, descending=descending, stable=True).indices


def removal_ranks(relevance: Tensor, perturbable: Tensor, mode: str) -> Tensor:
    """``[..., pos]`` rank of every position in ``mode``'s order: 0 is the first one generation
    re-inserts (the most relevant) or pruning / morf removes (the least / most relevant)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    order = perturbation_order(relevance, perturbable, descending=mode in ("generation", "morf"))
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
    return ranks


def removed_at(ranks: Tensor, perturbable: Tensor, mode: str, k: Tensor) -> Tensor:
    """``[..., pos]`` booleans, the positions a step with ``k`` (per row) removes: generation
    removes every perturbable position but the ``k`` first of its order, pruning and morf the
    ``k`` first of theirs."""
    first = ranks < k.unsqueeze(-1)
    return perturbable & ~first if mode == "generation" else first


def ceil_steps(fraction: float, n: Tensor) -> Tensor:
    """``k = ceil(f N)`` per row, the language protocols' step size (``- 1e-9``: a product that
    rounds above an integer, ``0.30000000000000004 * 10``, does not count one position more)."""
    return torch.ceil(fraction * n.double() - 1e-9).long()


@dataclass
class Unit:
    """What the loop perturbs together: its maps ``{method: [..., pos]}`` (leading dims: rows
    that are removed from at once, e.g. the two sentences of a pair or a batch of images), which
    positions may be removed, and where its curves go (``rows`` of the ``[samples, steps]``
    curves). ``data`` is the protocol's own (tokens, target, images, ...)."""

    rows: Union[int, slice]
    maps: Dict[str, Tensor]
    perturbable: Tensor
    data: Any = None


@dataclass
class Perturbation:
    """What a protocol supplies to ``perturbation_curves``.

    ``modes`` names its curves and maps each to a removal order ("generation", "pruning" or
    "morf"); ``count(f, n)`` is how many positions step ``f`` removes (generation: re-inserts) of
    the ``n`` perturbable ones of each row; ``remove(unit, removed)`` builds the model input of
    one step from the positions ``removed [..., pos]`` (a tensor, or a tuple of tensors, whose
    dim 0 is the model's batch); ``score(unit, inputs)`` runs the model on the inputs of
    ``steps_per_forward`` consecutive steps (concatenated along dim 0) and returns
    ``{quantity: [steps, ...]}``, one entry per step (``...``: the unit's rows, where a step
    scores several). ``steps_per_forward=None``: every step of a unit and map, all modes, in one
    forward.
    """

    modes: Dict[str, str]
    fractions: Tensor
    count: Callable[[float, Tensor], Tensor]
    remove: Callable[[Unit, Tensor], Any]
    score: Callable[[Unit, Any], Dict[str, Tensor]]
    quantities: Tuple[str, ...]
    steps_per_forward: Optional[int] = None


def _concat(parts: List[Any]):
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _perturbed(protocol: Perturbation, unit: Unit, relevance: Tensor, fractions: List[float], n: Tensor):
    """The perturbed inputs of one unit and map, mode by mode, step by step."""
    for order in protocol.modes.values():
        ranks = removal_ranks(relevance, unit.perturbable, order)
        for f in fractions:
            yield protocol.remove(unit, removed_at(ranks, unit.perturbable, order, protocol.count(f, n)))


def perturbation_curves(protocol: Perturbation, units: Iterable[Unit], methods: Sequence[str], n_rows: int,
                        progress: bool = False, desc: str = "perturbation",
                        total: Optional[int] = None) -> Dict[str, Dict[str, Dict[str, Tensor]]]:
    """The perturbation loop: ``{method: {mode: {quantity: [n_rows, steps]}}}``.

    For each unit and each of its maps, every step of every mode removes the positions its
    fraction asks for (``removal_ranks`` / ``removed_at``), the protocol builds the input and
    scores it, ``steps_per_forward`` steps per forward, and the scores are filed under the
    unit's rows.
    """
    from tqdm.auto import tqdm

    fractions = protocol.fractions.tolist()
    n_steps = len(fractions) * len(protocol.modes)
    per_forward = protocol.steps_per_forward or n_steps
    curves = {m: {mode: {q: torch.zeros(n_rows, len(fractions), dtype=torch.float64) for q in protocol.quantities}
                  for mode in protocol.modes} for m in methods}
    for unit in tqdm(units, disable=not progress, desc=desc, total=total):
        n = unit.perturbable.sum(-1)
        for method, relevance in unit.maps.items():
            steps = _perturbed(protocol, unit, relevance, fractions, n)
            scores: Dict[str, List[Tensor]] = {q: [] for q in protocol.quantities}
            for _ in range(0, n_steps, per_forward):
                out = protocol.score(unit, _concat(list(islice(steps, per_forward))))
                for q in protocol.quantities:
                    scores[q].append(out[q])
            for q, parts in scores.items():
                values = torch.cat(parts)
                values = values.reshape(len(protocol.modes), len(fractions), *values.shape[1:])
                for j, mode in enumerate(protocol.modes):
                    curves[method][mode][q][unit.rows] = values[j].movedim(0, -1)
    return curves


def perturbed_inputs(tokens: Tensor, relevance: Tensor, perturbable: Tensor, mode: str,
                     mask_token: int, fractions: Tensor = FRACTIONS) -> Tensor:
    """``[steps, pos]`` inputs of one sample for ``mode`` (see the module docstring)."""
    ranks = removal_ranks(relevance, perturbable, mode)
    n = perturbable.sum(-1)
    inputs = torch.stack([torch.where(removed_at(ranks, perturbable, mode, ceil_steps(f, n)), mask_token, tokens)
                          for f in fractions.tolist()])
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


# ------------------------------------------------------------------------------- statistics
CONFIDENCE = 0.95
# percentile: the interval the tables always printed (quantiles of the resampled means), and
# defined where every sample is equal (pointing is often 1 everywhere), where BCa gives NaN
BOOTSTRAP_METHOD = "percentile"


def _interval(samples: Tuple[np.ndarray, ...], statistic, n_boot: int, seed: int, paired: bool) -> Tuple[float, float]:
    if samples[0].size < 2:  # one value: every resample is that value
        value = float(statistic(*samples, axis=-1))
        return value, value
    ci = stats.bootstrap(samples, statistic, n_resamples=n_boot, confidence_level=CONFIDENCE,
                         method=BOOTSTRAP_METHOD, paired=paired, vectorized=True,
                         rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def _numpy(values: Tensor) -> np.ndarray:
    return values.detach().double().flatten().cpu().numpy()


def bootstrap_mean(values: Tensor, n_boot: int = 1000, seed: int = 0) -> Tuple[float, float, float]:
    """Mean and its 95% percentile bootstrap interval (``scipy.stats.bootstrap``, ``n_boot``
    resamples drawn by ``numpy.random.default_rng(seed)``)."""
    mean = float(values.detach().double().flatten().cpu().mean())
    return (mean, *_interval((_numpy(values),), np.mean, n_boot, seed, paired=False))


def _mean_difference(a, b, axis=-1):
    return np.mean(a - b, axis=axis)


def paired_difference(a: Tensor, b: Tensor, n_boot: int = 1000, seed: int = 0) -> Tuple[float, float, float]:
    """Mean of ``a - b`` over paired samples (two methods on the same inputs) and its 95%
    percentile bootstrap interval, resampling the pairs together (``paired=True``)."""
    if a.shape != b.shape:
        raise ValueError(f"paired samples need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mean = float((a.detach().double() - b.detach().double()).flatten().cpu().mean())
    return (mean, *_interval((_numpy(a), _numpy(b)), _mean_difference, n_boot, seed, paired=True))


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


@takes_hf_models
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

    def remove(unit: Unit, removed: Tensor) -> Tensor:
        return torch.where(removed, mask_token, unit.data["tokens"])[None]

    def score(unit: Unit, inputs: Tensor) -> Dict[str, Tensor]:
        n, target = unit.data["tokens"].shape[-1], unit.data["target"]

        def last_only(act, hook=None):
            # only the explained position reaches the unembedding (a 262k vocabulary is most of
            # the cost of a forward on short inputs)
            return act[:, n - 1 : n]

        with torch.no_grad():
            out = family.forward(inputs.to(device), None, [(slice_at, last_only)])[:, -1].double()
        return {"prob": out.softmax(-1)[:, target].cpu(), "logit": out[:, target].cpu()}

    def units():
        for i in range(batch):
            n = int(lengths[i])
            yield Unit(i, {m: relevance[i, :n] for m, relevance in maps.items()}, perturbable[i, :n],
                       {"tokens": tokens[i, :n].cpu(), "target": int(targets[i])})

    protocol = Perturbation({mode: mode for mode in modes}, FRACTIONS, ceil_steps, remove, score, ("prob", "logit"))
    curves = perturbation_curves(protocol, units(), list(maps), batch, progress, "perturbation", total=batch)
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


@takes_hf_models
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
    if removal not in ("attention", "mask_token"):
        raise ValueError(f"removal must be 'attention' or 'mask_token', got {removal!r}")
    family = family_for(model)
    device = next(model.parameters()).device
    if removal == "mask_token":
        mask_token = default_mask_token(model) if mask_token is None else int(mask_token)
    hook = family.final_hidden_hook
    original = torch.zeros(len(pairs), dtype=torch.float64)

    def pooled(tokens: Tensor, mask: Tensor) -> Tensor:
        store = {}

        def grab(act, hook=None):
            store["h"] = act.detach()
            return act

        with torch.no_grad():
            family.forward(tokens.to(device), mask.to(device), [(hook, grab)])
        return mean_pool(store["h"].double(), mask.to(store["h"].device)).cpu()

    def remove(unit: Unit, removed: Tensor) -> Tuple[Tensor, Tensor]:
        """Both sentences at one step (each perturbed by its own map): ``(tokens, mask) [2, pos]``."""
        tokens, mask = unit.data["tokens"], unit.data["mask"]
        if removal == "attention":
            return tokens, mask * (~removed).long()
        return torch.where(removed, mask_token, tokens), mask

    def score(unit: Unit, inputs: Tuple[Tensor, Tensor]) -> Dict[str, Tensor]:
        """Each perturbed sentence against the other one whole; the two directions averaged."""
        embeddings = pooled(*inputs).view(-1, 2, unit.data["whole"].shape[-1])
        whole = unit.data["whole"]
        sims = [torch.nn.functional.cosine_similarity(embeddings[:, r], whole[1 - r][None], dim=-1) for r in range(2)]
        return {"similarity": (sims[0] + sims[1]) / 2}

    def units():
        for i, (a, b) in enumerate(pairs):
            needed = _explained_methods(methods) or ["grad_x_input"]  # one run gives the tokens
            explained = {m: explain_similarity(model, a, b, method=m) for m in needed}
            ref = explained[needed[0]]
            tokens, mask = ref.tokens.cpu(), ref.attention_mask.cpu()
            original[i] = float(ref.target_value.sum())
            # rollout: averaged over the rows that are pooled (the real tokens)
            maps = _maps(methods, explained, tokens.shape, seed + i,
                         lambda: mean_pool(rollout_matrix(model, tokens.to(device), mask.to(device)).cpu(), mask))
            perturbable = torch.zeros(tokens.shape, dtype=torch.bool)
            for r, n in enumerate(mask.sum(-1).tolist()):
                perturbable[r, 1 : n - 1] = True  # [CLS] and [SEP] stay
            yield Unit(i, maps, perturbable, {"tokens": tokens, "mask": mask, "whole": pooled(tokens, mask)})

    protocol = Perturbation({mode: mode for mode in modes}, FRACTIONS, ceil_steps, remove, score, ("similarity",))
    curves = perturbation_curves(protocol, units(), methods, len(pairs), progress, "similarity perturbation",
                                 total=len(pairs))
    curves = {m: {mode: c["similarity"] for mode, c in by_mode.items()} for m, by_mode in curves.items()}
    return SimilarityResult(curves, original)
