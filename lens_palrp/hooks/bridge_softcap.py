"""Softcaps and q/k norms on a TransformerBridge: where they sit relative to the hook points.

The rules need no new hook for either; this module checks that a bridge computes them where the
rules expect them, and names what it does not (``check_supported`` refuses with that text).

Softcaps (Gemma-2). ``PositionEmbeddingsAttentionBridge.forward`` (TransformerLens 3.9 and 4.3)
computes ``c tanh(q k^T scaling / c)`` from the hooked ``hook_rot_q`` / ``hook_rot_k``, *then*
masks (Hugging Face's per-layer mask: causal or sliding window) and only then fires
``hook_attn_scores``: the hook sees the capped, masked scores and no hook sees the raw ones. So the
identity rule on the cap (``rules.IdentitySoftcap``) rebuilds the raw scores from the rotated q
and k (keys repeated per query head where kv heads are grouped) over the family's ``attn_scale``
(``1 / scaling``: Gemma-2's ``query_pre_attn_scalar``), and sends each capped score's gradient to
them with the factor ``cap(s) / s``; masked entries get no gradient from the softmax, so what the
rebuild puts there never matters. The output cap ``c tanh(logits / c)`` is applied by Hugging
Face's ``ForCausalLM`` after ``lm_head``, i.e. after ``unembed.hook_out``, which therefore holds
the raw logits; the engine completes the identity rule from them and the returned (capped) logits
(``rules.IdentityOutputSoftcap``), so the explained value is the capped logit and all of it enters
the unembedding. A cap whose value differs from the config, an attention bridge of another kind,
a non-rotary model or q/k norms after RoPE (the scores would not be built from ``hook_rot_q/k``)
are refused.

q/k norms (Qwen3, OLMo-2, Gemma-3). The bridges wrap Hugging Face's ``q_norm`` / ``k_norm`` in
``RMSNormalizationBridge``es whose ``hook_scale`` is in the path (a hook that returns another
tensor makes the bridge rebuild the output from it), so the family's ``*.hook_scale`` -> norm-scale
role detaches them as every other norm (the identity rule on the normalization). Their
``use_qk_norm`` flag is not set by these adapters, so it says nothing; what is checked is that every
q/k norm module of the wrapped attention is one of those bridges with its ``hook_scale`` hooked.
"""

from __future__ import annotations

from typing import List, Optional

from lens_palrp.hooks.bridge_support import bridge_component

_QK_NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def _attentions(family) -> list:
    return [getattr(block, "attn", None) for block in family.model.blocks]


def softcap_refusal(family, attn_softcap: Optional[float], output_softcap: Optional[float]) -> Optional[str]:
    """Why the bridge's softcaps (the config's, None where off) are not where the rules put them,
    or None. Called from ``check_supported``, before the family's facts are set."""
    problems: List[str] = []
    if attn_softcap is not None:
        plain = bridge_component("position_embeddings_attention", "PositionEmbeddingsAttentionBridge")
        for layer, attn in enumerate(_attentions(family)):
            if plain is None or attn is None or type(attn).forward is not plain.forward:
                problems.append(f"attention softcap in {type(attn).__name__} of layer {layer} (verified: "
                                "PositionEmbeddingsAttentionBridge, which caps before hook_attn_scores)")
                break
            cap = getattr(attn.original_component, "attn_logit_softcapping", None)
            if cap is None or float(cap) != float(attn_softcap):
                problems.append(f"attention softcap of layer {layer} is {cap}, the config says "
                                f"{attn_softcap}")
                break
            if getattr(family.cfg, "qk_norm_after_rope", False):
                problems.append("attention softcap with q/k norms after RoPE (the scores are not "
                                "built from hook_rot_q / hook_rot_k)")
                break
        if family.cfg.positional_embedding_type != "rotary":
            problems.append("attention softcap without RoPE (scores rebuilt from hook_rot_q / hook_rot_k only)")
    if output_softcap is not None:
        hf_config = getattr(getattr(family.model, "original_model", None), "config", None)
        hf_cap = getattr(hf_config, "final_logit_softcapping", None)
        if hf_cap is None or float(hf_cap) != float(output_softcap):
            problems.append(f"output softcap: Hugging Face's final_logit_softcapping is {hf_cap}, the "
                            f"config says {output_softcap}")
        if not family.has_hook("unembed.hook_out"):
            problems.append("output softcap without unembed.hook_out (the raw logits)")
    return "; ".join(problems) or None


def qk_norm_refusal(family) -> Optional[str]:
    """Why a q/k norm of the wrapped attention would be differentiated through, or None: each
    must be wrapped by a normalization bridge whose ``hook_scale`` the sweep holds constant."""
    norm_bridge = bridge_component("normalization", "NormalizationBridge")
    points = family.hook_points()
    for layer, attn in enumerate(_attentions(family)):
        hf_attn = getattr(attn, "original_component", None)
        for hf_name in _QK_NORM_NAMES:
            if getattr(hf_attn, hf_name, None) is None:
                continue
            wrapped = [(name, sub) for name, sub in getattr(attn, "submodules", {}).items()
                       if getattr(sub, "name", None) == hf_name]
            bridge = getattr(attn, wrapped[0][0], None) if wrapped else None
            scale = f"blocks.{layer}.attn.{wrapped[0][0]}.hook_scale" if wrapped else None
            if (bridge is None or norm_bridge is None or not isinstance(bridge, norm_bridge)
                    or scale not in points or points[scale] is not getattr(bridge, "hook_scale", None)):
                return (f"q/k norm {hf_name} of layer {layer} ({type(hf_attn).__name__}) is not wrapped by "
                        "a normalization bridge with a hook_scale (its scale would be differentiated "
                        "through instead of held constant)")
            if getattr(attn, "_qk_norm_phase", "known") is None:
                return f"q/k norm {hf_name} of layer {layer}: the bridge did not place it (no qk-norm phase)"
    return None
