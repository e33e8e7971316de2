"""The relative-bias strategy on its own (``lens_palrp.positional.relative_bias``), against the
element-by-element closed form: the sink of key ``j`` in head ``h`` is ``sum_i b_h(i, j) dL/ds_hij``."""

import torch

from lens_palrp.positional import encoding_for
from lens_palrp.positional.relative_bias import RelativeBias

from strategy_fakes import FakeSweep, family

B, H, N_ENC, N_DEC = 2, 3, 4, 3


def _family():
    torch.manual_seed(0)
    fam = family(n_layers=3, n_heads=H)  # encoder self, decoder self, cross
    biases = {0: torch.randn(H, N_ENC, N_ENC, dtype=torch.float64),
              1: torch.randn(H, N_DEC, N_DEC, dtype=torch.float64), 2: None}
    keys = {0: slice(0, N_ENC), 1: slice(N_ENC, N_ENC + N_DEC), 2: slice(0, N_ENC)}
    fam.relative_bias = lambda layer: biases[layer]
    fam.key_positions = lambda layer: keys[layer]
    return fam, biases


def test_registered_under_the_bridges_pe_name_and_asks_for_score_gradients():
    assert encoding_for("relative_positional_bias") is RelativeBias and RelativeBias.needs_score_gradient


def test_sink_per_key_is_bias_times_score_gradient_summed_over_queries():
    fam, biases = _family()
    sweep = FakeSweep(fam, B, N_ENC + N_DEC)
    strategy = RelativeBias(sweep)
    grads = {0: torch.randn(B, H, N_ENC, N_ENC, dtype=torch.float64),
             1: torch.randn(B, H, N_DEC, N_DEC, dtype=torch.float64).tril(),
             2: torch.randn(B, H, N_DEC, N_ENC, dtype=torch.float64)}
    for layer, g in grads.items():
        strategy.at_scores(layer, g)
    for layer, keys in ((0, range(0, N_ENC)), (1, range(N_ENC, N_ENC + N_DEC))):
        for b in range(B):
            for h in range(H):
                for col, j in enumerate(keys):
                    expected = sum(float(biases[layer][h, i, col] * grads[layer][b, h, i, col])
                                   for i in range(grads[layer].shape[2]))
                    assert abs(float(sweep.positional[b, layer, h, j]) - expected) < 1e-12
    assert float(sweep.positional[:, 0, :, N_ENC:].abs().sum()) == 0.0  # an encoder layer's keys only
    assert float(sweep.positional[:, 1, :, :N_ENC].abs().sum()) == 0.0
    assert float(sweep.positional[:, 2].abs().sum()) == 0.0  # cross-attention has no bias


def test_relu_and_abs_take_each_layers_head_summed_sink():
    strategy = RelativeBias(FakeSweep(family(n_heads=2), 1, 2))
    positional = torch.tensor([[[[1.0, -3.0], [-2.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    positive, absolute = strategy.layer_reductions(positional)
    torch.testing.assert_close(positive[0, 0], torch.tensor([0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(absolute[0, 0], torch.tensor([1.0, 2.0], dtype=torch.float64))
