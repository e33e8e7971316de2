"""The rotated query and key put into the path of a joint-qkv RoPE attention bridge.

TransformerLens' ``JointQKVPositionEmbeddingsAttentionBridge`` (GPT-NeoX / Pythia, Phi-3, Falcon
with RoPE) creates ``hook_rot_q`` / ``hook_rot_k`` but never calls them: its attention rotates q
and k with ``_apply_rotary_pos_emb`` and goes straight on to the scores. A rule installed there
would do nothing (the q k^T and RoPE rules silently missing: 39% of a Pythia logit unaccounted
for, no positional sink). This canonizer wraps that one method on each such attention instance so
that its two outputs pass the existing hook points, which is where ``PositionEmbeddingsAttentionBridge``
fires them (after the rotation, before the kv cache and the repetition of grouped kv heads). The
values are unchanged; ``remove`` deletes the instance attributes again.
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

from lens_palrp.canonizers.base import Canonizer

_NONE = object()


class RotationHooksInPath(Canonizer):
    """``attn._apply_rotary_pos_emb`` wrapped, per instance, to end in ``hook_rot_q`` / ``hook_rot_k``."""

    def __init__(self, attentions: Sequence[Any]):
        self.attentions = list(attentions)
        self._swapped: List[Tuple[Any, object]] = []

    def register(self, family, sweep) -> None:
        for attn in self.attentions:
            self._swapped.append((attn, attn.__dict__.get("_apply_rotary_pos_emb", _NONE)))
            # not setattr: a bridge component forwards attribute writes to its wrapped module
            attn.__dict__["_apply_rotary_pos_emb"] = _hooked_rotation(attn, attn._apply_rotary_pos_emb)

    def remove(self) -> None:
        for attn, previous in reversed(self._swapped):
            if previous is _NONE:
                attn.__dict__.pop("_apply_rotary_pos_emb", None)
            else:
                attn.__dict__["_apply_rotary_pos_emb"] = previous
        self._swapped = []


def _hooked_rotation(attn, rotate: Callable) -> Callable:
    def rotate_then_hook(q, k, cos, sin):
        q, k = rotate(q, k, cos, sin)
        return attn.hook_rot_q(q), attn.hook_rot_k(k)  # [batch, heads, pos, d_head]; hooks see pos first

    return rotate_then_hook
