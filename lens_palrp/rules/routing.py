"""The rules inside a mixture-of-experts MLP: the routed product ``w_e(x) * expert_e(x)``, and
gpt-oss's expert product ``(clamp(up) + 1) * glu(clamp(gate))``."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from lens_palrp.roles import Role
from lens_palrp.rules.base import Applied, Rule, Site
from lens_palrp.rules.functional import identity_rule_ratio, linearized, scale_grad


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


def offset_gated_product(gate_pre: Tensor, gate_act: Tensor, up_pre: Tensor, up: Tensor, value: Tensor,
                         gate_share: float, up_share: float) -> Tensor:
    """``value = (up + 1) * gate_act`` (gpt-oss's experts; ``gate_act = f(gate_pre)``, ``up =
    clamp(up_pre)``) under AttnLRP's rules, so that no relevance is lost to the constant: the
    product is the sum ``up * gate_act + gate_act``; the epsilon rule (eps 0) splits the relevance
    over the two terms by value, the uniform rule gives ``gate_share`` / ``up_share`` of the first
    term to its factors, the second term is the gate side's alone; the identity rule passes each
    side through its element-wise function (activation, clamp). Backward weights: ``(gate_share up
    + 1) f(gate_pre) / gate_pre`` to ``gate_pre``, ``up_share gate_act up / up_pre`` to ``up_pre``."""
    gate_pre_d, gate_act_d, up_pre_d, up_d = gate_pre.detach(), gate_act.detach(), up_pre.detach(), up.detach()
    inputs = [gate_pre]
    weights = [(gate_share * up_d + 1) * identity_rule_ratio(gate_pre_d, gate_act_d)]
    if up_share:
        inputs.append(up_pre)
        weights.append(up_share * gate_act_d * identity_rule_ratio(up_pre_d, up_d))
    return linearized(value, inputs, weights)
