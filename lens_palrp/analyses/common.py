"""What the analyses share about the model they run: eval mode and the hook names they read.

The analyses run forwards of their own (patching, perturbation, rollout) next to ``explain``'s
sweep. Those forwards must see the model ``explain`` explains (eval mode: no dropout), and the hooks
they read must be the ones the sweep's rules sit on, whatever the model family calls them.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Dict, List, TypeVar

import torch

from lens_palrp.hooks.roles import Role


def _all_modules(model) -> List[torch.nn.Module]:
    """``model.modules()`` and, for a TransformerBridge, its Hugging Face model's: the bridge keeps
    ``original_model`` outside its own module tree, with dropouts only reachable from there."""
    seen: Dict[int, torch.nn.Module] = {}
    for root in (model, getattr(model, "original_model", None)):
        if isinstance(root, torch.nn.Module):
            for module in root.modules():
                seen.setdefault(id(module), module)
    return list(seen.values())


@contextmanager
def evaluating(model):
    """Eval mode for the analysis' own forwards (as ``explain`` explains the eval-mode model, and
    TransformerLens 4's patching refuses a model in training mode); every module's flag is put
    back afterwards, whatever happens."""
    modes = [(m, m.training) for m in _all_modules(model)]
    try:
        if isinstance(model, torch.nn.Module):
            model.eval()  # a bridge's own eval() also reaches its Hugging Face model
        for module, _ in modes:
            module.training = False
        yield
    finally:
        for module, training in modes:
            module.training = training


F = TypeVar("F", bound=Callable)


def in_eval_mode(fn: F) -> F:
    """``fn(model, ...)`` run under ``evaluating(model)``: its forwards and the ``explain`` calls
    inside see the eval-mode model, and the caller gets the model back with every flag as it was
    (``explain`` alone does not restore the flags of a bridge's Hugging Face model, which lies
    outside ``model.modules()``)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with evaluating(model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# TransformerLens' patching utilities name what they patch with ``utils.get_act_name``
_PATCHED = {Role.Z: "blocks.{layer}.attn.hook_z", Role.RESID_PRE: "blocks.{layer}.hook_resid_pre"}


def layer_hooks(family, role: Role) -> List[str]:
    """The hook of ``role`` in each layer, as the family's role map names it.

    Recording a gradient at another spelling of the same hook point (a bridge's canonical name
    behind a HookedTransformer alias, say) would put a second hook beside the one that installs the
    rule; the role map's name is the one the sweep hooks. Where TransformerLens' patching utilities
    patch a different name, the comparison would not be of one component: refused.
    """
    by_layer = {hr.layer: name for name, hr in family.hook_roles().items() if hr.role is role}
    names = []
    for layer in range(family.n_layers):
        name = by_layer.get(layer)
        if name is None:
            raise NotImplementedError(f"{family.name}: no hook plays the role '{role.value}' in layer {layer}")
        expected = _PATCHED.get(role, name).format(layer=layer)
        if name != expected:
            raise NotImplementedError(
                f"{family.name}: the sweep hooks {name!r} where TransformerLens' patching utilities patch "
                f"{expected!r}; patching and relevance would not be of the same component"
            )
        names.append(name)
    return names
