"""T5 (encoder-decoder, relative position bias) on the TransformerBridge, against the bare Hugging
Face model: gradient x input of the token embeddings, the per-head outputs and the relative bias
equal autograd; conservation under the LRP methods; the bias is a sink under PA-LRP only.

No float64 patch is needed: T5's softmax runs in the model's dtype, and the gradient x input
comparisons agree to ~1e-15 (checked to 1e-6)."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import lens_palrp as lp
from lens_palrp.methods import METHODS, SINKS, Method

sys.path.insert(0, str(Path(__file__).parent))
from architectures import build  # noqa: E402

tl = pytest.importorskip("transformer_lens")
from importlib.metadata import version  # noqa: E402

TL3 = int(version("transformer-lens").split(".")[0]) < 4
needs_tl4 = pytest.mark.skipif(TL3, reason="TransformerLens 3.x's T5 bridge cannot run this transformers' T5 (refused)")

ENC = torch.tensor([[3, 5, 7, 2, 9, 4]])
DEC = torch.tensor([[0, 4, 6]])
TARGET = 3
LRP = ["pa_lrp", "attn_lrp", "cp_lrp"]


def _bridge(hf=None):
    from transformers import AutoTokenizer

    from lens_palrp.zoo import TOKENIZER_DIR

    hf = build("t5", biases=False) if hf is None else hf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lp.models.bridge_from_hf(hf, AutoTokenizer.from_pretrained(TOKENIZER_DIR), dtype=torch.float64)


@pytest.fixture(scope="module")
def bridge():
    return _bridge()


@pytest.fixture(scope="module")
def reference():
    """Autograd on the bare model: grad x input of the embeddings, of each attention's input to
    its output projection (per head), and of each stack's relative-bias table as the forward used it."""
    hf = build("t5", biases=False)
    n_enc = ENC.shape[1]
    embedded = hf.shared(torch.cat([ENC, DEC], 1)).detach().requires_grad_()
    saved = {}

    def keep(key):
        def hook(module, args, out=None):
            t = args[0] if out is None else out
            t.retain_grad()
            saved[key] = t
        return hook

    handles = []
    attns = ([("encoder", i, blk.layer[0].SelfAttention) for i, blk in enumerate(hf.encoder.block)]
             + [("decoder", i, blk.layer[0].SelfAttention) for i, blk in enumerate(hf.decoder.block)]
             + [("cross", i, blk.layer[1].EncDecAttention) for i, blk in enumerate(hf.decoder.block)])
    for stack, i, attn in attns:
        handles.append(attn.o.register_forward_pre_hook(keep((stack, i))))
    for stack in ("encoder", "decoder"):
        bias = getattr(hf, stack).block[0].layer[0].SelfAttention.relative_attention_bias
        handles.append(bias.register_forward_hook(keep(("bias", stack))))
    logit = hf(inputs_embeds=embedded[:, :n_enc], decoder_inputs_embeds=embedded[:, n_enc:]).logits[0, -1, TARGET]
    logit.backward()
    for h in handles:
        h.remove()
    H = hf.config.num_heads
    heads = [(saved[(s, i)] * saved[(s, i)].grad).reshape(1, -1, H, hf.config.d_kv).sum(-1).transpose(1, 2).detach()
             for s, i, _ in attns]
    bias = {s: (saved[("bias", s)] * saved[("bias", s)].grad).sum(0).T.detach() for s in ("encoder", "decoder")}
    return {"logit": logit.detach(), "semantic": (embedded * embedded.grad).sum(-1).detach(), "heads": heads,
            "bias": bias}


def _explain(bridge, method, **kw):
    return lp.explain(bridge, ENC, TARGET, method=method, decoder_input=DEC, **kw)


@needs_tl4
def test_grad_x_input_equals_autograd_on_both_stacks(bridge, reference):
    attr = _explain(bridge, "grad_x_input")
    n_enc, n = ENC.shape[1], ENC.shape[1] + DEC.shape[1]
    torch.testing.assert_close(attr.target_value[0], reference["logit"], rtol=0, atol=1e-12)
    assert attr.tokens.shape == (1, n) and int(attr.target_position[0]) == n - 1
    torch.testing.assert_close(attr.semantic, reference["semantic"], rtol=0, atol=1e-6)
    assert float(attr.semantic[:, :n_enc].abs().sum()) > 1e-3 and float(attr.semantic[:, n_enc:].abs().sum()) > 1e-3
    names = attr.computation["layers"]
    for layer, ref in enumerate(reference["heads"]):  # self and cross attention, per head and query position
        at = slice(0, n_enc) if names[layer].startswith("encoder") else slice(n_enc, n)
        torch.testing.assert_close(attr.heads_by_pos[:, layer, :, at], ref, rtol=0, atol=1e-6)
    # the relative bias's grad x input, per head and key position, summed over the layers sharing it
    sinks = Method("grad_x_input_bias_sinks", METHODS["grad_x_input"].rules, SINKS)
    per_key = _explain(bridge, sinks).positional[0]
    torch.testing.assert_close(per_key[0:2, :, :n_enc].sum(0), reference["bias"]["encoder"], rtol=0, atol=1e-6)
    torch.testing.assert_close(per_key[2:4, :, n_enc:].sum(0), reference["bias"]["decoder"], rtol=0, atol=1e-6)
    assert float(per_key[4:].abs().sum()) == 0.0  # cross-attention has no bias


@needs_tl4
@pytest.mark.parametrize("method", LRP)
@needs_tl4
def test_conservation_bias_free(bridge, method):
    c = _explain(bridge, method).conservation()
    assert abs(float(c.other_absorbed[0] / c.target_value[0])) < 1e-8


@needs_tl4
def test_relative_bias_is_a_sink_under_pa_lrp_and_the_leak_under_attn_lrp(bridge):
    pa, attn = _explain(bridge, "pa_lrp"), _explain(bridge, "attn_lrp")
    per_layer = pa.positional.abs().sum((0, 2, 3))
    assert bool((per_layer[:4] > 1e-5).all()) and float(per_layer[4:].sum()) == 0.0
    assert float(attn.positional.abs().sum()) == 0.0
    # an additive sink is only read: the same backward, so the leak is exactly PA-LRP's sink
    torch.testing.assert_close(attn.conservation().positional_leak, pa.conservation().positional, rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(attn.semantic, pa.semantic, rtol=1e-12, atol=1e-14)


@needs_tl4
def test_rebuilt_attention_needs_the_bias(bridge, monkeypatch):
    """Without the relative bias the rebuilt attention is not T5's: refused, not explained."""
    from lens_palrp.hooks.t5_bridge import T5BridgeFamily

    monkeypatch.setattr(T5BridgeFamily, "relative_bias", lambda self, layer: None)
    with pytest.raises(NotImplementedError, match="relative bias"):
        _explain(bridge, "pa_lrp")


@needs_tl4
def test_every_patched_hook_is_in_the_path(bridge):
    from lens_palrp.hooks import family_for
    from lens_palrp.roles import Role

    family = family_for(bridge)
    family.resolve_options({"decoder_input": DEC})
    tokens = family.prepare(ENC, None, None, -1, torch.device("cpu")).tokens
    with torch.no_grad():
        base = family.forward(tokens, None, [])
        for name, hr in family.hook_roles().items():
            if hr.role == Role.RESID_FINAL:
                continue
            out = family.forward(tokens, None, [(name, lambda a, hook=None: a * 1.3 + 0.05)])
            assert float((out - base).abs().max()) > 1e-8, name


@needs_tl4
def test_encoder_alone_at_hook_and_default_decoder_input(bridge):
    target = lp.at_hook("encoder_blocks.1.hook_out", lambda a: a[:, 2, :4].sum(-1))
    attr = lp.explain(bridge, ENC, target, method="pa_lrp")
    assert abs(float(attr.conservation().other_absorbed[0] / attr.target_value[0])) < 1e-8
    assert float(attr.positional[:, :2].abs().sum()) > 0 and float(attr.semantic[:, ENC.shape[1]:].abs().sum()) == 0
    default = lp.explain(bridge, ENC, TARGET)  # the decoder start token
    assert default.tokens.shape == (1, ENC.shape[1] + 1) and int(default.tokens[0, -1]) == 0


@needs_tl4
def test_model_left_unchanged_and_refusals(bridge):
    norms = [bridge.encoder_blocks[0].ln1, bridge.decoder_ln_final]
    before = [n._uses_rms_norm_override for n in norms]
    n_hooks = sum(len(h.fwd_hooks) for h in bridge.hook_dict.values())
    _explain(bridge, "pa_lrp")
    assert [n._uses_rms_norm_override for n in norms] == before
    assert n_hooks == sum(len(h.fwd_hooks) for h in bridge.hook_dict.values())
    with pytest.raises(NotImplementedError, match="padded"):
        lp.explain(bridge, ENC, TARGET, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))
    with pytest.raises(NotImplementedError, match="checkpoint"):
        _explain(bridge, "pa_lrp", checkpoint=True)
    with pytest.raises(ValueError, match="decoder_input"):
        lp.explain(_bridge_gpt2(), "a b", "c", decoder_input=DEC)


def _bridge_gpt2():
    from transformers import AutoTokenizer

    from lens_palrp.zoo import TOKENIZER_DIR

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lp.models.bridge_from_hf(build("gpt2", biases=False), AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                                        dtype=torch.float64)


@needs_tl4
def test_gated_t5_is_refused():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=18, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    hf = transformers.T5ForConditionalGeneration(cfg).double().eval()
    with pytest.raises(NotImplementedError, match="T5.*gated"):
        lp.explain(_bridge(hf), ENC, TARGET)


@pytest.mark.skipif(not TL3, reason="TransformerLens 4 runs T5")
def test_transformer_lens_3_refuses_t5():
    with pytest.raises(NotImplementedError, match="T5 TransformerBridge on TransformerLens < 4"):
        lp.explain(_bridge(), ENC, TARGET)
