"""TransformerLens ``TransformerBridge``: the same hook names as HookedTransformer, other facts.

The bridge wraps a Hugging Face model and reimplements attention eagerly with the
HookedTransformer hook names in the computation path (``hook_rot_q``, ``hook_attn_scores``,
``hook_pattern``, ``hook_z``, ``ln*.hook_scale``, ``mlp.hook_pre`` / ``hook_pre_linear`` /
``hook_post``; checked by intervention in ``tests/test_bridge.py``). So the role map is the
HookedTransformer one; what differs is where the model facts live:

* the RoPE tables are read where the forward uses them, at ``attn.hook_cos`` / ``attn.hook_sin``;
* the activation and the score scale come from the wrapped Hugging Face modules;
* grouped-query attention cannot be ungrouped: the key side of a shared kv head is credited to
  each query head from that head's score gradient, exactly (``engine._gqa_key_sink``).

Not yet supported on the bridge (``NotImplementedError``): ALiBi architectures, attention or
output softcaps, q/k norms (their scale sits outside any hook), adjacent-pair RoPE, and encoders.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Optional, Tuple

from torch import Tensor

from lens_palrp.hooks.hooked_transformer import HookedTransformerFamily, _softcap_on
from lens_palrp.hooks.roles import HookRole, Role

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # pragma: no cover - very old TransformerLens
    TransformerBridge = None  # type: ignore[assignment,misc]


def is_transformer_bridge(model) -> bool:
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


class TransformerBridgeFamily(HookedTransformerFamily):
    """Adapter between the engine and one decoder ``TransformerBridge``."""

    name = "TransformerBridge"
    ungroups_kv = False  # keys stay grouped: GQA crediting goes through the score gradients

    def __init__(self, model):
        super().__init__(model)
        if self.pe_type == "rotary" and self.rotary_dim is None:
            self.rotary_dim = self.d_head

    def check_supported(self) -> None:
        cfg = self.cfg
        unsupported = {
            "ALiBi attention": cfg.positional_embedding_type == "alibi",
            "attention softcap (attn_scores_soft_cap)": _softcap_on(cfg.attn_scores_soft_cap),
            "output softcap (output_logits_soft_cap)": _softcap_on(cfg.output_logits_soft_cap),
            "q/k norms (use_qk_norm: their scale has no hook on the bridge)": bool(cfg.use_qk_norm),
            "adjacent-pair RoPE (rotary_adjacent_pairs)": cfg.positional_embedding_type == "rotary"
            and bool(cfg.rotary_adjacent_pairs),
            "bidirectional attention (encoders)": getattr(cfg, "attention_dir", "causal") != "causal",
            "mixture-of-experts MLP": bool(getattr(cfg, "num_experts", None)),
        }
        bad = [name for name, hit in unsupported.items() if hit]
        if bad:
            raise NotImplementedError(
                "lens_palrp cannot explain this TransformerBridge yet: " + "; ".join(bad)
            )
        for layer in range(cfg.n_layers):
            if not hasattr(self.model.blocks[layer], "attn") or not hasattr(
                self.model.blocks[layer].attn, "hook_pattern"
            ):
                raise NotImplementedError(f"block {layer} has no attention with hook_pattern")

    def hook_roles(self) -> Dict[str, HookRole]:
        roles = super().hook_roles()
        if self.pe_type == "rotary":
            for layer in range(self.n_layers):
                roles[f"blocks.{layer}.attn.hook_cos"] = HookRole(Role.ROPE_COS, layer)
                roles[f"blocks.{layer}.attn.hook_sin"] = HookRole(Role.ROPE_SIN, layer)
        return roles

    def activation(self, layer: int) -> Callable[[Tensor], Tensor]:
        hf_mlp = self.model.blocks[layer].mlp.original_component
        for name in ("act_fn", "act", "activation_fn"):
            fn = getattr(hf_mlp, name, None)
            if fn is not None:
                return fn
        raise NotImplementedError(f"cannot find the activation function of {type(hf_mlp).__name__}")

    def attn_scale(self, layer: int) -> float:
        hf_attn = self.model.blocks[layer].attn.original_component
        return 1.0 / float(getattr(hf_attn, "scaling", self.d_head**-0.5))

    def rotary_tables(self, layer: int, n_pos: int, attention_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        raise AssertionError("the bridge's RoPE tables are captured at attn.hook_cos / hook_sin")

    def fold_kv(self, name: str, relevance: Tensor) -> Tensor:
        return relevance  # keys and values are never ungrouped on the bridge

    @contextmanager
    def prepared(self):
        yield

    def forward(self, tokens: Tensor, attention_mask: Optional[Tensor], fwd_hooks) -> Tensor:
        with warnings.catch_warnings():
            # TransformerLens 4 warns when a hook edits hook_scale: detaching it is the rule
            warnings.filterwarnings("ignore", message=".*edited hook_scale/hook_normalized.*")
            with self.model.hooks(fwd_hooks=fwd_hooks):
                return self.model(tokens, attention_mask=attention_mask)
