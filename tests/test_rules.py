"""Every rule against its slow closed form (tests/reference_rules.py), in float64."""

import pytest
import torch
import torch.nn.functional as F

from lens_palrp import rules
import reference_rules as ref

torch.manual_seed(0)
D = torch.float64


def relevance_through(fn, inputs, r_out):
    """x * grad at each input when the output carries relevance r_out (grad = r_out / out)."""
    xs = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad((out * (r_out / out).detach()).sum(), xs)
    return [x.detach() * g for x, g in zip(xs, grads)], out


def test_scale_grad_keeps_value_and_scales_gradient():
    x = torch.randn(5, dtype=D, requires_grad=True)
    y = rules.scale_grad(x, 0.25)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.full_like(x, 0.25))
    assert rules.scale_grad(x, 1.0) is x


def test_uniform_matmul_rule_matches_closed_form():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(4, 5, dtype=D)
    r_out = torch.randn(3, 5, dtype=D)
    (ra, rb), _ = relevance_through(lambda a, b: rules.scale_grad(a, 0.5) @ rules.scale_grad(b, 0.5), [a, b], r_out)
    ra_ref, rb_ref = ref.uniform_matmul(a, b, r_out)
    torch.testing.assert_close(ra, ra_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rb, rb_ref, rtol=1e-12, atol=1e-12)
    # identity 4: the two factors share the product's relevance exactly
    torch.testing.assert_close(ra.sum() + rb.sum(), r_out.sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", [F.gelu, F.silu, F.relu, lambda x: x * torch.sigmoid(1.702 * x)])
def test_identity_rule_matches_closed_form(act):
    x = torch.randn(40, dtype=D)
    x[3] = 0.0  # exact zero: relevance 0, no NaN
    r_out = torch.randn(40, dtype=D)
    xr = x.clone().requires_grad_(True)
    out = rules.identity_rule(xr, act(xr))
    assert torch.equal(out, act(x))
    (g,) = torch.autograd.grad((out * r_out).sum(), xr)  # grad at out = r_out
    expected = ref.identity(act(x) * r_out)
    expected[3] = 0.0
    torch.testing.assert_close(x * g, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.0, 1.0)])
def test_gated_product_matches_closed_form(shares):
    gate, up = torch.randn(12, dtype=D), torch.randn(12, dtype=D)
    bias = torch.randn(12, dtype=D)
    g_out = torch.randn(12, dtype=D)
    gate_r, up_r = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    act = F.silu(gate)
    value = act * up + bias
    out = rules.gated_product(gate_r, act, up_r, value, *shares)
    assert torch.equal(out, value)
    g_gate, g_up = torch.autograd.grad((out * g_out).sum(), [gate_r, up_r], allow_unused=True)
    g_gate = torch.zeros_like(gate) if g_gate is None else g_gate
    r_gate_ref, r_up_ref = ref.gated(gate, up, act, act * up * g_out, *shares)
    torch.testing.assert_close(gate * g_gate, r_gate_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(up * g_up, r_up_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sink", [False, True])
def test_softmax_relevance_matches_deep_taylor_rule(sink):
    """R_in from the pattern and the gradient autograd leaves at the scores (the engine's inputs:
    no score kept) equals the slow deep-Taylor reference per row, masked keys (-inf) included, with
    a sink logit too; R_out is sum p g."""
    scores = (torch.randn(3, 6, dtype=D) * 2 + 0.7).requires_grad_(True)  # arbitrary row offsets
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True  # masked keys
    masked = scores.masked_fill(mask, float("-inf"))
    g = torch.randn(3, 6, dtype=D)
    sink_logit = torch.tensor(0.3, dtype=D)
    if sink:
        full = torch.cat([masked, sink_logit.expand(3, 1)], -1)
        p = torch.softmax(full - full.max(-1, keepdim=True).values, -1)[:, :-1]  # as TransformerLens
    else:
        p = torch.softmax(masked, -1)
    (score_grad,) = torch.autograd.grad(p, scores, g)
    score_values = masked.detach()
    r_in = rules.softmax_input_relevance(p.detach(), score_grad, sink_logit if sink else None)
    r_out = rules.softmax_output_relevance(p.detach(), g)
    assert torch.isfinite(r_in).all()
    for row in range(3):
        keep = ~mask[row]
        s_row = score_values[row][keep]
        r_row = (p[row].detach() * g[row])[keep]
        if sink:
            s_full = torch.cat([s_row, sink_logit[None]])
            expected = ref.softmax_deep_taylor(s_full, torch.cat([r_row, torch.zeros(1, dtype=D)]))[:-1]
        else:
            expected = ref.softmax_deep_taylor(s_row, r_row)
        torch.testing.assert_close(r_in[row], expected.sum(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r_out[row], r_row.sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_rope_table_relevance_matches_rotation_matrix_entries(adjacent, rotary_dim):
    d_head, n_pos = 8, 5
    half = rotary_dim // 2
    freq = 10000 ** (torch.arange(half, dtype=D) / half)
    freq = freq.repeat_interleave(2) if adjacent else freq.repeat(2)
    angles = torch.arange(n_pos, dtype=D)[:, None] / freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(n_pos, d_head, dtype=D)
    g = torch.randn(n_pos, d_head, dtype=D)
    x_rot = x[:, :rotary_dim]
    y = x_rot * cos + rules.rotate_every_two(x_rot, adjacent) * sin
    c, s = rules.rope_table_relevance(y, g[:, :rotary_dim], cos, sin, adjacent)
    for i in range(n_pos):
        R = ref.rotation_matrix(cos[i], sin[i], adjacent, rotary_dim, d_head)
        y_full = R @ x[i]
        torch.testing.assert_close(y_full[:rotary_dim], y[i], rtol=1e-12, atol=1e-12)
        rel = ref.rope_entry_relevance(x[i], R, y_full * g[i])[:rotary_dim, :rotary_dim]
        diag = torch.diagonal(rel)
        off = rel.sum(1) - diag
        torch.testing.assert_close(0.5 * c[i], diag, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(0.5 * s[i], off, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c + s, y * g[:, :rotary_dim], rtol=1e-12, atol=1e-12)


def test_alibi_split_matches_eq16_with_conservation_sign():
    rp = torch.randn(2, 3, 6, 6, dtype=D).tril(-1)
    out = rules.alibi_position_relevance(rp)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(out[b, h], ref.alibi_split(rp[b, h]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.sum(-1), rp.sum((-1, -2)), rtol=1e-12, atol=1e-12)


def _absolute_pe_model(kind, tmp_path):
    """``(model, W_E, W_pos)``: the embedding tables read from the weights, not from any hook."""
    if kind == "bridge_gpt2":
        pytest.importorskip("transformer_lens.model_bridge")
        from bridges import tiny_gpt2

        hf, bridge = tiny_gpt2(tmp_path / "gpt2")
        return bridge, hf.transformer.wte.weight.detach(), hf.transformer.wpe.weight.detach()
    from models import make_model  # skips under TransformerLens 4 (no HookedTransformer)

    model = make_model(kind, biases=True)
    return model, model.embed.W_E.detach(), model.pos_embed.W_pos.detach()


@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp", "grad_x_input"])
@pytest.mark.parametrize("kind", ["gpt2_like", "sinusoidal", "bridge_gpt2"])
def test_input_pe_sink_at_hook_pos_embed_is_eq5(kind, method, tmp_path):
    """The library's input sinks against Eq. 5 (eps = 0) at ``z = E + P``, the first residual
    stream: ``R(P) = P R(z) / z = P * g`` and ``R(E) = E * g`` element-wise, with ``E``, ``P``
    taken from the embedding weights and ``g`` the rule-modified gradient at ``z``. PA-LRP maps
    ``sum_d R(P)`` per position as ``positional_input``; methods without a PE rule report its
    total as the leak and map nothing."""
    import lens_palrp as lp

    model, W_E, W_pos = _absolute_pe_model(kind, tmp_path)
    tokens = torch.randint(2, 18, (2, 9), generator=torch.Generator().manual_seed(4))
    z_name = "blocks.0.hook_resid_pre"
    attr = lp.explain(model, tokens, 5, method=method, record=["hook_pos_embed", z_name], record_gradients=[z_name])
    E, P = W_E[tokens].to(D), W_pos[: tokens.shape[1]].to(D)[None].expand_as(W_E[tokens])
    g, r_z = attr.gradients[z_name], attr.hooks[z_name]
    _, cache = model.run_with_cache(tokens, names_filter=z_name)
    z = cache[z_name]
    torch.testing.assert_close(E + P, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_z, z * g, rtol=1e-12, atol=1e-12)
    r_p = P * g
    assert float(r_p.abs().max()) > 1e-6 and float(r_p.sum(-1).max()) > 0 > float(r_p.sum(-1).min())
    torch.testing.assert_close(attr.hooks["hook_pos_embed"], r_p, rtol=1e-10, atol=1e-12)
    r_e_eq5, r_p_eq5 = ref.epsilon_sum(E, P, r_z)  # Eq. 5 as written: the shares E / z, P / z of R(z)
    ok = z.abs() > 1e-3
    torch.testing.assert_close(attr.hooks["hook_pos_embed"][ok], r_p_eq5[ok], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((E * g)[ok], r_e_eq5[ok], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(attr.semantic, (E * g).sum(-1), rtol=1e-10, atol=1e-12)
    leak = attr.conservation().positional_leak
    if method == "pa_lrp":
        torch.testing.assert_close(attr.positional_input, r_p.sum(-1), rtol=1e-10, atol=1e-12)
        assert float(leak.abs().max()) == 0.0
    else:
        assert float(attr.positional_input.abs().max()) == 0.0
        torch.testing.assert_close(leak, r_p.sum((-1, -2)), rtol=1e-10, atol=1e-12)


def test_rope_table_relevance_summed_over_heads():
    y, g = torch.randn(2, 5, 3, 8, dtype=D), torch.randn(2, 5, 3, 8, dtype=D)
    angles = torch.rand(1, 5, 1, 4, dtype=D).repeat(1, 1, 1, 2) * 6
    cos, sin = angles.cos(), angles.sin()
    c, s = rules.rope_table_relevance(y, g, cos, sin, adjacent_pairs=False)
    ch, sh = rules.rope_table_relevance(y, g, cos, sin, adjacent_pairs=False, head_dim=2)
    torch.testing.assert_close(ch, c.sum(2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sh, s.sum(2), rtol=1e-12, atol=1e-12)
