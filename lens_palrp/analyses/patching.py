"""PA-LRP side by side with activation patching, and relevance patching.

* ``compare_with_patching``: TransformerLens activation patching (each head's output at all
  positions, and the residual stream per layer and position, patched from the clean into the
  corrupted run) next to the relevance of the same components on the clean run, with Spearman
  and Pearson correlations.
* ``relevance_patching``: attribution patching (Nanda 2023) with LRP's modified gradients: the
  effect of patching a component is estimated as ``(clean - corrupted) . g`` where ``g`` is the
  gradient of the metric on the corrupted run, plain ("grad") or rule-modified ("attn_lrp",
  "pa_lrp"; the latter with the RoPE / ALiBi rules, whose positional share never reaches the
  components). One forward per input and one sweep per method, instead of one forward per patch.

Both run on a HookedTransformer and on a TransformerBridge (TransformerLens 3.9 and 4.x), in the
bridge's default hook naming and in its compatibility mode. TransformerLens' patching utilities
patch ``blocks.{l}.attn.hook_z`` and ``blocks.{l}.hook_resid_pre``: on the bridge these names are
aliases of its own hook points by default (``blocks.{l}.attn.o.hook_in``, ``blocks.{l}.hook_in``)
and resolve either way, so the utilities are used as they are (checked against patching the
Hugging Face modules by hand in ``tests/test_analyses_bridge.py``). The gradients are recorded
at the names the family's role map gives (``layer_hooks``), the hooks the rules sit on. Every
forward runs in eval mode, as ``explain``'s (``in_eval_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from scipy import stats
from torch import Tensor

from lens_palrp.analyses.common import in_eval_mode, layer_hooks
from lens_palrp.engine import explain
from lens_palrp.hooks import family_for
from lens_palrp.roles import Role
from lens_palrp.inputs import prepare_tokens


def _pair(a: Tensor, b: Tensor):
    return a.detach().double().flatten().cpu().numpy(), b.detach().double().flatten().cpu().numpy()


def _correlation(test, a: Tensor, b: Tensor) -> float:
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


@dataclass
class PatchingComparison:
    """Per-component scores (``[layers, heads]`` and ``[layers, pos]``) and their correlations."""

    patching_heads: Tensor
    patching_resid: Tensor
    scores_heads: Dict[str, Tensor]
    scores_resid: Dict[str, Tensor]
    correlations: Dict[str, Dict[str, float]] = field(default_factory=dict)
    str_tokens: List[str] = field(default_factory=list)
    what: str = "relevance"

    def table(self) -> List[dict]:
        """A tidy table: one row per component, the patching effect and every method's score."""
        rows = []
        L, H = self.patching_heads.shape
        for l in range(L):
            for h in range(H):
                row = {"component": "head", "layer": l, "index": h, "patching": float(self.patching_heads[l, h])}
                row.update({m: float(s[l, h]) for m, s in self.scores_heads.items()})
                rows.append(row)
        for l in range(self.patching_resid.shape[0]):
            for p in range(self.patching_resid.shape[1]):
                row = {"component": "resid_pre", "layer": l, "index": p,
                       "patching": float(self.patching_resid[l, p])}
                row.update({m: float(s[l, p]) for m, s in self.scores_resid.items()})
                rows.append(row)
        return rows

    def figure(self, method: str = None) -> go.Figure:
        """Patching effects next to one method's scores, per head and per residual position."""
        method = method or next(iter(self.scores_heads))
        fig = make_subplots(rows=2, cols=2, subplot_titles=[
            "activation patching: heads", f"{method}: heads",
            "activation patching: residual stream", f"{method}: residual stream"])
        grids = [(self.patching_heads, 1, 1), (self.scores_heads[method], 1, 2),
                 (self.patching_resid, 2, 1), (self.scores_resid[method], 2, 2)]
        for grid, r, c in grids:
            z = grid.double().tolist()
            limit = max(1e-12, float(grid.abs().max()))
            x = ([f"H{h}" for h in range(grid.shape[1])] if r == 1
                 else [f"{p}:{t}" for p, t in enumerate(self.str_tokens[: grid.shape[1]])])
            fig.add_trace(go.Heatmap(z=z, x=x, y=[f"L{l}" for l in range(grid.shape[0])], colorscale="RdBu",
                                     zmid=0, zmin=-limit, zmax=limit, showscale=False,
                                     hovertemplate="%{y} %{x}: %{z:.4g}<extra></extra>"), row=r, col=c)
        corr = self.correlations.get(method, {})
        fig.update_layout(title=f"Activation patching vs {method} ({self.what}); "
                          f"Spearman heads {corr.get('heads_spearman', float('nan')):.2f}, "
                          f"residual {corr.get('resid_spearman', float('nan')):.2f}", height=700)
        return fig


def _inputs(model, clean, corrupted):
    family = family_for(model)
    device = next(model.parameters()).device
    clean_batch = prepare_tokens(family, clean, None, None, device)
    clean_t, strs = clean_batch.tokens, clean_batch.str_tokens
    corr_t = prepare_tokens(family, corrupted, None, None, device).tokens
    if clean_t.shape != corr_t.shape or clean_t.shape[0] != 1:
        raise ValueError(
            f"clean and corrupted must be one prompt each with the same number of tokens, got "
            f"{tuple(clean_t.shape)} and {tuple(corr_t.shape)}"
        )
    return family, clean_t, corr_t, strs[0]


def _scalar_metric(metric: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda logits: metric(logits).sum()


def _batch_metric(metric: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def wrapped(logits):
        value = metric(logits)
        return value.reshape(1) if value.ndim == 0 else value
    return wrapped


@in_eval_mode
def activation_patching(model, clean, corrupted, metric) -> Dict[str, Tensor]:
    """Effect on ``metric`` of patching each head's output (all positions) and each residual
    stream position from the clean into the corrupted run, relative to the corrupted run."""
    from transformer_lens import patching

    family, clean_t, corr_t, _ = _inputs(model, clean, corrupted)
    for role in (Role.Z, Role.RESID_PRE):
        layer_hooks(family, role)  # the names the utilities patch are the family's
    scalar = _scalar_metric(metric)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_t)
        baseline = float(scalar(model(corr_t)))
        heads = patching.get_act_patch_attn_head_out_all_pos(model, corr_t, clean_cache, scalar)
        resid = patching.get_act_patch_resid_pre(model, corr_t, clean_cache, scalar)
    return {"heads": heads.detach().cpu() - baseline, "resid": resid.detach().cpu() - baseline}


@in_eval_mode
def compare_with_patching(model, clean, corrupted, metric: Callable[[Tensor], Tensor],
                          methods: Sequence[str] = ("pa_lrp", "attn_lrp")) -> PatchingComparison:
    """Activation patching per head / residual position next to each method's relevance of the
    same components on the clean run (``attr.heads``, ``attr.residual``), with correlations.

    ``metric(logits)`` returns a scalar or ``[1]`` (e.g. a logit difference at the last position).
    """
    family, clean_t, corr_t, strs = _inputs(model, clean, corrupted)
    patched = activation_patching(model, clean_t, corr_t, metric)
    scores_heads, scores_resid, corr = {}, {}, {}
    for method in methods:
        attr = explain(model, clean_t, _batch_metric(metric), method=method)
        scores_heads[method] = attr.heads[0].detach().cpu()
        scores_resid[method] = attr.residual[0, :-1].detach().cpu()
        corr[method] = _correlations(patched, scores_heads[method], scores_resid[method])
    return PatchingComparison(patched["heads"], patched["resid"], scores_heads, scores_resid, corr,
                              list(strs), "relevance on the clean run")


def _correlations(patched, heads, resid) -> Dict[str, float]:
    return {
        "heads_spearman": spearman(patched["heads"], heads), "heads_pearson": pearson(patched["heads"], heads),
        "resid_spearman": spearman(patched["resid"], resid), "resid_pearson": pearson(patched["resid"], resid),
    }


@in_eval_mode
def relevance_patching(model, clean, corrupted, metric: Callable[[Tensor], Tensor],
                       methods: Sequence[str] = ("grad", "attn_lrp", "pa_lrp"),
                       true_patching: bool = True) -> PatchingComparison:
    """Estimate every head's and residual position's patching effect as ``(clean - corrupted) . g``
    with ``g`` the plain or LRP-modified gradient of ``metric`` on the corrupted run; with
    ``true_patching`` also run activation patching and report the correlations."""
    family, clean_t, corr_t, strs = _inputs(model, clean, corrupted)
    z_names, r_names = layer_hooks(family, Role.Z), layer_hooks(family, Role.RESID_PRE)
    with torch.no_grad():  # one forward per input; the differences serve every method
        _, clean_cache = model.run_with_cache(clean_t, names_filter=z_names + r_names)
        _, corr_cache = model.run_with_cache(corr_t, names_filter=z_names + r_names)
    delta = {n: clean_cache[n] - corr_cache[n] for n in z_names + r_names}
    heads, resid = {}, {}
    for method in methods:
        lrp_method = "grad_x_input" if method == "grad" else method
        attr = explain(model, corr_t, _batch_metric(metric), method=lrp_method, record_gradients=z_names + r_names)
        heads[method] = torch.stack([(delta[n] * attr.gradients[n]).sum((0, 1, 3)) for n in z_names]).detach().cpu()
        resid[method] = torch.stack([(delta[n] * attr.gradients[n]).sum((0, 2)) for n in r_names]).detach().cpu()
    if true_patching:
        patched = activation_patching(model, clean_t, corr_t, metric)
    else:
        patched = {"heads": torch.full_like(heads[methods[0]], float("nan")),
                   "resid": torch.full_like(resid[methods[0]], float("nan"))}
    corr = {m: _correlations(patched, heads[m], resid[m]) for m in methods} if true_patching else {}
    return PatchingComparison(patched["heads"], patched["resid"], heads, resid, corr, list(strs),
                              "estimated patching effect")
