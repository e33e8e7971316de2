"""lens_palrp: Positional-Aware LRP (PA-LRP) for TransformerLens models.

>>> import lens_palrp as lp
>>> attr = lp.explain(model, "The capital of France is", " Paris")
>>> attr.semantic, attr.positional, attr.combined()
"""

from lens_palrp.engine import explain, rule_sites
from lens_palrp.dataset import DatasetAttribution, explain_dataset
from lens_palrp.hooks import unverified_architectures
from lens_palrp.methods import METHODS, Method, register_method
from lens_palrp.result import Attribution, Conservation
from lens_palrp.similarity import explain_similarity
from lens_palrp.continuation import Continuation, explain_continuation
from lens_palrp.targets import at_hook
from lens_palrp import models, zoo

__version__ = "0.1.0"
__all__ = ["explain", "explain_dataset", "DatasetAttribution", "explain_similarity", "explain_continuation", "Continuation", "at_hook", "unverified_architectures", "Attribution", "Conservation", "METHODS", "Method", "register_method", "rule_sites", "zoo", "models", "__version__"]
