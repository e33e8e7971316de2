"""Bounds for checks where two computations reach the same number by different arithmetic.

Two results computed by the same operations on the same shapes (the same call twice, a slice of
a batch, a tensor saved and loaded, a pad position a mask zeroes) are compared bit for bit. Two
results that take different paths (a batch of 1 and a batch of 18, a fused kernel and an eager
one, a float32 softmax inside Hugging Face and a float64 rebuild) round differently, and how
differently depends on the CPU's kernels (AVX-512, AVX2, the BLAS blocking, the thread count):
they are compared to ``rounding(dtype, scale)``, a few dozen units of ``dtype``'s machine epsilon
times the magnitude of the quantities summed on the way. See docs/tolerances.md.
"""

import torch

from lens_palrp.hooks.transformer_bridge import is_transformer_bridge


def eps(dtype) -> float:
    return torch.finfo(dtype).eps


def rounding(dtype, scale, ulps: int = 64) -> float:
    """An absolute bound for two ``dtype`` results of magnitude ``scale`` that differ by rounding
    only: ``ulps`` machine epsilons of ``scale``. 64 covers a few dozen roundings that need not
    cancel (observed: 1 to 5 ulps); a wrong computation misses by far more than that."""
    return ulps * eps(dtype) * float(scale)


def meeting_dtype(model) -> torch.dtype:
    """The precision two forwards of ``model`` that differ only in their arithmetic meet at: a
    TransformerBridge's own eager softmax runs in float32 even in a float64 model (an input that
    differs by a float64 rounding may round to another float32 there), otherwise the model's."""
    if is_transformer_bridge(model):
        return torch.float32
    return next(model.parameters()).dtype
