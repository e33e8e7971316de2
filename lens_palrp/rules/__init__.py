"""LRP rules: closed-form gradient patches (``functional``) and the small rule objects a method
maps hook roles to (``base``, ``products``, ``activations``, ``routing``)."""

from lens_palrp.rules.activations import IdentityActivation, IdentityOutputSoftcap, IdentitySoftcap
from lens_palrp.rules.base import Applied, ConstantScale, Gradient, InputSink, Rule, Site
from lens_palrp.rules.functional import (
    Factor,
    alibi_position_relevance,
    alibi_split_weights,
    gated_product,
    identity_rule,
    identity_rule_ratio,
    linear_gamma_relevance,
    linearized,
    rope_table_relevance,
    rotate_every_two,
    scale_grad,
    softmax_input_relevance,
    softmax_output_relevance,
)
from lens_palrp.rules.products import GatedShares, HeldConstant, RotatedShare, UniformShare
from lens_palrp.rules.routing import RoutedShares, offset_gated_product, routed_product

__all__ = [
    "Rule", "Site", "Applied", "Gradient", "InputSink", "ConstantScale", "UniformShare", "HeldConstant",
    "RotatedShare", "GatedShares", "RoutedShares", "routed_product", "offset_gated_product", "IdentityActivation", "IdentitySoftcap", "IdentityOutputSoftcap",
    "Factor", "scale_grad", "linearized", "identity_rule_ratio", "identity_rule", "gated_product", "rotate_every_two",
    "rope_table_relevance", "alibi_split_weights", "alibi_position_relevance", "softmax_input_relevance", "softmax_output_relevance",
    "linear_gamma_relevance",
]
