"""Per-prompt targets for a batch: one token (or one logit-difference pair) per prompt."""

import pytest
import torch

import lens_palrp as lp
from models import random_gpt2_with_real_tokenizer

PROMPTS = ["c h a p k b e g", "b e g c"]


def test_one_string_per_prompt_equals_each_prompt_alone(zoo):
    """Each row explains its own token: the same numbers as that prompt explained alone (a
    list applied to every row, or the first id broadcast, would differ)."""
    model, _ = zoo
    batch = lp.explain(model, PROMPTS, ["k", "e"])
    for i, (prompt, token) in enumerate(zip(PROMPTS, ["k", "e"])):
        one = lp.explain(model, prompt, token)
        n = one.tokens.shape[1]
        torch.testing.assert_close(batch.target_value[i], one.target_value[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch.semantic[i, :n], one.semantic[0], rtol=1e-5, atol=1e-6)
    ids = lp.explain(model, PROMPTS, [model.tokenizer.convert_tokens_to_ids(t) for t in ("k", "e")])
    torch.testing.assert_close(ids.semantic, batch.semantic, rtol=0, atol=0)


def test_one_pair_per_prompt_is_the_difference_of_the_logits(zoo):
    model, _ = zoo
    pairs = lp.explain(model, PROMPTS, [("k", "h"), ("e", "b")])
    correct = lp.explain(model, PROMPTS, ["k", "e"])
    wrong = lp.explain(model, PROMPTS, ["h", "b"])
    torch.testing.assert_close(pairs.target_value, correct.target_value - wrong.target_value, rtol=1e-5, atol=1e-5)
    # the pair of lists is the same target written the other way round
    lists = lp.explain(model, PROMPTS, (["k", "e"], ["h", "b"]))
    torch.testing.assert_close(lists.semantic, pairs.semantic, rtol=0, atol=0)


@pytest.mark.parametrize("target, message", [
    (["k"], "1 entries for a batch of 2 prompts"),
    (["k", "zz"], "target for prompt 1 'zz' is not in the vocabulary"),
    (["k", 99], "target for prompt 1 id 99 is out of the vocabulary"),
    ([("k",), ("e", "b")], "target for prompt 0: a list of logit-difference targets holds one pair"),
    ([("k", "h"), ("e", "zz")], "wrong target for prompt 1 'zz'"),
    ([["k"], "e"], "target for prompt 0"),
])
def test_bad_per_prompt_targets_name_the_prompt(zoo, target, message):
    model, _ = zoo
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
        lp.explain(model, PROMPTS, target)


@pytest.fixture(scope="module")
def gpt2():
    """A random GPT-2 (Hugging Face object) with GPT-2's real BPE tokenizer."""
    model, tokenizer = random_gpt2_with_real_tokenizer()
    return model.double(), tokenizer


def test_per_prompt_names_with_a_bpe_tokenizer(gpt2):
    """The Inseq-style batch: ' Mary' / ' Anna' are one GPT-2 token each; the logit explained in
    each row is that row's name (compared with the Hugging Face model's own logits)."""
    hf, tok = gpt2
    prompts = ["When Mary and John went to the store, John gave a drink to",
               "When Tom and Anna went to the park, Tom gave a ball to"]
    attr = lp.explain(hf, prompts, [" Mary", " Anna"], tokenizer=tok)
    for i, (prompt, name) in enumerate(zip(prompts, [" Mary", " Anna"])):
        n = len(attr.str_tokens[i])
        ids = attr.tokens[i:i + 1, :n]  # as the bridge tokenized it (with its BOS)
        assert tok.decode(ids[0]).endswith(prompt)
        with torch.no_grad():
            logits = hf(ids).logits[0, -1]
        torch.testing.assert_close(attr.target_value[i], logits[tok.convert_tokens_to_ids(tok.tokenize(name))[0]],
                                   rtol=1e-9, atol=1e-9)
    diff = lp.explain(hf, prompts, [(" Mary", " John"), (" Anna", " Tom")], tokenizer=tok)
    assert diff.target_value.shape == (2,)
    with pytest.raises(ValueError, match=r"target for prompt 1 ' Annabelle' is not a single token.*tokenizes as \["):
        lp.explain(hf, prompts, [" Mary", " Annabelle"], tokenizer=tok)
