"""Attribution methods as declarative rule maps: hook role -> rule object.

A method says, for every role a hook point can play (``lens_palrp.roles.Role``), which rule
(``lens_palrp.rules``) the sweep installs there; roles it leaves out pass relevance as plain
gradient x input. It also says what happens to the relevance that reaches a positional encoding:
PA-LRP turns it into sinks (per layer, head and position), the others let it leak (measured and
reported by ``attr.conservation()``, absent from the maps). The engine knows no method by name.

A variant is a new map, registered under a name and then used like the built-in ones::

    from lens_palrp import rules
    from lens_palrp.roles import Role
    from lens_palrp.methods import METHODS, register_method

    register_method(METHODS["pa_lrp"].with_rules("pa_lrp_constant_gate",
                                                 {Role.MLP_GATED: rules.GatedShares(0.0, 1.0)}))
    lp.explain(model, tokens, target, method="pa_lrp_constant_gate")
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, Mapping, Optional

from lens_palrp import rules
from lens_palrp.roles import Role
from lens_palrp.rules import Rule


@dataclass(frozen=True)
class PositionalTreatment:
    """What a method does with the relevance that reaches positional encodings.

    ``sinks=True`` (PA-LRP): it is mapped, per layer, head and position, into ``attr.positional``
    and ``attr.positional_input``. ``sinks=False``: it is measured and reported as
    ``conservation().positional_leak``; the maps hold zeros.
    """

    sinks: bool


SINKS = PositionalTreatment(sinks=True)
LEAK = PositionalTreatment(sinks=False)


@dataclass(frozen=True)
class Method:
    """A named rule map. ``rule(role)`` is the rule installed at every hook point of ``role``."""

    name: str
    rules: Mapping[Role, Rule]
    positional: PositionalTreatment = LEAK
    description: str = ""

    def __post_init__(self):
        for role, rule in self.rules.items():
            if not isinstance(role, Role):
                raise TypeError(f"method {self.name!r}: rule map keys must be Role members, got {role!r}")
            if not isinstance(rule, rules.Rule):
                raise TypeError(f"method {self.name!r}: the rule for {role.name} must be a lens_palrp.rules.Rule, "
                                f"got {type(rule).__name__}")
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))

    def rule(self, role: Role) -> Rule:
        return self.rules.get(role, _GRADIENT)

    def with_rules(self, name: str, changes: Mapping[Role, Rule], description: str = "",
                   positional: Optional[PositionalTreatment] = None) -> "Method":
        """A variant: this method's map with ``changes`` applied, under a new name."""
        merged: Dict[Role, Rule] = {**self.rules, **changes}
        return Method(name, merged, self.positional if positional is None else positional,
                      description or f"{self.name} with {', '.join(r.name for r in changes)} changed")


_GRADIENT = rules.Gradient()

# every method: the input embeddings are where relevance stops
_INPUT_SINKS = {Role.EMBED: rules.InputSink(), Role.POS_EMBED: rules.InputSink(), Role.TOKEN_TYPE: rules.InputSink()}

# AttnLRP (Achtibat et al. 2024): identity rule on norms and activations, uniform rule on products
_ATTN_LRP = {
    **_INPUT_SINKS,
    Role.NORM_SCALE: rules.ConstantScale(),
    Role.Q: rules.UniformShare(0.5),
    Role.K: rules.UniformShare(0.5),
    Role.ROT_Q: rules.UniformShare(0.5),
    Role.ROT_K: rules.UniformShare(0.5),
    Role.V: rules.UniformShare(0.5),
    Role.PATTERN: rules.UniformShare(0.5),
    Role.SCORES: rules.IdentitySoftcap(),
    Role.MLP_POST: rules.IdentityActivation(),
    Role.MLP_MID: rules.IdentityActivation(),
    Role.MLP_GATED: rules.GatedShares(0.5, 0.5),
    Role.MOE_ROUTED: rules.RoutedShares(0.5, 0.5),
    Role.LOGITS: rules.IdentityOutputSoftcap(),
}

METHODS: Dict[str, Method] = {}


def register_method(method: Method, overwrite: bool = False) -> Method:
    """Make ``method`` available as ``explain(..., method=method.name)``."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a lens_palrp.methods.Method, got {type(method).__name__}")
    if method.name in METHODS and not overwrite:
        raise ValueError(f"a method named {method.name!r} is registered already (pass overwrite=True to replace it)")
    METHODS[method.name] = method
    return method


register_method(Method(
    "pa_lrp", {**_ATTN_LRP, Role.ROT_Q: rules.RotatedShare(0.5, 0.5), Role.ROT_K: rules.RotatedShare(0.5, 0.5)},
    SINKS, "AttnLRP plus positional sinks (PA-LRP, Bakish et al. 2025)",
))
register_method(Method(
    "attn_lrp", _ATTN_LRP, LEAK, "AttnLRP (Achtibat et al. 2024); relevance into positional encodings leaks",
))
register_method(Method(
    "cp_lrp",
    {**_ATTN_LRP, Role.Q: _GRADIENT, Role.K: _GRADIENT, Role.ROT_Q: _GRADIENT, Role.ROT_K: _GRADIENT,
     Role.V: _GRADIENT, Role.PATTERN: rules.HeldConstant(), Role.SCORES: _GRADIENT,
     Role.MLP_GATED: rules.GatedShares(0.0, 1.0), Role.MOE_ROUTED: rules.RoutedShares(0.0, 1.0)},
    LEAK, "CP-LRP (Ali et al. 2022): attention pattern, MLP gate and MoE routing weights held constant",
))
register_method(Method(
    "relp",
    {**_INPUT_SINKS, Role.NORM_SCALE: rules.ConstantScale(), Role.MLP_POST: rules.IdentityActivation(),
     Role.MLP_MID: rules.IdentityActivation(), Role.MLP_GATED: rules.GatedShares(0.5, 0.5),
     Role.MOE_ROUTED: rules.RoutedShares(0.5, 0.5), Role.LOGITS: rules.IdentityOutputSoftcap()},
    LEAK, "RelP (Jafari et al. 2025): the LayerNorm, identity and half rules only; attention plain gradient",
))
register_method(Method("grad_x_input", _INPUT_SINKS, LEAK, "plain gradient x input, no rules"))


def get_method(method) -> Method:
    """A registered method by name, or a ``Method`` object as it is."""
    if isinstance(method, Method):
        return method
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}") from None
