"""The Eq. 11 ("relu") and authors' ("abs") combined maps rebuilt from recorded relevances.

Each reduction is recomputed here from first principles (recorded hook relevance, recorded
rule-modified gradients, activations from ``run_with_cache`` and the model's own weights and
RoPE tables), without the library's helpers, so swapping relu and abs in any one reduction
(token embedding, input PE, per-layer RoPE tables, shortformer, ALiBi) fails a test. The GQA test checks
that recorded ``hook_k`` / ``hook_v`` / ``hook_rot_k`` relevance is folded back to the right kv
heads, against the same model with its kv heads duplicated.
"""

import pytest
import torch

import lens_palrp as lp
from models import make_model

from headline_oracles import alibi_reductions, mixed_signs

TOL = dict(rtol=1e-9, atol=1e-10)


def tokens_for(model, batch=2, n_pos=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=g)


def assert_close(a, b, scale=None):
    scale = float(b.abs().max()) if scale is None else scale
    torch.testing.assert_close(a / scale, b / scale, **TOL)


# --------------------------------------------------------------------------- token and input PE
@pytest.mark.parametrize("config", ["gpt2_like", "sinusoidal", "llama_like"])
def test_token_part_from_recorded_embedding(config):
    model = make_model(config)
    attr = lp.explain(model, tokens_for(model), 5, record=["hook_embed"])
    r = attr.hooks["hook_embed"]  # [batch, pos, d_model]
    mixed_signs(r)
    relu = r.clamp(min=0).sum(-1)
    signed = r.sum(-1)
    assert float((relu - signed).abs().max()) > 1e-6  # relu and signed differ here
    assert_close(attr.combined("relu", parts="semantic"), relu)
    assert_close(attr.combined("abs", parts="semantic", normalize=False), signed)
    assert_close(attr.combined("signed", parts="semantic"), signed)
    # "abs" normalizes by the max-abs of the map by default
    assert_close(attr.combined("abs", parts="semantic"), signed / signed.abs().amax(-1, keepdim=True))


@pytest.mark.parametrize("config", ["gpt2_like", "sinusoidal"])
def test_input_pe_part_from_recorded_pos_embed(config):
    model = make_model(config)
    attr = lp.explain(model, tokens_for(model), 5, record=["hook_embed", "hook_pos_embed"])
    r = attr.hooks["hook_pos_embed"]
    mixed_signs(r)
    relu, absolute = r.clamp(min=0).sum(-1), r.sum(-1).abs()
    assert float((relu - absolute).abs().max()) > 1e-6
    # no attention-level positional sink for additive input PE
    assert float(attr.positional.abs().max()) == 0.0
    assert_close(attr.combined("relu", parts="positional"), relu)
    assert_close(attr.combined("abs", parts="positional", normalize=False), absolute)
    assert_close(attr.combined("signed", parts="positional"), r.sum(-1))
    emb = attr.hooks["hook_embed"]
    assert_close(attr.combined("relu"), relu + emb.clamp(min=0).sum(-1))
    both = absolute + emb.sum(-1)
    assert_close(attr.combined("abs"), both / both.abs().amax(-1, keepdim=True))


# --------------------------------------------------------------------------------------- RoPE
def _swap_pairs(x, adjacent):
    """(a, b) -> (-b, a) on each rotated pair, written out independently of the library."""
    out = torch.empty_like(x)
    if adjacent:
        out[..., 0::2] = -x[..., 1::2]
        out[..., 1::2] = x[..., 0::2]
    else:
        n = x.shape[-1] // 2
        out[..., :n] = -x[..., n:]
        out[..., n:] = x[..., :n]
    return out


@pytest.mark.parametrize("config", ["llama_like", "neox_like", "gptj_like"])
def test_rope_tables_per_layer_from_recorded_rotations(config):
    """Eq. 10 per head and position, and the per-entry split of each layer's rotation for Eq. 11.

    With ``x`` the content at ``hook_q`` / ``hook_k`` (before the rotation) and ``g`` the
    rule-modified gradient at ``hook_rot_q`` / ``hook_rot_k`` (after the Q K^T share, before the
    RoPE half), ``y = x cos + J(x) sin`` gives the cos entry ``c`` of position ``p`` the relevance
    ``1/2 sum_heads x_c cos_c g_c`` and the sin entry ``1/2 sum_heads J(x)_c sin_c g_c`` (query
    plus key side). relu: positive part of every entry; abs: |sum over channels| of each table.
    """
    model = make_model(config)
    tokens = tokens_for(model)
    n_pos = tokens.shape[1]
    L, rd = model.cfg.n_layers, model.cfg.rotary_dim
    adjacent = model.cfg.rotary_adjacent_pairs
    names = [f"blocks.{l}.attn.hook_{w}" for l in range(L) for w in ("rot_q", "rot_k")]
    attr = lp.explain(model, tokens, 5, record=names, record_gradients=names)
    _, cache = model.run_with_cache(tokens)

    relu = torch.zeros(tokens.shape, dtype=torch.float64)
    absolute = torch.zeros_like(relu)
    for l in range(L):
        attn = model.blocks[l].attn
        cos = attn.rotary_cos[:n_pos, :rd].to(torch.float64)  # [pos, rd]
        sin = attn.rotary_sin[:n_pos, :rd].to(torch.float64)
        on_cos = torch.zeros(tokens.shape + (rd,), dtype=torch.float64)
        on_sin = torch.zeros_like(on_cos)
        sink = 0
        for side in ("q", "k"):
            x = cache[f"blocks.{l}.attn.hook_{side}"][..., :rd]  # [batch, pos, heads, rd]
            y = cache[f"blocks.{l}.attn.hook_rot_{side}"]
            g = attr.gradients[f"blocks.{l}.attn.hook_rot_{side}"]
            assert g.shape == y.shape  # grouped keys: gradients folded to the kv heads
            rec = attr.hooks[f"blocks.{l}.attn.hook_rot_{side}"]
            assert_close(rec, y * g)  # recorded relevance = activation x modified gradient
            # the rotation as the forward computed it
            assert_close(x * cos[:, None] + _swap_pairs(x, adjacent) * sin[:, None], y[..., :rd])
            on_cos += 0.5 * (x * cos[:, None] * g[..., :rd]).sum(2)
            on_sin += 0.5 * (_swap_pairs(x, adjacent) * sin[:, None] * g[..., :rd]).sum(2)
            sink = sink + 0.5 * rec[..., :rd].sum((2, 3))  # Eq. 10, rotated channels only
        # Eq. 10 per layer and position (heads summed: grouped keys are folded)
        assert_close(attr.positional[:, l].sum(1), sink)
        assert_close(on_cos.sum(-1) + on_sin.sum(-1), sink)
        mixed_signs(on_cos)
        mixed_signs(on_sin)
        relu += on_cos.clamp(min=0).sum(-1) + on_sin.clamp(min=0).sum(-1)
        absolute += on_cos.sum(-1).abs() + on_sin.sum(-1).abs()
        assert float((on_cos.clamp(min=0).sum(-1) - on_cos.sum(-1).abs()).abs().max()) > 1e-6

    if model.cfg.n_key_value_heads is None:  # per head: q side and the head's own key copy
        l = L - 1
        per_head = 0.5 * (attr.hooks[f"blocks.{l}.attn.hook_rot_q"][..., :rd].sum(-1)
                          + attr.hooks[f"blocks.{l}.attn.hook_rot_k"][..., :rd].sum(-1))
        assert_close(attr.positional[:, l], per_head.transpose(1, 2))
    assert float((relu - absolute).abs().max()) > 1e-6
    assert_close(attr.combined("relu", parts="positional"), relu)
    assert_close(attr.combined("abs", parts="positional", normalize=False), absolute)
    sem = lp.explain(model, tokens, 5, record=["hook_embed"]).hooks["hook_embed"]
    assert_close(attr.combined("relu"), relu + sem.clamp(min=0).sum(-1))
    both = absolute + sem.sum(-1)
    assert_close(attr.combined("abs"), both / both.abs().amax(-1, keepdim=True))


# -------------------------------------------------------------------------------- shortformer
def test_shortformer_dims_from_recorded_query_key_gradients():
    """Per layer, ``R(P)`` per d_model channel = ``P * sum_heads (W_Q g_q + W_K g_k)`` with
    ``g`` the rule-modified gradient at ``hook_q`` / ``hook_k``; relu per channel, abs of the sum."""
    model = make_model("shortformer")
    tokens = tokens_for(model)
    n_pos, L = tokens.shape[1], model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_{w}" for l in range(L) for w in ("q", "k")]
    attr = lp.explain(model, tokens, 5, record_gradients=names)
    P = model.pos_embed.W_pos[:n_pos].detach()  # [pos, d_model]
    relu = torch.zeros(tokens.shape, dtype=torch.float64)
    absolute = torch.zeros_like(relu)
    total = torch.zeros(tokens.shape + (model.cfg.d_model,), dtype=torch.float64)
    for l in range(L):
        attn = model.blocks[l].attn
        per_head = 0
        for side, W in (("q", attn.W_Q), ("k", attn.W_K)):
            g = attr.gradients[f"blocks.{l}.attn.hook_{side}"]  # [batch, pos, heads, d_head]
            back = torch.einsum("bphe,hde->bphd", g, W.detach())  # gradient at the q/k input
            per_head = per_head + back * P[None, :, None, :]
        assert_close(attr.positional[:, l], per_head.sum(-1).transpose(1, 2))
        dims = per_head.sum(2)  # [batch, pos, d_model]
        mixed_signs(dims)
        total += dims
        relu += dims.clamp(min=0).sum(-1)
        absolute += dims.sum(-1).abs()
    assert float((relu - absolute).abs().max()) > 1e-6
    assert float(attr.positional_input.abs().max()) == 0.0
    assert_close(attr.combined("relu", parts="positional"), relu)
    assert_close(attr.combined("abs", parts="positional", normalize=False), absolute)
    # summed over layers and heads: P * dy/dP, the relevance recorded at hook_pos_embed
    rec = lp.explain(model, tokens, 5, record=["hook_pos_embed"]).hooks["hook_pos_embed"]
    assert_close(total, rec)


# -------------------------------------------------------------------------------------- ALiBi
def test_alibi_reductions_from_recorded_scores():
    """Eq. 15 / 16 per layer, head and position from the recorded score relevance and the bias
    ``m_h (j - i)`` (slopes ``2^(-8 h / H)``, h = 1..H); Eq. 11 for ALiBi, which has no channels:
    relu of the head-summed per-layer map, "abs" its absolute value (not per head)."""
    model = make_model("alibi")
    tokens = tokens_for(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = [f"blocks.{l}.attn.hook_attn_scores" for l in range(L)]
    attr = lp.explain(model, tokens, 5, record=names + ["hook_embed"])
    _, cache = model.run_with_cache(tokens, names_filter=names)
    relu, absolute, per_head_relu = alibi_reductions(attr, cache, names, H, assert_close)
    # the checks tell the reductions apart: relu vs abs, per layer vs per head
    assert float((relu - absolute).abs().max()) > 1e-6 * float(absolute.abs().max())
    assert float((relu - per_head_relu).abs().max()) > 1e-6 * float(relu.abs().max())
    assert float(attr.positional_input.abs().max()) == 0.0
    assert_close(attr.combined("relu", parts="positional"), relu)
    assert_close(attr.combined("abs", parts="positional", normalize=False), absolute)
    emb = attr.hooks["hook_embed"]
    assert_close(attr.combined("relu"), relu + emb.clamp(min=0).sum(-1))
    both = absolute + emb.sum(-1)
    assert_close(attr.combined("abs"), both / both.abs().amax(-1, keepdim=True))


# ------------------------------------------------------------------------------------- GQA
def _duplicated_kv(model):
    """The same model with its grouped kv heads copied per query head (query head h reads kv
    head h // group, TransformerLens' repeat_interleave)."""
    n_heads, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    dup = make_model("llama_like", n_key_value_heads=None)
    state = {}
    for name, p in model.state_dict().items():
        for w in ("K", "V"):
            for kind in ("W", "b"):
                if name.endswith(f"attn._{kind}_{w}"):
                    name = name.replace(f"attn._{kind}_{w}", f"attn.{kind}_{w}")
                    p = p.repeat_interleave(n_heads // n_kv, dim=0)
        state[name] = p
    missing, unexpected = dup.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("mask", "IGNORE", "rotary_sin", "rotary_cos")) for k in missing)
    return dup


def test_gqa_folded_records_match_duplicated_kv_heads():
    model = make_model("llama_like")
    assert model.cfg.n_key_value_heads == 2 and model.cfg.n_heads == 4
    dup = _duplicated_kv(model)
    tokens = tokens_for(model)
    torch.testing.assert_close(model(tokens), dup(tokens), **TOL)
    names = [f"blocks.{l}.attn.hook_{w}" for l in range(2) for w in ("q", "k", "v", "rot_q", "rot_k")]
    a = lp.explain(model, tokens, 5, record=names + ["hook_embed"])
    b = lp.explain(dup, tokens, 5, record=names + ["hook_embed"])
    for field in ("semantic", "positional", "heads", "heads_by_pos", "mlp", "residual"):
        assert_close(getattr(a, field), getattr(b, field))
    for agg in ("relu", "abs", "signed"):
        assert_close(a.combined(agg), b.combined(agg))
    n_kv, group = 2, 2
    for name in names:
        ra, rb = a.hooks[name], b.hooks[name]
        if name.endswith(("hook_k", "hook_v", "hook_rot_k")):
            bb, p, h, d = rb.shape
            assert ra.shape == (bb, p, n_kv, d)
            folded = rb.reshape(bb, p, n_kv, group, d).sum(3)  # heads 0,1 -> kv 0; 2,3 -> kv 1
            # the check distinguishes the grouping: the strided one differs
            strided = rb.reshape(bb, p, group, n_kv, d).sum(2)
            assert float((folded - strided).abs().max()) > 1e-6 * float(folded.abs().max())
            assert_close(ra, folded)
        else:
            assert_close(ra, rb)
