"""The family contract (``lens_palrp.hooks.base.ModelFamily``) is what every family provides."""

import pytest

from lens_palrp.hooks import HookedEncoderFamily, HookedTransformerFamily, TransformerBridgeFamily, ViTFamily
from lens_palrp.hooks.base import ModelFamily, RotaryTables


def test_every_family_is_a_model_family_with_no_abstract_part_left():
    for family in (HookedTransformerFamily, HookedEncoderFamily, TransformerBridgeFamily, ViTFamily):
        assert issubclass(family, ModelFamily)
        assert not family.__abstractmethods__, (family.__name__, sorted(family.__abstractmethods__))


def test_capabilities_only_where_the_encoding_needs_them():
    """The bridge observes its RoPE tables at hooks: it must not claim to compute them."""
    assert issubclass(HookedTransformerFamily, RotaryTables)
    assert not issubclass(TransformerBridgeFamily, RotaryTables)
    assert not issubclass(ViTFamily, RotaryTables)


def test_a_family_that_leaves_a_fact_unset_is_refused_by_name():
    class Incomplete(ViTFamily):
        def __init__(self, model):
            super().__init__(model)
            del self.score_roles

    from lens_palrp.hooks.vit import HookedViT, ViTConfig

    family = Incomplete(HookedViT(ViTConfig(image_size=8, patch_size=4, d_model=8, n_layers=1, n_heads=2, d_mlp=8,
                                            n_classes=3)))
    with pytest.raises(TypeError, match=r"Incomplete does not set the family facts \['score_roles'\]"):
        family.check_contract()
