"""TransformerBridge facts of GPT-NeoX / Pythia, Phi-3, Phi and Falcon (RoPE; fused qkv; parallel
attention and MLP), which the generic bridge adapter would get wrong.

* **The rotated q and k are not in the path** of ``JointQKVPositionEmbeddingsAttentionBridge``
  (GPT-NeoX, Phi-3, Falcon): ``hook_rot_q`` / ``hook_rot_k`` exist but are never called, so the
  ``Q K^T`` and RoPE rules installed there did nothing. ``canonizers`` puts them into the path
  (``lens_palrp.canonizers.RotationHooksInPath``) when the installed TransformerLens' attention
  does not call them itself; checked by intervention in ``tests/test_bridge_parallel.py``.
* **Partial RoPE** (GPT-NeoX ``rotary_pct``, Phi ``partial_rotary_factor``): the bridge's
  ``cfg.rotary_dim`` is None, but only the first ``rotary_dim`` channels of each head are rotated.
  ``rotary_dim`` returns the width of the tables the forward uses: ``int(head_dim * fraction)``
  as Hugging Face computes it, checked against the rotary embedding's own ``inv_freq``.
* **Parallel blocks** (GPT-NeoX ``use_parallel_residual``, Phi, Falcon ``parallel_attn``):
  ``x + attn(ln1(x)) + mlp(ln2(x))`` (or one shared ``ln1``) is computed by the Hugging Face layer
  with the bridge's hooked submodules inside it; the residual add is linear, each norm's scale is
  hooked and held constant, so the block needs no rule of its own.
"""

from __future__ import annotations

import inspect
from typing import List, Optional

from torch import Tensor

from lens_palrp.canonizers.rotation_hooks import RotationHooksInPath

JOINT_ROTARY_ATTENTION = "JointQKVPositionEmbeddingsAttentionBridge"


def rotary_dim(model, d_head: int) -> int:
    """Rotated channels per head of a RoPE bridge (``cfg.rotary_dim`` is None on a bridge)."""
    from lens_palrp.hooks.transformer_bridge import _rotary_fraction

    hf_model = getattr(model, "original_model", None)
    hf_config = getattr(hf_model, "config", None)
    if hf_config is None:
        return d_head
    width = int(d_head * _rotary_fraction(hf_config))
    tables = {2 * int(m.inv_freq.shape[-1]) for m in hf_model.modules()
              if isinstance(getattr(m, "inv_freq", None), Tensor)}
    # GPT-OSS-style half-width tables (applied to both halves) report d_head / 2 there: full RoPE
    if tables and width < d_head and tables != {width}:
        raise NotImplementedError(
            f"partial RoPE: the config rotates {width} of {d_head} channels per head, the rotary "
            f"embedding builds tables of width {sorted(tables)}; lens_palrp cannot tell which the forward uses")
    return width


def _calls_rotation_hooks(cls) -> Optional[bool]:
    """Whether ``cls``'s attention calls ``hook_rot_q`` itself; None: its source is not readable."""
    try:
        source = inspect.getsource(cls._reconstruct_attention)
    except (OSError, TypeError):
        return None
    return "hook_rot_q" in source and "hook_rot_k" in source


def rotation_hooks_missing(model) -> List:
    """The joint-qkv RoPE attentions whose ``hook_rot_q`` / ``hook_rot_k`` are not in the path."""
    missing = []
    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if attn is None or not any(c.__name__ == JOINT_ROTARY_ATTENTION for c in type(attn).__mro__):
            continue
        if not (hasattr(attn, "hook_rot_q") and hasattr(attn, "hook_rot_k")):
            continue
        calls = _calls_rotation_hooks(type(attn))
        if calls is None:
            raise NotImplementedError(
                f"{type(attn).__name__}: cannot read its attention's source to tell whether hook_rot_q / "
                "hook_rot_k are in the path")
        if not calls:
            if type(attn)._apply_rotary_pos_emb.__qualname__.split(".")[0] != JOINT_ROTARY_ATTENTION:
                raise NotImplementedError(
                    f"{type(attn).__name__} overrides the rotation of {JOINT_ROTARY_ATTENTION}; "
                    "lens_palrp does not know where its rotated q and k are")
            missing.append(attn)
    return missing


def canonizers(family) -> list:
    """The rewrites these bridges need: the rotated q and k put into the path (none elsewhere)."""
    if family.pe_type != "rotary":
        return []
    missing = rotation_hooks_missing(family.model)
    return [RotationHooksInPath(missing)] if missing else []
