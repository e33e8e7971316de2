"""The numbered identities 1-9 of docs/identities.md ("The numbered identities") on small random models of every supported config.

Every test takes the ``device`` fixture (conftest): it runs on the CPU, and on CUDA where there
is one, the model and its tokens moved there and the results checked to stay there."""

import pytest
import torch

import lens_palrp as lp
from devices import assert_on_device
from models import ALL_CONFIGS, make_model

TOL = dict(rtol=1e-9, atol=1e-10)


def tokens_for(model, batch=2, n_pos=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=g).to(model.cfg.device)


@pytest.mark.parametrize("config", ALL_CONFIGS)
@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp", "cp_lrp"])
def test_bias_free_models_conserve_except_at_the_softmax(config, method, device):
    """Identities 1-5 end to end: with no biases, only the softmax rule absorbs relevance, and
    the absorption measured at every softmax accounts for all of it, per layer too."""
    model = make_model(config, biases=False, device=device)
    attr = lp.explain(model, tokens_for(model), 5, method=method)
    assert_on_device(attr, device)
    c = attr.conservation()
    scale = c.target_value.abs().max()
    torch.testing.assert_close(c.other_absorbed / scale, torch.zeros_like(scale).expand(2), **TOL)
    torch.testing.assert_close(
        c.absorbed_per_layer,
        c.softmax_absorbed_per_layer + c.positional_leak_per_layer,
        rtol=1e-8, atol=1e-9 * float(scale),
    )
    pe = model.cfg.positional_embedding_type
    if method == "attn_lrp" and pe in ("standard", "shortformer") or method == "cp_lrp" and pe == "standard":
        assert float(c.positional_leak.abs().min()) > 1e-6  # the leak PA-LRP closes
    if method == "pa_lrp":
        assert float(c.positional_leak.abs().max()) == 0.0
    if method == "cp_lrp":  # attention held constant: fully conservative up to the PE leak
        assert float(c.softmax_absorbed.abs().max()) == 0.0
        torch.testing.assert_close(
            c.semantic + c.positional_input + c.positional_leak, c.target_value, **TOL
        )
    else:  # identity 5: the softmax rule is not conservative
        assert float(c.softmax_absorbed.abs().max()) > 1e-4


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_with_biases_the_residual_telescopes(config, device):
    """Per layer, what enters = what leaves + positional sink + what the layer absorbed."""
    model = make_model(config, biases=True, device=device)
    attr = lp.explain(model, tokens_for(model), 3)
    assert_on_device(attr, device)
    c = attr.conservation()
    resid = attr.residual.sum(-1)
    torch.testing.assert_close(
        resid[:, 1:] - resid[:, :-1], c.absorbed_per_layer + c.positional_per_layer, **TOL
    )
    total = c.semantic + c.positional_input + c.positional + c.softmax_absorbed + c.other_absorbed
    torch.testing.assert_close(total, c.target_value, **TOL)
    # the embedding sinks hold exactly the relevance of the first residual stream (eps = 0)
    if model.cfg.positional_embedding_type == "standard":
        torch.testing.assert_close(attr.semantic + attr.positional_input, attr.residual[:, 0], **TOL)
    else:
        torch.testing.assert_close(attr.semantic, attr.residual[:, 0], **TOL)


@pytest.mark.parametrize("config", ["gpt2_like", "solu_ln"])
def test_identity_rule_per_element_on_mlp_activation(config, device):
    """Identity 2: R(hook_pre) == R(hook_post) element-wise (hook_mid for SoLU-LN)."""
    model = make_model(config, biases=True, device=device)
    post = "blocks.1.mlp.hook_mid" if config == "solu_ln" else "blocks.1.mlp.hook_post"
    attr = lp.explain(model, tokens_for(model), 3, method="attn_lrp", record=["blocks.1.mlp.hook_pre", post])
    assert_on_device(attr, device)
    torch.testing.assert_close(attr.hooks["blocks.1.mlp.hook_pre"], attr.hooks[post], **TOL)
    assert attr.hooks[post].abs().sum() > 0


def test_gated_mlp_uniform_rule_halves_the_product(device):
    model = make_model("llama_like", biases=False, device=device)
    names = ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post"]
    attr = lp.explain(model, tokens_for(model), 3, method="attn_lrp", record=names)
    assert_on_device(attr, device)
    gate, up, post = (attr.hooks[n] for n in names)
    torch.testing.assert_close(gate, 0.5 * post, **TOL)
    torch.testing.assert_close(up, 0.5 * post, **TOL)
    cp = lp.explain(model, tokens_for(model), 3, method="cp_lrp", record=names)
    assert float(cp.hooks[names[0]].abs().max()) == 0.0
    torch.testing.assert_close(cp.hooks[names[1]], cp.hooks[names[2]], **TOL)


def test_layernorm_with_detached_scale_and_no_bias_conserves(device):
    """Identity 3: relevance into a LayerNorm (mean removed, scale detached) equals relevance out."""
    model = make_model("gpt2_like", biases=False, device=device)
    names = ["blocks.1.hook_resid_mid", "blocks.1.mlp.hook_pre"]
    attr = lp.explain(model, tokens_for(model), 3, method="attn_lrp", record=names + ["blocks.1.hook_resid_post"])
    assert_on_device(attr, device)
    # resid_mid feeds the skip and ln2 -> MLP; its relevance = skip part + MLP-input part
    r_mid = attr.hooks["blocks.1.hook_resid_mid"].sum()
    r_mlp_in = attr.hooks["blocks.1.mlp.hook_pre"].sum()
    r_post = attr.hooks["blocks.1.hook_resid_post"].sum()
    # R(resid_post) = R(skip) + R(mlp_out); R(mlp_out) = R(mlp input) through linear/identity/LN
    torch.testing.assert_close(r_mid, r_post, **TOL)
    assert abs(float(r_mlp_in)) > 0


@pytest.mark.parametrize("config", ["llama_like", "gptj_like", "neox_like", "gemma_like", "ln_pre", "sinks"])
def test_rope_eq10_per_layer_head_and_position(config, device):
    """Identity 6: positional = 1/2 (R(q~) + R(k~)) on the rotated channels, to ~1e-15."""
    model = make_model(config, biases=True, device=device)
    L, rd = model.cfg.n_layers, model.cfg.rotary_dim
    names = [f"blocks.{l}.attn.hook_rot_{s}" for l in range(L) for s in "qk"]
    attr = lp.explain(model, tokens_for(model), 3, record=names)
    assert_on_device(attr, device)
    for l in range(L):
        rq = attr.hooks[f"blocks.{l}.attn.hook_rot_q"][..., :rd].sum(-1)  # [b, pos, heads]
        rk = attr.hooks[f"blocks.{l}.attn.hook_rot_k"]
        if model.cfg.n_key_value_heads:  # recorded keys are folded back to kv heads
            rk_heads = None
        else:
            rk_heads = rk[..., :rd].sum(-1)
        if rk_heads is not None:
            expected = 0.5 * (rq + rk_heads)
            torch.testing.assert_close(attr.positional[:, l], expected.transpose(1, 2), rtol=1e-12, atol=1e-13)
        # summed over heads, the fold does not matter
        total = 0.5 * (rq.sum(-1) + rk[..., :rd].sum((-1, -2)))
        torch.testing.assert_close(attr.positional[:, l].sum(1), total, rtol=1e-12, atol=1e-13)
    assert attr.positional.abs().sum() > 0


def test_gqa_key_side_is_credited_to_the_reading_query_heads(device):
    """With GQA the per-head positional map equals the one of the same model with the key/value
    heads duplicated (plain multi-head attention), so each query head gets exactly its share."""
    gqa = make_model("llama_like", biases=False, device=device)
    mha = make_model("llama_like", biases=False, n_key_value_heads=None, device=device)
    rep = gqa.cfg.n_heads // gqa.cfg.n_key_value_heads
    state = {}
    for name, value in gqa.state_dict().items():
        if name.endswith(("._W_K", "._W_V", "._b_K", "._b_V")):
            state[name.replace("._", ".")] = value.repeat_interleave(rep, dim=0)
        else:
            state[name] = value
    mha.load_state_dict(state, strict=False)
    toks = tokens_for(gqa)
    a, b = lp.explain(gqa, toks, 3), lp.explain(mha, toks, 3)
    assert_on_device(a, device)
    assert_on_device(b, device)
    torch.testing.assert_close(a.target_value, b.target_value, rtol=1e-12, atol=1e-12)
    for field in ("semantic", "positional", "heads_by_pos"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-10, atol=1e-12)


def test_pa_lrp_totals_close_to_but_not_equal_attn_lrp(device):
    """Identity 7. In one layer, halving q/k only moves relevance into the sink (equal totals);
    deeper, the halved relevance meets other softmaxes, so the totals differ."""
    one = make_model("llama_like", biases=False, n_layers=1, device=device)
    toks = tokens_for(one)
    pa, attn = lp.explain(one, toks, 3), lp.explain(one, toks, 3, method="attn_lrp")
    assert_on_device(pa, device)
    assert_on_device(attn, device)
    torch.testing.assert_close(
        pa.semantic.sum(-1) + pa.positional.sum((1, 2, 3)), attn.semantic.sum(-1), **TOL
    )
    deep = make_model("llama_like", biases=False, n_layers=3, device=device)
    pa, attn = lp.explain(deep, toks, 3), lp.explain(deep, toks, 3, method="attn_lrp")
    pa_total = pa.semantic.sum(-1) + pa.positional.sum((1, 2, 3))
    attn_total = attn.semantic.sum(-1)
    assert float((pa_total - attn_total).abs().min()) > 1e-9
    assert not torch.allclose(pa.semantic, attn.semantic)  # the token map changes too


@pytest.mark.parametrize("config", ["gpt2_like", "sinusoidal"])
def test_absolute_pe_epsilon_split_element_wise(config, device):
    """Identity 8: R(E) + R(P) = R(z) element-wise (eps = 0), for learned and sinusoidal tables."""
    model = make_model(config, biases=True, device=device)
    names = ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"]
    attr = lp.explain(model, tokens_for(model), 3, record=names)
    assert_on_device(attr, device)
    e, p, z = (attr.hooks[n] for n in names)
    torch.testing.assert_close(e + p, z, **TOL)
    torch.testing.assert_close(p.sum(-1), attr.positional_input, **TOL)
    assert p.abs().sum() > 0


def test_shortformer_layer_sinks_add_up_to_the_pe_gradient(device):
    """Shortformer: the per-layer epsilon splits at the q/k inputs sum to P * dy/dP."""
    model = make_model("shortformer", biases=True, device=device)
    attr = lp.explain(model, tokens_for(model), 3, record=["hook_pos_embed"])
    assert_on_device(attr, device)
    torch.testing.assert_close(
        attr.positional.sum((1, 2)), attr.hooks["hook_pos_embed"].sum(-1), **TOL
    )
    assert attr.positional_input.abs().sum() == 0 and attr.positional.abs().sum() > 0


def test_alibi_sink_is_bias_times_score_gradient(device):
    """ALiBi: per head, the positional relevance sums to sum_ij P_ij dy/dA'_ij (Eq. 15); the
    split over query and key positions (Eq. 16) is checked element-wise in test_rules."""
    model = make_model("alibi", biases=True, device=device)
    names = [f"blocks.{l}.attn.hook_attn_scores" for l in range(2)]
    toks = tokens_for(model)
    attr = lp.explain(model, toks, 3, record=names)
    assert_on_device(attr, device)
    n = toks.shape[1]
    for l in range(2):
        scores = model.run_with_cache(toks, names_filter=names[l])[1][names[l]]
        r_scores = attr.hooks[names[l]]  # A' * dy/dA', 0 where masked
        finite = torch.isfinite(scores) & (scores != 0)
        grad = torch.where(finite, r_scores / torch.where(finite, scores, 1.0), 0.0)
        bias = model.blocks[l].attn.alibi[:, :n, :n]  # first forward at this length: canonical
        expected = (bias * grad).sum((-1, -2))  # [batch, heads]
        torch.testing.assert_close(attr.positional[:, l].sum(-1), expected, **TOL)
        assert float(expected.abs().min()) > 0


def test_lemma_3_3_alibi_positional_only_task(device):
    """Lemma 3.3 (paper, appendix E): one causal ALiBi attention layer, W_Q = W_K = W_V = 0, a
    non-zero value bias. With a plain softmax every key then carries the same value and the
    output cannot depend on anything, so the model also has a learned attention sink (as GPT-OSS
    does): the output now depends only on where the query sits. Methods without PE rules give an
    all-zero map; PA-LRP a non-zero positional one. TransformerLens keeps the residual skip, so
    the token embeddings live in channels 0-1 and the unembedding reads channels 2-3 only.
    (One head: ALiBi slope 2^-8, so the positional relevances are small but far from zero.)"""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=4, d_head=4, n_heads=1, n_ctx=8, d_vocab=5, attn_only=True,
        normalization_type=None, positional_embedding_type="alibi", use_attention_sinks=True,
        dtype=torch.float64, device=device,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:, :2].normal_()
        model.blocks[0].attn.b_V.copy_(torch.tensor([[0.0, 0.0, 2.0, 0.3]]))
        model.blocks[0].attn.W_O.copy_(torch.eye(4)[None])
        model.blocks[0].attn.sinks.fill_(0.5)
        model.unembed.W_U[2, 2] = 1.0
        model.unembed.W_U[3, 2] = -0.5
    toks = torch.tensor([[1, 2, 3, 4, 0, 1]]).to(device)
    for method in ("attn_lrp", "cp_lrp", "grad_x_input"):
        attr = lp.explain(model, toks, 2, method=method)
        assert float(attr.combined(parts="all").abs().max()) == 0.0
        assert float(attr.semantic.abs().max()) == 0.0
    pa = lp.explain(model, toks, 2)
    assert_on_device(pa, device)
    assert float(pa.semantic.abs().max()) == 0.0
    pos_map = pa.combined(parts="positional")
    assert float(pos_map[0, 1:5].abs().min()) > 1e-5
    assert float(pa.positional.abs().sum()) > 1e-4


@pytest.mark.parametrize("hook", ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"])
def test_softmax_absorption_is_exact_for_hidden_targets_too(hook):
    """The relevance leaving a softmax is read from its layer's per-head relevance (sum p g =
    sum z g for z = A V); at a target on the pattern itself no z follows and it is formed from the
    pattern. Either way, on a bias-free model only the softmaxes absorb (identity 5)."""
    model = make_model("gpt2_like", biases=False)
    target = lp.at_hook(hook, lambda act: act.reshape(act.shape[0], -1)[:, -7:].sum(-1))  # a few last entries
    attr = lp.explain(model, tokens_for(model), target, method="attn_lrp")
    c = attr.conservation()
    scale = c.target_value.abs().max()
    torch.testing.assert_close(c.other_absorbed / scale, torch.zeros_like(scale).expand(2), **TOL)
    assert float(c.softmax_absorbed_per_layer[:, 1].abs().max()) > 1e-6 * float(scale)
