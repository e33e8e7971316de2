"""plotly figures built from an ``Attribution``.

Each figure has a ``*_data`` twin that returns the plotted numbers, so what is drawn is
what the result holds (tests check the figures' arrays, titles and labels, not pixels).
"""

from __future__ import annotations

import html
from typing import List, Optional, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from lens_palrp.result import Attribution

DIVERGING = "RdBu"


def _limit(values) -> float:
    flat = [abs(v) for row in values for v in (row if isinstance(row, list) else [row])]
    return max(1e-12, max(flat) if flat else 1e-12)


def _n_real(attr: Attribution, index: int) -> int:
    return int(attr.attention_mask[index].sum())


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
    """Heatmap ``[layers, heads]`` with a menu choosing "all positions" or one position."""
    layers, heads, _ = per_pos.shape
    n = _n_real(attr, index)
    tokens = attr.str_tokens[index]
    choices = [("all positions", per_pos[..., :n].sum(-1))] + [
        (f"{p}: {tokens[p]!r}", per_pos[..., p]) for p in range(n)
    ]
    start = 0 if position is None else position + 1
    z = choices[start][1].tolist()
    limit = _limit([row for _, data in choices for row in data.tolist()])
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[f"H{h}" for h in range(heads)], y=[f"L{l}" for l in range(layers)],
            colorscale=DIVERGING, zmid=0, zmin=-limit, zmax=limit, colorbar=dict(title="relevance"),
            customdata=[[choices[start][0]] * heads for _ in range(layers)],
            hovertemplate="layer %{y}, head %{x}<br>%{customdata}<br>relevance %{z:.5g}<extra></extra>",
        )
    )
    buttons = [
        dict(label=label, method="restyle",
             args=[{"z": [data.tolist()], "customdata": [[[label] * heads for _ in range(layers)]]}])
        for label, data in choices
    ]
    fig.update_layout(
        title=title, xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
        updatemenus=[dict(buttons=buttons, active=start, x=1.0, xanchor="right", y=1.15, yanchor="top")],
    )
    return fig


def positional_heads_figure(attr: Attribution, index: int = 0, position: Optional[int] = None,
                            title: Optional[str] = None) -> go.Figure:
    """Attention-level positional relevance per layer (rows) and head (columns); the menu picks
    all positions or one position (hover shows the token)."""
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
        "positional": (attr.positional_input[index] + attr.positional[index].sum((0, 1)))[:n].detach().cpu(),
        f"combined ({aggregation})": attr.combined(aggregation)[index, :n].detach().cpu(),
    }


def token_relevance_figure(attr: Attribution, index: Optional[int] = 0, aggregation: str = "relu") -> go.Figure:
    """The prompt's tokens colored by semantic, positional and combined relevance (three rows per
    prompt, diverging colormap centered at zero, exact numbers on hover). ``index=None``: every
    prompt of the batch, one block of three rows each."""
    indices = range(attr.batch_size) if index is None else [index]
    titles = [f"#{i} {name}" if index is None else name for i in indices
              for name in token_rows_data(attr, i, aggregation)]
    fig = make_subplots(rows=len(titles), cols=1, subplot_titles=titles, vertical_spacing=0.08 / max(1, len(indices)))
    row = 1
    for i in indices:
        labels = [f"{p}:{t}" for p, t in enumerate(attr.str_tokens[i][: _n_real(attr, i)])]
        for name, values in token_rows_data(attr, i, aggregation).items():
            vals = values.tolist()
            limit = _limit(vals)
            fig.add_trace(
                go.Heatmap(
                    z=[vals], x=labels, y=[name], colorscale=DIVERGING, zmid=0, zmin=-limit, zmax=limit,
                    showscale=False, text=[[f"{v:.3g}" for v in vals]], texttemplate="%{text}",
                    hovertemplate="%{x}<br>%{y}: %{z:.6g}<extra></extra>",
                ),
                row=row, col=1,
            )
            fig.update_xaxes(title_text="position:token", row=row, col=1)
            row += 1
    fig.update_layout(title=f"Token relevance ({attr.method})", height=160 * len(titles) + 120)
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
    """Stacked bars, one per layer: semantic vs positional share of the relevance."""
    data = layer_share_data(attr, index)
    layers = [f"L{l}" for l in range(attr.positional.shape[1])]
    fig = go.Figure([go.Bar(name=name, x=layers, y=values.tolist(),
                            hovertemplate="%{x}: %{y:.2%}<extra>" + name + "</extra>")
                     for name, values in data.items()])
    fig.update_layout(barmode="stack", title=f"Semantic vs positional share per layer ({attr.method})",
                      xaxis_title="layer", yaxis_title="share of relevance mass", yaxis_tickformat=".0%")
    return fig


def residual_data(attr: Attribution, index: int = 0) -> torch.Tensor:
    """``[layers + 1, pos]``: relevance of the residual stream entering each layer, and the final one."""
    return attr.residual[index, :, : _n_real(attr, index)].detach().cpu()


def residual_figure(attr: Attribution, index: int = 0) -> go.Figure:
    """Relevance over the residual stream: layer x position heatmap."""
    data = residual_data(attr, index).tolist()
    n_layers = len(data) - 1
    labels = [f"{p}:{t}" for p, t in enumerate(attr.str_tokens[index][: len(data[0])])]
    limit = _limit(data)
    fig = go.Figure(go.Heatmap(
        z=data, x=labels, y=[f"into L{l}" for l in range(n_layers)] + ["final"],
        colorscale=DIVERGING, zmid=0, zmin=-limit, zmax=limit, colorbar=dict(title="relevance"),
        hovertemplate="%{y}, %{x}<br>relevance %{z:.5g}<extra></extra>",
    ))
    fig.update_layout(title=f"Relevance over the residual stream ({attr.method})",
                      xaxis_title="position:token", yaxis_title="residual stream", yaxis_autorange="reversed")
    return fig


# ------------------------------------------------------------------------ HTML
def write_html(figures: Sequence[go.Figure], path: str, title: str = "lens_palrp",
               preamble: str = "") -> str:
    """One standalone HTML page (plotly.js inlined, works offline) holding ``figures``."""
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
             f"<h1>{html.escape(title)}</h1>", preamble]
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
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


def write_report(attr: Attribution, path: str, index: int = 0, title: Optional[str] = None) -> str:
    """Every view of one explanation, and its conservation table, in one HTML file."""
    c = attr.conservation()
    prompt = "".join(attr.str_tokens[index][: _n_real(attr, index)])
    preamble = (
        f"<p><b>method</b> {html.escape(attr.method)} &nbsp; <b>model</b> {html.escape(attr.model_name or '-')}"
        f" &nbsp; <b>target value</b> {float(attr.target_value[index]):.6g}</p>"
        f"<p><b>input</b> {html.escape(prompt)}</p>"
        f"<pre>{html.escape(c.format(index))}</pre>"
    )
    return write_html(report_figures(attr, index), path, title or "lens_palrp report", preamble)
