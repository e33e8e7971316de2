"""plotly figures built from an ``Attribution`` (data first: each figure's arrays are the result's)."""

from __future__ import annotations

from typing import Optional, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens_palrp.result import Attribution


def positional_heads_data(attr: Attribution, index: int = 0, position: Optional[int] = None):
    """``[layers, heads]`` positional relevance of one example, at one position or summed."""
    pos = attr.positional[index]  # [layers, heads, pos]
    data = pos.sum(-1) if position is None else pos[..., position]
    return data.detach().cpu()


def positional_heads_figure(
    attr: Attribution, index: int = 0, position: Optional[int] = None, title: Optional[str] = None
) -> go.Figure:
    """Heatmap of attention-level positional relevance per layer (rows) and head (columns)."""
    data = positional_heads_data(attr, index, position).tolist()
    where = "all positions" if position is None else f"position {position} ({attr.str_tokens[index][position]!r})"
    limit = max(1e-12, max(abs(v) for row in data for v in row))
    fig = go.Figure(
        go.Heatmap(
            z=data, x=[f"H{h}" for h in range(len(data[0]))], y=[f"L{l}" for l in range(len(data))],
            colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit, colorbar=dict(title="relevance"),
            hovertemplate="layer %{y}, head %{x}<br>positional relevance %{z:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"Positional relevance per head ({attr.method}, {where})",
        xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
    )
    return fig


def token_relevance_figure(attr: Attribution, index: int = 0, aggregation: str = "relu") -> go.Figure:
    """The prompt's tokens colored by semantic, positional and combined relevance (three rows)."""
    n = int(attr.attention_mask[index].sum())
    rows = {
        "semantic": attr.semantic[index, :n],
        "positional": (attr.positional_input[index] + attr.positional[index].sum((0, 1)))[:n],
        f"combined ({aggregation})": attr.combined(aggregation)[index, :n],
    }
    labels = [f"{i}:{t}" for i, t in enumerate(attr.str_tokens[index][:n])]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=list(rows))
    for r, (name, values) in enumerate(rows.items(), start=1):
        vals = values.detach().cpu().tolist()
        limit = max(1e-12, max(abs(v) for v in vals))
        fig.add_trace(
            go.Heatmap(
                z=[vals], x=labels, y=[name], colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
                showscale=False, text=[[f"{v:.3g}" for v in vals]], texttemplate="%{text}",
                hovertemplate="%{x}<br>%{y}: %{z:.5g}<extra></extra>",
            ),
            row=r, col=1,
        )
    fig.update_layout(title=f"Token relevance ({attr.method})", height=420)
    fig.update_xaxes(title_text="position:token", row=3, col=1)
    return fig


def write_html(figures: Sequence[go.Figure], path: str, title: str = "lens_palrp") -> str:
    """One standalone HTML page (plotly.js inlined, works offline) holding ``figures``."""
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>", f"<h1>{title}</h1>"]
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
