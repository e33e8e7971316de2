"""TransformerLens ``HookedTransformer``: which hook point plays which role.

Every non-linear or multiplicative node of a HookedTransformer block sits next to a hook point,
so the rules can be installed from the hooks alone, without touching the modules (the rule of
each role is the method's, ``lens_palrp.methods``):

* ``ln*.hook_scale`` (and ``q_norm`` / ``k_norm``) -> ``NORM_SCALE``;
* ``mlp.hook_pre`` / ``hook_pre_linear`` / ``hook_mid`` / ``hook_post`` -> the activation's input
  and output (``MLP_POST``), a gated product (``MLP_GATED``) or SoLU-LN's pair (``MLP_MID``);
* ``attn.hook_q`` / ``hook_k`` or ``hook_rot_q`` / ``hook_rot_k`` -> the two factors of ``Q K^T``;
* ``attn.hook_v`` / ``hook_pattern`` -> the two factors of ``A V``;
* ``attn.hook_attn_scores`` -> the attention softcap;
* ``hook_embed`` / ``hook_pos_embed`` -> the semantic and input-positional sinks.

Names come from ``transformer_lens.utilities.get_act_name``, as TransformerLens spells them.

Options whose computation has no hook around it raise ``NotImplementedError`` naming the option.
"""

from __future__ import annotations

import abc
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.utilities import get_act_name

from lens_palrp.canonizers import UngroupKeyValueHeads
from lens_palrp.hooks.base import TextFamily
from lens_palrp.roles import HookRole, Role

try:  # TransformerLens 3.x; 4.x removed HookedTransformer
    from transformer_lens import HookedTransformer
except ImportError:  # pragma: no cover - depends on the installed TransformerLens
    HookedTransformer = None  # type: ignore[assignment,misc]


_OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _softcap_on(cap) -> bool:
    return cap is not None and cap > 0


def is_hooked_transformer(model) -> bool:
    return HookedTransformer is not None and isinstance(model, HookedTransformer)


def hooked_transformer_roles(family) -> Dict[str, HookRole]:
    """The role of every hook point of the HookedTransformer block layout, from the family's facts
    (``pe_type``, ``gated_mlp``, ``activation_has_norm``, ``attn_only``, the softcaps)."""
    roles: Dict[str, HookRole] = {"hook_embed": HookRole(Role.EMBED)}
    if family.pe_type in ("standard", "shortformer"):
        roles["hook_pos_embed"] = HookRole(Role.POS_EMBED)
    for name in family.hook_points():
        if name.endswith("hook_scale"):
            layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
            roles[name] = HookRole(Role.NORM_SCALE, layer)
    if family.activation_has_norm:
        mlp_output = Role.MLP_NORMED_POST  # the activation's rule sits at hook_mid
    else:
        mlp_output = Role.MLP_GATED if family.gated_mlp else Role.MLP_POST
    for layer in range(family.n_layers):
        def at(role: Role, hook: str) -> None:
            roles[get_act_name(hook, layer)] = HookRole(role, layer)

        at(Role.RESID_PRE, "resid_pre")
        if family.pe_type == "rotary":
            at(Role.ROT_Q, "rot_q")
            at(Role.ROT_K, "rot_k")
        else:
            at(Role.Q, "q")
            at(Role.K, "k")
        at(Role.V, "v")
        at(Role.SCORES, "attn_scores")  # the softmax input: the capped scores where there is a cap
        at(Role.PATTERN, "pattern")
        at(Role.Z, "z")
        if not family.attn_only:
            at(Role.MLP_PRE, "pre")
            if family.gated_mlp:
                at(Role.MLP_UP, "pre_linear")
            if family.activation_has_norm:
                at(Role.MLP_MID, "mid")
            at(mlp_output, "post")
    roles[get_act_name("resid_post", family.n_layers - 1)] = HookRole(Role.RESID_FINAL)
    if family.output_softcap is not None:
        roles["unembed.hook_out"] = HookRole(Role.LOGITS)
    return roles


class TransformerLensFamily(TextFamily):
    """What every TransformerLens-configured model shares: the facts in ``model.cfg`` and the
    ``HookedTransformer`` hook layout (the bridge and ``HookedEncoder`` use the same names)."""

    name = "TransformerLens"

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg
        self.check_supported()
        cfg = self.cfg
        self.n_layers = cfg.n_layers
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_head
        self.n_ctx = cfg.n_ctx
        self.d_vocab_out = cfg.d_vocab_out
        self.d_vocab = cfg.d_vocab
        self.pe_type = cfg.positional_embedding_type
        self.rotary_dim = cfg.rotary_dim if self.pe_type == "rotary" else None
        self.rotary_adjacent_pairs = bool(cfg.rotary_adjacent_pairs)
        self.n_kv_heads = (
            cfg.n_key_value_heads
            if cfg.n_key_value_heads is not None and cfg.n_key_value_heads != cfg.n_heads
            else None
        )
        self.gated_mlp = bool(cfg.gated_mlp)
        # SoLU-LN style: a LayerNorm between the activation (hook_mid) and hook_post
        self.activation_has_norm = bool(cfg.act_fn and cfg.act_fn.endswith("_ln"))
        self.attn_only = bool(cfg.attn_only)
        self.attn_softcap = cfg.attn_scores_soft_cap if _softcap_on(cfg.attn_scores_soft_cap) else None
        self.output_softcap = (
            cfg.output_logits_soft_cap if _softcap_on(cfg.output_logits_soft_cap) else None
        )
        self.causal = getattr(cfg, "attention_dir", "causal") == "causal"
        self.logits_supported = True
        self.score_roles = (Role.ROT_Q, Role.ROT_K) if self.pe_type == "rotary" else (Role.Q, Role.K)

    @abc.abstractmethod
    def check_supported(self) -> None:
        """Raise ``NotImplementedError`` naming any option whose rule cannot be installed."""

    @property
    def final_hidden_hook(self) -> str:
        return get_act_name("resid_post", self.n_layers - 1)

    # ------------------------------------------------------------------ hook layout
    def hook_roles(self) -> Dict[str, HookRole]:
        return hooked_transformer_roles(self)

    # ------------------------------------------------------------------ model facts
    def activation(self, layer: int) -> Callable[[Tensor], Tensor]:
        return self.model.blocks[layer].mlp.act_fn

    def attention_module(self, layer: int):
        """Block ``layer``'s attention, whose forward fused attention replaces."""
        return self.model.blocks[layer].attn

    def attn_scale(self, layer: int) -> float:
        return float(self.model.blocks[layer].attn.attn_scale)

    def attention_sinks(self, layer: int) -> Optional[Tensor]:
        """Learned per-head sink logits ``[heads]`` that join the softmax (GPT-OSS), or None."""
        if not getattr(self.cfg, "use_attention_sinks", False):
            return None
        return self.model.blocks[layer].attn.sinks

    # ------------------------------------------------------------------ running
    def forward(self, tokens: Tensor, attention_mask: Optional[Tensor], fwd_hooks) -> Tensor:
        with self.hooks_attached(fwd_hooks):
            return self.model(tokens, attention_mask=attention_mask, return_type="logits")

    # ------------------------------------------------------------------ tokens
    @property
    def tokenizer(self):
        return self.model.tokenizer

    def to_tokens(self, text: str, prepend_bos: Optional[bool]) -> Tensor:
        kwargs = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
        return self.model.to_tokens(text, truncate=False, **kwargs)[0]  # too long: the caller refuses

    def to_str_tokens(self, tokens: Tensor):
        if self.model.tokenizer is None:
            return [str(int(t)) for t in tokens]
        return self.model.to_str_tokens(tokens)

    def to_single_token(self, text: str) -> int:
        return int(self.model.to_single_token(text))


class HookedTransformerFamily(TransformerLensFamily):
    """Adapter between the engine and one ``HookedTransformer`` instance."""

    name = "HookedTransformer"

    def check_supported(self) -> None:
        """Raise ``NotImplementedError`` naming any option whose rule cannot be installed."""
        cfg = self.cfg
        unsupported = {
            "positional_embedding_type='relative_positional_bias'": cfg.positional_embedding_type
            == "relative_positional_bias",
            "num_experts (mixture-of-experts MLP)": bool(getattr(cfg, "num_experts", None)),
            "load_in_4bit": bool(getattr(cfg, "load_in_4bit", False)),
            "clip_qkv (clamp between hook_q and the scores has no hook)": getattr(
                cfg, "clip_qkv", None
            )
            is not None,
            "gated_mlp with a LayerNorm activation (act_fn ending in '_ln')": bool(cfg.gated_mlp)
            and cfg.act_fn is not None
            and cfg.act_fn.endswith("_ln"),
            "attn_scores_soft_cap with use_qk_norm on a non-rotary model (normalized q/k have no hook)": _softcap_on(
                cfg.attn_scores_soft_cap
            )
            and bool(cfg.use_qk_norm)
            and cfg.positional_embedding_type != "rotary",
            "attn_scores_soft_cap with use_logn_attn": _softcap_on(cfg.attn_scores_soft_cap)
            and bool(getattr(cfg, "use_logn_attn", False)),
            "shortformer with use_attn_in / use_split_qkv_input": cfg.positional_embedding_type
            == "shortformer"
            and bool(cfg.use_attn_in or cfg.use_split_qkv_input),
            "shortformer with use_qk_norm": cfg.positional_embedding_type == "shortformer"
            and bool(cfg.use_qk_norm),
        }
        bad = [name for name, hit in unsupported.items() if hit]
        if bad:
            raise NotImplementedError(
                "lens_palrp cannot explain this HookedTransformer: unsupported config option(s): "
                + "; ".join(bad)
            )
        if cfg.positional_embedding_type not in ("standard", "shortformer", "rotary", "alibi"):
            raise NotImplementedError(
                f"positional_embedding_type={cfg.positional_embedding_type!r} is not supported"
            )

    def canonizers(self):
        """Grouped-query attention is ungrouped for the sweep: every query head owns its key copy."""
        return [UngroupKeyValueHeads()] if self.n_kv_heads is not None else []

    # ------------------------------------------------------------------ fused attention
    def fused_attention_refusal(self) -> Optional[str]:
        """What of this config the fused forward does not reproduce, or None."""
        cfg = self.cfg
        reasons = {
            "attention sinks (use_attention_sinks)": bool(getattr(cfg, "use_attention_sinks", False)),
            "use_attn_result (per-head results)": bool(cfg.use_attn_result),
            "use_logn_attn": bool(getattr(cfg, "use_logn_attn", False)),
            "OLMo's q/k norms on the flattened heads": cfg.original_architecture in _OLMO_QK_NORM,
            "an attention softcap": self.attn_softcap is not None,
        }
        hit = [name for name, on in reasons.items() if on]
        return f"the fused forward does not cover {', '.join(hit)}" if hit else None

    def fused_attention_forward(self, layer: int, kernel) -> Callable:
        """The attention forward of TransformerLens' ``AbstractAttention`` (no cache), with the
        same hook points up to ``hook_rot_q`` / ``hook_rot_k`` / ``hook_v`` and from ``hook_z``
        on, and ``kernel`` (``FusedAttention.kernel``) in place of scores, mask, softmax and
        pattern: ``hook_attn_scores`` and ``hook_pattern`` do not fire."""
        attn, cfg = self.attention_module(layer), self.cfg

        def forward(query_input, key_input, value_input, past_kv_cache_entry=None,
                    additive_attention_mask=None, attention_mask=None, position_bias=None):
            if past_kv_cache_entry is not None or position_bias is not None:
                raise NotImplementedError("fused attention runs without a kv cache or a position bias")
            q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
            if cfg.positional_embedding_type == "rotary":
                q = attn.hook_rot_q(attn.apply_rotary(q, 0, attention_mask))
                k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
            causal = (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
            n = q.shape[1]
            mask = None
            if attn.attn_type == "local" or attention_mask is not None:
                mask = attn._make_causal_mask(n, n, 0, q.device) if causal else torch.ones(
                    1, 1, n, n, dtype=torch.bool, device=q.device)
                if attention_mask is not None:
                    mask = mask & attention_mask.bool().to(q.device)[:, None, None, :]
            if additive_attention_mask is not None:  # HookedEncoder's [batch, 1, 1, key] pad mask
                additive = additive_attention_mask.to(device=q.device, dtype=q.dtype)
                mask = additive if mask is None else additive.masked_fill(~mask, float("-inf"))
            z = kernel(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn.attn_scale,
                       causal, mask)
            z = attn.hook_z(z.transpose(1, 2).to(v.dtype))
            w = attn.W_O.reshape(-1, attn.W_O.shape[-1]).T.to(z.device)  # [d_model, heads * d_head]
            return F.linear(z.reshape(z.shape[0], z.shape[1], -1).to(w.dtype), w, attn.b_O.to(z.device))

        return forward

    def rotary_tables(self, layer: int, n_pos: int, attention_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """cos and sin ``[batch or 1, pos, 1, rotary_dim]`` exactly as the forward used them."""
        attn = self.model.blocks[layer].attn
        if attention_mask is None:
            cos = attn.rotary_cos[None, :n_pos, None, :]
            sin = attn.rotary_sin[None, :n_pos, None, :]
        else:
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0).to(attn.rotary_cos.device)
            cos = attn.rotary_cos[position_ids, None, :]
            sin = attn.rotary_sin[position_ids, None, :]
        return cos, sin

    def alibi_bias(self, layer: int, n_pos: int) -> Tensor:
        """The ALiBi bias ``m_h (j - i)`` ``[heads, query, key]``, built for this length.

        Not TransformerLens' cached tensor: 3.9 slices its cache as ``[:, -query:, :key]``, so
        after a longer input a shorter one sees rows shifted by a per-row constant. The softmax
        ignores that shift (the forward is unchanged), but the split of Eq. 16 would not.
        """
        from transformer_lens.components import AbstractAttention

        device = self.model.blocks[layer].attn.IGNORE.device
        return AbstractAttention.create_alibi_bias(self.n_heads, n_pos, device)

    def shortformer_projections(self, layer: int) -> Tuple[Tensor, Tensor]:
        """``W_Q`` and ``W_K`` ``[heads, d_model, d_head]`` (keys ungrouped for GQA)."""
        attn = self.model.blocks[layer].attn
        return attn.W_Q, attn.W_K
