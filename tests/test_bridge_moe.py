"""Mixture-of-experts bridges (Mixtral, Qwen3-MoE): the routed-product rule and the router's
softmax against closed forms, conservation per method, gradient x input against Hugging Face's
autograd, the rewrite's value against the model's, and gpt-oss's refusal.

Conservation is checked with every float32-upcast softmax of the float64 model put in float64
(``float64_softmax``: the bridge's attention softmax, and Qwen3-MoE's router softmax; Mixtral's
router casts its logits to float32 itself and stays so): the router's absorption is measured from
the logits' own gradient, so its float32 softmax does not break the bookkeeping.
"""

import sys

import pytest
import torch

import lens_palrp as lp
from lens_palrp import rules
from lens_palrp.hooks import bridge_moe, family_for

pytest.importorskip("transformer_lens.model_bridge")
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from architectures import build  # noqa: E402
from bridges import bridge_from_model  # noqa: E402

MOE = ["mixtral", "qwen3_moe", "gpt_oss"]
TOKENS = torch.randint(2, 18, (2, 9), generator=torch.Generator().manual_seed(5))
TARGET = 3


bridge_of = bridge_from_model


def eager_build(name):
    """The tiny model with Hugging Face's eager expert loop: its default ``grouped_mm`` kernel
    takes no float64 (the rewrite repeats the eager loop whatever the setting)."""
    hf = build(name, biases=False)
    hf.config._experts_implementation = "eager"
    return hf


@pytest.fixture(scope="module", params=MOE)
def moe(request):
    hf = eager_build(request.param)
    return request.param, hf, bridge_of(hf)



# ------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.0, 1.0), (0.25, 0.75)])
def test_routed_product_is_the_uniform_rule_element_by_element(shares):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(5, 1, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.randn(5, 7, dtype=torch.float64, generator=g).requires_grad_(True)
    upstream = torch.randn(5, 7, dtype=torch.float64, generator=g)
    out = rules.routed_product(w, y, *shares)
    assert torch.equal(out, y * w)
    out.backward(upstream)
    ws, es = shares
    for n in range(5):  # the product's relevance per element, y_nd w_n g_nd, split by the shares
        r_w = float((y[n] * w[n, 0] * upstream[n]).sum().detach())
        assert abs(float(w[n, 0] * (w.grad[n, 0] if w.grad is not None else 0.0)) - ws * r_w) < 1e-12
        for d in range(7):
            assert abs(float(y[n, d] * y.grad[n, d]) - es * float(y[n, d] * w[n, 0] * upstream[n, d])) < 1e-12
    if ws == 0:
        assert w.grad is None


class _FakeSweep:
    """What ``_measured_router`` uses of a sweep."""

    def __init__(self, batch, layers):
        self.router_absorbed = torch.zeros(batch, layers, dtype=torch.float64)

    def on_grad(self, tensor, fn):
        tensor.register_hook(fn)

    def observed(self, tensor, fn):
        tensor.register_hook(lambda g: fn(tensor.detach(), g))
        return tensor.view_as(tensor)

    def accumulate(self, total, value):
        total.add_(value)


def test_router_absorption_is_the_deep_taylor_softmax_rule_in_closed_form():
    """Mixtral's router: ``w = softmax over the top-k logits``. With ``R_k = w_k c_k`` handed to
    the weights, the deep Taylor rule gives ``R(l_j) = l_j w_j (c_j - sum_k w_k c_k)`` at the
    selected logits (0 elsewhere); what the router absorbs is ``sum R_k - sum_j R(l_j)``."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    router = MixtralTopKRouter(MixtralConfig(hidden_size=6, num_local_experts=5, num_experts_per_tok=3)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(5, 6, dtype=torch.float64, generator=g))
    x = torch.randn(2 * 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(8, 3, dtype=torch.float64, generator=g)
    sweep = _FakeSweep(2, 1)
    logits, weights, indices = router(x)
    weights = bridge_moe._measured_router(sweep, 0, 2, logits, weights)
    (weights * c).sum().backward()
    expected = torch.zeros(2, dtype=torch.float64)
    for t in range(8):
        sel = [int(i) for i in indices[t]]
        l_sel = logits[t, sel].detach()
        w = torch.softmax(l_sel, -1)  # the closed form, in float64
        r_out = float((w * c[t]).sum())
        r_in = sum(float(l_sel[k] * w[k] * (c[t, k] - (w * c[t]).sum())) for k in range(3))
        expected[t // 4] += r_out - r_in
    # the router takes its softmax in float32: the closed form agrees to that rounding
    torch.testing.assert_close(sweep.router_absorbed[:, 0], expected, rtol=1e-6, atol=1e-7)
    # and the measured absorption closes the books exactly: R_out - absorbed reaches the input
    r_out = float((weights.detach() * c).sum())
    assert abs(float((x * x.grad).sum()) - (r_out - float(sweep.router_absorbed.sum()))) < 1e-12


# ------------------------------------------------------------------------- the rewrite
def test_the_rewritten_block_computes_the_models_value_and_is_removed(moe):
    name, hf, bridge = moe
    family = family_for(bridge)
    with torch.no_grad():
        base = bridge(TOKENS)
    canonizer = bridge_moe.MixtureOfExperts(bridge_moe.moe_layers(bridge))
    sweep = lp.engine.Sweep.__new__(lp.engine.Sweep)  # only what the forward reads
    sweep.method = lp.methods.get_method("attn_lrp")
    canonizer.register(family, sweep)
    try:
        with torch.no_grad():
            assert torch.equal(bridge(TOKENS), base), name
    finally:
        canonizer.remove()
    assert all("forward" not in b.mlp.original_component.__dict__ for b in bridge.blocks)


def test_the_moe_blocks_in_and_out_get_no_dense_mlp_role(moe):
    """The MoEBridge's ``hook_pre`` / ``hook_post`` are the block's input and output, not a dense
    MLP's pre-activation and activation (every other rule site is shown in the path by
    ``tests/test_architectures.py``)."""
    name, _, bridge = moe
    roles = family_for(bridge).hook_roles()
    assert not [n for n in roles if ".mlp." in n], "the MoEBridge's hook_pre/hook_post are its in/out"


# ------------------------------------------------------------------------- the acceptance bar
@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp", "cp_lrp"])
def test_bias_free_moe_conserves(moe, method, float64_softmax):
    name, _, bridge = moe
    attr = lp.explain(bridge, TOKENS, TARGET, method=method)
    c = attr.conservation()
    gap = (c.other_absorbed / c.target_value).abs().max()
    assert float(gap) < 1e-8, (name, method, float(gap))
    router = c.router_absorbed.abs().max()
    if method == "cp_lrp":  # routing weights held constant: the router passes nothing
        assert float(router) == 0.0
    else:  # the measured term is needed to close the books
        assert float(router / c.target_value.abs().max()) > 1e-6, (name, method)
        torch.testing.assert_close(c.router_absorbed, c.router_absorbed_per_layer.sum(-1))
    if method == "pa_lrp":
        assert float(attr.positional.abs().sum()) > 1e-6


def test_moe_absorption_survives_save_and_load(moe, tmp_path):
    _, _, bridge = moe
    attr = lp.explain(bridge, TOKENS, TARGET, method="attn_lrp")
    path = tmp_path / "a.safetensors"
    attr.save(str(path))
    again = lp.Attribution.load(str(path)).conservation()
    torch.testing.assert_close(again.router_absorbed, attr.conservation().router_absorbed, rtol=0, atol=0)


def test_grad_x_input_equals_hugging_face_autograd(moe, float64_softmax):
    """Token relevance: ``E * dy/dE`` at the embedding output; per-head relevance: ``z * dy/dz``
    at each o_proj input, summed over d_head; both by plain autograd on the bare model. Its eager
    attention takes the softmax in float32 (as the bridge's eager path does), so it is put in
    float64: Mixtral's sweep runs fused float64 attention and would differ from it by ~3e-6."""
    name, hf, bridge = moe
    attr = lp.explain(bridge, TOKENS, TARGET, method="grad_x_input")
    embeds = hf.get_input_embeddings()(TOKENS).detach().requires_grad_(True)
    zs = []
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: zs.append(args[0]) or None) for layer in hf.model.layers]
    try:
        logits = hf(inputs_embeds=embeds).logits
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(logits[:, -1, TARGET].sum(), [embeds, *zs])
    semantic = (embeds * grads[0]).sum(-1)
    assert float((attr.semantic - semantic).abs().max() / semantic.abs().max()) < 1e-6, name
    heads = torch.stack([(z * g).reshape(*z.shape[:2], bridge.cfg.n_heads, -1).sum(-1).transpose(1, 2)
                         for z, g in zip(zs, grads[1:])], 1)
    assert float((attr.heads_by_pos - heads).abs().max() / heads.abs().max()) < 1e-6, name


def test_gpt_oss_sinks_are_what_closes_the_books(float64_softmax, monkeypatch):
    """gpt-oss's learned sink logits join every attention softmax as an extra key: the part of the
    relevance the sink column takes is absorbed there (``softmax_input_relevance``), which the
    bridge family reports through ``attention_sinks``. Without it the books do not close."""
    from lens_palrp.hooks.transformer_bridge import TransformerBridgeFamily

    hf = eager_build("gpt_oss")
    with torch.no_grad():  # sinks large enough to take a visible share of every row
        for layer in hf.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(0.5, 2.0, layer.self_attn.sinks.numel()))
    bridge = bridge_of(hf)
    assert all(family_for(bridge).attention_sinks(layer) is not None for layer in range(bridge.cfg.n_layers))
    c = lp.explain(bridge, TOKENS, TARGET, method="attn_lrp").conservation()
    assert float((c.other_absorbed / c.target_value).abs().max()) < 1e-8
    monkeypatch.setattr(TransformerBridgeFamily, "attention_sinks", lambda self, layer: None)
    c = lp.explain(bridge, TOKENS, TARGET, method="attn_lrp").conservation()
    assert float((c.other_absorbed / c.target_value).abs().max()) > 1e-4


def test_gpt_oss_expert_product_closed_form():
    """``(clamp(up) + 1) * glu(clamp(gate))`` element by element: up gets ``u * up * glu * g``,
    gate gets ``(g_s * up + 1) * glu * g``; the two add up to the product's relevance."""
    g = torch.Generator().manual_seed(2)
    gate_pre = (torch.randn(4, 6, dtype=torch.float64, generator=g) * 5).requires_grad_(True)
    up_pre = (torch.randn(4, 6, dtype=torch.float64, generator=g) * 5).requires_grad_(True)
    upstream = torch.randn(4, 6, dtype=torch.float64, generator=g)
    gate, up = gate_pre.clamp(max=7.0), up_pre.clamp(-7.0, 7.0)
    glu = gate * torch.sigmoid(1.702 * gate)
    value = (up + 1) * glu
    out = rules.offset_gated_product(gate_pre, glu, up_pre, up, value, 0.5, 0.5)
    assert torch.equal(out, value)
    out.backward(upstream)
    for i in range(4):
        for j in range(6):
            r = float(value[i, j] * upstream[i, j])
            r_up = 0.5 * float(up[i, j] * glu[i, j] * upstream[i, j])
            r_gate = float((0.5 * up[i, j] + 1) * glu[i, j] * upstream[i, j])
            assert abs(float(up_pre[i, j] * up_pre.grad[i, j]) - r_up) < 1e-12
            assert abs(float(gate_pre[i, j] * gate_pre.grad[i, j]) - r_gate) < 1e-12
            assert abs(r_up + r_gate - r) < 1e-12
