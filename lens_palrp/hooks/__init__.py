"""Model families: each module maps one family's hook points to the sweep's roles."""

from __future__ import annotations

from lens_palrp.hooks.hooked_encoder import HookedEncoderFamily, is_hooked_encoder
from lens_palrp.hooks.hooked_transformer import HookedTransformerFamily, is_hooked_transformer
from lens_palrp.hooks.roles import HookRole, Role
from lens_palrp.hooks.transformer_bridge import TransformerBridgeFamily, is_transformer_bridge, unverified_architectures
from lens_palrp.hooks.vit import HookedViT, ViTFamily, is_hooked_vit

__all__ = ["family_for", "HookRole", "Role", "HookedTransformerFamily", "HookedEncoderFamily", "TransformerBridgeFamily",
           "HookedViT", "ViTFamily", "unverified_architectures"]


def family_for(model):
    """The adapter for ``model``, or a ``TypeError`` naming what is supported."""
    if is_hooked_transformer(model):
        return HookedTransformerFamily(model)
    if is_hooked_encoder(model):
        return HookedEncoderFamily(model)
    if is_transformer_bridge(model):
        return TransformerBridgeFamily(model)
    if is_hooked_vit(model):
        return ViTFamily(model)
    raise TypeError(
        f"lens_palrp cannot explain a {type(model).__module__}.{type(model).__name__}: "
        "supported models are transformer_lens.HookedTransformer, HookedEncoder, TransformerBridge and lens_palrp.hooks.vit.HookedViT"
    )
