"""Activation patching and relevance patching on one pair: on the zoo model and on tiny
TransformerBridges in both hook namings (TransformerLens 3.9 and 4.x). What they check holds for
any model; ``tests/test_analyses_bridge.py`` checks the bridges' numbers against patching the
Hugging Face modules by hand, ``tests/test_patching_sets.py`` the sets of pairs and statistics."""

import math
import warnings

import pytest
import torch

import lens_palrp as lp
from lens_palrp import analyses as an
from tolerances import meeting_dtype, rounding

CLEAN, CORRUPTED = "c h a p k b e g", "c h a p n b e g"  # the zoo's answer (3 back) is k, then n


@pytest.fixture(scope="module", params=["zoo", "llama-bridge", "gpt2-bridge-compat"])
def setup(request, tmp_path_factory):
    if request.param == "zoo":
        if not lp.zoo.available():
            pytest.skip("the zoo models do not load here")
        model, _ = lp.zoo.load("rope-repeat")
        model = model.to(torch.float64)
        model.cfg.dtype = torch.float64
    else:
        pytest.importorskip("transformer_lens.model_bridge")
        from bridges import tiny_gpt2, tiny_llama

        make = tiny_llama if request.param.startswith("llama") else tiny_gpt2
        _, model = make(tmp_path_factory.mktemp(request.param))
        if request.param.endswith("compat"):
            model.enable_compatibility_mode(disable_warnings=True)
    k, n = model.to_single_token("k"), model.to_single_token("n")
    metric = lambda logits: logits[:, -1, k] - logits[:, -1, n]
    return model, metric


def test_correlation_helpers():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert an.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert an.spearman(a, a**3) == pytest.approx(1.0)
    assert an.spearman(a, -a) == pytest.approx(-1.0)
    assert an.spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([3.0, 3.0, 5.0])) == pytest.approx(1.0)
    # by hand: x = 0, 1, 2 and y = 0, 1, 4 give r = 4 / sqrt(2 * 78 / 9) = 6 / sqrt(39); their
    # ranks agree exactly (Spearman 1): the two are not swapped
    x, y = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 1.0, 4.0])
    assert an.pearson(x, y) == pytest.approx(6 / math.sqrt(39), rel=1e-12)
    assert an.spearman(x, y) == pytest.approx(1.0)
    # ties share their mean rank: ranks 1, 2.5, 2.5, 4 against 1, 3, 2, 4 correlate at
    # 4.5 / sqrt(4.5 * 5) (ordinal ranks 1, 2, 3, 4 would give 0.8)
    ties = an.spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0]))
    assert ties == pytest.approx(4.5 / math.sqrt(4.5 * 5), rel=1e-12)
    # grids flatten; a constant grid (no component moved the metric) has no correlation
    assert an.spearman(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 3.0], [2.0, 4.0]])) == pytest.approx(0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(an.pearson(torch.ones(4), a)) and math.isnan(an.spearman(a, torch.zeros(4)))
        assert math.isnan(an.pearson(torch.ones(1), torch.ones(1)))
    assert isinstance(an.pearson(a, a), float) and isinstance(an.spearman(a, a), float)


def test_patching_the_only_changed_position_restores_the_clean_metric(setup):
    model, metric = setup
    cmp = an.compare_with_patching(model, CLEAN, CORRUPTED, metric)
    with torch.no_grad():
        clean_logits = model(model.to_tokens(CLEAN))
        full = float(metric(clean_logits) - metric(model(model.to_tokens(CORRUPTED))))
    patched = cmp.patching
    assert patched.resid.dtype == torch.float64 and tuple(patched.resid.shape) == (1, 2, 9)
    assert float(patched.resid[0, 0, 5]) == pytest.approx(full, rel=1e-9)
    # Unchanged positions (and head outputs before the changed position) are the same in both
    # runs: patching them does nothing, but the patched forward (a batch of every unit) and the
    # corrupted one (a batch of 1) round differently, so "nothing" is zero to the rounding of
    # logits of this size (a wrong position or pair would move it by about |full|).
    tol = rounding(meeting_dtype(model), clean_logits[:, -1].abs().max())
    assert float(patched.resid[0, 0, :5].abs().max()) <= tol
    assert float(patched.clean_metric[0] - patched.corrupted_metric[0]) == pytest.approx(full, rel=1e-12)
    assert float(patched.head_pos[0, :, :, :5].abs().max()) <= tol
    frame = cmp.to_frame()
    assert set(frame["source"]) == {"patching", "pa_lrp", "attn_lrp"}
    agreement = cmp.agreement()
    assert set(agreement["method"]) == {"pa_lrp", "attn_lrp"} and (agreement["n_pairs"] == 1).all()
    assert agreement["value"].dropna().between(-1, 1).all()
    torch.testing.assert_close(cmp.scores["pa_lrp"]["heads"], lp.explain(model, CLEAN, lambda x: metric(x)).heads.double())
    fig = cmp.figure("pa_lrp")
    assert len(fig.data) == 2 * len(cmp.components) and "pa_lrp" in fig.layout.title.text


def test_gradient_estimate_is_attribution_patching(setup):
    """method 'grad' must equal (clean - corrupted) . dmetric/dz on the corrupted run, computed
    here with plain autograd through TransformerLens hooks."""
    model, metric = setup
    rp = an.relevance_patching(model, CLEAN, CORRUPTED, metric, methods=("grad", "pa_lrp"))
    assert rp.patching is None  # estimates only: no activation patching ran
    corr = model.to_tokens(CORRUPTED)
    _, clean_cache = model.run_with_cache(model.to_tokens(CLEAN))
    acts = {}

    def keeper(name):  # keyed by the name asked for: a bridge's hook.name may be its own
        def keep(act, hook):
            act.retain_grad()
            acts[name] = act
            return act
        return keep

    names = [f"blocks.{l}.attn.hook_z" for l in range(2)]
    model.zero_grad(set_to_none=True)
    with model.hooks(fwd_hooks=[(n, keeper(n)) for n in names]):
        metric(model(corr)).sum().backward()
    expected = torch.stack([((clean_cache[n] - acts[n].detach()) * acts[n].grad).sum((0, 1, 3)) for n in names])
    model.zero_grad(set_to_none=True)
    # a bridge's own eager softmax runs in float32 even in a float64 model; the sweep's fused
    # attention runs in the model's dtype: the two gradients agree to float32 rounding there
    tight = not lp.hooks.transformer_bridge.is_transformer_bridge(model)
    got = rp.scores["grad"]["heads"][0]
    torch.testing.assert_close(got, expected.double(), rtol=1e-8 if tight else 1e-5,
                               atol=1e-10 if tight else 1e-6 * float(expected.abs().max()))
    assert not torch.allclose(rp.scores["pa_lrp"]["heads"][0], expected.double())  # the rules change the gradient
    with pytest.raises(ValueError, match="needs activation patching"):
        rp.agreement()


def test_inputs_must_align(setup):
    model, metric = setup
    with pytest.raises(ValueError, match="pair 0: clean has 9 tokens and corrupted 4"):
        an.compare_with_patching(model, CLEAN, "c h a", metric)
