"""What the analyses share about the model they run: Hugging Face objects wrapped, eval mode and
the hook names they read.

The analyses run forwards of their own (patching, perturbation, rollout) next to ``explain``'s
sweep. Those forwards must see the model ``explain`` explains (eval mode: no dropout), and the hooks
they read must be the ones the sweep's rules sit on, whatever the model family calls them.
"""

from __future__ import annotations

import functools
from typing import Callable, List, TypeVar

from transformer_lens.utilities import get_act_name

from lens_palrp.roles import Role
from lens_palrp.safety import evaluating

F = TypeVar("F", bound=Callable)


def in_eval_mode(fn: F) -> F:
    """``fn(model, ...)`` run under ``evaluating(model)``: its forwards and the ``explain`` calls
    inside see the eval-mode model, and the caller gets the model back with every flag as it was."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with evaluating(model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def takes_hf_models(fn: F) -> F:
    """``fn(model, ..., tokenizer=None)`` also takes a Hugging Face model object, wrapped once as
    ``lp.explain`` wraps it (``lens_palrp.models.explainable``: a cached TransformerBridge over a
    weight-sharing copy), so every analysis accepts what ``explain`` accepts and the user's object
    is never the one run. Put it outside ``in_eval_mode``: the flags to restore are the bridge's."""

    @functools.wraps(fn)
    def wrapper(model, *args, tokenizer=None, **kwargs):
        from lens_palrp.models import explainable

        return fn(explainable(model, tokenizer), *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# TransformerLens' patching utilities name what they patch with ``get_act_name``
_PATCHED = {Role.Z: "z", Role.RESID_PRE: "resid_pre"}


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
        expected = get_act_name(_PATCHED[role], layer) if role in _PATCHED else name
        if name != expected:
            raise NotImplementedError(
                f"{family.name}: the sweep hooks {name!r} where TransformerLens' patching utilities patch "
                f"{expected!r}; patching and relevance would not be of the same component"
            )
        names.append(name)
    return names
