"""Half precision (``lens_palrp.precision``): the model runs in bfloat16 / float16, every relevance
is formed and summed in float32, and a NaN or overflow is refused, never returned.

The accuracy checks compare with the float64 explanation of the *same* weights (the half model
upcast), so what is measured is the sweep's rounding, not a difference of weights. The bounds
are the issue's 5% target; the measured errors are in docs/precision.md (about 1% in bfloat16).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lens_palrp as lp
from lens_palrp.precision import RECORD_DTYPES, Precision, precision_for



def _relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- the small piece
def test_record_dtype_is_float32_for_half_models_and_the_models_own_otherwise():
    assert RECORD_DTYPES[torch.bfloat16] is torch.float32
    assert RECORD_DTYPES[torch.float16] is torch.float32
    assert RECORD_DTYPES[torch.float32] is torch.float32
    assert RECORD_DTYPES[torch.float64] is torch.float64


def test_relevance_is_formed_in_the_record_dtype_not_rounded_to_the_models():
    p = Precision(torch.bfloat16, torch.float32)
    a = torch.tensor([1 + 2 ** -7], dtype=torch.bfloat16)  # exactly representable in bfloat16
    g = torch.tensor([1 + 2 ** -7], dtype=torch.bfloat16)
    r = p.relevance(a, g)
    assert r.dtype is torch.float32
    assert float(r) == (1 + 2 ** -7) ** 2  # bfloat16 would round the product to 1 + 2^-6
    assert float(a * g) != (1 + 2 ** -7) ** 2


def test_precision_for_refuses_other_dtypes_naming_them():
    model = torch.nn.Embedding(3, 2)
    model.weight.data = model.weight.data.to(torch.bfloat16)
    assert precision_for(model) == Precision(torch.bfloat16, torch.float32)
    with pytest.raises(TypeError, match="no floating-point parameters"):
        precision_for(torch.nn.Module())
    eight_bit = torch.nn.Linear(2, 2)
    eight_bit.weight = torch.nn.Parameter(eight_bit.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
    eight_bit.bias = None
    with pytest.raises(TypeError, match="float8_e4m3fn; lens_palrp explains models in float64, float32, bfloat16, float16"):
        precision_for(eight_bit)


def test_the_non_finite_message_names_the_dtype_and_a_way_out():
    msg = Precision(torch.float16, torch.float32).describe_non_finite("the relevance 'semantic'")
    assert "float16" in msg and "bfloat16" in msg and "semantic" in msg


# ----------------------------------------------------------------------------- end to end
def _llama_bridge(dtype):
    transformers = pytest.importorskip("transformers")
    if not lp.zoo.bridge_available():
        pytest.skip("no TransformerBridge in this TransformerLens")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.architectures = ["LlamaForCausalLM"]
    hf = transformers.LlamaForCausalLM(cfg).eval()
    return lp.models.bridge_from_hf(hf, lp.zoo.tokenizer(), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_bridge_matches_the_float64_explanation_of_the_same_weights(dtype):
    half = _llama_bridge(dtype)
    wide = copy.deepcopy(half).to(torch.float64)
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    attr = lp.explain(half, tokens, 7)
    ref = lp.explain(wide, tokens, 7)
    assert attr.semantic.dtype is torch.float32 and attr.positional.dtype is torch.float32
    assert attr.target_value.dtype is torch.float32
    assert _relative(attr.semantic, ref.semantic) < 0.05
    assert _relative(attr.positional, ref.positional) < 0.05
    assert _relative(attr.heads, ref.heads) < 0.05
    assert next(half.parameters()).dtype is dtype  # the model is left in its dtype


def test_float16_overflow_of_the_target_is_refused_not_returned():
    half = _llama_bridge(torch.float16)
    with torch.no_grad():
        half.original_model.lm_head.weight.mul_(1e5)  # the logits pass float16's 65504
    tokens = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(2))
    with pytest.raises(FloatingPointError, match=r"(target value is not finite|contains NaN or inf).*float16 overflows"):
        lp.explain(half, tokens, 7)


def test_a_gradient_overflow_in_the_sweep_is_refused_not_returned():
    """The forward stays finite; a user's hook makes the backward overflow in layer 0."""
    half = _llama_bridge(torch.float16)
    point = half.blocks[0].hook_resid_pre

    def amplify_gradient(act, hook):  # the same value, its gradient times 1e30 (inf in float16)
        return act + (act - act.detach()) * 1e30

    point.add_hook(amplify_gradient)
    try:
        tokens = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(2))
        with pytest.raises(FloatingPointError, match=r"relevance '\w+' contains NaN or inf \(model in float16\)"):
            lp.explain(half, tokens, 7)
    finally:
        point.remove_hooks("fwd")


def test_a_half_hooked_transformer_is_explained_in_float32_records():
    if not lp.zoo.hooked_available():
        pytest.skip("HookedTransformer needs TransformerLens 3.x")
    model, _ = lp.zoo.load("rope-repeat", kind="hooked")
    wide = copy.deepcopy(model).to(torch.bfloat16).to(torch.float64)
    half = model.to(torch.bfloat16)
    tokens = torch.tensor([[1, 5, 9, 12, 5, 9, 12, 5]])
    attr, ref = lp.explain(half, tokens, 9), lp.explain(wide, tokens, 9)
    assert attr.semantic.dtype is torch.float32
    assert _relative(attr.semantic, ref.semantic) < 0.05
    assert _relative(attr.positional, ref.positional) < 0.05


def test_float16_backward_is_seeded_with_a_power_of_two_and_divided_back_exactly():
    """The seed scale lifts float16's small gradients out of the subnormals; dividing it back is
    exact, so on weights where nothing underflows the scaled and unscaled sweeps agree to float16
    rounding, and both match float64 (a forgotten division would be 1024 times off)."""
    from lens_palrp.precision import FLOAT16_GRADIENT_SCALE

    assert precision_for(_llama_bridge(torch.float16)).gradient_scale == FLOAT16_GRADIENT_SCALE
    assert precision_for(_llama_bridge(torch.bfloat16)).gradient_scale == 1.0
    half = _llama_bridge(torch.float16)
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = lp.explain(copy.deepcopy(half).to(torch.float64), tokens, 7)
    attr = lp.explain(half, tokens, 7)
    assert _relative(attr.semantic, ref.semantic) < 0.01
    assert _relative(attr.positional.sum((2, 3)), ref.positional.sum((2, 3))) < 0.05


def test_a_float16_sweep_whose_scaled_backward_overflows_runs_again_unscaled():
    half = _llama_bridge(torch.float16)
    wide = copy.deepcopy(half).to(torch.float32)
    tokens = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(2))

    def amplify_gradient(act, hook):  # the same value; its gradient times 2000 (times 1024 more overflows)
        return act + (act - act.detach()) * 1999.0

    forwards = []
    points = [half.blocks[0].hook_resid_pre, wide.blocks[0].hook_resid_pre]
    for point in points:
        point.add_hook(amplify_gradient)
    counter = half.blocks[0].hook_resid_pre.register_forward_hook(lambda *a: forwards.append(1))
    try:
        attr = lp.explain(half, tokens, 7)
        ref = lp.explain(wide, tokens, 7)
    finally:
        counter.remove()
        for point in points:
            point.remove_hooks("fwd")
    assert len(forwards) == 2  # the scaled sweep raised inside, the unscaled one returned
    assert torch.isfinite(attr.semantic).all()
    assert _relative(attr.semantic, ref.semantic) < 0.05
