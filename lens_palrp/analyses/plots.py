"""plotly figures built from an ``Attribution``.

Each figure has a ``*_data`` twin that returns the plotted numbers, so what is drawn is
what the result holds (tests check the figures' arrays, titles and labels, not pixels).
"""

from __future__ import annotations

import html
import os
from typing import List, Optional, Sequence

import plotly.graph_objects as go
import torch

from lens_palrp.html_view import prompt_text as _prompt_text
from lens_palrp.html_view import summary
from lens_palrp.result import Attribution

# red for positive relevance, blue for negative (the LRP convention; plotly's RdBu is the reverse)
DIVERGING = "RdBu_r"

# fixed pixel sizes: a figure sized by its rows, never by the window (plotly's default height is
# 100% of the page, so a small heatmap filled the screen and pushed the others out of view)
ROW_PX = 28  # one layer of a layers x heads / residual heatmap, one bar of the layer shares
TOKEN_ROW_PX = 54  # one strip of the token view
FIGURE_FRAME_PX = 190  # title, menu, axis labels and margins around a heatmap
MAX_TICK_LABELS = 80  # token axes longer than this let plotly thin their labels


def _limit(values) -> float:
    """Half-width of the symmetric colour range that holds ``values`` (nested lists or a tensor)."""
    if isinstance(values, torch.Tensor):
        return max(1e-12, float(values.abs().max()) if values.numel() else 0.0)
    flat = [abs(v) for row in values for v in (row if isinstance(row, list) else [row])]
    return max(1e-12, max(flat) if flat else 1e-12)


def _n_real(attr: Attribution, index: int) -> int:
    return int(attr.attention_mask[index].sum())


def _every_tick(labels: Sequence[str]) -> dict:
    """Axis settings that print every category label (plotly skips some when it thinks they crowd)."""
    labels = list(labels)
    return dict(tickmode="array", tickvals=labels, ticktext=labels, type="category")


def _token_labels(attr: Attribution, index: int) -> List[str]:
    return [f"{p}:{t}" for p, t in enumerate(attr.str_tokens[index][: _n_real(attr, index)])]


def _token_axis(labels: Sequence[str]) -> dict:
    return _every_tick(labels) if len(labels) <= MAX_TICK_LABELS else dict(type="category")


def _heatmap_height(n_rows: int) -> int:
    return FIGURE_FRAME_PX + ROW_PX * max(n_rows, 3)


# ------------------------------------------------------------------------ layers x heads heatmaps
def positional_heads_data(attr: Attribution, index: int = 0, position: Optional[int] = None) -> torch.Tensor:
    """``[layers, heads]`` positional relevance of one example, at one position or summed."""
    pos = attr.positional[index].detach().cpu()  # [layers, heads, pos]
    return pos.sum(-1) if position is None else pos[..., position]


def heads_data(attr: Attribution, index: int = 0, position: Optional[int] = None) -> torch.Tensor:
    """``[layers, heads]`` relevance each head writes into the residual stream (semantic flow)."""
    per_pos = attr.heads_by_pos[index].detach().cpu()
    return per_pos.sum(-1) if position is None else per_pos[..., position]


def _layer_head_figure(per_pos: torch.Tensor, attr: Attribution, index: int, title: str,
                       position: Optional[int]) -> go.Figure:
    """Heatmap ``[layers, heads]`` with a menu choosing "all positions" or one position.

    Each view has its own symmetric colour range (the sum over positions and one position differ
    by orders of magnitude: on one shared scale the smaller looks blank); the menu switches
    ``zmin``/``zmax`` with ``z``."""
    layers, heads, _ = per_pos.shape
    n = _n_real(attr, index)
    tokens = attr.str_tokens[index]
    choices = [("all positions", per_pos[..., :n].sum(-1))] + [
        (f"{p}: {tokens[p]!r}", per_pos[..., p]) for p in range(n)
    ]
    start = 0 if position is None else position + 1
    limits = [_limit(data) for _, data in choices]
    layer_labels = [f"L{l}" for l in range(layers)]
    head_labels = [f"H{h}" for h in range(heads)]

    def hover_labels(label):
        return [[label] * heads for _ in range(layers)]

    fig = go.Figure(
        go.Heatmap(
            z=choices[start][1].tolist(), x=head_labels, y=layer_labels, colorscale=DIVERGING, zauto=False,
            zmin=-limits[start], zmax=limits[start], colorbar=dict(title="relevance"),
            customdata=hover_labels(choices[start][0]),
            hovertemplate="layer %{y}, head %{x}<br>%{customdata}<br>relevance %{z:.5g}<extra></extra>",
        )
    )
    buttons = [
        dict(label=label, method="restyle",
             args=[{"z": [data.tolist()], "zmin": [-limit], "zmax": [limit], "zauto": [False],
                    "customdata": [hover_labels(label)]}])
        for (label, data), limit in zip(choices, limits)
    ]
    fig.update_layout(
        title=dict(text=title, y=0.98, yanchor="top"), height=_heatmap_height(layers),
        margin=dict(t=110, b=60), xaxis=dict(title="head", side="top", **_every_tick(head_labels)),
        yaxis=dict(title="layer", autorange="reversed", **_every_tick(layer_labels)),
        updatemenus=[dict(buttons=buttons, active=start, x=1.0, xanchor="right", y=1.0, yanchor="bottom",
                          pad=dict(b=30))],
    )
    return fig


def positional_heads_figure(attr: Attribution, index: int = 0, position: Optional[int] = None,
                            title: Optional[str] = None) -> go.Figure:
    """Attention-level positional relevance per layer (rows, L0 on top) and head (columns); the
    menu picks all positions or one position, each on its own colour scale."""
    return _layer_head_figure(
        attr.positional[index].detach().cpu(), attr, index,
        title or f"Positional relevance per head ({attr.method})", position,
    )


def heads_figure(attr: Attribution, index: int = 0, position: Optional[int] = None,
                 title: Optional[str] = None) -> go.Figure:
    """Relevance each head writes into the residual stream, per layer and head."""
    return _layer_head_figure(
        attr.heads_by_pos[index].detach().cpu(), attr, index,
        title or f"Relevance through each head ({attr.method})", position,
    )


# ------------------------------------------------------------------------ token view
def token_rows_data(attr: Attribution, index: int = 0, aggregation: str = "relu"):
    """``{row name: [pos] values}`` of one example: semantic, positional, combined."""
    n = _n_real(attr, index)
    return {
        "semantic": attr.semantic[index, :n].detach().cpu(),
        "positional": attr.positional_per_position[index, :n].detach().cpu(),
        f"combined ({aggregation})": attr.combined(aggregation)[index, :n].detach().cpu(),
    }


# pixel layout of the token view: a strip per row, a block of three strips per prompt
_TOKEN_TOP_PX = 70  # figure title
_BLOCK_TITLE_PX = 34  # "#i: prompt" above a block (multi-prompt view)
_ROW_GAP_PX = 8  # between the strips of one block
_TICKS_PX = 90  # token labels under a block (rotated when long)


def token_relevance_figure(attr: Attribution, index: Optional[int] = 0, aggregation: str = "relu") -> go.Figure:
    """The prompt's tokens colored by semantic, positional and combined relevance (three rows per
    prompt, red positive, blue negative, exact numbers on hover). Every row has its own colour
    scale and colour bar. ``index=None``: every prompt of the batch, one block of three rows each,
    titled by its example number and text."""
    indices = list(range(attr.batch_size)) if index is None else [index]
    blocks = [(i, token_rows_data(attr, i, aggregation)) for i in indices]
    titled = index is None
    # the plot area's height in pixels, then each strip's domain as a fraction of it
    per_block = [(_BLOCK_TITLE_PX if titled else 0) + len(rows) * TOKEN_ROW_PX + (len(rows) - 1) * _ROW_GAP_PX
                 + _TICKS_PX for _, rows in blocks]
    plot_px = sum(per_block)
    fig = go.Figure()
    layout = {}
    annotations = []
    top = 0.0  # pixels from the plot area's top
    k = 0
    for (i, rows), block_px in zip(blocks, per_block):
        labels = _token_labels(attr, i)
        if titled:
            annotations.append(dict(
                text=f"<b>#{i}</b> {html.escape(_prompt_text(attr, i))}", x=0, xref="paper", xanchor="left",
                y=1 - (top + _BLOCK_TITLE_PX - 6) / plot_px, yref="paper", yanchor="bottom", showarrow=False,
            ))
            top += _BLOCK_TITLE_PX
        for r, (name, values) in enumerate(rows.items()):
            k += 1
            suffix = "" if k == 1 else str(k)
            lo, hi = 1 - (top + TOKEN_ROW_PX) / plot_px, 1 - top / plot_px
            limit = _limit(values)
            last = r == len(rows) - 1
            show_text = len(labels) <= 24  # numbers in the cells while they fit
            digits = ".3g" if len(labels) <= 12 else ".2g"
            fig.add_trace(go.Heatmap(
                z=[values.tolist()], x=labels, y=[name], xaxis=f"x{suffix}", yaxis=f"y{suffix}",
                colorscale=DIVERGING, zauto=False, zmin=-limit, zmax=limit,
                colorbar=dict(y=(lo + hi) / 2, yanchor="middle", len=hi - lo, thickness=10, x=1.0,
                              xanchor="left", tickvals=[-limit, 0, limit],
                              ticktext=[f"{-limit:.3g}", "0", f"{limit:.3g}"]),  # the row's range, labelled
                text=[[format(v, digits) for v in values.tolist()]] if show_text else None,
                texttemplate="%{text}" if show_text else None,
                hovertemplate="%{x}<br>%{y}: %{z:.6g}<extra></extra>",
            ))
            layout[f"xaxis{suffix}"] = dict(anchor=f"y{suffix}", domain=[0, 1], showticklabels=last,
                                            title="position:token" if last else None, **_token_axis(labels))
            layout[f"yaxis{suffix}"] = dict(anchor=f"x{suffix}", domain=[lo, hi], **_every_tick([name]))
            top += TOKEN_ROW_PX + (0 if last else _ROW_GAP_PX)
        top += _TICKS_PX
    fig.update_layout(
        title=f"Token relevance ({attr.method})", height=plot_px + _TOKEN_TOP_PX + 20,
        margin=dict(t=_TOKEN_TOP_PX, b=20, l=140, r=90), annotations=annotations, **layout,
    )
    return fig


# ------------------------------------------------------------------------ layer views
def layer_share_data(attr: Attribution, index: int = 0):
    """Per layer: the share of the relevance mass that enters the layer's positional sink vs what
    flows on through the residual stream into the layer (absolute values, each layer sums to 1)."""
    positional = attr.positional[index].abs().sum((1, 2)).detach().cpu()  # [layers]
    stream = attr.residual[index, :-1].abs().sum(-1).detach().cpu()  # into each layer
    total = positional + stream
    total = torch.where(total == 0, torch.ones_like(total), total)
    return {"semantic (residual stream)": stream / total, "positional sink": positional / total}


def layer_share_figure(attr: Attribution, index: int = 0) -> go.Figure:
    """Stacked horizontal bars, one per layer (L0 on top, as in the heatmaps): semantic vs
    positional share of the relevance."""
    data = layer_share_data(attr, index)
    layers = [f"L{l}" for l in range(attr.positional.shape[1])]
    fig = go.Figure([go.Bar(name=name, y=layers, x=values.tolist(), orientation="h",
                            hovertemplate="%{y}: %{x:.2%}<extra>" + name + "</extra>")
                     for name, values in data.items()])
    fig.update_layout(
        barmode="stack", title=f"Semantic vs positional share per layer ({attr.method})",
        height=_heatmap_height(len(layers)), margin=dict(t=90, b=60),
        xaxis=dict(title="share of relevance mass", tickformat=".0%", range=[0, 1]),
        yaxis=dict(title="layer", autorange="reversed", **_every_tick(layers)),
        legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"),
    )
    return fig


def residual_data(attr: Attribution, index: int = 0) -> torch.Tensor:
    """``[layers + 1, pos]``: relevance of the residual stream entering each layer, and the final one."""
    return attr.residual[index, :, : _n_real(attr, index)].detach().cpu()


def residual_figure(attr: Attribution, index: int = 0) -> go.Figure:
    """Relevance over the residual stream: layer (L0 on top) x position heatmap."""
    data = residual_data(attr, index)
    n_layers = data.shape[0] - 1
    labels = _token_labels(attr, index)
    rows = [f"into L{l}" for l in range(n_layers)] + ["final"]
    limit = _limit(data)
    fig = go.Figure(go.Heatmap(
        z=data.tolist(), x=labels, y=rows, colorscale=DIVERGING, zauto=False, zmin=-limit, zmax=limit,
        colorbar=dict(title="relevance"), hovertemplate="%{y}, %{x}<br>relevance %{z:.5g}<extra></extra>",
    ))
    fig.update_layout(
        title=f"Relevance over the residual stream ({attr.method})", height=_heatmap_height(len(rows)) + 40,
        margin=dict(t=80, b=110), xaxis=dict(title="position:token", **_token_axis(labels)),
        yaxis=dict(title="residual stream", autorange="reversed", **_every_tick(rows)),
    )
    return fig


# ------------------------------------------------------------------------ HTML
PLOTLYJS_MODES = ("inline", "beside")
PLOTLYJS_FILE = "plotly.min.js"
DEFAULT_FIGURE_HEIGHT = "520px"  # for figures that set no height of their own


def _plotlyjs_tag(path: str, plotlyjs: str) -> str:
    """The page's one ``<script>`` for plotly.js: inlined (offline, ~4.9 MB per page), or a
    relative reference to ``plotly.min.js`` written once beside the page (pages share it)."""
    from plotly.offline import get_plotlyjs

    if plotlyjs not in PLOTLYJS_MODES:
        raise ValueError(f"plotlyjs must be one of {PLOTLYJS_MODES}, got {plotlyjs!r}")
    source = get_plotlyjs()
    if plotlyjs == "inline":
        return f"<script type='text/javascript'>{source}</script>"
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), PLOTLYJS_FILE)
    current = None
    if os.path.exists(beside):
        with open(beside, encoding="utf-8") as f:
            current = f.read()
    if current != source:  # missing, or another plotly version's
        with open(beside, "w", encoding="utf-8") as f:
            f.write(source)
    return f"<script src='{PLOTLYJS_FILE}'></script>"


def write_html(figures: Sequence[go.Figure], path: str, title: str = "lens_palrp",
               preamble: str = "", plotlyjs: str = "inline") -> str:
    """One HTML page holding ``figures`` one under the other, each at its own fixed height.

    ``plotlyjs="inline"`` (default) puts plotly.js in the page once: it works offline and alone.
    ``"beside"`` writes ``plotly.min.js`` next to the page (once; kept if already current) and
    loads it by relative path: pages of a few hundred kB that travel with that file."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             _plotlyjs_tag(path, plotlyjs), "</head><body style='max-width:1200px;margin:auto;padding:0 12px'>",
             f"<h1 style='font-family:sans-serif'>{html.escape(title)}</h1>", preamble]
    for fig in figures:
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, default_height=DEFAULT_FIGURE_HEIGHT))
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path


def report_figures(attr: Attribution, index: int = 0) -> List[go.Figure]:
    return [
        token_relevance_figure(attr, index),
        positional_heads_figure(attr, index),
        heads_figure(attr, index),
        layer_share_figure(attr, index),
        residual_figure(attr, index),
    ]


def write_report(attr: Attribution, path: str, index: int = 0, title: Optional[str] = None,
                 plotlyjs: str = "inline") -> str:
    """Every view of one explanation in one HTML file: what was explained (model, method, target
    and position, the prompt as the tokenizer decodes it), the coloured tokens and conservation
    table, then the figures. ``plotlyjs``: ``"inline"`` or ``"beside"`` (see ``write_html``)."""
    from lens_palrp.result import check_index

    index = check_index(index, attr.batch_size)
    if title is None:
        title = f"lens_palrp report: {attr.model_name or 'model'}, {attr.method}"
    return write_html(report_figures(attr, index), path, title, summary(attr, index), plotlyjs=plotlyjs)
