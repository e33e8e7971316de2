"""Activation patching over a set of prompt pairs, relevance patching, and how well they agree.

* ``activation_patching``: the effect on ``metric`` of patching one component from the clean into
  the corrupted run, for every pair and every component (``PatchingResult``). Our own hooks, on
  the names the family's role map gives; every pair of a batch in one forward per component.
* ``relevance_patching``: attribution patching (Nanda 2023) with plain ("grad") or LRP-modified
  gradients ("relp", "attn_lrp", "pa_lrp"): the effect is estimated as ``(clean - corrupted) . g``
  with ``g`` the gradient of ``metric`` on the corrupted run. One ``explain`` per method over the
  whole corrupted batch; activation patching only when asked (``patching=``).
* ``compare_with_patching``: each method's relevance of the same components on the clean run next
  to activation patching.

Both comparisons return a ``PatchingComparison``: ``agreement()`` (Spearman / Pearson with
bootstrap intervals over pairs), ``effects()`` (mean effect per component, with intervals),
``to_frame()`` and ``figure()``. See ``docs/patching.md``.

Components (``COMPONENTS``), each patched at one hook per layer:

* ``heads`` ``[n, layers, heads]``: one head's output (``attn.hook_z``, role ``Z``) at all positions;
* ``resid`` ``[n, layers, pos]``: the residual stream entering a layer (``hook_resid_pre``) at one position;
* ``mlp`` ``[n, layers]``: a layer's MLP output (``hook_mlp_out``) at all positions;
* ``head_pos`` ``[n, layers, heads, pos]``: one head's output at one position.

On a TransformerBridge these HookedTransformer names are aliases of the bridge's own hook points
and resolve in both hook namings (``tests/test_analyses_bridge.py`` checks the numbers against
patching the Hugging Face modules by hand). Every forward runs in eval mode (``in_eval_mode``).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from lens_palrp.analyses.common import in_eval_mode, layer_hooks, takes_hf_models
from lens_palrp.canonizers.logit_positions import LogitsAtPositions
from lens_palrp.engine import explain
from lens_palrp.hooks import family_for
from lens_palrp.inputs import prepare_tokens
from lens_palrp.roles import Role
from lens_palrp.targets import HookTarget, at_hook, takes_positions

COMPONENTS = ("heads", "resid", "mlp", "head_pos")
POSITIONAL = ("resid", "head_pos")  # indexed by position: not pooled across pairs of other lengths
HOOK_KIND = {"heads": "z", "head_pos": "z", "resid": "resid_pre", "mlp": "mlp_out"}
ESTIMATE_METHODS = ("grad", "relp", "attn_lrp", "pa_lrp")
Metric = Union[Callable[..., Tensor], HookTarget]  # on the logits, or lp.at_hook(name, fn) on an activation


# ---------------------------------------------------------------------------------- correlations
def _pair(a, b):
    a = a.detach().double().flatten().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a, float).ravel()
    b = b.detach().double().flatten().cpu().numpy() if isinstance(b, Tensor) else np.asarray(b, float).ravel()
    return a, b


def _correlation(test, a, b) -> float:
    """``test(a, b).statistic`` as a float; NaN where it is undefined (fewer than two values, or a
    constant input), silently, as for a constant patching grid."""
    x, y = _pair(a, b)
    if x.size < 2 or x.min() == x.max() or y.min() == y.max():
        return float("nan")
    return float(test(x, y).statistic)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson's correlation of the flattened tensors (``scipy.stats.pearsonr``)."""
    return _correlation(stats.pearsonr, a, b)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of the flattened tensors, ties at their mean rank
    (``scipy.stats.spearmanr``)."""
    return _correlation(stats.spearmanr, a, b)


def _rowwise(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Correlation of ``x[..., k]`` with ``y[..., k]`` along the last axis, for every leading index
    at once (``scipy.stats.pearsonr(axis=-1)``; Spearman = Pearson of the ``rankdata`` ranks, ties
    at their mean rank); NaN where a row is constant."""
    if kind == "spearman":
        x, y = stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1)
    constant = (np.ptp(x, axis=-1) == 0) | (np.ptp(y, axis=-1) == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = np.asarray(stats.pearsonr(x, y, axis=-1).statistic, dtype=float)
    return np.where(constant, np.nan, r)


def _bootstrap(data: Tuple[np.ndarray, ...], statistic, n_resamples: int, confidence: float, seed: int,
               method: str, **kwargs) -> Tuple[np.ndarray, np.ndarray]:
    """``scipy.stats.bootstrap`` over the first axis (the pairs), seeded; NaN bounds where fewer
    than two pairs leave nothing to resample."""
    n = len(data[0])
    if n < 2:
        shape = np.shape(statistic(*data, axis=0)) if kwargs.get("vectorized", True) else ()
        return np.full(shape, np.nan), np.full(shape, np.nan)
    with warnings.catch_warnings():  # a degenerate resample (all pairs alike) is not an error here
        warnings.simplefilter("ignore")
        res = stats.bootstrap(data, statistic, n_resamples=n_resamples, confidence_level=confidence,
                              method=method, rng=np.random.default_rng(seed), axis=0, **kwargs)
    return np.asarray(res.confidence_interval.low, float), np.asarray(res.confidence_interval.high, float)


# ---------------------------------------------------------------------------------- inputs
@dataclass
class _Pairs:
    clean: List[Tensor]  # one 1-D LongTensor per pair
    corrupted: List[Tensor]
    str_tokens: List[List[str]]

    def __len__(self):
        return len(self.clean)

    def groups(self) -> Dict[int, List[int]]:
        """Pair indices by length (pairs of one length share a forward)."""
        out: Dict[int, List[int]] = {}
        for i, t in enumerate(self.clean):
            out.setdefault(int(t.shape[0]), []).append(i)
        return out

    def stacked(self, idx: List[int]) -> Tuple[Tensor, Tensor]:
        """The clean and corrupted tokens ``[len(idx), pos]`` of pairs of one length."""
        return (torch.stack([self.clean[i] for i in idx]), torch.stack([self.corrupted[i] for i in idx]))

    @property
    def max_len(self) -> int:
        return max(int(t.shape[0]) for t in self.clean)


def _rows(family, spec, what: str, device) -> Tuple[List[Tensor], List[List[str]]]:
    """One token row per prompt: strings are tokenized one at a time (never padded to each other);
    a ``[n, pos]`` tensor is taken row by row as it is (no padding inferred)."""
    if isinstance(spec, np.ndarray):
        spec = torch.from_numpy(spec)
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Tensor):
        if spec.dtype.is_floating_point or spec.dtype == torch.bool:
            raise TypeError(f"{what}: token ids must be integers, got dtype {spec.dtype}")
        t = spec[None] if spec.ndim == 1 else spec
        if t.ndim != 2:
            raise ValueError(f"{what}: token ids must be [n, pos], got shape {tuple(spec.shape)}")
        batch = prepare_tokens(family, t, torch.ones_like(t), None, device)
        return list(batch.tokens), batch.str_tokens
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"{what}: no prompts")
        rows, strs = [], []
        for i, s in enumerate(spec):
            if not isinstance(s, str):
                raise TypeError(f"{what}[{i}]: prompts are strings (or pass a [n, pos] tensor), got {type(s).__name__}")
            batch = prepare_tokens(family, [s], None, None, device)
            rows.append(batch.tokens[0])
            strs.append(batch.str_tokens[0])
        return rows, strs
    raise TypeError(f"{what}: a string, a list of strings or a [n, pos] token tensor, got {type(spec).__name__}")


def _pairs(family, clean, corrupted, device) -> _Pairs:
    clean_rows, strs = _rows(family, clean, "clean", device)
    corr_rows, _ = _rows(family, corrupted, "corrupted", device)
    if len(clean_rows) != len(corr_rows):
        raise ValueError(f"clean has {len(clean_rows)} prompts and corrupted {len(corr_rows)}: they must pair up "
                         "(as many prompts in each)")
    for i, (a, b) in enumerate(zip(clean_rows, corr_rows)):
        if a.shape != b.shape:
            raise ValueError(
                f"pair {i}: clean has {a.shape[0]} tokens and corrupted {b.shape[0]}; both prompts of a pair "
                f"must have the same length (positions are patched one to one)"
            )
    return _Pairs(clean_rows, corr_rows, strs)


def _model_name(model) -> str:
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", "") or type(model).__name__)


def _component_hooks(family, components: Optional[Sequence[str]]) -> Dict[str, List[str]]:
    """The hook each component is patched at, per layer. ``None``: every component the model has
    (an attention-only model has no ``mlp``)."""
    default = components is None
    wanted = list(COMPONENTS if default else components)
    if isinstance(components, str):
        wanted = [components]
    unknown = [c for c in wanted if c not in COMPONENTS]
    if unknown or not wanted:
        raise ValueError(f"components: pick from {COMPONENTS}, got {list(wanted)!r}")
    hooks: Dict[str, List[str]] = {}
    for comp in dict.fromkeys(wanted):
        if HOOK_KIND[comp] == "z":
            hooks[comp] = layer_hooks(family, Role.Z)
        elif HOOK_KIND[comp] == "resid_pre":
            hooks[comp] = layer_hooks(family, Role.RESID_PRE)
        else:
            names = [get_act_name("mlp_out", layer) for layer in range(family.n_layers)]
            attn_only = bool(getattr(getattr(family.model, "cfg", None), "attn_only", False))
            missing = names if attn_only else [n for n in names if not family.has_hook(n)]
            if missing:
                if default:
                    continue
                raise ValueError(f"components: {family.name} has no hook {missing[0]!r} (no MLP output to "
                                 f"patch, e.g. an attention-only model); leave 'mlp' out")
            hooks[comp] = names
    return hooks


def _as_batch_metric(metric: Callable, pair_index: Tensor) -> Callable[[Tensor], Tensor]:
    """``metric`` as ``logits -> [batch]`` for rows that belong to the pairs ``pair_index``
    (a metric taking a second argument gets those indices, as ``logit_difference`` does)."""
    if not callable(metric):
        raise TypeError(f"metric must be a callable metric(logits) -> [batch], got {type(metric).__name__}")
    with_pairs = takes_positions(metric)

    def fn(logits: Tensor) -> Tensor:
        value = metric(logits, pair_index.to(logits.device)) if with_pairs else metric(logits)
        value = torch.as_tensor(value)
        if value.ndim == 0 and logits.shape[0] == 1:
            value = value.reshape(1)
        if value.shape != (logits.shape[0],):
            raise ValueError(f"metric must return one value per pair ([batch] = [{logits.shape[0]}]), "
                             f"got shape {tuple(value.shape)}")
        return value

    return fn


class _Measure:
    """The metric as patching's forwards and ``explain`` see it: ``metric(logits[, pairs])`` on the
    logits, or an ``lp.at_hook(name, fn)`` target, ``fn(activation[, pairs])`` on the activation at
    hook ``name`` read during the same forward (an encoder's sentence similarity, any internal
    scalar). Either way one value per row."""

    def __init__(self, metric, family):
        self.hook_name, fn = (metric.hook_name, metric.fn) if isinstance(metric, HookTarget) else (None, metric)
        if self.hook_name is not None and not family.has_hook(self.hook_name):
            raise ValueError(f"metric: the model has no hook point named {self.hook_name!r}")
        if not callable(fn):
            raise TypeError("metric must be a callable metric(logits) -> [batch] or an lp.at_hook(name, fn) target, "
                            f"got {type(metric).__name__}")
        self.fn, self.family = fn, family
        self._seen: Optional[Tensor] = None
        self._narrowed = False  # inside forwards(): the logits hold the logit difference's position only
        # a logit difference reads one position: the unembedding runs there only (a third of a
        # forward on a 262k-word vocabulary); any other callable may read any position and keeps all
        self.logit_difference = fn if isinstance(fn, LogitDifference) and family.unembed_module() is not None else None
        self._at_narrowed = (None if self.logit_difference is None else  # position 0 of the narrowed logits
                             LogitDifference(fn.correct, fn.wrong, 0))

    @contextmanager
    def forwards(self) -> Iterator[None]:
        """Around patching's forwards: with a logit difference, the unembedding is handed its
        position of the final residual only (``canonizers.LogitsAtPositions``, as ``explain`` does
        for logit targets); put back on exit, whatever happens."""
        if self.logit_difference is None:
            yield
            return
        narrowed = LogitsAtPositions(torch.tensor(self.logit_difference.position))
        narrowed.register(self.family, None)
        self._narrowed = True
        try:
            yield
        finally:
            self._narrowed = False
            narrowed.remove()

    def hooks(self) -> List[Tuple[str, Callable]]:
        """The hook keeping the activation the metric reads (none on the logits); put it after the
        patching hooks, so that at a patched hook point it sees the patched value."""
        if self.hook_name is None:
            return []

        def keep(act, hook=None):
            self._seen = act.detach()
        return [(self.hook_name, keep)]

    def hook_names(self) -> List[str]:
        return [] if self.hook_name is None else [self.hook_name]

    def fired_after(self, firing_order: Sequence[str]) -> List[str]:
        """The hooks of ``firing_order`` (one forward's) that fire after the metric's own."""
        if self.hook_name is None:
            return []
        return list(firing_order[firing_order.index(self.hook_name) + 1:])

    def read(self, logits: Tensor, pair_index: Tensor) -> Tensor:
        """The metric of the forward that just returned ``logits``."""
        if self._narrowed:  # logits of the logit difference's one position
            return _as_batch_metric(self._at_narrowed, pair_index)(logits)
        if self.hook_name is None:
            return _as_batch_metric(self.fn, pair_index)(logits)
        seen, self._seen = self._seen, None
        if seen is None:
            raise ValueError(f"the metric's hook {self.hook_name!r} did not run in the forward: "
                             "name a hook point of this model")
        return _as_batch_metric(self.fn, pair_index)(seen)

    def explain_target(self, pair_index: Tensor) -> Dict[str, object]:
        """``explain``'s ``target`` (and ``position``) for the rows of pairs ``pair_index``: a logit
        difference as explain's own (correct, wrong) pairs, so that its sweep too unembeds the
        one position; any other metric as a callable or an ``at_hook`` target."""
        if self.logit_difference is not None:
            correct, wrong = self.logit_difference.ids(len(pair_index), pair_index)
            return {"target": list(zip(correct.tolist(), wrong.tolist())), "position": self.logit_difference.position}
        fn = _as_batch_metric(self.fn, pair_index)
        return {"target": fn if self.hook_name is None else at_hook(self.hook_name, fn)}


# ---------------------------------------------------------------------------------- metric
class LogitDifference:
    """``logits[:, position, correct] - logits[:, position, wrong]`` with each pair's own ids;
    called as ``metric(logits, pairs)`` by the analyses (``pairs``: the pair index of each row)."""

    def __init__(self, correct: Tensor, wrong: Tensor, position: int):
        self.correct, self.wrong, self.position = correct, wrong, int(position)

    def ids(self, n_rows: int, pairs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The correct and wrong id of each of ``n_rows`` rows (``pairs``: each row's pair index)."""
        correct, wrong = self.correct, self.wrong
        if pairs is not None and correct.numel() > 1:
            correct, wrong = correct[pairs.to(correct.device)], wrong[pairs.to(correct.device)]
        if correct.numel() > 1 and correct.numel() != n_rows:
            raise ValueError(f"logit_difference holds ids for {correct.numel()} pairs, the logits are for "
                             f"{n_rows}; call it with the pair index of each row")
        return correct.expand(n_rows), wrong.expand(n_rows)

    def __call__(self, logits: Tensor, pairs: Optional[Tensor] = None) -> Tensor:
        correct, wrong = (ids.to(logits.device) for ids in self.ids(logits.shape[0], pairs))
        at = logits[:, self.position]
        rows = torch.arange(logits.shape[0], device=logits.device)
        return at[rows, correct] - at[rows, wrong]

    def __repr__(self):
        return f"logit_difference(correct={self.correct.tolist()}, wrong={self.wrong.tolist()}, position={self.position})"


def _ids(spec, model, what: str) -> Tensor:
    items = spec.tolist() if isinstance(spec, (Tensor, np.ndarray)) else spec
    items = [items] if isinstance(items, (int, str)) else list(items)
    ids = []
    for item in items:
        if isinstance(item, str):
            if model is None:
                raise ValueError(f"{what}: token strings need the model (logit_difference(..., model=model))")
            try:
                ids.append(int(model.to_single_token(item)))
            except (AssertionError, ValueError) as err:
                raise ValueError(f"{what}: {item!r} is not a single token of the model") from err
        elif isinstance(item, (int, np.integer)):
            ids.append(int(item))
        else:
            raise TypeError(f"{what}: token ids are ints or single-token strings, got {type(item).__name__}")
    if not ids:
        raise ValueError(f"{what}: no token ids")
    return torch.tensor(ids, dtype=torch.long)


def logit_difference(correct, wrong, position: int = -1, model=None) -> LogitDifference:
    """A metric ``logits -> [batch]``: the logit of ``correct`` minus that of ``wrong`` at
    ``position``, per pair. ``correct`` / ``wrong``: one id for every pair, or one per pair (ints,
    a list, a tensor, or single-token strings with ``model``), as IOI pairs each have their names."""
    c, w = _ids(correct, model, "correct"), _ids(wrong, model, "wrong")
    if c.numel() != w.numel() and 1 not in (c.numel(), w.numel()):
        raise ValueError(f"correct has {c.numel()} ids and wrong {w.numel()}: one each, or one per pair")
    n = max(c.numel(), w.numel())
    return LogitDifference(c.expand(n).clone(), w.expand(n).clone(), position)


# ---------------------------------------------------------------------------------- results
def _poolable(component: str, lengths: Sequence[int]) -> bool:
    """Whether the pairs' values of ``component`` may be averaged: position p is the same token in
    every pair only where the pairs have one length."""
    return component not in POSITIONAL or len(set(lengths)) <= 1


def _require_pooled(component: str, lengths: Sequence[int], what: str) -> None:
    if not _poolable(component, lengths):
        raise ValueError(f"{component}: the pairs have different lengths {sorted(set(lengths))}; "
                         f"position-indexed {what} are not pooled across them (group the pairs by length)")


@dataclass
class PatchingResult:
    """Activation patching over ``n`` pairs: ``effects[component]`` ``[n, ...]`` is
    ``metric(patched) - metric(corrupted)`` per pair (float64; position-indexed components are
    NaN past a shorter pair's end). Reusable: ``check_inputs`` refuses other inputs or models."""

    effects: Dict[str, Tensor]
    clean_metric: Tensor
    corrupted_metric: Tensor
    str_tokens: List[List[str]]
    model_name: str
    clean_tokens: List[Tensor]
    corrupted_tokens: List[Tensor]
    hooks: Dict[str, List[str]] = field(default_factory=dict)

    heads = property(lambda self: self.effects.get("heads"))
    resid = property(lambda self: self.effects.get("resid"))
    mlp = property(lambda self: self.effects.get("mlp"))
    head_pos = property(lambda self: self.effects.get("head_pos"))

    @property
    def n_pairs(self) -> int:
        return len(self.clean_tokens)

    @property
    def lengths(self) -> List[int]:
        return [int(t.shape[0]) for t in self.clean_tokens]

    def check_inputs(self, model, pairs: "_Pairs") -> None:
        """Refuse reuse with another model or other prompts: the effects would be of something else."""
        if _model_name(model) != self.model_name:
            raise ValueError(f"this PatchingResult was computed on model {self.model_name!r}, not "
                             f"{_model_name(model)!r}; compute activation patching for this model")
        same = len(pairs) == self.n_pairs and all(
            torch.equal(a.cpu(), b.cpu()) and torch.equal(c.cpu(), d.cpu())
            for a, b, c, d in zip(pairs.clean, self.clean_tokens, pairs.corrupted, self.corrupted_tokens))
        if not same:
            raise ValueError(f"this PatchingResult was computed for other inputs ({self.n_pairs} pairs with other "
                             f"tokens); pass the same clean and corrupted prompts, or patching=True")

    def mean(self, component: str) -> Tensor:
        """The pair-mean effect; refused for a position-indexed component over pairs of different
        lengths (position p is not the same token there)."""
        _require_pooled(component, self.lengths, "effects")
        return self.effects[component].mean(0)

    def to_frame(self):
        """Tidy per-pair table: pair, component, layer, head, pos, effect (NaN entries dropped)."""
        return _long_frame({"patching": self.effects})


def _indexes(component: str, shape) -> Dict[str, np.ndarray]:
    """Layer / head / position labels of each flattened entry of a ``component`` grid."""
    grids = np.indices(shape).reshape(len(shape), -1)
    names = {"heads": ("layer", "head"), "resid": ("layer", "pos"), "mlp": ("layer",),
             "head_pos": ("layer", "head", "pos")}[component]
    out = {"layer": grids[0], "head": np.full(grids.shape[1], -1), "pos": np.full(grids.shape[1], -1)}
    out.update({name: grids[i] for i, name in enumerate(names)})
    return out


def _long_frame(sources: Dict[str, Dict[str, Tensor]]):
    import pandas as pd

    frames = []
    for source, by_comp in sources.items():
        for comp, grid in by_comp.items():
            values = grid.detach().double().cpu().numpy()
            n = values.shape[0]
            idx = _indexes(comp, values.shape[1:])
            k = idx["layer"].size
            frame = pd.DataFrame({"source": source, "component": comp, "pair": np.repeat(np.arange(n), k),
                                  "layer": np.tile(idx["layer"], n), "head": np.tile(idx["head"], n),
                                  "pos": np.tile(idx["pos"], n), "value": values.reshape(n, k).ravel()})
            frames.append(frame[np.isfinite(frame["value"])])
    return pd.concat(frames, ignore_index=True)


@dataclass
class PatchingComparison:
    """Each method's per-pair scores (``scores[method][component]``, the shapes of
    ``PatchingResult.effects``) next to activation patching (``patching``, or None: estimates only).
    ``what`` says what the scores are ("estimated patching effect" or "relevance on the clean run")."""

    scores: Dict[str, Dict[str, Tensor]]
    patching: Optional[PatchingResult]
    str_tokens: List[List[str]]
    what: str
    lengths: List[int] = field(default_factory=list)

    @property
    def methods(self) -> List[str]:
        return list(self.scores)

    @property
    def components(self) -> List[str]:
        """The components scored (and, where there is activation patching, patched too)."""
        comps = list(next(iter(self.scores.values()))) if self.scores else list(self.patching.effects)
        return [c for c in comps if self.patching is None or c in self.patching.effects]

    @property
    def n_pairs(self) -> int:
        return len(self.str_tokens)

    def _pooled_ok(self, component: str) -> bool:
        return _poolable(component, self.lengths)

    def _require_patching(self, what: str) -> PatchingResult:
        if self.patching is None:
            raise ValueError(f"{what} needs activation patching: this comparison holds estimates only "
                             f"(relevance_patching(..., patching=True) or patching=<PatchingResult>)")
        return self.patching

    def agreement(self, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
                  ci_method: str = "percentile"):
        """One row per (method, component, statistic): ``value`` with its bootstrap interval
        (``low``, ``high``) over pairs, and ``n_pairs``. Statistics: ``spearman_of_means`` /
        ``pearson_of_means`` (the pair-mean effects vs the pair-mean scores, over components), and
        ``mean_spearman_per_pair`` / ``mean_pearson_per_pair`` (each pair's own correlation,
        averaged). Position-indexed components over pairs of different lengths get per-pair rows
        only (a warning says so)."""
        import pandas as pd

        patching = self._require_patching("agreement()")
        rows, skipped = [], []
        for method in self.methods:
            for comp in self.components:
                P = patching.effects[comp].double().cpu().numpy().reshape(self.n_pairs, -1)
                E = self.scores[method][comp].double().cpu().numpy().reshape(self.n_pairs, -1)
                for kind in ("spearman", "pearson"):
                    if self._pooled_ok(comp):
                        value = float(_rowwise(kind, P.mean(0), E.mean(0)))

                        def of_means(idx, axis=-1, kind=kind):
                            idx = np.moveaxis(np.asarray(idx), axis, -1)
                            return _rowwise(kind, P[idx].mean(-2), E[idx].mean(-2))

                        low, high = _bootstrap((np.arange(self.n_pairs),), of_means, n_resamples, confidence,
                                               seed, ci_method, vectorized=True)
                        rows.append((method, comp, f"{kind}_of_means", value, float(low), float(high),
                                     self.n_pairs))
                    elif kind == "spearman":
                        skipped.append(comp)
                    per_pair = np.array([
                        float(_rowwise(kind, p[np.isfinite(p)], e[np.isfinite(p)])) if np.isfinite(p).sum() > 1
                        else np.nan for p, e in zip(P, E)])
                    per_pair = per_pair[np.isfinite(per_pair)]
                    value = float(per_pair.mean()) if per_pair.size else float("nan")
                    low, high = _bootstrap((per_pair,), np.mean, n_resamples, confidence, seed, ci_method,
                                           vectorized=True)
                    rows.append((method, comp, f"mean_{kind}_per_pair", value, float(low), float(high),
                                 int(per_pair.size)))
        if skipped:
            warnings.warn(f"{sorted(set(skipped))}: the pairs have different lengths {sorted(set(self.lengths))}, "
                          f"so position-indexed effects are not pooled (per-pair statistics only)", stacklevel=2)
        return pd.DataFrame(rows, columns=["method", "component", "statistic", "value", "low", "high", "n_pairs"])

    def effects(self, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
                ci_method: str = "percentile"):
        """The mean over pairs of each component's effect (``source`` "patching") and of each
        method's score, with bootstrap intervals over pairs; columns source, component, layer,
        head, pos, mean, low, high, n_pairs (position-indexed components only where every pair
        has the same length)."""
        import pandas as pd

        frames = []
        for source, by_comp in self._sources().items():
            for comp, grid in by_comp.items():
                if not self._pooled_ok(comp):
                    continue
                X = grid.double().cpu().numpy().reshape(self.n_pairs, -1)
                low, high = _bootstrap((X,), np.mean, n_resamples, confidence, seed, ci_method, vectorized=True)
                idx = _indexes(comp, grid.shape[1:])
                frames.append(pd.DataFrame({"source": source, "component": comp, **idx, "mean": X.mean(0),
                                            "low": low, "high": high, "n_pairs": self.n_pairs}))
        return pd.concat(frames, ignore_index=True)

    def to_frame(self):
        """Tidy per-pair table: source (patching or a method), component, pair, layer, head, pos, value."""
        return _long_frame(self._sources())

    def _sources(self) -> Dict[str, Dict[str, Tensor]]:
        """Activation patching's effects first (where there are some), then each method's scores."""
        head = {} if self.patching is None else {"patching": self.patching.effects}
        return {**head, **self.scores}

    table = to_frame

    def mean(self, method: str, component: str) -> Tensor:
        _require_pooled(component, self.lengths, "scores")
        return self.scores[method][component].mean(0)

    def figure(self, method: Optional[str] = None, components: Optional[Sequence[str]] = None,
               height: int = 900) -> go.Figure:
        """Pair-mean activation patching (left) next to ``method``'s pair-mean scores (right), one
        row per component; each panel has its own symmetric colour scale and colour bar; layer 0
        at the top and every layer labelled."""
        patching = self._require_patching("figure()")
        method = method or self.methods[0]
        if method not in self.scores:
            raise ValueError(f"no method {method!r} here; these are {self.methods}")
        comps = [c for c in (components or self.components) if self._pooled_ok(c)]
        if not comps:
            raise ValueError("nothing to draw: position-indexed components are not pooled over pairs of different lengths")
        fig = make_subplots(rows=len(comps), cols=2, horizontal_spacing=0.18, vertical_spacing=0.12,
                            subplot_titles=[t for c in comps for t in (f"activation patching: {c}", f"{method}: {c}")])
        n_layers = patching.effects[comps[0]].shape[1]
        layers = [f"L{l}" for l in range(n_layers)]
        strs = self.str_tokens[0]
        for r, comp in enumerate(comps, start=1):
            for c, grid in enumerate((patching.mean(comp), self.mean(method, comp)), start=1):
                z, x, y = self._panel(comp, grid, layers, strs)
                limit = max(1e-12, float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1e-12)
                axis = fig.get_subplot(r, c)
                x0, x1 = axis.xaxis.domain
                y0, y1 = axis.yaxis.domain
                fig.add_trace(go.Heatmap(z=z.tolist(), x=x, y=y, colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
                                         colorbar=dict(x=x1 + 0.01, y=(y0 + y1) / 2, len=(y1 - y0), thickness=10),
                                         hovertemplate="%{y} %{x}: %{z:.4g}<extra></extra>"), row=r, col=c)
                fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=y, ticktext=y, row=r, col=c)
        fig.update_layout(title=f"Activation patching vs {method} ({self.what}), mean over {self.n_pairs} pairs",
                          height=height)
        return fig

    @staticmethod
    def _panel(comp, grid, layers, strs):
        g = grid.double().cpu().numpy()
        if comp == "heads":
            return g, [f"H{h}" for h in range(g.shape[1])], layers
        if comp == "resid":
            return g, [f"{p}:{t}" for p, t in enumerate(strs[: g.shape[1]])], layers
        if comp == "mlp":
            return g[:, None], ["MLP"], layers
        L, H, T = g.shape  # head_pos: one row per (layer, head)
        return g.reshape(L * H, T), [f"{p}:{t}" for p, t in enumerate(strs[:T])], \
            [f"L{l}H{h}" for l in range(L) for h in range(H)]


# ---------------------------------------------------------------------------------- patching
def _capture(family, tokens: Tensor, names: Sequence[str], extra=()) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Logits and the activations at ``names`` of one hooked forward (no gradient), keyed in the
    order the hooks fired; ``extra`` hooks run after the keepers."""
    acts: Dict[str, Tensor] = {}

    def keeper(name):
        def keep(act, hook=None):
            acts[name] = act.detach().clone()
        return keep

    with torch.no_grad():
        logits = family.forward(tokens, None, [(n, keeper(n)) for n in dict.fromkeys(names)] + list(extra))
    return logits, acts


def _sites(component: str, n_layers: int, n_heads: int, n_pos: int):
    """Every patched unit of ``component``: ``(layer, head or None, pos or None)``."""
    if component == "heads":
        return [(l, h, None) for l in range(n_layers) for h in range(n_heads)]
    if component == "resid":
        return [(l, None, p) for l in range(n_layers) for p in range(n_pos)]
    if component == "mlp":
        return [(l, None, None) for l in range(n_layers)]
    return [(l, h, p) for l in range(n_layers) for h in range(n_heads) for p in range(n_pos)]


def _select(component, head, pos) -> Tuple:
    """Index into one row's activation (``act_shape`` without the batch) that the unit covers."""
    p = slice(None) if pos is None else pos
    if HOOK_KIND[component] == "z":
        return (p, head)
    return (p,)


def _patch_forward(family, corr_tokens, clean_acts, hooks, jobs, measure: _Measure, pair_index: Tensor):
    """One forward: row ``i`` is pair ``jobs[i][0]`` (index within the group) with unit ``jobs[i][1:]``
    of component ``jobs[i][1]`` patched from its clean run; returns the metric per row."""
    by_name: Dict[str, List[Tuple[int, int, Tuple]]] = {}
    for row, (pair, comp, layer, head, pos) in enumerate(jobs):
        name = hooks[comp][layer]
        by_name.setdefault(name, []).append((row, pair, _select(comp, head, pos)))

    def patcher(name, entries):
        def patch(act, hook=None):
            act = act.clone()
            for row, pair, index in entries:
                act[(row,) + index] = clean_acts[name][(pair,) + index].to(act.dtype)
            return act
        return patch

    rows = torch.tensor([j[0] for j in jobs], device=corr_tokens.device)
    logits = family.forward(corr_tokens[rows], None,
                            [(n, patcher(n, e)) for n, e in by_name.items()] + measure.hooks())
    return measure.read(logits, pair_index)


@takes_hf_models
@in_eval_mode
def activation_patching(model, clean, corrupted, metric: Metric, *, components: Optional[Sequence[str]] = None,
                        batch_size: int = 64, progress: bool = True) -> PatchingResult:
    """Patch each unit of each component from the clean into the corrupted run, for every pair.

    ``clean`` / ``corrupted``: one string each, lists of strings, or ``[n, pos]`` token tensors;
    the two prompts of a pair must have the same length (pairs of different lengths are run in
    groups by length). ``metric(logits) -> [batch]`` per row (or ``metric(logits, pairs)``,
    ``pairs`` the pair index of each row, as ``logit_difference`` takes it), or
    ``lp.at_hook(name, fn)``: ``fn(activation[, pairs])`` on the activation at hook ``name`` (an
    encoder's pooled similarity, a neuron, a direction). ``components``: a
    subset of ``COMPONENTS``, None for every one the model has. ``batch_size``: rows per forward,
    a row being one pair with one unit patched (all pairs of a group for one unit share a forward,
    and further units fill the batch). One progress bar over the whole job.
    """
    family = family_for(model)
    pairs = _pairs(family, clean, corrupted, next(model.parameters()).device)
    return _patch_pairs(model, family, pairs, metric, _component_hooks(family, components), batch_size, progress)


def _patch_pairs(model, family, pairs: _Pairs, metric, hooks, batch_size, progress) -> PatchingResult:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    measure = _Measure(metric, family)
    names = sorted({n for ns in hooks.values() for n in ns})
    n, L, T_max, H = len(pairs), family.n_layers, pairs.max_len, int(model.cfg.n_heads)
    groups = pairs.groups()
    effects = _empty(hooks, n, L, H, T_max)
    clean_metric = torch.zeros(n, dtype=torch.float64)
    corr_metric = torch.zeros(n, dtype=torch.float64)
    plans = [(idx, [(j, comp) + site for comp in hooks for site in _sites(comp, L, H, T) for j in range(len(idx))])
             for T, idx in groups.items()]  # unit-major: the pairs of one unit fill a forward together
    bar = tqdm(total=sum(math.ceil(len(jobs) / batch_size) for _, jobs in plans), desc="activation patching",
               disable=not progress, unit="forward")
    with bar, measure.forwards():  # the bar closed and the unembedding put back, whatever happens
        for idx, jobs in plans:
            idx_t = torch.tensor(idx)
            clean_t, corr_t = pairs.stacked(idx)
            clean_logits, clean_acts = _capture(family, clean_t, names, measure.hooks())
            clean_metric[idx_t] = measure.read(clean_logits, idx_t).detach().double().cpu()
            for comp in hooks:
                if HOOK_KIND[comp] == "z" and clean_acts[hooks[comp][0]].shape[2] != H:
                    raise NotImplementedError(f"{hooks[comp][0]} holds {tuple(clean_acts[hooks[comp][0]].shape)}, "
                                              f"not [batch, pos, {H} heads, d_head]: heads cannot be patched one by one")
            with torch.no_grad():
                corr_metric[idx_t] = measure.read(family.forward(corr_t, None, measure.hooks()),
                                                  idx_t).detach().double().cpu()
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                rows_pairs = idx_t[[j[0] for j in chunk]]
                with torch.no_grad():
                    values = _patch_forward(family, corr_t, clean_acts, hooks, chunk, measure,
                                            rows_pairs).detach().double().cpu()
                for (j, comp, layer, head, pos), v in zip(chunk, values - corr_metric[rows_pairs]):
                    effects[comp][(idx[j], layer) + tuple(i for i in (head, pos) if i is not None)] = v
                bar.update(1)
    return PatchingResult(effects, clean_metric, corr_metric, pairs.str_tokens, _model_name(model),
                          [t.cpu() for t in pairs.clean], [t.cpu() for t in pairs.corrupted], hooks)


# ---------------------------------------------------------------------------------- estimates
def _lrp_name(method: str) -> str:
    return "grad_x_input" if method == "grad" else method


def _reduce(component: str, grid: Tensor, T_max: int) -> Tensor:
    """A ``[b, pos, ...]`` product (delta x gradient, or relevance) summed to the component's shape
    for one layer: heads ``[b, H]``, resid ``[b, pos]``, mlp ``[b]``, head_pos ``[b, H, pos]``."""
    if component == "heads":
        return grid.sum((1, 3))
    if component == "mlp":
        return grid.sum((1, 2))
    return _pad_positions(grid.sum(2) if component == "resid" else grid.sum(3).transpose(1, 2), T_max)


def _pad_positions(grid: Tensor, T_max: int) -> Tensor:
    """``grid [..., pos]`` NaN-padded to ``T_max`` positions (a shorter pair's missing ones)."""
    pad = T_max - grid.shape[-1]
    return torch.nn.functional.pad(grid, (0, pad), value=float("nan")) if pad else grid


def _empty(hooks, n, L, H, T_max):
    shapes = {"heads": (n, L, H), "resid": (n, L, T_max), "mlp": (n, L), "head_pos": (n, L, H, T_max)}
    return {c: torch.full(shapes[c], float("nan"), dtype=torch.float64) for c in hooks}


def _check_methods(methods) -> List[str]:
    methods = [methods] if isinstance(methods, str) else list(methods)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods: each method once, got {methods}")
    return methods


def _resolve_patching(model, pairs, patching, metric, components, batch_size, progress) -> Optional[PatchingResult]:
    if patching is None or patching is False:
        return None
    if patching is True:
        return _patch_pairs(model, family_for(model), pairs, metric, components, batch_size, progress)
    if isinstance(patching, PatchingResult):
        patching.check_inputs(model, pairs)
        return patching
    raise TypeError(f"patching: None, True or a PatchingResult, got {type(patching).__name__}")


def _check_same_metric(patching: Optional[PatchingResult], idx, values: Tensor, which: str) -> None:
    """The metric the scores were computed with must be the one the PatchingResult was: its value
    on the clean / corrupted run is compared (a reused result with another metric is refused)."""
    if patching is None:
        return
    stored = (patching.clean_metric if which == "clean" else patching.corrupted_metric)[idx]
    values = values.detach().double().cpu()
    scale = max(1.0, float(stored.abs().max()))
    if not torch.allclose(values, stored, rtol=1e-3, atol=1e-5 * scale):
        raise ValueError(f"the metric on the {which} run ({values[:3].tolist()}...) differs from the one the "
                         f"PatchingResult holds ({stored[:3].tolist()}...): it was computed with another metric")


def _run_estimates(model, clean, corrupted, metric, methods, patching, components, batch_size, progress,
                   on_clean: bool) -> PatchingComparison:
    family = family_for(model)
    device = next(model.parameters()).device
    pairs = _pairs(family, clean, corrupted, device)
    hooks = _component_hooks(family, components)
    methods = _check_methods(methods)
    measure = _Measure(metric, family)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    patched = _resolve_patching(model, pairs, patching, metric, hooks, 64, progress)
    n, L, T_max = len(pairs), family.n_layers, pairs.max_len
    names = sorted({nm for ns in hooks.values() for nm in ns})
    scores: Dict[str, Dict[str, Tensor]] = {}
    chunks = [(T, idx[s:s + (batch_size or len(idx))]) for T, idx in pairs.groups().items()
              for s in range(0, len(idx), batch_size or len(idx))]
    bar = tqdm(total=len(chunks) * len(methods), desc="relevance" if on_clean else "relevance patching",
               disable=not progress, unit="explain")
    with bar:
        for T, idx in chunks:
            idx_t = torch.tensor(idx)
            clean_t, corr_t = pairs.stacked(idx)
            if not on_clean:  # one forward per input; the differences serve every method
                with measure.forwards():
                    _, clean_acts = _capture(family, clean_t, names)
                    _, corr_acts = _capture(family, corr_t, names + measure.hook_names())
                past_metric = measure.fired_after(list(corr_acts))
            H = None
            for method in methods:
                tokens = clean_t if on_clean else corr_t
                attr = explain(model, tokens, **measure.explain_target(idx_t), method=_lrp_name(method),
                               attention_mask=torch.ones_like(tokens), record_gradients=None if on_clean else names)
                _check_same_metric(patched, idx_t, attr.target_value, "clean" if on_clean else "corrupted")
                H = attr.heads.shape[2]
                out = scores.setdefault(method, _empty(hooks, n, L, H, T_max))
                for comp, comp_names in hooks.items():
                    if on_clean:
                        grid = _relevance(comp, attr, T_max)
                    else:
                        grid = torch.stack([
                            _reduce(comp, ((clean_acts[nm] - corr_acts[nm]).double()
                                           * _gradient(attr, nm, clean_acts[nm], past_metric)), T_max)
                            for nm in comp_names], dim=1)
                    out[comp][idx_t] = grid.detach().double().cpu()
                bar.update(1)
    what = "relevance on the clean run" if on_clean else "estimated patching effect"
    return PatchingComparison(scores, patched, pairs.str_tokens, what, [int(t.shape[0]) for t in pairs.clean])


def _gradient(attr, name: str, like: Tensor, past_metric: Sequence[str]) -> Tensor:
    """The recorded (rule-modified) gradient at ``name``, as float64 on ``like``'s device. Under an
    ``at_hook`` metric the sweep's forward stops at the metric's hook, so a hook that fires after
    it (``past_metric``, seen in a full forward) records nothing: the metric does not depend on it,
    and its gradient is exactly 0."""
    if name in past_metric:
        return torch.zeros_like(like, dtype=torch.float64)
    return attr.gradients[name].to(like.device).double()


def _relevance(component: str, attr, T_max: int) -> Tensor:
    """The relevance of the component's units on the clean run, in the component's shape."""
    if component == "heads":
        return attr.heads
    if component == "mlp":
        return attr.mlp.sum(-1)
    return _pad_positions(attr.residual[:, :-1] if component == "resid" else attr.heads_by_pos, T_max)


@takes_hf_models
@in_eval_mode
def relevance_patching(model, clean, corrupted, metric: Metric,
                       methods: Sequence[str] = ESTIMATE_METHODS, *,
                       patching: Union[None, bool, PatchingResult] = None,
                       components: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                       progress: bool = False) -> PatchingComparison:
    """Estimate every unit's patching effect as ``(clean - corrupted) . g``, ``g`` the plain
    ("grad") or rule-modified gradient of ``metric`` on the corrupted run, recorded at the
    patched hooks by one ``explain`` per method over the whole corrupted batch (``batch_size``:
    pairs per ``explain``, None: every pair of a length at once).

    ``patching``: None (default) gives estimates only (no activation patching is run); a
    ``PatchingResult`` of the same model, prompts and metric is reused; True computes it.
    """
    return _run_estimates(model, clean, corrupted, metric, methods, patching, components, batch_size, progress,
                          on_clean=False)


@takes_hf_models
@in_eval_mode
def compare_with_patching(model, clean, corrupted, metric: Metric,
                          methods: Sequence[str] = ("pa_lrp", "attn_lrp"), *,
                          patching: Optional[PatchingResult] = None,
                          components: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                          progress: bool = False) -> PatchingComparison:
    """Each method's relevance of the patched units on the clean run (``attr.heads``,
    ``attr.residual``, ``attr.mlp`` summed over positions, ``attr.heads_by_pos``) next to
    activation patching: ``patching`` reused when given, computed otherwise."""
    return _run_estimates(model, clean, corrupted, metric, methods, True if patching is None else patching,
                          components, batch_size, progress, on_clean=True)
