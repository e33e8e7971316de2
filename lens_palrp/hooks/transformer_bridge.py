"""TransformerLens ``TransformerBridge``: the same hook names as HookedTransformer, other facts.

The bridge wraps a Hugging Face model and reimplements attention eagerly with the
HookedTransformer hook names in the computation path (``hook_rot_q``, ``hook_attn_scores``,
``hook_pattern``, ``hook_z``, ``ln*.hook_scale``, ``mlp.hook_pre`` / ``hook_pre_linear`` /
``hook_post``; checked by intervention in ``tests/test_bridge.py``). So the role map is the
HookedTransformer one; what differs is where the model facts live:

* the RoPE tables are read where the forward uses them, at ``attn.hook_cos`` / ``attn.hook_sin``;
* the activation and the score scale come from the wrapped Hugging Face modules;
* grouped-query attention cannot be ungrouped: the key side of a shared kv head is credited to
  each query head from that head's score gradient, exactly (``lens_palrp.positional.rope``).

BERT-style encoders (checked on all-MiniLM-L6-v2) differ in three ways, handled here:

* ``hook_embed`` is the *summed, normalized* embedding there; the sinks are the word, position
  and token-type embeddings (``embed.hook_out``, ``pos_embed.hook_out``,
  ``token_type_embed.hook_out``), which the embedding LayerNorm (``embed_ln.hook_scale``) joins;
* attention is delegated to Hugging Face and ``hook_pattern`` only observes the weights, so the
  attention is rebuilt at ``hook_z`` from the in-path q, k, v with the rules installed (the
  ``lens_palrp.canonizers.RebuildAttention`` canonizer), and the rebuilt z is checked against the
  model's;
* attention is bidirectional; post-LN blocks need nothing special (the norm scales are hooked).

BLOOM (ALiBi, checked on TransformerLens 3.9's and 4.x's ``BloomAttentionBridge``, whose
``hook_attn_scores`` and ``hook_pattern`` are in the path) gets the HookedTransformer ALiBi rule:
Hugging Face adds ``m_h j`` to the scores, which differs from the canonical ``m_h (j - i)`` by a
per-row constant that the softmax ignores but Eq. 16's split does not, so ``alibi_bias`` rebuilds
the canonical form from the wrapped model's own ``build_alibi_tensor`` (BLOOM's slopes, which for a
head count that is not a power of two are not TransformerLens' geometric ``2^(-8/n)`` series).
Hugging Face takes BLOOM's (and Llama's) softmax in float32 whatever the dtype, so a float64 bridge
conserves up to float32 rounding (~1e-7 of the logit), not to float64's.

Gemma-2's softcaps and the q/k norms of Qwen3, OLMo-2 and Gemma-3 are checked where the bridge
applies them (``lens_palrp.hooks.bridge_softcap``); a cap or a q/k norm elsewhere is refused.
Mixture-of-experts MLPs (Mixtral, Qwen3-MoE, gpt-oss) have no hook inside their experts; their
block forward is rebuilt with the rules by ``lens_palrp.hooks.bridge_moe``. gpt-oss's learned
sink logits join the softmax absorption through ``attention_sinks``.

GPT-J (adjacent-pair RoPE applied inside Hugging Face), OPT (float32 softmax in Hugging Face's
eager attention) and OLMo (LayerNorm without weight or bias) have their specifics in
``lens_palrp.hooks.bridge_positions``.

Not yet supported on the bridge (``NotImplementedError``): ALiBi other than BLOOM's (MPT, Falcon
with ``alibi=True``: their bias is added elsewhere and unverified), adjacent-pair RoPE in the
bridge's own attention (``rotary_adjacent_pairs``; GPT-J's, inside Hugging Face, is rebuilt).

Only architectures whose maps were checked (conservation on bias-free weights, agreement with
HookedTransformer or an independent implementation) are explained: a bridge of any other Hugging
Face ``model_type`` is refused, naming it, unless the caller opts in (``explain(...,
allow_unverified=True)`` or ``with lp.unverified_architectures():``). A bridge's adapter can
compute something other than what its hook names promise (GPT-NeoX, Phi-3 and Falcon create
``hook_rot_q`` / ``hook_rot_k`` and never call them: ``bridge_parallel.py`` puts them into the path).
The engine refuses a map with a rule site the forward never ran, and for an unverified architecture
one the backward never reaches; what a hook computes in place of its name, only the per-architecture
tests (``tests/test_architectures.py``) catch.
"""

from __future__ import annotations

import contextvars
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from lens_palrp.hooks.bridge_softcap import qk_norm_refusal, softcap_refusal
from lens_palrp.hooks.bridge_support import bridge_component, support_for, verified_model_types
from lens_palrp.hooks import bridge_moe
from lens_palrp.hooks import bridge_positions
from lens_palrp.hooks import bridge_parallel
from lens_palrp.hooks.hooked_transformer import TransformerLensFamily, _softcap_on
from lens_palrp.roles import HookRole, Role

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # pragma: no cover - very old TransformerLens
    TransformerBridge = None  # type: ignore[assignment,misc]


# Hugging Face ``model_type``s whose bridge maps are verified (see the module docstring)
VERIFIED_ARCHITECTURES = frozenset(verified_model_types())
# the ALiBi attention whose bias alibi_bias rebuilds and whose hooks were checked in the path
_VERIFIED_ALIBI = {"bloom": "BloomAttentionBridge"}
_ALLOW_UNVERIFIED = contextvars.ContextVar("lens_palrp_allow_unverified", default=False)


@contextmanager
def unverified_architectures(allow: bool = True):
    """Within this block, bridges of unverified architectures are explained (with a warning)
    instead of refused; also covers the analyses that call ``explain`` for you."""
    token = _ALLOW_UNVERIFIED.set(_ALLOW_UNVERIFIED.get() or allow)
    try:
        yield
    finally:
        _ALLOW_UNVERIFIED.reset(token)


def is_transformer_bridge(model) -> bool:
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def _rotary_fraction(cfg) -> float:
    try:
        from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config
    except ImportError:  # pragma: no cover - older TransformerLens
        return float(getattr(cfg, "rotary_pct", 1.0) or 1.0)
    return float(get_rotary_pct_from_config(cfg))


def _rotate(attn, q: Tensor, k: Tensor, position_embeddings, head_dim: int, cfg):
    """RoPE as ``PositionEmbeddingsAttentionBridge`` applies it (rotate-half; full or partial)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = attn._apply_position_embedding_hooks(position_embeddings)
    rotary_dim = cos.shape[-1]
    if rotary_dim * 2 == head_dim and _rotary_fraction(cfg) == 1.0:
        raise NotImplementedError("fused attention: half-width RoPE tables (GPT-OSS) are not covered; "
                                  "use attention='eager'")
    if rotary_dim < head_dim:
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
        return torch.cat([q_rot, q[..., rotary_dim:]], dim=-1), torch.cat([k_rot, k[..., rotary_dim:]], dim=-1)
    return apply_rotary_pos_emb(q, k, cos, sin)


class TransformerBridgeFamily(TransformerLensFamily):
    """Adapter between the engine and one ``TransformerBridge`` (decoders and BERT encoders).

    Keys and values of grouped-query attention stay grouped: the RoPE strategy credits the key
    side per query head through the score gradients."""

    name = "TransformerBridge"

    def __init__(self, model):
        hf_config = getattr(getattr(model, "original_model", None), "config", None)
        self.encoder = getattr(hf_config, "model_type", "") == "bert" and not getattr(
            hf_config, "is_decoder", False
        )
        super().__init__(model)
        if self.pe_type == "rotary" and self.rotary_dim is None:
            self.rotary_dim = bridge_parallel.rotary_dim(model, self.d_head)  # partial RoPE (Pythia, Phi)
        self.causal = not self.encoder
        self.logits_supported = not self.encoder  # the MLM head's activation has no hook
        # the generic AttentionBridge hands attention to Hugging Face: hook_pattern only observes
        self.pattern_observed_only = type(model.blocks[0].attn).__name__ == "AttentionBridge"
        bridge_positions.adjust_facts(self)  # GPT-J's rotation, float32 attention (OPT, GPT-J)
        bridge_parallel.check_supported(self)  # joint-qkv RoPE: the bridge's score scale is the model's

    def canonizers(self):
        moe = bridge_moe.moe_layers(self.model)  # expert loops rebuilt with the rules
        return (bridge_positions.canonizers(self)  # the attention rebuild, OLMo's weightless norms
                + bridge_parallel.canonizers(self)  # joint-qkv RoPE: rotated q, k into the path
                + ([bridge_moe.MixtureOfExperts(moe)] if moe else []))

    # ------------------------------------------------------------------ fused attention
    def fused_attention_refusal(self) -> Optional[str]:
        """What of this bridge the fused forward does not reproduce, or None. It reproduces the
        plain path of ``PositionEmbeddingsAttentionBridge.forward`` (Llama, Mistral, Qwen2,
        Gemma, OLMo-2 without q/k norms...): projections, RoPE (full or partial, rotate-half),
        grouped kv heads, Hugging Face's mask, the output projection."""
        Plain = bridge_component("position_embeddings_attention", "PositionEmbeddingsAttentionBridge")
        if Plain is None:  # pragma: no cover - older TransformerLens
            return "this TransformerLens has no PositionEmbeddingsAttentionBridge"
        attns = [self.attention_module(layer) for layer in range(self.n_layers)]
        if all(bridge_parallel.is_joint_rotary(a) for a in attns):  # GPT-NeoX, Phi-3, Falcon
            return bridge_parallel.fused_refusal(self, attns)
        kinds = sorted({type(a).__name__ for a in attns if type(a) is not Plain})
        if kinds:
            return f"the fused forward covers PositionEmbeddingsAttentionBridge, not {', '.join(kinds)}"
        cfg = self.cfg
        hf_cfg = getattr(attns[0].original_component, "config", None)
        rope = getattr(hf_cfg, "rope_parameters", None)
        reasons = {
            "split q/k/v inputs (use_split_qkv_input / use_attn_in)": bool(
                getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False)),
            "use_attn_result": bool(getattr(cfg, "use_attn_result", False)),
            "a gated q projection": bool(getattr(cfg, "gated_q_proj", False)),
            "interleaved or adjacent-pair RoPE": bool(getattr(cfg, "rotary_interleaved_cos_sin", False)
                                                      or getattr(cfg, "rotary_adjacent_pairs", False)),
            "q/k norms": any("q_norm" in a.submodules or "k_norm" in a.submodules for a in attns),
            "an attention gate": any(a._modules.get("gate") is not None for a in attns),
            "a key multiplier": any(getattr(a.original_component, "key_multiplier", None) is not None for a in attns),
            "clip_qkv": getattr(hf_cfg, "clip_qkv", None) is not None,
            "an attention softcap": any(getattr(a.original_component, "attn_logit_softcapping", None) is not None
                                        for a in attns),
            "attention sinks": any(getattr(a.original_component, "sinks", None) is not None for a in attns),
            "Llama-4 query scaling": isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None,
            "a layer before the output projection": any(
                type(a)._pre_output_projection is not Plain._pre_output_projection for a in attns),
        }
        hit = [name for name, on in reasons.items() if on]
        return f"the fused forward does not cover {', '.join(hit)}" if hit else None

    def fused_attention_forward(self, layer: int, kernel) -> Callable:
        """``PositionEmbeddingsAttentionBridge.forward``'s plain path (the same hook points up to
        ``hook_rot_q`` / ``hook_rot_k`` / ``hook_v`` and from ``hook_z`` on), ``kernel``
        (``FusedAttention.kernel``) in place of scores, mask, softmax and pattern. Hugging Face's
        mask is used as the eager path uses it: a 4-d mask as given (it holds the causal and any
        sliding-window structure), none as causal."""
        attn = self.attention_module(layer)
        if bridge_parallel.is_joint_rotary(attn):
            return bridge_parallel.fused_forward(self, layer, kernel)
        head_dim, scale = attn.original_component.head_dim, self.attn_scale(layer)
        rotary = self.pe_type == "rotary"

        def forward(*args, **kwargs):
            if "hidden_states" in kwargs:
                hidden = kwargs.pop("hidden_states")
            else:
                hidden, args = args[0], args[1:]
            position_embeddings = kwargs.pop("position_embeddings", None)
            mask = kwargs.pop("attention_mask", None)
            hidden = attn.hook_in(hidden)
            shape = hidden.shape[:-1]
            q, k, v = (proj(hidden).view(*shape, -1, head_dim).transpose(1, 2) for proj in (attn.q, attn.k, attn.v))
            if position_embeddings is not None:
                q, k = _rotate(attn, q, k, position_embeddings, head_dim, self.cfg)
            elif rotary and not attn.rope_optional:
                raise NotImplementedError(f"layer {layer}: no RoPE tables reached the attention")
            q = attn.hook_rot_q(q) if hasattr(attn, "hook_rot_q") else q
            k = attn.hook_rot_k(k) if hasattr(attn, "hook_rot_k") else k
            k, v = attn._update_kv_cache(k, v, **kwargs)
            n_q, n_k = q.shape[-2], k.shape[-2]
            causal = attn.is_causal and not attn.is_cross_attention
            if mask is not None:
                if mask.ndim < 4:
                    raise NotImplementedError("fused attention takes Hugging Face's 4-d masks only")
                mask, causal = mask[..., -n_q:, :n_k], False  # the 4-d mask is authoritative, as in eager
            z = kernel(layer, q, k, v, scale, causal, mask, zero_empty_rows=attn.compatibility_mode)
            out = z.transpose(1, 2).contiguous().reshape(*shape, -1)
            out = attn._pre_output_projection(out)
            weight = getattr(getattr(attn.o, "original_component", None), "weight", None)
            if isinstance(weight, Tensor) and weight.dtype.is_floating_point and out.dtype != weight.dtype:
                out = out.to(weight.dtype)
            return attn.hook_out(attn.o(out)), None  # no pattern exists

        return forward

    @contextmanager
    def fused_attention_masks(self):
        """Hugging Face builds the mask for its ``sdpa`` attention while the fused forward runs:
        none at all without padding (causal), a boolean one with it, instead of the eager
        additive ``[batch, 1, query, key]`` float mask (quadratic memory before any attention)."""
        config = getattr(getattr(self.model, "original_model", None), "config", None)
        previous = getattr(config, "_attn_implementation", None)
        if config is None or previous in (None, "sdpa"):
            yield
            return
        config._attn_implementation = "sdpa"
        try:
            yield
        finally:
            config._attn_implementation = previous

    def check_supported(self) -> None:
        cfg = self.cfg
        row = support_for(self._model_type())
        refusal = row.refusal_here() if row is not None else None
        if row is not None and refusal:  # a known refusal of the coverage table: no opt-in explains it
            raise NotImplementedError(
                f"lens_palrp cannot explain {row.name} ({self._model_type()!r}) on a TransformerBridge: {refusal}")
        moe = bridge_moe.moe_refusal(self.model)
        unsupported = {
            self._alibi_refusal(): cfg.positional_embedding_type == "alibi" and not self._verified_alibi(),
            self._softcap_refusal(): self._softcap_refusal() is not None,
            qk_norm_refusal(self): qk_norm_refusal(self) is not None,
            "adjacent-pair RoPE (rotary_adjacent_pairs)": cfg.positional_embedding_type == "rotary"
            and bool(cfg.rotary_adjacent_pairs),
            "bidirectional attention other than BERT": getattr(cfg, "attention_dir", "causal") != "causal"
            and not self.encoder,
            moe or "mixture-of-experts MLP": moe is not None,
        }
        bad = [str(name) for name, hit in unsupported.items() if hit]
        if bad:
            raise NotImplementedError(
                f"lens_palrp cannot explain this TransformerBridge of {self._model_type()!r} yet: " + "; ".join(bad)
            )
        self._check_verified()  # after the hard refusals: no "unverified" warning before one
        for layer in range(cfg.n_layers):
            if not hasattr(self.model.blocks[layer], "attn") or not hasattr(
                self.model.blocks[layer].attn, "hook_pattern"
            ):
                raise NotImplementedError(f"block {layer} has no attention with hook_pattern")

    def describe(self) -> str:
        return f"TransformerBridge of the architecture {self._model_type()!r}"

    def _softcap_refusal(self) -> Optional[str]:
        """Softcaps the rules do not see where the bridge applies them (``bridge_softcap``)."""
        cfg = self.cfg
        return softcap_refusal(self, cfg.attn_scores_soft_cap if _softcap_on(cfg.attn_scores_soft_cap) else None,
                               cfg.output_logits_soft_cap if _softcap_on(cfg.output_logits_soft_cap) else None)

    def _model_type(self) -> str:
        hf_config = getattr(getattr(self.model, "original_model", None), "config", None)
        return str(getattr(hf_config, "model_type", None) or "unknown")

    def _verified_alibi(self) -> bool:
        """BLOOM through its own attention bridge: the only ALiBi whose bias form is known here."""
        attention = _VERIFIED_ALIBI.get(self._model_type())
        blocks = self.model.blocks
        return attention is not None and all(
            type(getattr(block, "attn", None)).__name__ == attention for block in blocks
        )

    def _alibi_refusal(self) -> str:
        return (
            f"ALiBi attention of {self._model_type()!r} (verified: BLOOM's BloomAttentionBridge only; "
            "another model adds its bias in a form alibi_bias does not rebuild)"
        )

    def alibi_bias(self, layer: int, n_pos: int) -> Tensor:
        """BLOOM's ALiBi bias in the canonical form ``m_h (j - i)``, ``[heads, query, key]``, float64.

        Hugging Face adds ``m_h j`` (``build_alibi_tensor``: slopes and products in float32, then
        the model's dtype). The wrapped model's own function builds that row here, and the row's
        differences are taken in float64, so the bias differs from what the forward added by
        exactly the per-row constant ``m_h i``: nothing the softmax sees, yet Eq. 16 splits the
        canonical form. Padded rows are right-aligned, so Hugging Face's mask-derived key
        positions are ``0 .. n - 1`` as here; pads are masked keys and carry no relevance.
        """
        cached = getattr(self, "_alibi", None)
        if cached is not None and cached.shape[-1] == n_pos:  # every layer shares one bias
            return cached
        hf_model = self.model.original_model
        build: Optional[Callable[..., Tensor]] = next(
            (m.build_alibi_tensor for m in hf_model.modules() if hasattr(m, "build_alibi_tensor")), None)
        if build is None:  # pragma: no cover - older transformers keep only the module function
            from transformers.models.bloom.modeling_bloom import build_alibi_tensor

            build = build_alibi_tensor
        device = next(hf_model.parameters()).device
        mask = torch.ones(1, n_pos, dtype=torch.long, device=device)
        row = build(mask, self.n_heads, torch.float64).reshape(self.n_heads, n_pos)  # m_h j
        self._alibi = row[:, None, :] - row[:, :, None]
        return self._alibi

    def hook_names(self):
        """Hook points a hook can be added to: a ``record`` filter must not pick the ones the bridge
        refuses while their flag is off (``hook_result`` without ``use_attn_result``, the split
        q/k/v inputs without ``use_split_qkv_input``, ...)."""
        gated = getattr(self.model, "_gated_hook_reason", None)
        hooks = self.hook_points()
        if gated is None:
            return list(hooks)
        return [name for name, point in hooks.items() if gated(point.name or name) is None]

    def _check_verified(self) -> None:
        hf_config = getattr(getattr(self.model, "original_model", None), "config", None)
        model_type = self._model_type()
        if model_type in VERIFIED_ARCHITECTURES:
            return
        architectures = getattr(hf_config, "architectures", None) or []
        named = f"{model_type!r}" + (f" ({', '.join(architectures)})" if architectures else "")
        if not _ALLOW_UNVERIFIED.get():
            raise NotImplementedError(
                f"lens_palrp has not verified TransformerBridge maps for the architecture {named}; "
                f"verified: {', '.join(sorted(VERIFIED_ARCHITECTURES))}. To explain it anyway (its rule sites are checked to be in the computation path, its maps are not verified), "
                "pass allow_unverified=True to explain (or use `with lp.unverified_architectures():`)"
            )
        self.unverified = True
        warnings.warn(
            f"explaining an unverified architecture {named}: every hook point the rules patch is checked "
            "to be in the computation path, but the maps are not verified (conservation and the "
            "positional sinks may be wrong); compare attr.conservation() with the logit",
            UserWarning,
            stacklevel=2,
        )

    def hook_roles(self) -> Dict[str, HookRole]:
        roles = super().hook_roles()
        if self.encoder:  # hook_embed is the summed, normalized embedding: use the three parts
            del roles["hook_embed"]
            roles.pop("hook_pos_embed", None)
            roles["embed.hook_out"] = HookRole(Role.EMBED)
            roles["pos_embed.hook_out"] = HookRole(Role.POS_EMBED)
            roles["token_type_embed.hook_out"] = HookRole(Role.TOKEN_TYPE)
        bridge_moe.drop_dense_mlp_roles(self.model, roles)
        missing = [name for name in roles if not self.has_hook(name)]
        if missing:
            raise NotImplementedError(
                f"this TransformerBridge lacks hook points the rules need: {missing[:6]}"
                + (" ..." if len(missing) > 6 else "")
            )
        if self.pe_type == "rotary":
            for layer in range(self.n_layers):
                roles[f"blocks.{layer}.attn.hook_cos"] = HookRole(Role.ROPE_COS, layer)
                roles[f"blocks.{layer}.attn.hook_sin"] = HookRole(Role.ROPE_SIN, layer)
        return bridge_positions.adjust_roles(self, roles)  # GPT-J: rotation rebuilt, not hooked

    def activation(self, layer: int) -> Callable[[Tensor], Tensor]:
        hf_mlp = self.model.blocks[layer].mlp.original_component
        for name in ("act_fn", "act", "activation_fn"):
            fn = getattr(hf_mlp, name, None)
            if fn is not None:
                return fn
        from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

        if self.cfg.act_fn in SUPPORTED_ACTIVATIONS:
            return SUPPORTED_ACTIVATIONS[self.cfg.act_fn]
        raise NotImplementedError(f"cannot find the activation function of {type(hf_mlp).__name__}")

    def attention_sinks(self, layer: int) -> Optional[Tensor]:
        """GPT-OSS's learned per-head sink logits, which the bridge's softmax joins as an extra key."""
        return getattr(self.model.blocks[layer].attn.original_component, "sinks", None)

    def attn_scale(self, layer: int) -> float:
        """What the scores are divided by (the wrapped module's ``scaling`` is its inverse)."""
        hf_attn = self.model.blocks[layer].attn.original_component
        for module in hf_attn.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, (int, float)):
                return 1.0 / float(scaling)
        return float(self.d_head) ** 0.5

    @contextmanager
    def hooks_attached(self, fwd_hooks):
        with warnings.catch_warnings():
            # TransformerLens 4 warns when a hook edits hook_scale: detaching it is the rule
            warnings.filterwarnings("ignore", message=".*edited hook_scale/hook_normalized.*")
            with super().hooks_attached(fwd_hooks):
                yield

    def forward(self, tokens: Tensor, attention_mask: Optional[Tensor], fwd_hooks) -> Tensor:
        # no kv cache: nothing reads it, it costs memory, and a block recomputed under
        # checkpoint=True would append its keys to it a second time
        kwargs = {} if self.encoder else {"use_cache": False}
        with self.hooks_attached(fwd_hooks):
            return self.model(tokens, attention_mask=attention_mask, **kwargs)
