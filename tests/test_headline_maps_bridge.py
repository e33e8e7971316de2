"""The combined maps on TransformerBridges (run under TransformerLens 3.9 and 4), rebuilt from
recorded relevances without the library's helpers: token part and learned input PE (GPT-2),
per-layer RoPE tables from the rotations the forward made with the tables seen at
``attn.hook_cos`` / ``hook_sin`` (LLaMA, keys grouped), ALiBi (BLOOM); and grouped-query
crediting, where the bridge keeps the keys grouped, against the same Hugging Face model with its
kv heads duplicated.

Hugging Face's LLaMA takes RMSNorm and its RoPE tables in float32 whatever the model's dtype, and
the bridge's forward under the sweep's hooks differs from a plain one at that rounding (as the
GQA and the duplicated model do): the checks hold to ~1e-7 of each tensor's scale, where every
wrong reduction or grouping they tell apart is off by more than 1e-3 of it (``differ``).
"""

import copy

import pytest
import torch

import lens_palrp as lp

pytest.importorskip("transformer_lens.model_bridge")
from bridges import boot, save_with_tokenizer, tiny_bloom, tiny_gpt2, tiny_llama  # noqa: E402
from headline_oracles import alibi_reductions, mixed_signs  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-6)  # relative to each tensor's max-abs
TOKENS = torch.randint(2, 18, (2, 11), generator=torch.Generator().manual_seed(5))


def assert_close(a, b):
    scale = float(b.abs().max())
    torch.testing.assert_close(a / scale, b / scale, **TOL)


def differ(a, b):
    """The two candidate reductions are far apart here, so the check can tell them apart."""
    assert float((a - b).abs().max()) > 1e-3 * float(b.abs().max())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_duplicated_kv(llama, tmp_path_factory):
    """The same LLaMA with each kv head copied for its query heads (Hugging Face's repeat_kv:
    query head h reads kv head h // group), as plain multi-head attention."""
    from transformers import LlamaForCausalLM

    hf, _ = llama
    cfg = copy.deepcopy(hf.config)
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = cfg.hidden_size // n_heads
    cfg.num_key_value_heads = n_heads
    dup = LlamaForCausalLM(cfg).double().eval()
    state = {}
    for name, p in hf.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            p = p.reshape(n_kv, d_head, -1).repeat_interleave(n_heads // n_kv, dim=0).reshape(n_heads * d_head, -1)
        state[name] = p
    dup.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(dup(TOKENS).logits, hf(TOKENS).logits, rtol=1e-12, atol=1e-12)
    return dup, boot(save_with_tokenizer(dup, tmp_path_factory.mktemp("llama-dup")))


# ------------------------------------------------------------------------------ GQA, keys grouped
def test_grouped_keys_match_duplicated_kv_heads(llama, llama_duplicated_kv):
    """The bridge credits the key half of Eq. 10 per query head through the score gradients; the
    duplicated model has a key copy per query head. Same maps per head, and every recorded
    ``hook_k`` / ``hook_v`` / ``hook_rot_k`` of the grouped model is the sum of its query heads'
    copies (heads 0, 1 -> kv 0; 2, 3 -> kv 1)."""
    _, bridge = llama
    _, dup = llama_duplicated_kv
    n_heads, n_kv = bridge.cfg.n_heads, bridge.cfg.n_key_value_heads
    assert (n_heads, n_kv) == (4, 2)
    names = [f"blocks.{l}.attn.hook_{w}" for l in range(2) for w in ("q", "k", "v", "rot_q", "rot_k")]
    a = lp.explain(bridge, TOKENS, 7, record=names)
    b = lp.explain(dup, TOKENS, 7, record=names)
    assert_close(a.target_value, b.target_value)
    for field in ("semantic", "positional", "heads_by_pos", "mlp", "residual"):
        assert_close(getattr(a, field), getattr(b, field))
    for agg in ("relu", "abs", "signed"):
        assert_close(a.combined(agg), b.combined(agg))
    # per head the key-side crediting matters: the heads of one group differ
    differ(a.positional[:, :, 0], a.positional[:, :, 1])
    for name in names:
        ra, rb = a.hooks[name], b.hooks[name]
        if name.endswith(("hook_k", "hook_v", "hook_rot_k")):
            bb, p, h, d = rb.shape
            assert ra.shape == (bb, p, n_kv, d)
            folded = rb.reshape(bb, p, n_kv, h // n_kv, d).sum(3)
            differ(rb.reshape(bb, p, h // n_kv, n_kv, d).sum(2), folded)  # the strided grouping
            assert_close(ra, folded)
        else:
            assert_close(ra, rb)


# ------------------------------------------------------------------------------ RoPE tables
def _rotate_half(x):
    """(a, b) -> (-b, a) on the pairs (c, c + d/2): Hugging Face LLaMA's layout, written out."""
    n = x.shape[-1] // 2
    return torch.cat([-x[..., n:], x[..., :n]], -1)


def test_rope_tables_from_recorded_rotations(llama):
    """Per layer: ``y = x cos + J(x) sin`` with the tables the forward saw; the cos entry of
    channel c gets ``1/2 sum_heads x_c cos_c g_c`` (sin alike), query side plus key side (grouped
    keys: the kv heads' own gradient, already summed over the query heads reading them)."""
    _, bridge = llama
    L = bridge.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_rot_{s}" for l in range(L) for s in "qk"]
    attr = lp.explain(bridge, TOKENS, 7, record=names + ["hook_embed"], record_gradients=names)
    wanted = ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k", "hook_cos", "hook_sin")
    _, cache = bridge.run_with_cache(TOKENS, names_filter=lambda n: n.endswith(wanted))
    relu = torch.zeros(TOKENS.shape, dtype=torch.float64)
    absolute = torch.zeros_like(relu)
    for l in range(L):
        cos = cache[f"blocks.{l}.attn.hook_cos"].double()[:, :, None, :]  # [1, pos, 1, d_head]
        sin = cache[f"blocks.{l}.attn.hook_sin"].double()[:, :, None, :]
        on_cos = on_sin = sink = 0
        for side in "qk":
            x = cache[f"blocks.{l}.attn.hook_{side}"]
            y = cache[f"blocks.{l}.attn.hook_rot_{side}"]
            g = attr.gradients[f"blocks.{l}.attn.hook_rot_{side}"]
            rec = attr.hooks[f"blocks.{l}.attn.hook_rot_{side}"]
            assert g.shape == y.shape
            assert_close(rec, y * g)
            assert_close(x * cos + _rotate_half(x) * sin, y)
            on_cos = on_cos + 0.5 * (x * cos * g).sum(2)
            on_sin = on_sin + 0.5 * (_rotate_half(x) * sin * g).sum(2)
            sink = sink + 0.5 * rec.sum((2, 3))
        assert_close(attr.positional[:, l].sum(1), sink)  # Eq. 10, heads summed
        assert_close(on_cos.sum(-1) + on_sin.sum(-1), sink)
        mixed_signs(on_cos)
        mixed_signs(on_sin)
        relu += on_cos.clamp(min=0).sum(-1) + on_sin.clamp(min=0).sum(-1)
        absolute += on_cos.sum(-1).abs() + on_sin.sum(-1).abs()
    differ(relu, absolute)
    assert_close(attr.combined("relu", parts="positional"), relu)
    assert_close(attr.combined("abs", parts="positional", normalize=False), absolute)
    emb = attr.hooks["hook_embed"]
    differ(emb.clamp(min=0).sum(-1), emb.sum(-1).abs())
    assert_close(attr.combined("relu"), relu + emb.clamp(min=0).sum(-1))
    both = absolute + emb.sum(-1)
    assert_close(attr.combined("abs"), both / both.abs().amax(-1, keepdim=True))


# ------------------------------------------------------------------------------ learned input PE
def test_token_and_input_pe_parts_from_recorded_embeddings(tmp_path):
    _, bridge = tiny_gpt2(tmp_path / "gpt2")
    attr = lp.explain(bridge, TOKENS, 7, record=["hook_embed", "hook_pos_embed"])
    e, p = attr.hooks["hook_embed"], attr.hooks["hook_pos_embed"]
    mixed_signs(e)
    mixed_signs(p)
    differ(e.clamp(min=0).sum(-1), e.sum(-1).abs())
    differ(p.clamp(min=0).sum(-1), p.sum(-1).abs())
    assert float(attr.positional.abs().max()) == 0.0
    assert_close(attr.combined("relu", parts="semantic"), e.clamp(min=0).sum(-1))
    assert_close(attr.combined("relu", parts="positional"), p.clamp(min=0).sum(-1))
    assert_close(attr.combined("abs", parts="semantic", normalize=False), e.sum(-1))
    assert_close(attr.combined("abs", parts="positional", normalize=False), p.sum(-1).abs())
    assert_close(attr.combined("signed"), e.sum(-1) + p.sum(-1))
    both = e.sum(-1) + p.sum(-1).abs()
    assert_close(attr.combined("abs"), both / both.abs().amax(-1, keepdim=True))


# ------------------------------------------------------------------------------ ALiBi
def test_alibi_reductions_from_recorded_scores(tmp_path):
    """BLOOM with 4 heads (slopes ``2^(-2h)``, h = 1..4): Eq. 15 / 16 from the recorded score
    relevance, then relu / abs of the head-summed per-layer map (BLOOM's softmax is float32 too)."""
    _, bridge = tiny_bloom(tmp_path / "bloom")
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    names = [f"blocks.{l}.attn.hook_attn_scores" for l in range(L)]
    attr = lp.explain(bridge, TOKENS, (3, 5), record=names + ["hook_embed"])
    _, cache = bridge.run_with_cache(TOKENS, names_filter=lambda name: name in names)
    relu, absolute, per_head_relu = alibi_reductions(attr, cache, names, H, assert_close)
    differ(relu, absolute)
    differ(per_head_relu, relu)
    assert_close(attr.combined("relu", parts="positional"), relu)
    assert_close(attr.combined("abs", parts="positional", normalize=False), absolute)
    emb = attr.hooks["hook_embed"]
    assert_close(attr.combined("relu"), relu + emb.clamp(min=0).sum(-1))
