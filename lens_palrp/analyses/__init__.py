"""What users run on an ``Attribution``: figures and the HTML report (each figure has a
``*_data`` twin returning its numbers)."""

from lens_palrp.analyses import faithfulness
from lens_palrp.analyses.dataset_stats import (
    DatasetStats,
    collect,
    dataset_distance_figure,
    dataset_figures,
    dataset_layer_share_figure,
    dataset_positional_heads_figure,
    dataset_report,
    dataset_top_heads_figure,
    top_heads,
)
from lens_palrp.analyses.edges import Edge, EdgeAttribution, edge_attribution, path_patching
from lens_palrp.analyses.faithfulness import ground_truth_scores, perturbation_test, relevance_maps
from lens_palrp.analyses.patching import (
    PatchingComparison,
    PatchingResult,
    activation_patching,
    compare_with_patching,
    logit_difference,
    pearson,
    relevance_patching,
    spearman,
)
from lens_palrp.analyses.plots import (
    heads_data,
    heads_figure,
    layer_share_data,
    layer_share_figure,
    positional_heads_data,
    positional_heads_figure,
    report_figures,
    residual_data,
    residual_figure,
    token_relevance_figure,
    token_rows_data,
    write_html,
    write_report,
)

__all__ = [
    "DatasetStats", "collect", "dataset_distance_figure", "dataset_figures", "dataset_layer_share_figure",
    "dataset_positional_heads_figure", "dataset_report", "dataset_top_heads_figure", "top_heads",
    "Edge", "EdgeAttribution", "edge_attribution", "path_patching",
    "faithfulness", "ground_truth_scores", "perturbation_test", "relevance_maps",
    "PatchingComparison", "PatchingResult", "activation_patching", "compare_with_patching", "logit_difference",
    "pearson", "relevance_patching", "spearman",
    "heads_data", "heads_figure", "layer_share_data", "layer_share_figure", "positional_heads_data",
    "positional_heads_figure", "report_figures", "residual_data", "residual_figure",
    "token_relevance_figure", "token_rows_data", "write_html", "write_report",
]
