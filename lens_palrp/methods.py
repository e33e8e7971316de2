"""The attribution methods, each a set of rule choices (REFERENCE.md sections 1 and 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Method:
    """Which rule each kind of node gets.

    Factors are the share of a product's relevance that one factor receives (uniform rule: 1/2).
    ``pattern_share=None`` treats the attention pattern as a constant (CP-LRP).
    """

    name: str
    qk_share: float
    pattern_share: Optional[float]
    value_share: float
    detach_norm_scale: bool
    activation_identity: bool
    gate_share: Optional[float]  # None: plain autograd through the gated product
    up_share: Optional[float]
    positional_sinks: bool  # PA-LRP: RoPE / ALiBi / shortformer / input-PE sinks
    description: str = ""

    @property
    def is_lrp(self) -> bool:
        return self.detach_norm_scale


METHODS = {
    "pa_lrp": Method(
        "pa_lrp", 0.5, 0.5, 0.5, True, True, 0.5, 0.5, True,
        "AttnLRP plus positional sinks (PA-LRP, Bakish et al. 2025)",
    ),
    "attn_lrp": Method(
        "attn_lrp", 0.5, 0.5, 0.5, True, True, 0.5, 0.5, False,
        "AttnLRP (Achtibat et al. 2024); relevance into positional encodings leaks",
    ),
    "cp_lrp": Method(
        "cp_lrp", 1.0, None, 1.0, True, True, 0.0, 1.0, False,
        "CP-LRP (Ali et al. 2022): attention pattern and MLP gate held constant",
    ),
    "grad_x_input": Method(
        "grad_x_input", 1.0, 1.0, 1.0, False, False, None, None, False,
        "plain gradient x input, no rules",
    ),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; choose one of {sorted(METHODS)}"
        ) from None
