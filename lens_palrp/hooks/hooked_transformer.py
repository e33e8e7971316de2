"""TransformerLens ``HookedTransformer``: which hook point gets which rule.

Every non-linear or multiplicative node of a HookedTransformer block sits next to a hook point,
so the LRP rules can be installed from the hooks alone, without touching the modules:

* ``ln*.hook_scale`` (and ``q_norm`` / ``k_norm``) -> detached scale (identity rule on the norm);
* ``mlp.hook_pre`` / ``hook_pre_linear`` / ``hook_mid`` / ``hook_post`` -> identity rule on the
  activation and the uniform rule on the gated product;
* ``attn.hook_q`` / ``hook_k`` or ``hook_rot_q`` / ``hook_rot_k`` -> uniform rule on ``Q K^T``
  (and, for RoPE, the PA-LRP split between content and rotation);
* ``attn.hook_v`` / ``hook_pattern`` -> uniform rule on ``A V``;
* ``attn.hook_attn_scores`` -> identity rule on the attention softcap;
* ``hook_embed`` / ``hook_pos_embed`` -> the semantic and input-positional sinks.

Options whose computation has no hook around it raise ``NotImplementedError`` naming the option.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Optional, Tuple

from torch import Tensor

from lens_palrp.hooks.roles import HookRole, Role

try:  # TransformerLens 3.x; 4.x removed HookedTransformer
    from transformer_lens import HookedTransformer
except ImportError:  # pragma: no cover - depends on the installed TransformerLens
    HookedTransformer = None  # type: ignore[assignment,misc]


def _softcap_on(cap) -> bool:
    return cap is not None and cap > 0


def is_hooked_transformer(model) -> bool:
    return HookedTransformer is not None and isinstance(model, HookedTransformer)


class HookedTransformerFamily:
    """Adapter between the engine and one ``HookedTransformer`` instance."""

    name = "HookedTransformer"
    ungroups_kv = True  # GQA keys are ungrouped for the sweep (see prepared())
    rebuild_attention = False  # hook_pattern is in the computation path
    causal = True
    logits_supported = True

    @property
    def final_hidden_hook(self) -> str:
        """The hook holding the last block's output (what a sentence encoder pools)."""
        return f"blocks.{self.n_layers - 1}.hook_resid_post"

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg
        self.check_supported()
        cfg = self.cfg
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.d_head: int = cfg.d_head
        self.n_ctx: int = cfg.n_ctx
        self.d_vocab_out: int = cfg.d_vocab_out
        self.d_vocab: int = cfg.d_vocab  # token ids the embedding accepts
        self.pe_type: str = cfg.positional_embedding_type
        self.rotary_dim: Optional[int] = cfg.rotary_dim if self.pe_type == "rotary" else None
        self.rotary_adjacent_pairs: bool = bool(cfg.rotary_adjacent_pairs)
        self.n_kv_heads: Optional[int] = (
            cfg.n_key_value_heads
            if cfg.n_key_value_heads is not None and cfg.n_key_value_heads != cfg.n_heads
            else None
        )
        self.gated_mlp: bool = bool(cfg.gated_mlp)
        # SoLU-LN style: a LayerNorm between the activation (hook_mid) and hook_post
        self.activation_has_norm: bool = bool(cfg.act_fn and cfg.act_fn.endswith("_ln"))
        self.attn_only: bool = bool(cfg.attn_only)
        self.attn_softcap = cfg.attn_scores_soft_cap if _softcap_on(cfg.attn_scores_soft_cap) else None
        self.output_softcap = (
            cfg.output_logits_soft_cap if _softcap_on(cfg.output_logits_soft_cap) else None
        )

    # ------------------------------------------------------------------ support checks
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

    # ------------------------------------------------------------------ hook layout
    def hook_roles(self) -> Dict[str, HookRole]:
        """Map every hook point the sweep uses to its role."""
        roles: Dict[str, HookRole] = {"hook_embed": HookRole(Role.EMBED)}
        if self.pe_type in ("standard", "shortformer"):
            roles["hook_pos_embed"] = HookRole(Role.POS_EMBED)
        for name, _ in self.model.hook_dict.items():
            if name.endswith("hook_scale"):
                layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
                roles[name] = HookRole(Role.NORM_SCALE, layer)
        for layer in range(self.n_layers):
            b = f"blocks.{layer}"
            roles[f"{b}.hook_resid_pre"] = HookRole(Role.RESID_PRE, layer)
            if self.pe_type == "rotary":
                roles[f"{b}.attn.hook_rot_q"] = HookRole(Role.ROT_Q, layer)
                roles[f"{b}.attn.hook_rot_k"] = HookRole(Role.ROT_K, layer)
            else:
                roles[f"{b}.attn.hook_q"] = HookRole(Role.Q, layer)
                roles[f"{b}.attn.hook_k"] = HookRole(Role.K, layer)
            roles[f"{b}.attn.hook_v"] = HookRole(Role.V, layer)
            if self.attn_softcap is not None:
                roles[f"{b}.attn.hook_attn_scores"] = HookRole(Role.SCORES, layer)
            roles[f"{b}.attn.hook_pattern"] = HookRole(Role.PATTERN, layer)
            roles[f"{b}.attn.hook_z"] = HookRole(Role.Z, layer)
            if not self.attn_only:
                roles[f"{b}.mlp.hook_pre"] = HookRole(Role.MLP_PRE, layer)
                if self.gated_mlp:
                    roles[f"{b}.mlp.hook_pre_linear"] = HookRole(Role.MLP_UP, layer)
                if self.activation_has_norm:
                    roles[f"{b}.mlp.hook_mid"] = HookRole(Role.MLP_MID, layer)
                roles[f"{b}.mlp.hook_post"] = HookRole(Role.MLP_POST, layer)
        roles[f"blocks.{self.n_layers - 1}.hook_resid_post"] = HookRole(Role.RESID_FINAL)
        if self.output_softcap is not None:
            roles["unembed.hook_out"] = HookRole(Role.LOGITS)
        return roles

    def has_hook(self, name: str) -> bool:
        return name in self.model.hook_dict

    def hook_names(self):
        return list(self.model.hook_dict)

    # ------------------------------------------------------------------ model facts
    def activation(self, layer: int) -> Callable[[Tensor], Tensor]:
        return self.model.blocks[layer].mlp.act_fn

    def attn_scale(self, layer: int) -> float:
        return float(self.model.blocks[layer].attn.attn_scale)

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

    def attention_sinks(self, layer: int) -> Optional[Tensor]:
        """Learned per-head sink logits ``[heads]`` that join the softmax (GPT-OSS), or None."""
        if not getattr(self.cfg, "use_attention_sinks", False):
            return None
        return self.model.blocks[layer].attn.sinks

    def shortformer_projections(self, layer: int) -> Tuple[Tensor, Tensor]:
        """``W_Q`` and ``W_K`` ``[heads, d_model, d_head]`` (keys ungrouped for GQA)."""
        attn = self.model.blocks[layer].attn
        return attn.W_Q, attn.W_K

    def fold_kv(self, name: str, relevance: Tensor) -> Tensor:
        """Sum the ungrouped copies of a shared key/value head back to the model's grouping."""
        if self.n_kv_heads is None or not name.endswith(("hook_k", "hook_v", "hook_rot_k")):
            return relevance
        b, p, h, d = relevance.shape
        return relevance.reshape(b, p, self.n_kv_heads, h // self.n_kv_heads, d).sum(3)

    # ------------------------------------------------------------------ running
    @contextmanager
    def prepared(self):
        """Ungroup grouped-query attention for the sweep (so every query head owns its key copy)."""
        previous = self.cfg.ungroup_grouped_query_attention
        try:
            if self.n_kv_heads is not None:
                self.model.set_ungroup_grouped_query_attention(True)
            yield
        finally:
            self.model.set_ungroup_grouped_query_attention(previous)

    def forward(self, tokens: Tensor, attention_mask: Optional[Tensor], fwd_hooks) -> Tensor:
        with self.model.hooks(fwd_hooks=fwd_hooks):
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
