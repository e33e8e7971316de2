"""The rule for a mixture-of-experts MLP's routed product ``w_e(x) * expert_e(x)``."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from lens_palrp.roles import Role
from lens_palrp.rules.base import Applied, Rule, Site
from lens_palrp.rules.functional import scale_grad


def routed_product(weight: Tensor, expert: Tensor, weight_share: float, expert_share: float) -> Tensor:
    """``expert * weight`` (the model's own product, same value) under the uniform rule: the
    routing weight receives ``weight_share`` of the product's relevance, the expert's output
    ``expert_share``. A share of 0 holds that factor constant (detached)."""
    w = weight.detach() if weight_share == 0 else scale_grad(weight, weight_share)
    y = expert.detach() if expert_share == 0 else scale_grad(expert, expert_share)
    return y * w


class RoutedShares(Rule):
    """``w_e * expert_e(x)``, one selected expert of one token, as a product of two activations.

    AttnLRP (0.5, 0.5): the uniform rule, as for ``act(gate) * up``: half of the relevance goes
    through the expert, half to the routing weight and on through the router (its softmax
    absorbs what the deep Taylor rule drops there, measured as ``router_absorbed``). CP-LRP
    (0, 1): the routing weight is held constant, as CP-LRP holds the attention pattern and the
    MLP gate, so all relevance flows through the experts and the router gets none."""

    def __init__(self, weight_share: float = 0.5, expert_share: float = 0.5):
        self.weight_share, self.expert_share = weight_share, expert_share

    def reads(self, family) -> Tuple[Role, ...]:
        return (Role.MOE_WEIGHT, Role.MOE_EXPERT)

    def apply(self, act: Tensor, site: Site) -> Applied:
        weight, expert = site.take(Role.MOE_WEIGHT), site.take(Role.MOE_EXPERT)
        return routed_product(weight, expert, self.weight_share, self.expert_share), 1.0
