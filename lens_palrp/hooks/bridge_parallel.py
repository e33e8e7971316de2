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
from typing import Any, Dict, List, Optional

from torch import Tensor

from lens_palrp.canonizers.rotation_hooks import RotationHooksInPath
from lens_palrp.hooks.bridge_support import bridge_component

JOINT_ROTARY_ATTENTION = "JointQKVPositionEmbeddingsAttentionBridge"


def rotary_dim(model, d_head: int) -> int:
    """Rotated channels per head of a RoPE bridge (``cfg.rotary_dim`` is None on a bridge)."""
    from lens_palrp.hooks.transformer_bridge import _rotary_fraction

    hf_model = getattr(model, "original_model", None)
    hf_config = getattr(hf_model, "config", None)
    if hf_model is None or hf_config is None:
        return d_head
    width = int(d_head * _rotary_fraction(hf_config))
    tables = {2 * int(m.inv_freq.shape[-1]) for m in hf_model.modules()
              if isinstance(getattr(m, "inv_freq", None), Tensor)}
    # only a partial rotation is checked: full RoPE rotates every channel whatever its tables' width
    if tables and width < d_head and tables != {width}:
        raise NotImplementedError(
            f"TransformerBridge of {getattr(hf_config, 'model_type', None)!r}, partial RoPE: the config rotates "
            f"{width} of {d_head} channels per head, the rotary "
            f"embedding builds tables of width {sorted(tables)}; lens_palrp cannot tell which the forward uses")
    return width


_SOURCES: Dict[Any, Optional[str]] = {}


def _attention_source(cls: Any) -> Optional[str]:
    """The source of ``cls``'s attention computation (read once per class); None where it is not
    readable."""
    if cls not in _SOURCES:
        try:
            _SOURCES[cls] = inspect.getsource(cls._reconstruct_attention)
        except (OSError, TypeError):
            _SOURCES[cls] = None
    return _SOURCES[cls]


def _model_type(model) -> str:
    return str(getattr(getattr(getattr(model, "original_model", None), "config", None), "model_type", None))


def _is_joint_kind(attn) -> bool:
    """``JointQKVPositionEmbeddingsAttentionBridge`` or a subclass of it."""
    return attn is not None and any(c.__name__ == JOINT_ROTARY_ATTENTION for c in type(attn).__mro__)


def rotation_hooks_missing(model) -> List:
    """The joint-qkv RoPE attentions whose ``hook_rot_q`` / ``hook_rot_k`` are not in the path."""
    missing = []
    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if attn is None or not _is_joint_kind(attn):
            continue
        if not (hasattr(attn, "hook_rot_q") and hasattr(attn, "hook_rot_k")):
            continue
        source = _attention_source(type(attn))
        if source is None:
            raise NotImplementedError(
                f"TransformerBridge of {_model_type(model)!r}: {type(attn).__name__}: cannot read its "
                "attention's source to tell whether hook_rot_q / hook_rot_k are in the path")
        if "hook_rot_q" in source and "hook_rot_k" in source:
            continue  # the attention fires them itself
        # the wrapper puts them after the rotation: only where the attention rotates through it
        own_rotation = type(attn)._apply_rotary_pos_emb.__qualname__.split(".")[0] == JOINT_ROTARY_ATTENTION
        if not own_rotation or "self._apply_rotary_pos_emb(" not in source:
            raise NotImplementedError(
                f"TransformerBridge of {_model_type(model)!r}: {type(attn).__name__} rotates q and k otherwise "
                f"than {JOINT_ROTARY_ATTENTION}'s _apply_rotary_pos_emb and never calls hook_rot_q / hook_rot_k: "
                "lens_palrp cannot put its RoPE rules there")
        missing.append(attn)
    return missing


def check_supported(family) -> None:
    """Refuse a joint-qkv RoPE bridge whose scores the bridge scales otherwise than the Hugging
    Face module: the bridge divides by ``sqrt(head_dim)`` whatever the model says, the rules (and
    the grouped-key sink) use the module's scale, so one of the two would be wrong."""
    for layer, block in enumerate(family.model.blocks):
        if _is_joint_kind(getattr(block, "attn", None)):
            scale, bridge_scale = family.attn_scale(layer), family.d_head ** 0.5
            if abs(scale - bridge_scale) > 1e-12 * bridge_scale:
                raise NotImplementedError(
                    f"TransformerBridge of {family._model_type()!r}: layer {layer}'s Hugging Face attention "
                    f"scales the scores by 1/{scale:.6g}, {JOINT_ROTARY_ATTENTION} by 1/sqrt(head_dim) = "
                    f"1/{bridge_scale:.6g}; lens_palrp cannot tell which the explained forward follows")


def canonizers(family) -> list:
    """The rewrites these bridges need: the rotated q and k put into the path (none elsewhere)."""
    if family.pe_type != "rotary":
        return []
    missing = rotation_hooks_missing(family.model)
    return [RotationHooksInPath(missing)] if missing else []


# ------------------------------------------------------------------------------ fused attention
def is_joint_rotary(attn) -> bool:
    joint = bridge_component("joint_qkv_position_embeddings_attention", "JointQKVPositionEmbeddingsAttentionBridge")
    return joint is not None and type(attn) is joint


def fused_refusal(family, attns) -> Optional[str]:
    """What of these joint-qkv RoPE attentions the fused forward below does not reproduce, or None.
    It reproduces ``JointQKVPositionEmbeddingsAttentionBridge``'s plain path exactly as the class
    ships (the class itself, no subclass): fused projection split into q, k, v, rotate-half RoPE
    (full or partial), grouped kv heads, scores scaled by ``head_dim ** -0.5``, Hugging Face's
    mask, the output projection."""
    cfg = family.cfg
    reasons = {
        "split q/k/v inputs (use_split_qkv_input / use_attn_in)": bool(
            getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False)),
        "use_attn_result": bool(getattr(cfg, "use_attn_result", False)),
        "adjacent-pair RoPE": bool(getattr(cfg, "rotary_adjacent_pairs", False)),
    }
    hit = [name for name, on in reasons.items() if on]
    return f"the fused forward does not cover {', '.join(hit)}" if hit else None


def fused_forward(family, layer: int, kernel):
    """``JointQKVPositionEmbeddingsAttentionBridge.forward`` (the same hook points up to
    ``hook_rot_q`` / ``hook_rot_k`` / ``hook_v`` and from ``hook_z`` on), with ``kernel``
    (``FusedAttention.kernel``) in place of scores, mask, softmax and pattern. The rotated q and
    k pass their hook points here whether or not ``RotationHooksInPath`` is registered (its
    wrapper is bypassed: the class's own rotation is called)."""
    attn = family.attention_module(layer)
    n_heads = family.n_heads
    n_kv = family.n_kv_heads or n_heads
    rotate = type(attn)._apply_rotary_pos_emb
    scale = family.attn_scale(layer)

    def forward(*args, **kwargs):
        hidden = attn._apply_attention_input_hook(*args, **kwargs)
        kwargs.pop("hidden_states", None)
        q, k, v = attn.q(hidden), attn.k(hidden), attn.v(hidden)
        q, k, v, batch, n_q, head_dim = attn._reshape_qkv_to_heads(q, k, v, n_heads, n_kv)
        position_embeddings = kwargs.get("position_embeddings")
        if not isinstance(position_embeddings, tuple):
            raise NotImplementedError(f"layer {layer}: no RoPE tables reached the attention")
        cos, sin = attn._apply_position_embedding_hooks(position_embeddings)
        q, k = rotate(attn, q, k, cos, sin)
        q, k = attn.hook_rot_q(q), attn.hook_rot_k(k)
        k, v = attn._update_kv_cache(k, v, **kwargs)
        mask, causal = kwargs.get("attention_mask"), attn.is_causal and not attn.is_cross_attention
        if mask is not None:
            if mask.ndim < 4:
                raise NotImplementedError("fused attention takes Hugging Face's 4-d masks only")
            mask, causal = mask[..., -n_q:, : k.shape[-2]], False  # authoritative, as in eager
        z = kernel(layer, q, k, v, scale, causal, mask, zero_empty_rows=attn.compatibility_mode)
        out = attn._apply_output_projection(attn._reshape_attn_output(z, batch, n_q, n_heads, head_dim))
        return attn.hook_out(attn.hook_hidden_states(out)), None  # no pattern exists

    return forward
