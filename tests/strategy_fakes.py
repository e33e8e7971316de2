"""A stand-in for the engine's sweep, so each positional strategy can be tested on its own: the
strategy sees exactly the attributes the contract names (``lens_palrp.positional.base``), and the
gradient hooks it attaches are run by an ordinary autograd backward."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lens_palrp.methods import get_method
from lens_palrp.roles import Role


class FakeSweep:
    def __init__(self, family, batch, n_pos, method="pa_lrp", kv_grouped=False, attention_mask=None,
                 scores_materialized=True):
        self.family = family
        self.scores_materialized = scores_materialized
        self.method = get_method(method)
        self.n_pos, self.attention_mask, self.kv_grouped = n_pos, attention_mask, kv_grouped
        self.positional = torch.zeros(batch, family.n_layers, family.n_heads, n_pos, dtype=torch.float64)
        self.leaves = {}
        self.captured = {}
        self.roles, self.caller_hooked = {}, set()  # no hook of a caller's

    def on_grad(self, tensor, fn):
        if tensor.requires_grad:
            tensor.register_hook(lambda g: fn(g))

    def observe(self, tensor, fn):  # the engine keeps the activation as a saved tensor instead
        if tensor.requires_grad:
            tensor.register_hook(lambda g, a=tensor.detach(): fn(a, g))

    def accumulate(self, total, value):
        total.add_(value)

    def take(self, role, layer):
        return self.captured.pop((role, layer))


def site(role, layer, rule=None, consumer=True, method="pa_lrp"):
    return SimpleNamespace(role=role, layer=layer, consumer=consumer,
                           rule=rule if rule is not None else get_method(method).rule(role))


def family(**facts):
    base = dict(n_layers=2, n_heads=2, rotary_dim=None, rotary_adjacent_pairs=False, name="fake")
    base.update(facts)
    return SimpleNamespace(**base)


ROLES = Role
