"""BLOOM (ALiBi) TransformerBridge: the HookedTransformer ALiBi rule, conservation, agreement.

Hugging Face (and the bridge after it) takes BLOOM's attention softmax in float32 whatever the
model's dtype, so a float64 BLOOM conserves only to float32 rounding (~1e-7 of the logit). The
identities are therefore checked twice: as shipped, to that floor, and with the bridge's softmax
put in float64 (``float64_softmax``), to float64 precision, which is what isolates the rules.
TransformerLens' HookedTransformer takes its ALiBi slopes from the geometric ``2^(-8/n)`` series,
which is BLOOM's only for a power-of-two head count; with 6 heads it is compared after its
multipliers are replaced by BLOOM's slopes (the ALiBi paper's recipe, written out below).
"""

import math
import warnings

import pytest
import torch

import lens_palrp as lp
from bridges import boot, save_with_tokenizer, tiny_bloom
from padding import ROWS, assert_rows_equal_single_runs, pad, tolerance
from lens_palrp.hooks import family_for
from lens_palrp.roles import Role

pytest.importorskip("transformer_lens.model_bridge")
from transformer_lens.model_bridge.generalized_components.bloom_attention import (  # noqa: E402
    BloomAttentionBridge,
)

try:
    from transformer_lens import HookedTransformer  # noqa: F401
    from transformer_lens.components import AbstractAttention
except ImportError:  # TransformerLens 4.x
    AbstractAttention = None

needs_hooked = pytest.mark.skipif(
    AbstractAttention is None, reason="TransformerLens 4.x has no HookedTransformer to compare with"
)

TOL = dict(rtol=1e-9, atol=1e-10)
TOKENS = torch.randint(2, 18, (2, 11), generator=torch.Generator().manual_seed(5))
METHODS = ["pa_lrp", "attn_lrp", "cp_lrp", "grad_x_input"]


def bloom_slopes(n_heads):
    """ALiBi slopes as BLOOM defines them (Press et al.): ``2^(-8k/c)`` for the closest power of
    two ``c <= n``, then every other slope of the ``2c`` series for the remaining heads."""
    c = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = [2 ** (-8 * k / c) for k in range(1, c + 1)]
    slopes += [2 ** (-4 * (2 * k - 1) / c) for k in range(1, n_heads - c + 1)]
    return torch.tensor(slopes, dtype=torch.float64)


def rel(a, b):
    """Max relative error; exact zeros on both sides count as agreement."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


@pytest.fixture
def float64_softmax(monkeypatch):
    """The bridge's BLOOM softmax in float64 instead of float32 (nothing else changes)."""
    original = BloomAttentionBridge._softmax_dropout_pattern

    def softmax64(self, scores, target_dtype=None, upcast_to_fp32=False):
        return original(self, scores, target_dtype, False)

    monkeypatch.setattr(BloomAttentionBridge, "_softmax_dropout_pattern", softmax64)


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    return tiny_bloom(tmp_path_factory.mktemp("bloom"))


@pytest.fixture(scope="module")
def bloom_bias_free(tmp_path_factory):
    return tiny_bloom(tmp_path_factory.mktemp("bloom-bias-free"), biases=False)


@pytest.fixture(scope="module")
def bloom6(tmp_path_factory):
    return tiny_bloom(tmp_path_factory.mktemp("bloom6"), n_heads=6)


def captured_alibi(bridge, tokens, attention_mask=None):
    """The ALiBi tensor Hugging Face hands the first attention in a plain forward
    ``[batch * heads, 1, key]``, read off the call itself."""
    seen = []
    handle = bridge.blocks[0].attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["alibi"].detach().clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            bridge(tokens, attention_mask=attention_mask)
    finally:
        handle.remove()
    return seen[0]


# ------------------------------------------------------------------------------ hooks in the path
@pytest.mark.parametrize("mode", ["default", "compat"])
def test_every_hook_the_sweep_patches_is_in_the_computation_path(mode, tmp_path):
    """A rule installed on an observer-only hook would silently do nothing: every hook whose
    output the sweep replaces or reads (hook_attn_scores: the softmax input and Eq. 15's gradient) must
    change the output when perturbed. hook_pattern is among them, so no attention is rebuilt."""
    _, bridge = tiny_bloom(tmp_path)
    if mode == "compat":
        bridge.enable_compatibility_mode(disable_warnings=True)
    family = family_for(bridge)
    assert not family.canonizers() and family.pe_type == "alibi"  # BLOOM's pattern hook is in the path
    roles = family.hook_roles()
    assert {r.role for r in roles.values()} == {
        Role.EMBED, Role.NORM_SCALE, Role.RESID_PRE, Role.Q, Role.K, Role.V, Role.SCORES, Role.PATTERN, Role.Z,
        Role.MLP_PRE, Role.MLP_POST, Role.RESID_FINAL,
    }
    assert {"embed_ln.hook_scale", "blocks.1.ln1.hook_scale", "blocks.1.ln2.hook_scale",
            "ln_final.hook_scale", "blocks.1.attn.hook_pattern"} <= set(roles)
    with torch.no_grad():
        base = bridge(TOKENS)
    names = [n for n, r in roles.items() if r.role is not Role.RESID_FINAL]
    assert {"blocks.0.attn.hook_attn_scores", "blocks.1.attn.hook_attn_scores"} <= set(names)
    for name in names:
        with torch.no_grad():
            out = bridge.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda a, hook: a * 1.3 + 0.05)])
        assert float((out - base).abs().max()) > 1e-8, name


# ------------------------------------------------------------------------------ the bias
@pytest.mark.parametrize("n_heads", [4, 6, 12, 16])
def test_alibi_bias_is_bloom_s_in_the_canonical_form(n_heads, tmp_path):
    """``m_h (j - i)`` with BLOOM's slopes; it differs from what Hugging Face adds (``m_h j``) by
    exactly a per-row constant. TransformerLens' slopes equal BLOOM's for 4 and 16 heads only."""
    _, bridge = tiny_bloom(tmp_path, n_heads=n_heads)
    n = 9
    bias = family_for(bridge).alibi_bias(0, n)
    assert bias.shape == (n_heads, n, n) and bias.dtype == torch.float64
    i = torch.arange(n, dtype=torch.float64)
    canonical = bloom_slopes(n_heads)[:, None, None] * (i[None, :] - i[:, None])
    # to float32 rounding: Hugging Face computes the slopes and the products m_h j in float32
    torch.testing.assert_close(bias, canonical, rtol=0, atol=n * 2.0 ** -23)
    added = captured_alibi(bridge, TOKENS[:1, :n]).reshape(n_heads, n)  # m_h j, as the forward did
    assert torch.equal(bias + added[:, :, None], added[:, None, :].expand(n_heads, n, n))
    if AbstractAttention is not None:
        tl = AbstractAttention.create_alibi_bias(n_heads, n).double()
        power_of_two = n_heads & (n_heads - 1) == 0
        assert (rel(bias.tril(), tl) < 1e-6) == power_of_two


# ------------------------------------------------------------------------------ conservation
@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp", "cp_lrp"])
def test_bias_free_bloom_conserves_except_at_the_softmax(method, bloom_bias_free, float64_softmax):
    """With no biases only the softmax rule absorbs; with ALiBi PA-LRP maps the bias' relevance
    (target = semantic + positional + softmax absorbed), AttnLRP reports it as the leak."""
    _, bridge = bloom_bias_free
    c = lp.explain(bridge, TOKENS, 5, method=method).conservation()
    scale = float(c.target_value.abs().max())
    assert float(c.other_absorbed.abs().max()) < 1e-10 * scale
    torch.testing.assert_close(
        c.absorbed_per_layer, c.softmax_absorbed_per_layer + c.positional_leak_per_layer,
        rtol=1e-9, atol=1e-10 * scale,
    )
    if method == "pa_lrp":
        torch.testing.assert_close(c.semantic + c.positional + c.softmax_absorbed, c.target_value, **TOL)
        assert float(c.positional_leak.abs().max()) == 0.0
        assert float(c.positional.abs().min()) > 1e-3
    elif method == "attn_lrp":
        torch.testing.assert_close(c.semantic + c.positional_leak + c.softmax_absorbed, c.target_value, **TOL)
        assert float(c.positional.abs().max()) == 0.0
        assert float(c.positional_leak.abs().min()) > 1e-3
    else:  # attention held constant: nothing reaches the bias, nothing is absorbed
        assert float(c.softmax_absorbed.abs().max()) == 0.0 and float(c.positional_leak.abs().max()) == 0.0
        torch.testing.assert_close(c.semantic, c.target_value, **TOL)


def test_as_shipped_the_float32_softmax_is_the_floor(bloom_bias_free):
    """Without the float64 softmax the same identity holds to float32 rounding (as on the Llama
    bridge, whose Hugging Face softmax is float32 too)."""
    _, bridge = bloom_bias_free
    c = lp.explain(bridge, TOKENS, 5).conservation()
    scale = float(c.target_value.abs().max())
    assert float(c.other_absorbed.abs().max()) < 1e-5 * scale
    torch.testing.assert_close(c.semantic + c.positional + c.softmax_absorbed, c.target_value,
                               rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("fixture", ["bloom", "bloom6"])
def test_alibi_sink_is_bias_times_score_gradient_split_by_eq16(fixture, request, float64_softmax):
    """Independent of the sweep's own bookkeeping: the rule-modified score gradient is read from
    the recorded ``R(hook_attn_scores) = scores * dy/dscores``, the bias from the slopes above,
    and Eq. 16 from the element-wise reference; per layer, head, example and position."""
    from reference_rules import alibi_split

    _, bridge = request.getfixturevalue(fixture)
    names = [f"blocks.{l}.attn.hook_attn_scores" for l in range(2)]
    attr = lp.explain(bridge, TOKENS, (3, 5), record=names)
    _, cache = bridge.run_with_cache(TOKENS, names_filter=lambda name: name in names)
    n = TOKENS.shape[1]
    i = torch.arange(n, dtype=torch.float64)
    H = bridge.cfg.n_heads
    bias = bloom_slopes(H)[:, None, None] * (i[None, :] - i[:, None])
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    for l, name in enumerate(names):
        scores = cache[name].double()
        assert torch.isfinite(scores[..., visible]).all()
        grad = torch.where(visible & (scores != 0), attr.hooks[name] / torch.where(scores == 0, 1.0, scores), 0.0)
        for b in range(TOKENS.shape[0]):
            for h in range(H):
                expected = alibi_split(bias[h] * grad[b, h])
                torch.testing.assert_close(attr.positional[b, l, h], expected, rtol=1e-10, atol=1e-13)
        assert float(attr.positional[:, l].abs().sum()) > 1e-3


# ------------------------------------------------------------------------------ HookedTransformer
@needs_hooked
@pytest.mark.parametrize("softmax", ["float64", "float32"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fixture", ["bloom", "bloom6", "bloom_bias_free"])
def test_bridge_matches_hooked_transformer(fixture, method, softmax, request, monkeypatch):
    """Same weights as a HookedTransformer (TransformerLens' own ALiBi attention and the
    HookedTransformer family's bias): the same maps. The float64 comparison is limited by the
    two tanh-GELUs (TransformerLens rounds sqrt(2/pi) to 0.7978845608, BLOOM to 0.79788456)."""
    hf, bridge = request.getfixturevalue(fixture)
    if softmax == "float64":
        request.getfixturevalue("float64_softmax")
    H = hf.config.n_head
    if H & (H - 1):  # TransformerLens' slopes are not BLOOM's here
        slopes = bloom_slopes(H).float()
        monkeypatch.setattr(AbstractAttention, "create_alibi_multipliers",
                            staticmethod(lambda n_heads, device=None: slopes.to(device)))
    ht = lp.models.hooked_transformer_from_hf(hf)
    a = lp.explain(bridge, TOKENS, (3, 5), method=method)
    b = lp.explain(ht, TOKENS, (3, 5), method=method)
    tol = 1e-8 if softmax == "float64" else 2e-5
    ca, cb = a.conservation(), b.conservation()
    assert rel(a.target_value, b.target_value) < tol
    for field in ("semantic", "positional", "heads_by_pos", "mlp", "residual"):
        assert rel(getattr(a, field), getattr(b, field)) < tol, field
    for field in ("positional", "positional_leak", "softmax_absorbed"):
        assert rel(getattr(ca, field), getattr(cb, field)) < tol, field
    # bias-free, both are float rounding: compare on the logit's scale
    assert float((ca.other_absorbed - cb.other_absorbed).abs().max()) < tol * float(cb.target_value.abs().max())
    assert rel(a.combined(), b.combined()) < tol
    if method == "pa_lrp":
        assert float(a.positional.abs().sum()) > 1e-3


@needs_hooked
def test_trained_zoo_bloom_as_bridge_and_as_hooked_transformer():
    """The zoo's trained ALiBi model, both ways, in float64: same maps and the same bookkeeping to
    float32 rounding (the bridge's softmax)."""
    if not lp.zoo.hooked_available():
        pytest.skip("the zoo does not load as HookedTransformer here")
    bridge, _ = lp.zoo.load("alibi-repeat", "bridge", dtype=torch.float64)
    ht, _ = lp.zoo.load("alibi-repeat", "hooked", dtype=torch.float64)
    tokens, _ = lp.zoo.task("alibi-repeat").batch(4, torch.Generator().manual_seed(2))
    a, b = lp.explain(bridge, tokens[:, :10], 5), lp.explain(ht, tokens[:, :10], 5)
    for field in ("target_value", "semantic", "positional", "heads_by_pos", "mlp"):
        assert rel(getattr(a, field), getattr(b, field)) < 1e-5, field
    ca, cb = a.conservation(), b.conservation()
    for field in ("positional", "softmax_absorbed", "other_absorbed"):  # other: the biases' share
        assert rel(getattr(ca, field), getattr(cb, field)) < 1e-5, field
    assert float(ca.positional.abs().min()) > 0


# ------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_runs(bloom, side):
    """Hugging Face counts ALiBi key positions from the mask; lens_palrp right-aligns the rows, so
    each row's bias, and so its maps, are those of its single run; pads hold zero."""
    _, bridge = bloom
    tokens, mask = pad(ROWS, side)
    for method in ("pa_lrp", "attn_lrp"):
        attr = lp.explain(bridge, tokens, (5, 7), attention_mask=mask, method=method)
        # BLOOM's scores and softmax run in float32: batch and single run agree to its rounding
        assert_rows_equal_single_runs(bridge, ROWS, attr, (5, 7), method, meets_in=torch.float32)
        for i, row in enumerate(ROWS):  # attn_lrp's ALiBi leak, row by row
            leak = lp.explain(bridge, row[None], (5, 7), method=method).conservation().positional_leak[0]
            torch.testing.assert_close(attr.conservation().positional_leak[i], leak,
                                       **tolerance(attr, torch.float32, attr.target_value[i].abs()))
    inferred = lp.explain(bridge, tokens, (5, 7))  # the pad id 1 is recognised without the mask
    assert inferred.attention_mask.tolist() == attr.attention_mask.tolist()


# ------------------------------------------------------------------------------ methods
def test_pa_lrp_maps_the_alibi_sink_and_attn_lrp_reports_it_as_the_leak(bloom):
    """Both methods send the same relevance into the bias; only PA-LRP maps it to positions."""
    _, bridge = bloom
    pa, attn = lp.explain(bridge, TOKENS, 7), lp.explain(bridge, TOKENS, 7, method="attn_lrp")
    cp, ca = pa.conservation(), attn.conservation()
    assert float(cp.positional.abs().min()) > 1e-3 and float(cp.positional_leak.abs().max()) == 0.0
    torch.testing.assert_close(ca.positional_leak, cp.positional, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ca.positional_leak_per_layer, cp.positional_per_layer, rtol=1e-12, atol=1e-14)
    assert float(attn.positional.abs().max()) == 0.0
    torch.testing.assert_close(attn.semantic, pa.semantic, rtol=1e-12, atol=1e-14)
    assert float(pa.combined(parts="positional").abs().min()) >= 0
    assert float(pa.combined(parts="positional").abs().sum()) > 1e-3
    assert float(attn.combined(parts="positional").abs().max()) == 0.0


def test_bloom_is_verified_other_alibi_bridges_are_refused(bloom, tmp_path):
    """BLOOM explains without opting in and without a warning; MPT's and Falcon's ALiBi (a bias
    added in another form) are refused, naming the architecture, even when opted in."""
    from transformers import FalconConfig, FalconForCausalLM, MptConfig, MptForCausalLM

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*unverified.*")
        lp.explain(bloom[1], TOKENS, 3)
    torch.manual_seed(0)
    others = {
        "mpt": MptForCausalLM(MptConfig(vocab_size=18, d_model=32, n_layers=1, n_heads=4, max_seq_len=32)),
        "falcon": FalconForCausalLM(FalconConfig(
            vocab_size=18, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=True,
            new_decoder_architecture=False, multi_query=False, parallel_attn=True, bias=True)),
    }
    for model_type, hf in others.items():
        hf.config.architectures = [type(hf).__name__]
        bridge = boot(save_with_tokenizer(hf.double().eval(), tmp_path / model_type))
        assert bridge.cfg.positional_embedding_type == "alibi"
        with warnings.catch_warnings():  # refused before the opt-in's "unverified" warning
            warnings.filterwarnings("error", message=".*unverified.*")
            with pytest.raises(NotImplementedError, match=f"ALiBi attention of '{model_type}'"):
                lp.explain(bridge, TOKENS, 3, allow_unverified=True)


@needs_hooked
def test_a_hooked_transformer_with_other_slopes_than_bloom_is_refused(tmp_path):
    """6 heads: TransformerLens' slopes are not BLOOM's, and the HookedTransformer's logits were
    26-35% off Hugging Face's; the bridge of the same weights is the exact model."""
    hf, bridge = tiny_bloom(tmp_path / "b6", n_heads=6)
    with pytest.raises(NotImplementedError, match="6 heads: TransformerLens' ALiBi slopes differ"):
        lp.models.hooked_transformer_from_hf(hf)
    lp.explain(bridge, TOKENS, 3)
