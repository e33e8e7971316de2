"""Dataset-level statistics of many explanations, collected one batch at a time.

A single ``Attribution`` says which heads and positions mattered for one prompt; a claim about a
model ("head 3.1 carries positional information") needs the same numbers over a dataset, with
their spread. ``collect`` walks an iterable of ``Attribution`` batches (padded or not, each
example read as ``[i, :n_i]`` in the right-aligned layout, docs/inputs-and-safety.md) and keeps
only small things: per-prompt head totals ``[n, layers, heads]``, per-prompt layer shares
``[n, layers]`` and running float64 sums over query-minus-key distances. It never holds more
than the batch it is reading, so a dataset of any size can be streamed from disk or from
``explain`` calls.

Every figure has a ``*_data`` twin returning the plotted numbers, as in ``plots.py``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import plotly.graph_objects as go
import torch
from torch import Tensor

from lens_palrp.analyses.plots import DIVERGING, write_html
from lens_palrp.result import Attribution

WHICH = ("positional", "semantic")
_BOOT_CHUNK = 64  # bootstrap resamples drawn per step: bounds memory, fixed so a seed is reproducible


@dataclass
class DatasetStats:
    """What ``collect`` keeps of a dataset of explanations (CPU, float64).

    ``positional_per_prompt`` / ``heads_per_prompt`` ``[n, layers, heads]``: each prompt's
    attention-level positional relevance summed over positions, and ``attr.heads`` (the relevance
    each head writes into the residual stream); ``*_mean`` / ``*_std`` their mean and standard
    deviation over prompts (``std`` with Bessel's correction, 0 for a single prompt).
    ``layer_share_heads_*`` / ``layer_share_positional_*`` ``[layers]``: per prompt, each layer's
    share of ``sum |heads|`` and of ``sum |positional|`` (over heads and positions), then mean and
    std over prompts. ``by_distance_mean`` / ``by_distance_std`` ``[layers, heads, D]``: the
    positional relevance at key position ``j = q - d`` for the explained position ``q``, averaged
    over the ``by_distance_count[d]`` prompts with ``q >= d``. ``positional_ci`` / ``heads_ci``
    ``[2, layers, heads]``: bootstrap percentile interval (low, high) of each head's mean, or None
    when collected with ``n_boot=0``.
    """

    n: int
    method: str
    model_name: str
    positional_per_prompt: Tensor
    heads_per_prompt: Tensor
    positional_mean: Tensor
    positional_std: Tensor
    heads_mean: Tensor
    heads_std: Tensor
    layer_share_heads_per_prompt: Tensor
    layer_share_positional_per_prompt: Tensor
    layer_share_heads_mean: Tensor
    layer_share_heads_std: Tensor
    layer_share_positional_mean: Tensor
    layer_share_positional_std: Tensor
    by_distance_mean: Tensor
    by_distance_std: Tensor
    by_distance_count: Tensor
    positional_ci: Optional[Tensor] = None
    heads_ci: Optional[Tensor] = None
    n_boot: int = 0
    seed: int = 0
    confidence: float = 0.95

    @property
    def n_layers(self) -> int:
        return int(self.positional_mean.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.positional_mean.shape[1])

    @property
    def max_distance(self) -> int:
        return int(self.by_distance_count.shape[0]) - 1

    def per_prompt(self, which: str = "positional") -> Tensor:
        """``[n, layers, heads]`` head totals: ``"positional"`` or ``"semantic"`` (``attr.heads``)."""
        return _check_which(which, self.positional_per_prompt, self.heads_per_prompt)


def _check_which(which: str, positional, semantic):
    if which == "positional":
        return positional
    if which == "semantic":
        return semantic
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")


def _mean_std(values: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and Bessel-corrected std over dim 0; std 0 for one row (no spread is measured)."""
    mean = values.mean(0)
    std = values.std(0) if values.shape[0] > 1 else torch.zeros_like(mean)
    return mean, std


def _shares(mass: Tensor) -> Tensor:
    """``[b, layers]`` absolute mass -> each layer's share; a prompt with no mass has shares 0."""
    total = mass.sum(-1, keepdim=True)
    return mass / torch.where(total == 0, torch.ones_like(total), total)


class _DistanceSums:
    """Running float64 sums of positional relevance by query-minus-key distance, grown as longer
    prompts arrive (the max distance is unknown until the stream ends)."""

    def __init__(self, layers: int, heads: int):
        self.sum = torch.zeros(layers, heads, 0, dtype=torch.float64)
        self.sumsq = torch.zeros(layers, heads, 0, dtype=torch.float64)
        self.count = torch.zeros(0, dtype=torch.long)

    def _grow(self, size: int) -> None:
        extra = size - self.count.shape[0]
        if extra > 0:
            pad = self.sum.new_zeros(*self.sum.shape[:2], extra)
            self.sum = torch.cat([self.sum, pad], -1)
            self.sumsq = torch.cat([self.sumsq, pad.clone()], -1)
            self.count = torch.cat([self.count, self.count.new_zeros(extra)])

    def add(self, positional: Tensor, query: Tensor, mask: Tensor) -> None:
        """``positional [b, L, H, pos]``, ``query [b]`` (explained positions), ``mask [b, pos]``."""
        b, layers, heads, n_pos = positional.shape
        distance = torch.arange(n_pos, device=positional.device)
        key = query[:, None] - distance[None, :]                       # [b, D]: key j = q - d
        inside = key >= 0
        keyc = key.clamp(min=0)
        valid = inside & (mask.gather(1, keyc) > 0)                    # real tokens only
        index = keyc[:, None, None, :].expand(b, layers, heads, n_pos)
        values = positional.gather(-1, index).to(torch.float64)
        values = values * valid[:, None, None, :].to(values.dtype)
        width = int(query.max()) + 1
        self._grow(width)
        values, valid = values[..., :width].cpu(), valid[:, :width].cpu()
        self.sum[..., :width] += values.sum(0)
        self.sumsq[..., :width] += (values * values).sum(0)
        self.count[:width] += valid.sum(0)

    def finish(self) -> Tuple[Tensor, Tensor, Tensor]:
        n = self.count.to(torch.float64)
        mean = self.sum / n.clamp(min=1)
        var = (self.sumsq - n * mean * mean) / (n - 1).clamp(min=1)
        std = torch.where(n > 1, var.clamp(min=0).sqrt(), torch.zeros_like(var))
        return mean, std, self.count


def bootstrap_mean_interval(values: Tensor, n_boot: int = 1000, seed: int = 0,
                            confidence: float = 0.95) -> Tuple[Tensor, Tensor]:
    """Percentile bootstrap interval of the mean over dim 0 of ``values [n, ...]``.

    Every column is resampled with the same draws (one weight vector per resample), so a head's
    interval depends on the seed and ``n`` only, not on which other columns are asked for:
    ``top_heads`` and ``collect`` agree for equal ``n_boot`` / ``seed`` / ``confidence``."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1 (bootstrap resamples), got {n_boot!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n = values.shape[0]
    flat = values.reshape(n, -1).to(torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    means = []
    for start in range(0, n_boot, _BOOT_CHUNK):
        rows = min(_BOOT_CHUNK, n_boot - start)
        draws = torch.randint(n, (rows, n), generator=gen)
        weights = torch.zeros(rows, n, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(rows, n, dtype=torch.float64))
        means.append(weights @ flat / n)
    means = torch.cat(means)                                           # [n_boot, m]
    alpha = (1 - confidence) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    low, high = torch.quantile(means, q, dim=0)
    shape = values.shape[1:]
    return low.reshape(shape), high.reshape(shape)


def collect(batches: Iterable[Attribution], n_boot: int = 1000, seed: int = 0,
            confidence: float = 0.95) -> DatasetStats:
    """Stream ``batches`` (``Attribution`` s of one model and method) into a ``DatasetStats``.

    Each batch is reduced as it arrives and then dropped. ``n_boot > 0`` also computes every
    head's bootstrap interval of the mean (``positional_ci``, ``heads_ci``); ``n_boot=0`` skips it
    (``top_heads`` still bootstraps on demand)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be an int >= 0, got {n_boot!r}")
    positional_rows: List[Tensor] = []
    heads_rows: List[Tensor] = []
    share_heads_rows: List[Tensor] = []
    share_pos_rows: List[Tensor] = []
    distances: Optional[_DistanceSums] = None
    shape = method = model_name = None
    for k, attr in enumerate(batches):
        if not isinstance(attr, Attribution):
            raise TypeError(f"batch {k} is a {type(attr).__name__}, expected an Attribution")
        b, layers, heads, _ = attr.positional.shape
        if shape is None:
            shape, method, model_name = (layers, heads), attr.method, attr.model_name
            distances = _DistanceSums(layers, heads)
        elif (layers, heads) != shape or attr.method != method:
            raise ValueError(f"batch {k} has {layers} layers x {heads} heads and method {attr.method!r}; "
                             f"the earlier batches {shape[0]} x {shape[1]} and {method!r}: one dataset is "
                             "one model explained by one method")
        if b == 0:
            continue
        positional = attr.positional.detach()
        head_totals = attr.heads.detach()
        positional_rows.append(positional.sum(-1).to("cpu", torch.float64))
        heads_rows.append(head_totals.to("cpu", torch.float64))
        share_heads_rows.append(_shares(head_totals.abs().sum(-1).to("cpu", torch.float64)))
        share_pos_rows.append(_shares(positional.abs().sum((2, 3)).to("cpu", torch.float64)))
        query = attr.target_position.to(positional.device).long().reshape(b)
        distances.add(positional, query, attr.attention_mask.to(positional.device))
    if not positional_rows:
        raise ValueError("no prompts: collect needs at least one Attribution with examples")
    per_pos, per_heads = torch.cat(positional_rows), torch.cat(heads_rows)
    share_heads, share_pos = torch.cat(share_heads_rows), torch.cat(share_pos_rows)
    pos_mean, pos_std = _mean_std(per_pos)
    heads_mean, heads_std = _mean_std(per_heads)
    sh_mean, sh_std = _mean_std(share_heads)
    sp_mean, sp_std = _mean_std(share_pos)
    d_mean, d_std, d_count = distances.finish()
    positional_ci = heads_ci = None
    if n_boot > 0:
        positional_ci = torch.stack(bootstrap_mean_interval(per_pos, n_boot, seed, confidence))
        heads_ci = torch.stack(bootstrap_mean_interval(per_heads, n_boot, seed, confidence))
    return DatasetStats(
        n=int(per_pos.shape[0]), method=method, model_name=model_name or "",
        positional_per_prompt=per_pos, heads_per_prompt=per_heads,
        positional_mean=pos_mean, positional_std=pos_std, heads_mean=heads_mean, heads_std=heads_std,
        layer_share_heads_per_prompt=share_heads, layer_share_positional_per_prompt=share_pos,
        layer_share_heads_mean=sh_mean, layer_share_heads_std=sh_std,
        layer_share_positional_mean=sp_mean, layer_share_positional_std=sp_std,
        by_distance_mean=d_mean, by_distance_std=d_std, by_distance_count=d_count,
        positional_ci=positional_ci, heads_ci=heads_ci, n_boot=n_boot, seed=seed, confidence=confidence,
    )


def top_heads(stats: DatasetStats, k: int = 10, which: str = "positional", n_boot: int = 1000,
              seed: int = 0, confidence: float = 0.95) -> List[Dict[str, float]]:
    """The ``k`` heads with the largest absolute mean over prompts, largest first, each as
    ``{layer, head, mean, low, high}`` with the bootstrap percentile interval of its mean (seeded:
    the same call gives the same interval)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0 (how many heads), got {k!r}")
    values = stats.per_prompt(which)
    n, _, heads = values.shape
    flat = values.reshape(n, -1)
    mean = flat.mean(0)
    k = min(k, flat.shape[1])
    order = torch.sort(mean.abs(), descending=True, stable=True).indices[:k]
    if k == 0:
        return []
    low, high = bootstrap_mean_interval(flat[:, order], n_boot, seed, confidence)
    return [
        {"layer": int(i) // heads, "head": int(i) % heads, "mean": float(mean[i]),
         "low": float(lo), "high": float(hi)}
        for i, lo, hi in zip(order.tolist(), low.tolist(), high.tolist())
    ]


# ------------------------------------------------------------------------------------ figures
def _limit(values: Tensor) -> float:
    return max(1e-12, float(values.abs().max())) if values.numel() else 1e-12


def dataset_positional_heads_data(stats: DatasetStats, which: str = "positional") -> Tensor:
    """``[layers, heads]`` mean per-head relevance over prompts (positional, or ``attr.heads``)."""
    return _check_which(which, stats.positional_mean, stats.heads_mean)


def dataset_positional_heads_figure(stats: DatasetStats, which: str = "positional",
                                    title: Optional[str] = None) -> go.Figure:
    """Heatmap of the mean per-head relevance: layer 0 on top, every layer labelled, its own
    symmetric colour scale (so it is readable whatever the other figures hold), std on hover."""
    z = dataset_positional_heads_data(stats, which)
    std = _check_which(which, stats.positional_std, stats.heads_std)
    layers, heads = z.shape
    limit = _limit(z)
    what = "positional relevance" if which == "positional" else "relevance through each head"
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=[f"H{h}" for h in range(heads)], y=[f"L{l}" for l in range(layers)],
        colorscale=DIVERGING, zmid=0, zmin=-limit, zmax=limit, colorbar=dict(title="mean"),
        customdata=std.tolist(),
        hovertemplate="layer %{y}, head %{x}<br>mean %{z:.5g}<br>std %{customdata:.5g}<extra></extra>",
    ))
    fig.update_layout(
        title=title or f"Mean {what} per head over {stats.n} prompts ({stats.method})",
        xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
        yaxis=dict(tickmode="array", tickvals=[f"L{l}" for l in range(layers)]),
        height=_heatmap_height(layers),
    )
    return fig


def _heatmap_height(layers: int) -> int:
    """Fixed by the layer count (not by the browser window), tall enough that every label fits."""
    return 220 + 22 * layers


def dataset_layer_share_data(stats: DatasetStats) -> Dict[str, Tuple[Tensor, Tensor]]:
    """``{series: (mean [layers], std [layers])}``: each layer's share of the absolute head
    relevance and of the absolute positional relevance, over prompts."""
    return {
        "heads (|relevance written|)": (stats.layer_share_heads_mean, stats.layer_share_heads_std),
        "positional (|positional sink|)": (stats.layer_share_positional_mean, stats.layer_share_positional_std),
    }


def dataset_layer_share_figure(stats: DatasetStats) -> go.Figure:
    """Grouped bars per layer: mean share, std over prompts as error bars."""
    layers = [f"L{l}" for l in range(stats.n_layers)]
    fig = go.Figure([
        go.Bar(name=name, x=layers, y=mean.tolist(), error_y=dict(type="data", array=std.tolist()),
               hovertemplate="%{x}: %{y:.2%}<extra>" + name + "</extra>")
        for name, (mean, std) in dataset_layer_share_data(stats).items()
    ])
    fig.update_layout(barmode="group", title=f"Share of relevance per layer over {stats.n} prompts ({stats.method})",
                      xaxis_title="layer", yaxis_title="share (mean, std bars)", yaxis_tickformat=".0%")
    return fig


def dataset_distance_data(stats: DatasetStats, heads: Optional[Sequence[Tuple[int, int]]] = None,
                          k: int = 5) -> Dict[str, object]:
    """Mean positional relevance by distance ``d = q - j`` (explained query minus key position):
    ``{"distance": [D], "count": [D], "series": {"L{l}H{h}": [D]}}``. ``heads``: ``(layer, head)``
    pairs; by default the ``k`` heads with the largest absolute mean positional relevance."""
    if heads is None:
        flat = stats.positional_mean.reshape(-1)
        order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k].tolist()
        heads = [(i // stats.n_heads, i % stats.n_heads) for i in order]
    series = {}
    for layer, head in heads:
        if not (0 <= layer < stats.n_layers and 0 <= head < stats.n_heads):
            raise ValueError(f"head ({layer}, {head}) does not exist: the model has {stats.n_layers} "
                             f"layers x {stats.n_heads} heads")
        series[f"L{layer}H{head}"] = stats.by_distance_mean[layer, head]
    return {"distance": torch.arange(stats.max_distance + 1), "count": stats.by_distance_count,
            "series": series}


def dataset_distance_figure(stats: DatasetStats, heads: Optional[Sequence[Tuple[int, int]]] = None,
                            k: int = 5) -> go.Figure:
    """One line per head: how positional relevance falls off with query-minus-key distance
    (hover shows how many prompts reach that distance: long distances rest on few prompts)."""
    data = dataset_distance_data(stats, heads, k)
    x, count = data["distance"].tolist(), data["count"].tolist()
    fig = go.Figure([
        go.Scatter(name=name, x=x, y=values.tolist(), mode="lines+markers", customdata=count,
                   hovertemplate="distance %{x}: %{y:.5g} (%{customdata} prompts)<extra>" + name + "</extra>")
        for name, values in data["series"].items()
    ])
    fig.update_layout(title=f"Positional relevance by query - key distance ({stats.method})",
                      xaxis_title="distance q - j (tokens)", yaxis_title="mean positional relevance")
    return fig


def dataset_top_heads_data(stats: DatasetStats, k: int = 10, which: str = "positional", n_boot: int = 1000,
                           seed: int = 0, confidence: float = 0.95) -> List[Dict[str, float]]:
    """The plotted heads: ``top_heads`` with the same arguments."""
    return top_heads(stats, k, which, n_boot, seed, confidence)


def dataset_top_heads_figure(stats: DatasetStats, k: int = 10, which: str = "positional", n_boot: int = 1000,
                             seed: int = 0, confidence: float = 0.95) -> go.Figure:
    """Bars of the top heads' mean relevance with their bootstrap intervals as error bars."""
    rows = dataset_top_heads_data(stats, k, which, n_boot, seed, confidence)
    fig = go.Figure(go.Bar(
        x=[f"L{r['layer']}H{r['head']}" for r in rows], y=[r["mean"] for r in rows],
        error_y=dict(type="data", symmetric=False, array=[r["high"] - r["mean"] for r in rows],
                     arrayminus=[r["mean"] - r["low"] for r in rows]),
        customdata=[[r["low"], r["high"]] for r in rows],
        hovertemplate="%{x}: %{y:.5g}<br>[%{customdata[0]:.5g}, %{customdata[1]:.5g}]<extra></extra>",
    ))
    fig.update_layout(
        title=f"Top {len(rows)} heads by |mean {which} relevance| over {stats.n} prompts, "
              f"{confidence:.0%} bootstrap intervals ({stats.method})",
        xaxis_title="head", yaxis_title=f"mean {which} relevance",
    )
    return fig


def dataset_figures(stats: DatasetStats, k: int = 10) -> List[go.Figure]:
    """The report's figures, in order."""
    return [
        dataset_positional_heads_figure(stats, "positional"),
        dataset_positional_heads_figure(stats, "semantic"),
        dataset_layer_share_figure(stats),
        dataset_distance_figure(stats),
        dataset_top_heads_figure(stats, k, "positional", stats.n_boot or 1000, stats.seed, stats.confidence),
    ]


def dataset_report(stats: DatasetStats, path: str, title: Optional[str] = None, k: int = 10) -> str:
    """Every dataset figure in one standalone HTML page (``write_html``); returns ``path``."""
    preamble = (f"<p><b>method</b> {html.escape(stats.method)} &nbsp; <b>model</b> "
                f"{html.escape(stats.model_name or '-')} &nbsp; <b>prompts</b> {stats.n}</p>")
    return write_html(dataset_figures(stats, k), path, title or "lens_palrp dataset report", preamble)
