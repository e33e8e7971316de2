"""Methods as rule maps: registration, variants, and that a variant changes only what it maps."""

import pytest
import torch

import lens_palrp as lp
from lens_palrp import rules
from lens_palrp.methods import METHODS, Method, get_method, register_method
from lens_palrp.roles import Role

pytest.importorskip("transformer_lens")
try:
    from models import make_model
except ImportError:  # pragma: no cover
    make_model = None

needs_hooked = pytest.mark.skipif(make_model is None or not hasattr(__import__("transformer_lens"), "HookedTransformer"),
                                  reason="HookedTransformer is not in TransformerLens 4")


def test_built_in_methods_are_rule_maps():
    pa, attn, cp, gx = (METHODS[n] for n in ("pa_lrp", "attn_lrp", "cp_lrp", "grad_x_input"))
    assert pa.positional.sinks and not attn.positional.sinks
    assert pa.rule(Role.ROT_Q).splits_rotation and not attn.rule(Role.ROT_Q).splits_rotation
    assert isinstance(cp.rule(Role.PATTERN), rules.HeldConstant)
    assert cp.rule(Role.MLP_GATED) == rules.GatedShares(0.0, 1.0)
    assert type(gx.rule(Role.NORM_SCALE)) is rules.Rule  # plain gradient: no rule
    # the only differences between PA-LRP and AttnLRP: the rotated q/k rule and the PE treatment
    assert {r for r in Role if pa.rule(r) != attn.rule(r)} == {Role.ROT_Q, Role.ROT_K}


def test_register_refuses_duplicates_and_non_methods():
    with pytest.raises(ValueError, match="registered already"):
        register_method(METHODS["pa_lrp"])
    with pytest.raises(TypeError, match="Method"):
        register_method("pa_lrp")
    with pytest.raises(TypeError, match="Role members"):
        Method("bad", {"hook_q": rules.UniformShare()})
    with pytest.raises(TypeError, match="must be a lens_palrp.rules.Rule"):
        Method("bad", {Role.Q: 0.5})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


@needs_hooked
def test_a_registered_variant_changes_only_its_role():
    """A user's variant (the gate of a gated MLP held constant, CP-LRP style, inside PA-LRP) is
    run by name; it equals PA-LRP on a model without gated MLPs and differs where they exist."""
    variant = METHODS["pa_lrp"].with_rules("pa_lrp_constant_gate_test", {Role.MLP_GATED: rules.GatedShares(0.0, 1.0)})
    register_method(variant, overwrite=True)
    try:
        toks = torch.tensor([[1, 5, 7, 2, 9]])
        gated = make_model("llama_like", seed=0)  # gated SiLU MLP
        plain = make_model("gpt2_like", seed=0)
        a = lp.explain(gated, toks, 3, method="pa_lrp_constant_gate_test")
        b = lp.explain(gated, toks, 3, method="pa_lrp")
        assert a.method == "pa_lrp_constant_gate_test"
        assert float((a.semantic - b.semantic).abs().max()) > 1e-6
        rec = lp.explain(gated, toks, 3, method=variant, record=["blocks.0.mlp.hook_pre"])
        assert float(rec.hooks["blocks.0.mlp.hook_pre"].abs().max()) == 0.0  # the gate gets nothing
        c = lp.explain(plain, toks, 3, method="pa_lrp_constant_gate_test")
        d = lp.explain(plain, toks, 3, method="pa_lrp")
        assert torch.equal(c.semantic, d.semantic) and torch.equal(c.positional_input, d.positional_input)
    finally:
        METHODS.pop("pa_lrp_constant_gate_test", None)
