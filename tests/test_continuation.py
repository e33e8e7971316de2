"""``explain_continuation``: one explanation per continuation token, computed as batched sweeps
over masked copies of one sequence, equal to the steps explained one by one."""

import pytest
import torch

import lens_palrp as lp
from architectures import build


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lens_palrp.zoo import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


FIELDS = ("target_value", "semantic", "positional", "positional_input", "heads", "heads_by_pos", "mlp", "residual")


def _assert_step_equals_alone(model, cont, t, rtol, atol):
    """Step ``t`` equals ``explain`` on the prompt plus the earlier continuation tokens; its
    padded tail holds zeros."""
    n = cont.n_prompt + t
    one = lp.explain(model, cont.tokens[None, :n], int(cont.continuation_tokens[t]))
    step = cont[t]
    for field in FIELDS:
        mine, ref = getattr(step, field), getattr(one, field)
        if field in ("target_value", "heads"):
            torch.testing.assert_close(mine, ref, rtol=rtol, atol=atol, msg=field)
            continue
        torch.testing.assert_close(mine[..., :n], ref, rtol=rtol, atol=atol, msg=field)
        assert not mine[..., n:].any(), field  # pads
    assert step.str_tokens == one.str_tokens
    assert int(step.target_position[0]) == n - 1


@pytest.mark.skipif(not lp.zoo.available(), reason="the zoo models do not load here")
def test_batched_steps_equal_separate_explains_on_the_zoo():
    model, _ = lp.zoo.load("rope-repeat")
    cont = lp.explain_continuation(model, "c h a p c h", " a p k", batch_size=2)
    assert len(cont) == 3 and cont.str_continuation == ["a", "p", "k"] and not cont.generated
    assert cont.target(2) == (int(cont.continuation_tokens[2]), "k")
    for t in range(len(cont)):
        _assert_step_equals_alone(model, cont, t, rtol=1e-5, atol=1e-5)


def test_batched_steps_equal_separate_explains_in_float64(tokenizer):
    """A float64 Llama (Hugging Face object): any chunking of the steps gives the separate
    explains to float64 rounding, and the maps of one step do not depend on the batch size."""
    hf = build("llama")
    ids = torch.tensor([3, 5, 7, 9, 11, 4, 6])
    cont = lp.explain_continuation(hf, ids[:3], ids[3:], batch_size=3, tokenizer=tokenizer)
    assert torch.equal(cont.tokens, ids) and len(cont) == 4
    bridge = lp.models.explainable(hf)
    for t in range(len(cont)):
        _assert_step_equals_alone(bridge, cont, t, rtol=1e-10, atol=1e-12)
    whole = lp.explain_continuation(hf, ids[:3], ids[3:], batch_size=8)
    for t in range(len(cont)):
        n = cont.n_prompt + t
        torch.testing.assert_close(whole[t].semantic[..., :n], cont[t].semantic[..., :n], rtol=1e-10, atol=1e-12)
    # the logit each step explains is the Hugging Face model's own (the bridge takes its attention
    # softmax in float32: 1e-6, where another position or token would be off by O(1))
    with torch.no_grad():
        logits = hf(ids[None]).logits[0]
    expected = logits[torch.arange(2, 6), ids[3:]]
    torch.testing.assert_close(cont.target_values, expected, rtol=1e-5, atol=1e-5)


def test_greedy_continuation_is_the_models_argmax(tokenizer):
    hf = build("llama")
    hf.train()  # generation runs in eval mode and gives the flag back
    cont = lp.explain_continuation(hf, "c h a p", max_new_tokens=4, tokenizer=tokenizer)
    assert cont.generated and len(cont) == 4 and hf.training
    hf.eval()
    sequence = cont.tokens[: cont.n_prompt]
    with torch.no_grad():
        for t in range(4):
            logits = hf(sequence[None]).logits[0, -1]
            assert int(logits.argmax()) == int(cont.continuation_tokens[t])
            torch.testing.assert_close(cont.target_values[t], logits.max(), rtol=1e-5, atol=1e-5)
            sequence = torch.cat([sequence, cont.continuation_tokens[t:t + 1]])


def test_greedy_continuation_stops_after_eos(tokenizer):
    hf = build("llama")
    with torch.no_grad():  # the end-of-sequence token always wins
        hf.lm_head.bias = None
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[tokenizer.eos_token_id] = 1.0
    hf.model.norm.weight.data.fill_(1.0)
    cont = lp.explain_continuation(hf, torch.tensor([3, 5]), max_new_tokens=5, tokenizer=tokenizer,
                                   method="grad_x_input")
    if int(cont.continuation_tokens[0]) != tokenizer.eos_token_id:
        pytest.skip("the zero-mean residual did not make EOS the argmax")
    assert cont.continuation_tokens.tolist() == [tokenizer.eos_token_id]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(continuation=""), ValueError, "continuation is empty"),
    (dict(continuation=[3, 99]), ValueError, "continuation id 99 is out of the vocabulary"),
    (dict(continuation=torch.tensor([[1, 2], [3, 4]])), ValueError, "one sequence of ids"),
    (dict(continuation=[1.5]), TypeError, "a string or a sequence of token ids"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive integer"),
    (dict(continuation=[3], batch_size=0), ValueError, "batch_size must be a positive integer"),
    (dict(continuation=[3], position=2), TypeError, "sets position for each step itself"),
])
def test_bad_arguments_are_named(tokenizer, kwargs, error, message):
    with pytest.raises(error, match=message):
        lp.explain_continuation(build("llama"), [3, 5], tokenizer=tokenizer, **kwargs)


def test_encoders_are_refused(tokenizer):
    pytest.importorskip("transformer_lens.model_bridge")
    bert = build("bert")
    with pytest.raises(ValueError, match="needs a causal language model"):
        lp.explain_continuation(bert, [3, 5], [4], tokenizer=tokenizer)
