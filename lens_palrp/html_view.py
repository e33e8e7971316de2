"""Plain HTML + CSS views of an ``Attribution`` (no plotly, no JavaScript): the notebook view
(``Attribution._repr_html_``) and the summary at the top of the report.

Tokens are coloured spans, red for positive and blue for negative relevance, each row on its own
scale (its largest absolute value is full colour); the exact numbers are in each span's title
(hover). Every string that comes from the tokenizer or the user is escaped.
"""

from __future__ import annotations

import html
from typing import List, Optional, Tuple

# (red, green, blue) at full positive / negative relevance
POSITIVE = (214, 39, 40)
NEGATIVE = (31, 119, 180)
NOTEBOOK_EXAMPLES = 3  # a batch shows its first few examples and says how many it left out


def escape(text: str) -> str:
    return html.escape(str(text), quote=True)


def visible_token(token: str) -> str:
    """A token as it reads in a span: newlines and tabs drawn, an empty token marked."""
    if token == "":
        return "\u2205"
    return token.replace("\n", "\u23ce").replace("\t", "\u21e5")


def colour(value: float, limit: float) -> str:
    """CSS background for ``value`` on the symmetric scale ``[-limit, limit]``."""
    strength = 0.0 if limit <= 0 else min(1.0, abs(value) / limit)
    r, g, b = POSITIVE if value >= 0 else NEGATIVE
    return f"rgba({r},{g},{b},{strength * 0.85:.3f})"


def real_positions(attr, index: int) -> List[int]:
    """The example's positions that hold tokens (not padding), in order."""
    return [p for p, m in enumerate(attr.attention_mask[index].tolist()) if m]


def prompt_text(attr, index: int) -> str:
    """The prompt as the tokenizer decodes it, or (for results without it) its tokens joined."""
    if attr.prompt_text is not None:
        return attr.prompt_text[index]
    tokens = attr.str_tokens[index]
    return "".join(tokens[p] for p in real_positions(attr, index))


def target_description(attr, index: int) -> str:
    """What was explained, and where: "logit of ' Mary' minus logit of ' John' at position 14 (' to')"."""
    label = attr.target_label[index] if attr.target_label is not None else "the explained scalar"
    position = int(attr.target_position[index])
    tokens = attr.str_tokens[index]
    token = f" ({tokens[position]!r})" if 0 <= position < len(tokens) else ""
    return f"{label} at position {position}{token}"


def token_rows(attr, index: int, aggregation: str = "relu") -> List[Tuple[str, List[float]]]:
    """``[(row name, values over the real positions)]``: semantic, positional, combined."""
    positions = real_positions(attr, index)
    positional = attr.positional_per_position[index]
    combined = attr.combined(aggregation)[index]
    rows = [("semantic", attr.semantic[index]), ("positional", positional), (f"combined ({aggregation})", combined)]
    return [(name, [float(values[p]) for p in positions]) for name, values in rows]


_CSS = (
    "<style>.lp-view{font-family:sans-serif;font-size:13px;line-height:1.9}"
    ".lp-view .lp-row{margin:2px 0}.lp-view .lp-name{display:inline-block;min-width:11em;color:#444}"
    ".lp-view .lp-tok{white-space:pre;padding:1px 2px;margin:0 1px;border-radius:3px;"
    "font-family:monospace;border:1px solid #ddd}"
    ".lp-view .lp-scale{color:#777;font-size:11px;margin-left:6px}"
    ".lp-view pre{font-size:12px;line-height:1.3;background:#f7f7f7;padding:6px;white-space:pre-wrap}</style>"
)


def token_block(attr, index: int, aggregation: str = "relu") -> str:
    """One example's tokens coloured by each row's relevance, numbers in the spans' titles."""
    positions = real_positions(attr, index)
    tokens = [attr.str_tokens[index][p] for p in positions]
    explained = int(attr.target_position[index])
    lines = []
    for name, values in token_rows(attr, index, aggregation):
        limit = max((abs(v) for v in values), default=0.0)
        spans = []
        for p, token, value in zip(positions, tokens, values):
            mark = ";outline:2px solid #333" if p == explained else ""
            spans.append(
                f"<span class='lp-tok' style='background:{colour(value, limit)}{mark}' "
                f"title='{escape(f'position {p} {token!r}: {name} {value:.6g}')}'>"
                f"{escape(visible_token(token))}</span>"
            )
        lines.append(f"<div class='lp-row'><span class='lp-name'>{escape(name)}</span>{''.join(spans)}"
                     f"<span class='lp-scale'>full colour = \u00b1{limit:.3g}</span></div>")
    return "\n".join(lines)


def example_header(attr, index: int) -> str:
    """Model, method, target and prompt of one example, as a few lines of HTML."""
    return (
        f"<div><b>model</b> {escape(attr.model_name or '-')} &nbsp; <b>method</b> {escape(attr.method)}</div>"
        f"<div><b>explained</b> {escape(target_description(attr, index))} = "
        f"{float(attr.target_value[index]):.6g}</div>"
        f"<div><b>prompt</b> <span style='white-space:pre-wrap;font-family:monospace'>"
        f"{escape(prompt_text(attr, index))}</span></div>"
    )


def summary(attr, index: int, aggregation: str = "relu") -> str:
    """Header, token view and conservation table of one example (the report's top)."""
    return (
        f"<div class='lp-view'>{_CSS}{example_header(attr, index)}{token_block(attr, index, aggregation)}"
        f"<pre>{escape(attr.conservation().format(index))}</pre></div>"
    )


def notebook_view(attr, max_examples: Optional[int] = NOTEBOOK_EXAMPLES) -> str:
    """The first ``max_examples`` examples (all with None), then a note on the rest."""
    shown = attr.batch_size if max_examples is None else min(attr.batch_size, max_examples)
    # a result built by hand (no internal reductions) still renders: signed map, no table
    has_reductions = attr._reductions is not None
    aggregation = "relu" if has_reductions else "signed"
    table = attr.conservation().format if has_reductions else (lambda index: "")
    parts = [f"<div class='lp-view'>{_CSS}<div><b>{escape(repr(attr))}</b></div>"]
    for index in range(shown):
        parts.append(f"<hr style='margin:4px 0'><div><b>example {index}</b></div>{example_header(attr, index)}"
                     f"{token_block(attr, index, aggregation)}<pre>{escape(table(index))}</pre>")
    if shown < attr.batch_size:
        rest = attr.batch_size - shown
        parts.append(f"<div><i>{rest} more example{'s' if rest != 1 else ''} not shown: attr[i] views "
                     "example i; attr.to_frame('tokens') holds them all</i></div>")
    parts.append("</div>")
    return "".join(parts)
