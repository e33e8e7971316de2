"""What a rule is: a small object that decides how relevance passes one kind of node.

The sweep calls ``rule.apply(act, site)`` at every hook point whose role the method maps to the
rule. The rule returns the tensor the model continues with — the same *value*, with a patched
backward (``lens_palrp.rules.functional``) — and the share of the node's relevance that this
tensor carries (``R = share * act * grad``), or ``None`` where no relevance passes (a factor held
constant). Rules never touch the model; they read what the sweep captured at other hook points of
the same layer through the ``Site`` they are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, Tuple

import torch
from torch import Tensor

from lens_palrp.roles import Role

if TYPE_CHECKING:  # the hooks package imports the rules
    from lens_palrp.hooks.base import ModelFamily

Applied = Tuple[Tensor, Optional[float]]


class Site(Protocol):
    """One hook point during the forward, as a rule sees it."""

    name: str
    role: Role
    layer: Optional[int]
    consumer: bool  # False at an at_hook target: the explained scalar consumes the activation
    family: "ModelFamily"
    edited: bool  # the caller's own hooks ran here: the activation may differ from what its inputs give

    def take(self, role: Role) -> Tensor:
        """The rule-patched output of ``role`` in this layer (captured because a rule reads it)."""

    def add_input_sink(self, leaf: Tensor) -> None:
        """Register ``leaf`` as the autograd input where relevance of this role stops."""


class Rule:
    """Relevance passes unchanged: plain gradient x input at this node."""

    splits_rotation = False  # a rule on rotated q/k that sends part of the relevance to the rotation

    def reads(self, family: "ModelFamily") -> Tuple[Role, ...]:
        """Roles of the same layer whose output ``apply`` takes from the site."""
        return ()

    def apply(self, act: Tensor, site: Site) -> Applied:
        return act, 1.0

    def gradient_factor(self, family: "ModelFamily") -> Optional[float]:
        """The rule as one constant factor on the gradient through its node, where it is one
        (0: the node held constant); None where it is not. A fused attention kernel has no
        score or pattern tensor to install a rule on, so it applies those rules as factors on
        the gradients of q and k instead (``lens_palrp.canonizers.FusedAttention``); a rule
        that is no constant factor keeps the sweep on eager attention. A subclass that
        overrides ``apply`` is None unless it says otherwise."""
        return 1.0 if type(self).apply is Rule.apply else None

    def raw_score_gradient(self, family: "ModelFamily", raw: Tensor, grad: Tensor) -> Tensor:
        """At the attention scores: the gradient at the raw scores ``q k^T / scale`` from ``grad``,
        the one at the scores the softmax takes (capped where the model has a softcap). A strategy
        that credits grouped keys per query head from the score gradients needs it. Plain rule:
        the cap's derivative; a rule that patches the node must say its own."""
        cap = family.attn_softcap
        if cap is None:
            return grad
        if type(self).apply is not Rule.apply:
            raise NotImplementedError(f"{type(self).__name__} at the scores of a softcapped model does not say "
                                      "what gradient the raw scores get (raw_score_gradient)")
        t = torch.tanh(raw / cap)
        return grad * (1 - t * t)

    def complete(self, raw: Tensor, value: Tensor) -> Tensor:
        """For a rule whose node has no hook after it (the output softcap): the node's output
        ``value`` computed by the model from ``raw``, with the rule installed. Plain: unchanged."""
        return value

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


Gradient = Rule  # the rule of plain gradient x input, by its name


class InputSink(Rule):
    """An input embedding (token, position, token type): the activation becomes an autograd leaf,
    so relevance stops here and is read as ``embedding * gradient`` (Eq. 5 with epsilon 0)."""

    def apply(self, act: Tensor, site: Site) -> Applied:
        leaf = act.detach().requires_grad_(True)
        site.add_input_sink(leaf)
        return leaf, 1.0


class ConstantScale(Rule):
    """The scale of a LayerNorm / RMSNorm held constant (the identity rule on the normalization):
    ``x / scale`` is then linear in ``x``, and the scale receives no relevance."""

    def apply(self, act: Tensor, site: Site) -> Applied:
        return act.detach(), None

    def gradient_factor(self, family: "ModelFamily") -> Optional[float]:
        return None  # a norm's scale is no factor of an attention score
