"""Agreement with an independent implementation on the same weights (identity 11 of
docs/identities.md).

A random Hugging Face ``LlamaForCausalLM`` (float64, grouped-query attention) is converted into a
HookedTransformer; lens_palrp explains the HookedTransformer, ``reference_llama`` explains the
Hugging Face model directly from the rules. They must agree to 1e-6 relative.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4.x
    import pytest

    pytest.skip(
        "TransformerLens 4.x removed HookedTransformer; these tests run in the 3.9 environment",
        allow_module_level=True,
    )
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

import lens_palrp as lp
from devices import assert_on_device
from reference_llama import explain_llama


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    )
    hf_cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_cfg).double().eval()
    with torch.no_grad():  # give the norms non-trivial weights
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    cfg = HookedTransformerConfig(
        d_model=32, d_head=8, n_heads=4, d_mlp=48, n_layers=3, n_ctx=32, d_vocab=64,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=8, rotary_base=10000, rotary_adjacent_pairs=False, gated_mlp=True,
        n_key_value_heads=2, final_rms=True, eps=1e-6, original_architecture="LlamaForCausalLM",
        dtype=torch.float64,
    )
    ht = HookedTransformer(cfg)
    ht.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    return hf, ht.eval()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_converted_model_matches_hugging_face(pair):
    hf, ht = pair
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # Hugging Face computes its RoPE tables in float32, hence not 1e-12
        assert rel_err(ht(ids), hf(ids).logits) < 1e-6


@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp"])
def test_lens_palrp_matches_independent_reference(pair, method, device):
    """The reference runs on the CPU; lens_palrp on ``device`` too (CUDA where there is one), its
    results staying there, so the CUDA sweep is checked against the same CPU oracle."""
    hf, ht = pair
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    target = 7
    logit, semantic, positional, heads = explain_llama(hf, ids, target, positional=method == "pa_lrp")
    if device != "cpu":
        ht = copy.deepcopy(ht).to(device, print_details=False)
    attr = lp.explain(ht, ids.to(device), target, method=method)
    assert_on_device(attr, device)
    attr = attr.to("cpu")
    assert rel_err(attr.target_value, logit) < 1e-10
    assert rel_err(attr.semantic, semantic) < 1e-6
    assert rel_err(attr.heads_by_pos, heads) < 1e-6
    if method == "pa_lrp":
        assert rel_err(attr.positional, positional) < 1e-6
        # identity 10 (docs/identities.md), init side: a tiny positional share with Hugging
        # Face's small-std init
        pos_mass = attr.positional.abs().sum()
        assert pos_mass / (pos_mass + attr.semantic.abs().sum()) < 0.01
        assert float(positional.abs().max()) > 1e-6  # ~0.1% of the logit at random init
    print(method, "semantic", rel_err(attr.semantic, semantic), "positional",
          rel_err(attr.positional, positional) if method == "pa_lrp" else None,
          "heads", rel_err(attr.heads_by_pos, heads))
