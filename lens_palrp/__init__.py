"""lens_palrp: Positional-Aware LRP (PA-LRP) for TransformerLens models.

>>> import lens_palrp as lp
>>> attr = lp.explain(model, "The capital of France is", " Paris")
>>> attr.semantic, attr.positional, attr.combined()

Names are imported on first use (PEP 562), so ``import lens_palrp`` and ``lens-palrp --help``
do not load torch and TransformerLens until something needs them.
"""

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "explain": "lens_palrp.engine",
    "rule_sites": "lens_palrp.engine",
    "explain_dataset": "lens_palrp.dataset",
    "DatasetAttribution": "lens_palrp.dataset",
    "explain_similarity": "lens_palrp.similarity",
    "explain_continuation": "lens_palrp.continuation",
    "Continuation": "lens_palrp.continuation",
    "at_hook": "lens_palrp.targets",
    "unverified_architectures": "lens_palrp.hooks",
    "Attribution": "lens_palrp.result",
    "Conservation": "lens_palrp.result",
    "METHODS": "lens_palrp.methods",
    "Method": "lens_palrp.methods",
    "register_method": "lens_palrp.methods",
}
_SUBMODULES = ("zoo", "models", "analyses")

__all__ = [*_NAMES, *_SUBMODULES, "__version__"]


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES or (not name.startswith("_") and importlib.util.find_spec(f"lens_palrp.{name}")):
        # any submodule, as the eager package had them all imported (lp.engine, lp.hooks, lp.io)
        value = importlib.import_module(f"lens_palrp.{name}")
    else:
        raise AttributeError(f"module 'lens_palrp' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
