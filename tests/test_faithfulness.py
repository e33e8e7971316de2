"""The perturbation protocol (docs/evaluation.md) and ground-truth scores."""

import math

import pytest
import torch

import lens_palrp as lp
from lens_palrp.analyses import faithfulness as fa
from lens_palrp.analyses import vision


def test_trapezoid_areas_by_hand():
    f = fa.FRACTIONS
    assert float(fa.trapezoid(torch.ones(11))) == pytest.approx(1.0)
    assert float(fa.trapezoid(f)) == pytest.approx(0.5)
    # a kink between grid points: the trapezoid of (0, 0), (0.5, 1), (1, 0) is 0.5, and on the
    # 11-point grid the curve |f - 0.3| has area 0.3^2 / 2 + 0.7^2 / 2 = 0.29 exactly
    assert float(fa.trapezoid(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.5, 1.0]))) == pytest.approx(0.5)
    assert float(fa.trapezoid((f - 0.3).abs())) == pytest.approx(0.29)
    # batched over leading dims, uneven spacing
    x = torch.tensor([0.0, 0.1, 0.4, 1.0], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 0.0]])
    torch.testing.assert_close(fa.trapezoid(y, x), torch.tensor([1.0, 0.1 + 0.6 + 0.6], dtype=torch.float64))


def test_vision_area_is_the_mean_over_0_to_0_9_in_percent():
    # 1 - f on [0, 0.9]: (0.9 - 0.9^2 / 2) / 0.9 = 0.55; a constant 0.25 stays 25%
    curve = torch.stack([1 - vision.VISION_FRACTIONS, torch.full((10,), 0.25, dtype=torch.float64)])
    metrics = vision.VisionPerturbationResult({"m": {"positive": {"accuracy": curve}}}).metrics()
    torch.testing.assert_close(metrics["m"]["positive_accuracy_auc"], torch.tensor([55.0, 25.0], dtype=torch.float64))


def test_bootstrap_interval_of_the_mean():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(400, generator=g, dtype=torch.float64) * 2 + 5
    mean, low, high = fa.bootstrap_mean(values, seed=3)
    assert mean == float(values.mean())
    # a 95% interval of the mean: about mean -+ 1.96 s / sqrt(n) (a 90% or 68% one, or one of
    # the values instead of their mean, is far off)
    half = 1.96 * float(values.std()) / math.sqrt(len(values))
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert fa.bootstrap_mean(values, seed=3) == (mean, low, high)  # seeded
    assert fa.bootstrap_mean(values, seed=4)[1:] != (low, high)  # by the seed given
    # every value equal (pointing is often 1 on every sample): the interval is that value, not NaN
    assert fa.bootstrap_mean(torch.ones(50)) == (1.0, 1.0, 1.0)
    assert fa.bootstrap_mean(torch.tensor([2.5])) == (2.5, 2.5, 2.5)


def test_paired_difference_resamples_pairs_together():
    # two methods on the same 200 samples: the samples vary a lot, the difference little
    g = torch.Generator().manual_seed(1)
    base = torch.randn(200, generator=g, dtype=torch.float64) * 10
    a, b = base + 0.5 + 0.1 * torch.randn(200, generator=g, dtype=torch.float64), base
    mean, low, high = fa.paired_difference(a, b, seed=0)
    assert mean == float((a - b).mean())
    assert low < mean < high and low > 0.45 and high < 0.55  # sd of a - b is 0.1: +-0.014
    # resampled independently the interval would be about +-2 (sd 10, two samples): not paired
    unpaired = fa.bootstrap_mean(a, seed=0)[2] - fa.bootstrap_mean(a, seed=0)[1]
    assert unpaired > 50 * (high - low)
    assert fa.paired_difference(b, a, seed=0)[0] == -mean  # a minus b, not b minus a
    assert fa.paired_difference(a + 1, a) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        fa.paired_difference(a, b[:10])


# ------------------------------------------------------------------------------- the shared loop
def _counting_protocol(modes, count=fa.ceil_steps, fractions=fa.FRACTIONS, steps_per_forward=None, calls=None):
    """A "model" whose score is known in closed form: the sum of the values left in, per row
    (removed positions are zeroed)."""

    def remove(unit, removed):
        return torch.where(removed, 0.0, unit.data)[None]

    def score(unit, inputs):
        if calls is not None:
            calls.append(inputs.shape[0])
        return {"kept": inputs.sum(-1)}

    return fa.Perturbation(modes, fractions, count, remove, score, ("kept",), steps_per_forward)


def test_shared_loop_on_a_model_known_in_closed_form():
    values = torch.tensor([[100.0, 1.0, 8.0, 2.0, 4.0, 16.0], [100.0, 32.0, 64.0, 0.0, 0.0, 0.0]])
    perturbable = torch.tensor([[False, True, True, True, True, True], [False, True, True, False, False, False]])
    units = [fa.Unit(i, {"by_value": values[i], "reversed": -values[i]}, perturbable[i], values[i]) for i in range(2)]
    modes = {"gen": "generation", "prune": "pruning", "morf": "morf"}
    calls = []
    curves = fa.perturbation_curves(_counting_protocol(modes, calls=calls), units, ["by_value", "reversed"], 2)
    assert calls == [33, 33, 33, 33]  # one forward per unit and map: 3 modes x 11 steps
    k5 = [math.ceil(f * 5 - 1e-9) for f in fa.FRACTIONS.tolist()]  # 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5
    k2 = [math.ceil(f * 2 - 1e-9) for f in fa.FRACTIONS.tolist()]  # 0, 1, 1, 1, 1, 1, 2, 2, ...
    desc = [16.0, 8.0, 4.0, 2.0, 1.0]  # row 0's perturbable values, most relevant first

    def expected(row_values, ks, keep_first, first_is_largest, protected):
        order = sorted(row_values, reverse=first_is_largest)
        if keep_first:  # generation: the k first are back in, the rest of the perturbable removed
            return [protected + sum(order[:k]) for k in ks]
        return [protected + sum(row_values) - sum(order[:k]) for k in ks]

    row0 = {"gen": expected(desc, k5, True, True, 100), "prune": expected(desc, k5, False, False, 100),
            "morf": expected(desc, k5, False, True, 100)}
    row1 = {"gen": expected([32.0, 64.0], k2, True, True, 100), "prune": expected([32.0, 64.0], k2, False, False, 100),
            "morf": expected([32.0, 64.0], k2, False, True, 100)}
    for mode in modes:
        assert curves["by_value"][mode]["kept"][0].tolist() == row0[mode], mode
        assert curves["by_value"][mode]["kept"][1].tolist() == row1[mode], mode
    # the reversed map turns generation into keeping the smallest first and morf into pruning
    assert curves["reversed"]["morf"]["kept"][0].tolist() == row0["prune"]
    assert curves["reversed"]["gen"]["kept"][0].tolist() == expected(desc, k5, True, False, 100)
    assert curves["by_value"]["gen"]["kept"][0, -1] == values[0].sum()  # f = 1 restores the input
    # the same curves one step per forward
    calls = []
    again = fa.perturbation_curves(_counting_protocol(modes, steps_per_forward=4, calls=calls), units,
                                   ["by_value", "reversed"], 2)
    assert calls == ([4] * 8 + [1]) * 4
    for m in again:
        for mode in modes:
            assert torch.equal(again[m][mode]["kept"], curves[m][mode]["kept"])


def test_shared_loop_ties_keep_position_order():
    values = torch.tensor([0.0, 3.0, 5.0, 7.0])
    units = [fa.Unit(0, {"flat": torch.zeros(4)}, torch.ones(4, dtype=torch.bool), values)]
    fractions = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    curves = fa.perturbation_curves(_counting_protocol({"m": "morf", "p": "pruning"}, fractions=fractions), units,
                                    ["flat"], 1)
    # every relevance equal: both orders remove positions 0, 1, 2, 3 in turn
    assert curves["flat"]["m"]["kept"][0].tolist() == [15.0, 15.0, 12.0, 0.0]
    assert curves["flat"]["p"]["kept"][0].tolist() == [15.0, 15.0, 12.0, 0.0]


def test_vision_protocol_on_a_model_known_in_closed_form():
    """Two classes, logit 0 = the sum of the pixels of channel 0, logit 1 = 6: removing pixels
    (to 0) moves the probability of class 0 as ``sigmoid(left - 6)``."""

    class PixelSum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor(6.0))

        def forward(self, x):
            left = x[:, 0].sum((1, 2))
            return torch.stack([left, self.bias.expand_as(left)], -1)

    images = torch.ones(2, 3, 3, 3)  # 9 pixels each
    images[1] *= 2
    labels = torch.tensor([0, 0])
    pixel_map = torch.arange(9.0).reshape(1, 3, 3).expand(2, 3, 3)
    result = vision.vision_perturbation_test(PixelSum(), images, labels, {"map": pixel_map})
    ks = [round(f * 9) for f in vision.VISION_FRACTIONS.tolist()]  # 0, 1, 2, 3, 4, 4, 5, 6, 7, 8
    for order in ("positive", "negative"):  # the same count either way: every pixel is 1 (or 2)
        left = torch.tensor([[9.0 - k for k in ks], [2 * (9.0 - k) for k in ks]], dtype=torch.float64)
        torch.testing.assert_close(result.curves["map"][order]["prob"], torch.sigmoid(left - 6))
        torch.testing.assert_close(result.curves["map"][order]["accuracy"], (left >= 6).double())  # ties: class 0
    # a map that puts the pixels of one image in a known order: positive removes the largest first
    weighted = images.clone()
    weighted[:, 0] = torch.arange(9.0).reshape(3, 3)  # channel 0 holds 0..8
    result = vision.vision_perturbation_test(PixelSum(), weighted, labels, {"map": pixel_map})
    left_pos = [36.0 - sum(range(8, 8 - k, -1)) for k in ks]
    left_neg = [36.0 - sum(range(k)) for k in ks]
    torch.testing.assert_close(result.curves["map"]["positive"]["prob"][0],
                               torch.sigmoid(torch.tensor(left_pos, dtype=torch.float64) - 6))
    torch.testing.assert_close(result.curves["map"]["negative"]["prob"][0],
                               torch.sigmoid(torch.tensor(left_neg, dtype=torch.float64) - 6))


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
