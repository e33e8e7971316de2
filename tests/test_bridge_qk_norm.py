"""q/k RMSNorms on the TransformerBridge (Qwen3, OLMo-2, Gemma-3): their scale is held constant.

The bridges wrap Hugging Face's ``q_norm`` / ``k_norm`` in normalization bridges whose
``hook_scale`` is in the path, so the family's norm-scale role detaches it (the identity rule on
the normalization; ``lens_palrp.hooks.bridge_softcap``). The reference below detaches the q/k norm
scales by hand in Hugging Face's modules and runs the sweep with those hook points taken out of the
role map: the two must agree. Without the hand detach (the scale differentiated through) they do
not, which is what this test would see if the role were missing. Hugging Face and the bridge take
the attention softmax in float32 even in a float64 model; the conservation check puts it in
float64 (``float64_softmax``), as shipped it holds to ~1e-6. Gradient x input against the bare
model is in ``tests/test_architectures.py``.
"""

import warnings

import pytest
import torch

import lens_palrp as lp
from architectures import build
from lens_palrp.hooks import TransformerBridgeFamily, family_for
from lens_palrp.roles import Role

pytest.importorskip("transformer_lens.model_bridge")

ARCHS = ["qwen3", "olmo2", "gemma3"]
TOKENS = torch.randint(2, 18, (1, 9), generator=torch.Generator().manual_seed(5))
TARGET = 3
LRP = ["pa_lrp", "attn_lrp", "cp_lrp"]


def bridge_of(name, biases=False):
    from transformers import AutoTokenizer

    from lens_palrp.zoo import TOKENIZER_DIR

    hf = build(name, biases=biases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = lp.models.bridge_from_hf(hf, AutoTokenizer.from_pretrained(TOKENIZER_DIR), dtype=torch.float64)
    return hf, bridge


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return (request.param, *bridge_of(request.param))



def qk_norms(bridge):
    return [getattr(block.attn.original_component, n) for block in bridge.blocks for n in ("q_norm", "k_norm")]


def qk_scale_hooks(bridge):
    return [n for n in bridge.hook_dict if n.endswith(("q_norm.hook_scale", "k_norm.hook_scale"))]


def test_the_q_k_norm_scales_are_hooked_in_the_path_and_get_the_norm_role(arch):
    name, _, bridge = arch
    roles = family_for(bridge).hook_roles()
    hooks = qk_scale_hooks(bridge)
    assert len(hooks) == 2 * len(bridge.blocks)
    with torch.no_grad():
        base = bridge(TOKENS)
        for hook in hooks:
            assert roles[hook].role is Role.NORM_SCALE
            out = bridge.run_with_hooks(TOKENS, fwd_hooks=[(hook, lambda a, hook: a * 1.3)])
            assert float((out - base).abs().max()) > 1e-6, hook


def test_every_hook_the_sweep_patches_is_in_the_computation_path(arch):
    _, _, bridge = arch
    with torch.no_grad():
        base = bridge(TOKENS)
        for name, role in family_for(bridge).hook_roles().items():
            if role.role in (Role.RESID_FINAL, Role.ROPE_COS, Role.ROPE_SIN):
                continue
            out = bridge.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda a, hook: a * 1.3 + 0.05)])
            assert float((out - base).abs().max()) > 1e-8, name


def _hand_detached(norm, offset):
    """RMSNorm with its scale detached, in float64, written out (not Hugging Face's forward)."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps

    def forward(x):
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * inv.detach() * ((1.0 + norm.weight) if offset else norm.weight)
    return forward


@pytest.mark.parametrize("method", ["attn_lrp", "pa_lrp"])
def test_maps_equal_a_reference_with_the_q_k_norm_scale_detached_by_hand(arch, method, monkeypatch):
    name, hf, bridge = arch
    attr = lp.explain(bridge, TOKENS, TARGET, method=method, allow_unverified=True)

    hooks = set(qk_scale_hooks(bridge))
    roles = TransformerBridgeFamily.hook_roles
    monkeypatch.setattr(TransformerBridgeFamily, "hook_roles",
                        lambda self: {k: v for k, v in roles(self).items() if k not in hooks})
    through = lp.explain(bridge, TOKENS, TARGET, method=method, allow_unverified=True)
    for norm in qk_norms(bridge):
        monkeypatch.setitem(norm.__dict__, "forward", _hand_detached(norm, offset=name.startswith("gemma")))
    ref = lp.explain(bridge, TOKENS, TARGET, method=method, allow_unverified=True)

    scale = float(ref.semantic.abs().max())
    assert float((attr.semantic - ref.semantic).abs().max()) < 1e-9 * scale
    assert float((attr.positional - ref.positional).abs().max()) < 1e-9 * scale
    assert float((attr.heads_by_pos - ref.heads_by_pos).abs().max()) < 1e-9 * scale
    # the scale differentiated through (no rule at the q/k norms) is far off: the check can fail
    assert float((through.semantic - ref.semantic).abs().max()) > 1e-2 * scale


@pytest.mark.parametrize("method", LRP)
def test_bias_free_conserves(arch, method, float64_softmax):
    name, _, bridge = arch
    attr = lp.explain(bridge, TOKENS, TARGET, method=method)  # verified: no opt-in needed
    c = attr.conservation()
    assert abs(float(c.other_absorbed[0] / c.target_value[0])) < 1e-8, name
    if method == "pa_lrp":  # RoPE sinks in every layer
        assert bool((attr.positional.abs().sum((0, 2, 3)) > 1e-6).all())


def test_as_shipped_the_float32_softmax_is_the_floor(arch):
    _, _, bridge = arch
    c = lp.explain(bridge, TOKENS, TARGET, method="pa_lrp").conservation()
    # the gap is the float32 softmax's rounding (OLMo-2: 1.15e-6 of the logit, 10 float32 eps,
    # under AVX2; under 1e-6 under AVX-512): bounded at 64 eps; a wrong rule leaves far more
    assert abs(float(c.other_absorbed[0] / c.target_value[0])) < 64 * torch.finfo(torch.float32).eps



def test_a_q_k_norm_outside_a_normalization_bridge_is_refused(arch, monkeypatch):
    """A q/k norm whose scale the sweep cannot hold constant is refused before any map."""
    _, _, bridge = arch
    attn = bridge.blocks[1].attn
    monkeypatch.setitem(attn.__dict__, "submodules", {k: v for k, v in attn.submodules.items() if k != "k_norm"})
    with pytest.raises(NotImplementedError, match="q/k norm k_norm of layer 1"):
        lp.explain(bridge, TOKENS, TARGET)
