"""The perturbation protocol (REFERENCE.md 4) and ground-truth scores."""

import math

import pytest
import torch

import lens_palrp as lp
from lens_palrp.analyses import faithfulness as fa


def test_trapezoid_and_bootstrap():
    f = fa.FRACTIONS
    assert float(fa.trapezoid(torch.ones(11))) == pytest.approx(1.0)
    assert float(fa.trapezoid(f)) == pytest.approx(0.5)
    mean, low, high = fa.bootstrap_mean(torch.tensor([1.0, 2.0, 3.0, 4.0]), seed=3)
    assert mean == 2.5 and low <= mean <= high
    assert fa.bootstrap_mean(torch.tensor([1.0, 2.0, 3.0, 4.0]), seed=3) == (mean, low, high)


def test_perturbed_inputs_follow_the_protocol():
    tokens = torch.tensor([0, 11, 12, 13, 14, 15])
    rel = torch.tensor([9.0, 0.1, 0.5, 0.3, 0.9, 0.2])
    perturbable = torch.tensor([False, True, True, True, True, True])  # BOS protected
    gen = fa.perturbed_inputs(tokens, rel, perturbable, "generation", mask_token=1)
    assert gen.shape == (11, 6)
    assert torch.equal(gen[0], torch.tensor([0, 1, 1, 1, 1, 1]))  # f = 0: all masked (BOS kept)
    assert torch.equal(gen[-1], tokens)  # f = 1: restored exactly
    assert torch.equal(gen[2], torch.tensor([0, 1, 1, 1, 14, 1]))  # k = ceil(0.2 * 5) = 1: the most relevant
    prune = fa.perturbed_inputs(tokens, rel, perturbable, "pruning", mask_token=1)
    assert torch.equal(prune[0], tokens) and torch.equal(prune[2], torch.tensor([0, 1, 12, 13, 14, 15]))
    morf = fa.perturbed_inputs(tokens, rel, perturbable, "morf", mask_token=1)
    assert torch.equal(morf[2], torch.tensor([0, 11, 12, 13, 1, 15]))
    ks = [math.ceil(f * 5 - 1e-9) for f in fa.FRACTIONS.tolist()]
    assert [int((prune[i] == 1).sum()) for i in range(11)] == ks
    with pytest.raises(ValueError, match="mode"):
        fa.perturbed_inputs(tokens, rel, perturbable, "shuffle", mask_token=1)


def test_ground_truth_scores():
    rel = torch.tensor([[0.1, 2.0, -1.0, 1.0], [3.0, 0.0, 0.0, 1.0]])
    relevant = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 1]])
    s = fa.ground_truth_scores(rel, relevant)
    torch.testing.assert_close(s["mass_share"], torch.tensor([2.0 / 3.1, 0.25], dtype=torch.float64))
    torch.testing.assert_close(s["pointing"], torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.fixture(scope="module", params=["zoo", "gpt2-bridge-compat"])
def model(request, tmp_path_factory):
    """``(kind, model)``: the zoo's RoPE model, and a GPT-2 TransformerBridge in compatibility mode
    (TransformerLens 3.9 and 4.x), whose Hugging Face forward refuses a shortened last block."""
    if request.param == "zoo":
        if not lp.zoo.available():
            pytest.skip("the zoo models do not load here")
        return "zoo", lp.zoo.load("rope-repeat")[0]
    pytest.importorskip("transformer_lens.model_bridge")
    from bridges import tiny_gpt2

    _, bridge = tiny_gpt2(tmp_path_factory.mktemp("gpt2"))
    bridge.enable_compatibility_mode(disable_warnings=True)
    return "bridge", bridge


def test_protocol_end_to_end(model):
    kind, model = model
    prompts = ["c h a p k b e g", "n o p a b c", "f f a k d e l m i j"]
    result = fa.perturbation_test(model, prompts, progress=False, seed=1)
    some = ("random", "attention_rollout", "pa_lrp")
    again = fa.perturbation_test(model, prompts, methods=some, progress=False, seed=1)
    for method in some:  # deterministic
        for mode in fa.MODES:
            assert torch.equal(again.curves[method][mode]["logit"], result.curves[method][mode]["logit"])
    summary = result.summary(n_boot=200)
    assert summary == result.summary(n_boot=200)
    assert {row["method"] for row in summary} == set(fa.METHOD_NAMES)
    # at f = 1 generation sees the original input: the curve ends at the original logit
    for method in fa.METHOD_NAMES:
        torch.testing.assert_close(result.curves[method]["generation"]["logit"][:, -1], result.original_logit,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.curves[method]["pruning"]["logit"][:, 0], result.original_logit,
                                   rtol=1e-5, atol=1e-5)
    assert len(result.figure().data) == len(fa.METHOD_NAMES)
    tokens = model.to_tokens(prompts[0])
    target = torch.tensor([model.to_single_token("k")])
    maps = fa.relevance_maps(model, tokens, None, target, torch.tensor([8]))
    torch.testing.assert_close(maps["pa_lrp"], lp.explain(model, tokens, target).combined("relu").double())
    if kind != "zoo":
        return
    # the task is positional: PA-LRP must beat random at re-inserting the answer token
    metrics = result.metrics()
    assert float(metrics["pa_lrp"]["generation_auac"].mean()) > float(metrics["random"]["generation_auac"].mean())
    # ground truth: the answer sits 3 positions before the explained one
    relevant = torch.zeros(1, 9)
    relevant[0, 5] = 1
    assert float(fa.ground_truth_scores(maps["pa_lrp"], relevant)["pointing"][0]) == 1.0
