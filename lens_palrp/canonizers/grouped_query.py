"""Grouped-query attention ungrouped: every query head gets its own copy of its kv head.

HookedTransformer can compute grouped-query attention with the shared key and value heads
repeated per query head (``set_ungroup_grouped_query_attention``), the same numbers with one key
per query head, so the RoPE key sink is per query head without further work. Recorded key and
value relevance is folded back (the copies of one kv head summed) to the model's own layout.
A hook the caller left at one of those points would see the copies, not the model's kv heads,
and compute something else than in the model's own forward: refused, naming it.
"""

from __future__ import annotations

from torch import Tensor

from lens_palrp.canonizers.base import Canonizer

_GROUPED_HOOKS = ("hook_k", "hook_v", "hook_rot_k")


class UngroupKeyValueHeads(Canonizer):
    def __init__(self):
        self._model = None
        self._previous = None
        self._n_kv_heads = None

    def register(self, family, sweep) -> None:
        hooked = sorted(name for name in sweep.caller_hooked if name.endswith(_GROUPED_HOOKS))
        if hooked:
            raise NotImplementedError(
                f"the hooks the caller added at {', '.join(hooked)} cannot be explained on this grouped-query "
                "model: the sweep ungroups its kv heads, so they would see one copy per query head instead of "
                "the model's kv heads; hook the query side, hook_z or the block instead"
            )
        self._model, self._n_kv_heads = family.model, family.n_kv_heads
        self._previous = family.model.cfg.ungroup_grouped_query_attention
        family.model.set_ungroup_grouped_query_attention(True)
        sweep.kv_grouped = False
        sweep.fold_record = self.fold

    def remove(self) -> None:
        if self._model is not None:
            self._model.set_ungroup_grouped_query_attention(self._previous)
            self._model = None

    def fold(self, name: str, relevance: Tensor) -> Tensor:
        """Sum the copies of each shared key/value head back into one."""
        if not name.endswith(_GROUPED_HOOKS):
            return relevance
        b, p, h, d = relevance.shape
        return relevance.reshape(b, p, self._n_kv_heads, h // self._n_kv_heads, d).sum(3)
