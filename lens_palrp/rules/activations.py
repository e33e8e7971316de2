"""Rules for element-wise non-linearities: the identity rule, at every place it is installed."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from lens_palrp.roles import Role
from lens_palrp.rules.base import Applied, Rule, Site
from lens_palrp.rules.functional import identity_rule, identity_rule_ratio, linearized


class IdentityActivation(Rule):
    """``f(hook_pre)`` under the identity rule: each output element's relevance passes 1:1 to its
    input element (``R(x) = R(f(x))``)."""

    def reads(self, family) -> Tuple[Role, ...]:
        return (Role.MLP_PRE,)

    def apply(self, act: Tensor, site: Site) -> Applied:
        return identity_rule(site.take(Role.MLP_PRE), act), 1.0


class IdentitySoftcap(Rule):
    """The attention softcap ``c tanh(s / c)`` (Gemma-2 style) under the identity rule (models
    without a cap: the scores pass unchanged). No hook
    sits between ``q k^T`` and the cap, so the raw scores are recomputed from the rule-patched
    query and key the family names in ``score_roles``; the model keeps its own value."""

    def reads(self, family) -> Tuple[Role, ...]:
        return tuple(family.score_roles) if family.attn_softcap is not None else ()

    def apply(self, act: Tensor, site: Site) -> Applied:
        fam = site.family
        if fam.attn_softcap is None:  # no cap: the scores pass unchanged
            return act, 1.0
        assert site.layer is not None
        q_role, k_role = fam.score_roles
        q, k = site.take(q_role), site.take(k_role)
        if k.shape[2] != q.shape[2]:  # grouped kv heads (a bridge keeps them): each query head's copy
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        raw = torch.einsum("bqhd,bkhd->bhqk", q, k) / fam.attn_scale(site.layer)
        capped = fam.attn_softcap * torch.tanh(raw.detach() / fam.attn_softcap)
        return linearized(act, [raw], [identity_rule_ratio(raw.detach(), capped)]), 1.0

    def gradient_factor(self, family) -> Optional[float]:
        return 1.0 if family.attn_softcap is None else None  # a capped score is no constant factor

    def raw_score_gradient(self, family, raw: Tensor, grad: Tensor) -> Tensor:
        if family.attn_softcap is None:
            return grad
        return grad * identity_rule_ratio(raw, family.attn_softcap * torch.tanh(raw / family.attn_softcap))


class IdentityOutputSoftcap(Rule):
    """The output softcap on the logits under the identity rule, completed after the forward from
    the raw logits captured at ``unembed.hook_out``."""

    def complete(self, raw: Tensor, value: Tensor) -> Tensor:
        return identity_rule(raw, value)
