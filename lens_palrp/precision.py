"""Precision: the model runs in its own dtype; every relevance is formed and summed in float32.

Half precision (bfloat16, float16) is how real models run on GPUs, but a relevance is a product
``activation * gradient`` summed over thousands of channels whose terms cancel: formed in
bfloat16 (8 significant bits) such sums lose most of their digits. So the forward and the
backward stay in the model's dtype (their cost is the model's, and their rounding is the model's
own), while every record the sweep keeps is formed from operands upcast to the *record dtype*
(float32 for half models, float64 for float64 models) the moment the backward reaches them, and
accumulated there. Only those small per-site temporaries are upcast, never the model.

float16 has bfloat16's precision problem less and another one more: gradients below 6e-5 lose
bits (subnormals) and below 6e-8 vanish, and the deep layers' gradients of one logit are that
small; the per-layer positional sums of an 8-layer model came out 14% off. So a float16 sweep
seeds its backward with ``FLOAT16_GRADIENT_SCALE`` (a power of two, as mixed-precision training
scales its loss) and every gradient hook divides it out after the upcast, exactly. Should the
scaled backward overflow, ``explain`` runs the sweep once more unscaled.

Half precision can overflow (float16 saturates at 65504) or give NaN; a result is never silently
wrong: the engine refuses a non-finite target value or relevance with a ``FloatingPointError``
that names the dtype (``describe_non_finite``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import Tensor

# the model's dtype -> the dtype relevance records are formed and accumulated in
RECORD_DTYPES: Dict[torch.dtype, torch.dtype] = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}


FLOAT16_GRADIENT_SCALE = 2.0 ** 10  # 1024: the float16 per-layer error 14% -> 0.35% (benchmarks/precision.py)


@dataclass(frozen=True)
class Precision:
    """The two dtypes of one sweep (the model's and the records'), and the factor the backward is
    seeded with (1 but for float16)."""

    model: torch.dtype
    records: torch.dtype
    gradient_scale: float = 1.0

    @property
    def half(self) -> bool:
        return self.model in (torch.bfloat16, torch.float16)

    def upcast(self, tensor: Tensor) -> Tensor:
        """``tensor`` in the record dtype (itself where it is already; a copy otherwise)."""
        return tensor if tensor.dtype == self.records else tensor.to(self.records)

    def unscale(self, gradient: Tensor) -> Tensor:
        """A gradient of the seeded backward as the gradient of the target: in the record dtype,
        the seed's scale divided out (exact: a power of two)."""
        gradient = self.upcast(gradient)
        return gradient if self.gradient_scale == 1.0 else gradient * (1.0 / self.gradient_scale)

    def relevance(self, activation: Tensor, gradient: Tensor) -> Tensor:
        """``activation * gradient`` formed in the record dtype (``gradient`` from the backward)."""
        return self.upcast(activation) * self.unscale(gradient)

    def unscaled(self) -> "Precision":
        return Precision(self.model, self.records)

    def describe_non_finite(self, what: str) -> str:
        """The message of the ``FloatingPointError`` for a NaN / inf in ``what``."""
        return f"{what} contains NaN or inf {self.non_finite_hint()}"

    def non_finite_hint(self) -> str:
        """Which dtype the model ran in, and what to try."""
        if self.model == torch.float16:
            hint = ("float16 overflows past 65504: explain the model in bfloat16 (same memory, float32's "
                    "range) or float32")
        elif self.half:
            hint = "explain a float32 copy of the model to see whether half precision causes it"
        else:
            hint = "check the model's weights and inputs"
        return f"(model in {str(self.model).replace('torch.', '')}); {hint}"


def precision_for(model, scale_gradients: bool = True) -> Precision:
    """The precision of a sweep on ``model``, from its first floating-point parameter (the
    embedding: what the relevance leaves are made of); an unsupported dtype is refused, naming it."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None:
        raise TypeError("the model has no floating-point parameters: nothing to explain with gradients")
    if dtype not in RECORD_DTYPES:
        supported = ", ".join(str(d).replace("torch.", "") for d in RECORD_DTYPES)
        raise TypeError(f"the model is in {dtype}; lens_palrp explains models in {supported}")
    scale = FLOAT16_GRADIENT_SCALE if dtype == torch.float16 and scale_gradients else 1.0
    return Precision(dtype, RECORD_DTYPES[dtype], scale)
