"""Rules for products of two activations: the uniform rule and its variants."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from lens_palrp.roles import Role
from lens_palrp.rules.base import Applied, Rule, Site
from lens_palrp.rules.functional import gated_product, scale_grad


class UniformShare(Rule):
    """One factor of a product (``Q K^T``, ``A V``) under the uniform rule: it receives ``share``
    of the product's relevance (1/2 for two factors). At an ``at_hook`` target the activation is
    not consumed by the product, so it keeps all of it."""

    def __init__(self, share: float = 0.5):
        self.share = share

    def apply(self, act: Tensor, site: Site) -> Applied:
        share = self.share if site.consumer else 1.0
        return scale_grad(act, share), share

    def gradient_factor(self, family) -> Optional[float]:
        return self.share


class HeldConstant(Rule):
    """A factor treated as a constant (CP-LRP's attention pattern): the other factor receives all
    the relevance, this one none. At an ``at_hook`` target it is the explained quantity itself."""

    def apply(self, act: Tensor, site: Site) -> Applied:
        if not site.consumer:
            return act, 1.0
        return act.detach(), None

    def gradient_factor(self, family) -> Optional[float]:
        return 0.0


class RotatedShare(UniformShare):
    """A rotated query or key (RoPE) in ``Q K^T``: ``share`` of the product's relevance, of which
    the rotated channels pass ``1 - rotation_share`` on to the content and keep
    ``rotation_share`` for the rotation (Eq. 10, the uniform rule on ``R_i q_i``); the RoPE
    strategy reports what the rotation keeps as the per-layer, per-head positional sink."""

    splits_rotation = True

    def __init__(self, share: float = 0.5, rotation_share: float = 0.5):
        super().__init__(share)
        self.rotation_share = rotation_share

    def apply(self, act: Tensor, site: Site) -> Applied:
        share = self.share if site.consumer else 1.0
        factor = torch.full((act.shape[-1],), share, dtype=act.dtype, device=act.device)
        factor[: site.family.rotary_dim] *= 1 - self.rotation_share
        return scale_grad(act, factor), share

    def gradient_factor(self, family) -> Optional[float]:
        return None  # per channel, not one factor


class GatedShares(Rule):
    """A gated MLP's ``act(gate) * up`` at ``hook_post``: the gate side receives ``gate_share``
    of the product's relevance (its activation under the identity rule), the linear side
    ``up_share``. AttnLRP: 1/2 and 1/2; CP-LRP: 0 and 1 (the gate held constant)."""

    def __init__(self, gate_share: float = 0.5, up_share: float = 0.5):
        self.gate_share, self.up_share = gate_share, up_share

    def reads(self, family) -> Tuple[Role, ...]:
        return (Role.MLP_PRE, Role.MLP_UP)

    def apply(self, act: Tensor, site: Site) -> Applied:
        assert site.layer is not None  # an MLP role is always in a block
        pre, up = site.take(Role.MLP_PRE), site.take(Role.MLP_UP)
        gate_act = site.family.activation(site.layer)(pre.detach())
        return gated_product(pre, gate_act, up, act, self.gate_share, self.up_share, edited=site.edited), 1.0
