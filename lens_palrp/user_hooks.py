"""Hooks the caller left on the model: part of the computation ``explain`` explains.

A hook added with ``model.add_hook``, ``model.hooks(...)`` or a ``run_with_hooks``-style context
still open changes what the model computes (an ablated head, a scaled MLP), and the explanation is
of that model. The sweep leaves such hooks where they are and adds its own behind them: PyTorch
runs a module's forward hooks in the order they were added (``prepend=True`` ones first), and the
sweep's are added last, so its rule and its records see the value the caller's hooks produced.

What the sweep must know of them (``lens_palrp.engine``):

* which hook points carry a forward hook (``forward_hooked``): where fused attention would skip
  one (``hook_attn_scores``, ``hook_pattern``), that layer runs eagerly;
* backward hooks are refused (``refuse_backward_hooks``): the backward *is* the relevance sweep, so
  such a hook would see the rule-modified gradients, and whatever it returned would change them.
"""

from __future__ import annotations

from typing import Dict, List, Set


def _points_by_name(family) -> Dict[str, object]:
    """One name per hook point object, the shortest of its aliases (a bridge lists several, e.g.
    ``blocks.1.mlp.hook_post`` and ``blocks.1.mlp.out.hook_in``): the HookedTransformer name.
    Kept on the family beside its ``hook_points``: every sweep asks, the answer does not change."""
    cached = family.__dict__.get("_points_by_name")
    if cached is None:
        points = family.hook_points()
        aliases: Dict[int, List[str]] = {}
        for name, point in points.items():
            aliases.setdefault(id(point), []).append(name)
        cached = family.__dict__["_points_by_name"] = {
            min(names, key=lambda n: (len(n), n)): points[names[0]] for names in aliases.values()}
    return cached


def forward_hooked(family) -> List[str]:
    """Hook points on which the caller left a forward hook or forward pre-hook, one name each."""
    return sorted(name for name, point in _points_by_name(family).items()
                  if getattr(point, "_forward_hooks", None) or getattr(point, "_forward_pre_hooks", None))


def with_aliases(family, names: List[str]) -> Set[str]:
    """Every name of the hook points ``names`` name: a rule site knows its point by its role's
    name, which on a bridge may be another alias than the one ``forward_hooked`` lists."""
    points = family.hook_points()
    hooked = {id(points[name]) for name in names}
    return {name for name, point in points.items() if id(point) in hooked}


def refuse_backward_hooks(family) -> None:
    """A ``ValueError`` naming every hook point that carries a backward hook."""
    hooked = sorted(name for name, point in _points_by_name(family).items()
                    if getattr(point, "_backward_hooks", None) or getattr(point, "_backward_pre_hooks", None))
    if hooked:
        raise ValueError(
            f"the model has backward hooks at {', '.join(hooked)}: explain's backward is the relevance "
            "sweep, so they would see (and could change) the rule-modified gradients, not the model's. "
            "Remove them for the call (model.reset_hooks(), or the handle's remove())"
        )
