"""Gemma-2 on the TransformerBridge: both softcaps, alternating sliding windows,
``query_pre_attn_scalar``.

Where the bridge applies the caps (``lens_palrp.hooks.bridge_softcap``): the attention cap
``c tanh(q k^T scaling / c)`` before the mask and ``hook_attn_scores`` (no hook sees the raw
scores; the identity rule rebuilds them from ``hook_rot_q`` / ``hook_rot_k``), the output cap after
``unembed.hook_out`` (the raw logits; the identity rule is completed from them). The explained
value is the capped logit, and conservation is counted against it. Hugging Face and the bridge
take the attention softmax in float32 even in a float64 model; the conservation checks put it in
float64 (``float64_softmax``); as shipped it holds to ~1e-6. The tiny model has a sliding window of
4 on layer 0 (full attention on layer 1), a head size of 8 with ``query_pre_attn_scalar`` 256, and
grouped kv heads. Gradient x input against the bare model is in ``tests/test_architectures.py``.
"""

import warnings

import pytest
import torch

import lens_palrp as lp
from architectures import build
from padding import ROWS, assert_rows_equal_single_runs, pad
from lens_palrp import rules
from lens_palrp.hooks import family_for
from lens_palrp.methods import METHODS
from lens_palrp.roles import Role

pytest.importorskip("transformer_lens.model_bridge")

TOKENS = torch.randint(2, 18, (1, 9), generator=torch.Generator().manual_seed(5))
LRP = ["pa_lrp", "attn_lrp", "cp_lrp"]


@pytest.fixture(scope="module")
def gemma2():
    from transformers import AutoTokenizer

    from lens_palrp.zoo import TOKENIZER_DIR

    hf = build("gemma2", biases=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = lp.models.bridge_from_hf(hf, AutoTokenizer.from_pretrained(TOKENIZER_DIR), dtype=torch.float64)
    return hf, bridge


@pytest.fixture(scope="module")
def target(gemma2):
    """The token whose raw logit is furthest into the output cap's saturation."""
    hf, _ = gemma2
    with torch.no_grad():
        raw = hf.lm_head(hf.model(TOKENS).last_hidden_state)[0, -1]
    return int(raw.abs().argmax())



def gap(attr):
    c = attr.conservation()
    return abs(float(c.other_absorbed[0] / c.target_value[0]))


def test_the_model_is_what_the_test_claims(gemma2):
    hf, bridge = gemma2
    assert hf.config.layer_types == ["sliding_attention", "full_attention"] and hf.config.sliding_window == 4
    assert hf.model.layers[0].self_attn.scaling == 256 ** -0.5 != hf.config.head_dim ** -0.5
    fam = family_for(bridge)
    assert (fam.attn_softcap, fam.output_softcap, fam.n_kv_heads) == (5.0, 3.0, 2)
    assert fam.attn_scale(0) == 16.0


def test_every_hook_the_sweep_patches_is_in_the_computation_path(gemma2):
    _, bridge = gemma2
    roles = family_for(bridge).hook_roles()
    assert {"unembed.hook_out", "blocks.0.attn.hook_attn_scores"} <= set(roles)
    with torch.no_grad():
        base = bridge(TOKENS)
        for name, role in roles.items():
            if role.role in (Role.RESID_FINAL, Role.ROPE_COS, Role.ROPE_SIN):
                continue
            out = bridge.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda a, hook: a * 1.3 + 0.05)])
            assert float((out - base).abs().max()) > 1e-8, name


def test_the_caps_sit_where_the_rules_see_them(gemma2):
    """hook_attn_scores holds the capped scores of the hooked rotated q and k (masked after the
    cap); unembed.hook_out holds the raw logits, capped after it; the bridge equals Hugging Face."""
    hf, bridge = gemma2
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(TOKENS)
        torch.testing.assert_close(logits, hf(TOKENS).logits, rtol=0, atol=1e-12)
    raw_logits = cache["unembed.hook_out"]
    assert float(raw_logits.abs().max()) > 6.0  # well into the cap of 3
    torch.testing.assert_close(logits, 3.0 * torch.tanh(raw_logits / 3.0), rtol=0, atol=1e-12)
    for layer in range(2):
        q, k = cache[f"blocks.{layer}.attn.hook_rot_q"], cache[f"blocks.{layer}.attn.hook_rot_k"]
        raw = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) / 16.0
        visible = cache[f"blocks.{layer}.attn.hook_pattern"] > 0
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        torch.testing.assert_close(scores[visible], (5.0 * torch.tanh(raw / 5.0))[visible], rtol=0, atol=1e-12)
        assert float(raw.abs().max()) > 5.0  # the attention cap bends some scores


@pytest.mark.parametrize("side", ["left", "right"])
def test_per_layer_masks_are_hugging_face_s_sliding_window_and_causal_masks(gemma2, side, float64_softmax):
    """The pattern the rules see, per layer and padded on either side, is Hugging Face's: layer 0
    attends to the last 4 real positions, layer 1 to every earlier real one. (A float32 softmax
    turns a float64 model's masked scores, ``finfo(float64).min``, into -inf: a pad query that
    sees no key in the window gives NaN, in Hugging Face as in the bridge, and the NaN reaches
    the real rows through the values; hence the float64 softmax here.)"""
    hf, bridge = gemma2
    tokens, mask = pad(ROWS, side)
    ref = {}
    handles = [block.self_attn.register_forward_hook(lambda m, a, out, layer=layer: ref.__setitem__(layer, out[1]))
               for layer, block in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            _, cache = bridge.run_with_cache(tokens, attention_mask=mask)
            hf(tokens, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    for b in range(len(ROWS)):
        real = mask[b].bool()
        idx = torch.arange(mask.shape[1])
        for layer, window in ((0, 4), (1, None)):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][b][:, real][:, :, real]
            torch.testing.assert_close(pattern, ref[layer][b][:, real][:, :, real], rtol=0, atol=1e-6)
            i, j = idx[real][:, None], idx[real][None, :]
            allowed = (j <= i) & ((i - j < window) if window else torch.ones_like(j, dtype=torch.bool))
            assert bool(((pattern > 0) == allowed).all()), (side, b, layer)


@pytest.mark.parametrize("method", LRP)
def test_bias_free_conserves_against_the_capped_logit(gemma2, target, method, float64_softmax):
    hf, bridge = gemma2
    attr = lp.explain(bridge, TOKENS, target, method=method)  # verified: no opt-in needed
    with torch.no_grad():
        capped = hf(TOKENS).logits[0, -1, target]
    torch.testing.assert_close(attr.target_value[0], capped, rtol=1e-9, atol=0)  # the rules detach the norms: other rounding
    assert gap(attr) < 1e-8
    if method == "pa_lrp":  # RoPE sinks in both layers (grouped keys credited per query head)
        assert bool((attr.positional.abs().sum((0, 2, 3)) > 1e-6).all())
    assert attr.computation["attention"] == "eager"  # no fused kernel applies a cap


def test_without_the_identity_rules_at_the_caps_relevance_is_lost(gemma2, target, float64_softmax):
    """Plain gradients through either cap do not conserve: the checks above can fail."""
    _, bridge = gemma2
    for role in (Role.SCORES, Role.LOGITS):
        method = METHODS["attn_lrp"].with_rules(f"plain_{role.name}", {role: rules.Gradient()})
        assert gap(lp.explain(bridge, TOKENS, target, method=method)) > 1e-4, role


def test_as_shipped_the_float32_softmax_is_the_floor(gemma2, target):
    _, bridge = gemma2
    assert gap(lp.explain(bridge, TOKENS, target, method="pa_lrp")) < 1e-6



@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_runs(gemma2, side, float64_softmax):
    """Padded on either side (the sliding window then covers pads), each row as alone."""
    _, bridge = gemma2
    tokens, mask = pad(ROWS, side)
    attr = lp.explain(bridge, tokens, 3, method="pa_lrp", attention_mask=mask)
    assert_rows_equal_single_runs(bridge, ROWS, attr, 3, "pa_lrp")


def test_caps_the_rules_would_not_see_are_refused(gemma2, monkeypatch):
    hf, bridge = gemma2
    monkeypatch.setattr(bridge.blocks[1].attn.original_component, "attn_logit_softcapping", 4.0)
    with pytest.raises(NotImplementedError, match="attention softcap of layer 1 is 4.0, the config says 5.0"):
        lp.explain(bridge, TOKENS, 3)
    monkeypatch.undo()
    monkeypatch.setattr(hf.config, "final_logit_softcapping", 30.0)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping is 30.0, the config says 3.0"):
        lp.explain(bridge, TOKENS, 3)
