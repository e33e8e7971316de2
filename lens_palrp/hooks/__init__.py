"""Model families: each module maps one family's hook points to the sweep's roles."""

from __future__ import annotations

from lens_palrp.hooks.base import ModelFamily
from lens_palrp.hooks.hooked_encoder import HookedEncoderFamily, is_hooked_encoder
from lens_palrp.hooks.hooked_transformer import HookedTransformerFamily, is_hooked_transformer
from lens_palrp.roles import HookRole, Role
from lens_palrp.hooks.transformer_bridge import TransformerBridgeFamily, is_transformer_bridge, unverified_architectures
from lens_palrp.hooks.vit import HookedViT, ViTFamily, is_hooked_vit
from lens_palrp.hooks.t5_bridge import T5BridgeFamily, is_encoder_decoder_bridge

# explain() options some family takes, by option name: the families that take it (for the error
# that names where an option belongs when it is passed to another family)
FAMILY_OPTIONS = {name: "vision transformers (HookedViT)" for name in ViTFamily.options}
FAMILY_OPTIONS.update({name: "encoder-decoder TransformerBridges (T5)" for name in T5BridgeFamily.options})

__all__ = ["family_for", "FAMILY_OPTIONS", "ModelFamily", "HookRole", "Role", "HookedTransformerFamily", "HookedEncoderFamily", "TransformerBridgeFamily",
           "HookedViT", "ViTFamily", "unverified_architectures"]


def family_for(model):
    """The adapter for ``model``, or a ``TypeError`` naming what is supported."""
    for is_kind, family in ((is_hooked_transformer, HookedTransformerFamily), (is_hooked_encoder, HookedEncoderFamily),
                            (is_encoder_decoder_bridge, T5BridgeFamily),
                            (is_transformer_bridge, TransformerBridgeFamily), (is_hooked_vit, ViTFamily)):
        if is_kind(model):
            adapter = family(model)
            adapter.check_contract()
            return adapter
    raise TypeError(
        f"lens_palrp cannot explain a {type(model).__module__}.{type(model).__name__}: "
        "supported models are transformer_lens.HookedTransformer, HookedEncoder, TransformerBridge and lens_palrp.hooks.vit.HookedViT"
    )
