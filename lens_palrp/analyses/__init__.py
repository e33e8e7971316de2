"""What users run on an ``Attribution``: figures now; patching, faithfulness and reports later."""

from lens_palrp.analyses.plots import (
    positional_heads_data,
    positional_heads_figure,
    token_relevance_figure,
    write_html,
)

__all__ = ["positional_heads_data", "positional_heads_figure", "token_relevance_figure", "write_html"]
