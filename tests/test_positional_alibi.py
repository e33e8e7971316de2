"""The ALiBi strategy on its own (``lens_palrp.positional.alibi``), against the closed form."""

import torch

from lens_palrp.positional import encoding_for
from lens_palrp.positional.alibi import Alibi

from reference_rules import alibi_split
from strategy_fakes import FakeSweep, family

B, P, H = 2, 5, 3


def _bias(n):
    i = torch.arange(n, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    return slopes[:, None, None] * (i[None, None, :] - i[None, :, None])  # m_h (j - i)


def test_registered_for_alibi_and_asks_for_score_gradients():
    assert encoding_for("alibi") is Alibi and Alibi.needs_score_gradient


def test_sink_is_eq16_split_of_bias_times_score_gradient():
    """Eq. 15: R(bias) = bias * dL/dscores; Eq. 16 splits it over query and key positions (the
    element-by-element oracle); the positions' shares add up to R(bias) per head."""
    torch.manual_seed(0)
    fam = family(n_heads=H)
    fam.alibi_bias = lambda layer, n_pos: _bias(n_pos)
    sweep = FakeSweep(fam, B, P)
    strategy = Alibi(sweep)
    score_grad = torch.randn(B, H, P, P, dtype=torch.float64).tril()
    strategy.at_scores(1, score_grad)
    bias_rel = _bias(P)[None] * score_grad
    for b in range(B):
        for h in range(H):
            torch.testing.assert_close(sweep.positional[b, 1, h], alibi_split(bias_rel[b, h]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sweep.positional[:, 1].sum(-1), bias_rel.sum((-1, -2)), rtol=1e-12, atol=1e-13)
    assert float(sweep.positional[:, 0].abs().max()) == 0.0


def test_relu_and_abs_take_each_layers_head_summed_sink():
    """One bias per layer: the per-position table is the head-summed sink; relu keeps its
    positive part, abs its magnitude (a head-level sign must not survive the head sum)."""
    strategy = Alibi(FakeSweep(family(n_heads=2), 1, 2))
    positional = torch.tensor([[[[1.0, -3.0], [-2.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    positive, absolute = strategy.layer_reductions(positional)
    torch.testing.assert_close(positive[0, 0], torch.tensor([0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(absolute[0, 0], torch.tensor([1.0, 2.0], dtype=torch.float64))
