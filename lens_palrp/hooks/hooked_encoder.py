"""TransformerLens ``HookedEncoder`` (BERT, TransformerLens 3.x): encoder hooks, same rules.

Post-LN blocks (``ln1`` after attention + skip, ``ln2`` after the MLP + skip), bidirectional
attention through the standard TransformerLens attention (``hook_pattern`` in the path), and the
three embedding sinks ``embed.hook_embed``, ``embed.hook_pos_embed`` and
``embed.hook_token_type_embed`` that ``embed.ln`` joins. The block output is
``hook_normalized_resid_post``. The MLM head's activation has no hook, so logit targets are
refused: explain hidden states (``lp.at_hook``, ``lp.explain_similarity``).
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor
from transformer_lens.utilities import get_act_name

from lens_palrp.hooks.hooked_transformer import HookedTransformerFamily
from lens_palrp.roles import HookRole, Role

try:
    from transformer_lens import HookedEncoder
except ImportError:  # TransformerLens 4.x
    HookedEncoder = None  # type: ignore[assignment,misc]


def is_hooked_encoder(model) -> bool:
    return HookedEncoder is not None and isinstance(model, HookedEncoder)


class HookedEncoderFamily(HookedTransformerFamily):
    name = "HookedEncoder"

    def __init__(self, model):
        super().__init__(model)
        self.causal = False
        self.logits_supported = False  # the MLM head's activation has no hook

    def check_supported(self) -> None:
        super().check_supported()
        if self.cfg.positional_embedding_type != "standard":
            raise NotImplementedError("HookedEncoder with a non-learned position embedding")

    @property
    def final_hidden_hook(self) -> str:
        return get_act_name("normalized_resid_post", self.n_layers - 1)

    def hook_roles(self) -> Dict[str, HookRole]:
        roles = super().hook_roles()
        roles.pop("hook_embed", None)
        roles.pop("hook_pos_embed", None)
        roles.pop(f"blocks.{self.n_layers - 1}.hook_resid_post", None)
        roles["embed.hook_embed"] = HookRole(Role.EMBED)
        roles["embed.hook_pos_embed"] = HookRole(Role.POS_EMBED)
        roles["embed.hook_token_type_embed"] = HookRole(Role.TOKEN_TYPE)
        roles[self.final_hidden_hook] = HookRole(Role.RESID_FINAL)
        return roles

    def forward(self, tokens: Tensor, attention_mask: Optional[Tensor], fwd_hooks) -> Tensor:
        with self.hooks_attached(fwd_hooks):
            return self.model(tokens, one_zero_attention_mask=attention_mask, return_type="logits")

    def to_tokens(self, text: str, prepend_bos: Optional[bool]) -> Tensor:
        return self.model.to_tokens(text, truncate=False)[0][0]  # (tokens, token types, mask): [CLS] ... [SEP]

    def to_str_tokens(self, tokens: Tensor):
        return self.model.tokenizer.convert_ids_to_tokens(tokens.tolist())

    def to_single_token(self, text: str) -> int:
        ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens")
        return int(ids[0])
