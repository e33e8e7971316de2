"""The input-table and shortformer strategies on their own, and the strategy registry."""

import pytest
import torch

from lens_palrp.positional import ENCODINGS, PositionalEncoding, encoding_for, register_encoding
from lens_palrp.positional.input_table import InputTable
from lens_palrp.positional.shortformer import Shortformer
from lens_palrp.roles import Role

from strategy_fakes import FakeSweep, family, site

B, P, H, DM, DH = 2, 4, 2, 6, 3


def test_every_transformer_lens_encoding_has_a_strategy():
    assert {"standard", "shortformer", "rotary", "alibi", "relative_positional_bias"} <= set(ENCODINGS)
    with pytest.raises(NotImplementedError, match="'xpos' has no PA-LRP strategy; supported"):
        encoding_for("xpos")


def test_registering_a_second_strategy_for_one_encoding_is_refused():
    class Other(PositionalEncoding):
        pass

    with pytest.raises(ValueError, match="'rotary' is handled by Rotary"):
        register_encoding("rotary")(Other)


def test_input_table_sums_signed_and_positive_channels():
    """Eq. 11 at the input: relu takes each channel's positive part before summing (a sign that
    cancels across channels must still count)."""
    strategy = InputTable(FakeSweep(family(), 1, 2))
    r = torch.tensor([[[2.0, -3.0], [-1.0, -1.0]]], dtype=torch.float64)
    signed, positive = strategy.input_sums({Role.POS_EMBED: r})
    torch.testing.assert_close(signed, torch.tensor([[-1.0, -2.0]], dtype=torch.float64))
    torch.testing.assert_close(positive, torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    assert strategy.input_sums({}) is None


def test_shortformer_sink_is_the_position_tables_share_of_the_query_input():
    """Epsilon rule on ``x + P`` feeding ``q = (x + P) W_Q``: R(P) = P * dL/dP through this
    projection, per head (autograd on the explicit projection as the oracle)."""
    torch.manual_seed(0)
    W_Q, W_K = torch.randn(H, DM, DH, dtype=torch.float64), torch.randn(H, DM, DH, dtype=torch.float64)
    fam = family(n_heads=H)
    fam.shortformer_projections = lambda layer: (W_Q, W_K)
    sweep = FakeSweep(fam, B, P)
    pos = torch.randn(B, P, DM, dtype=torch.float64)
    sweep.leaves[Role.POS_EMBED] = pos
    strategy = Shortformer(sweep)
    q = torch.randn(B, P, H, DH, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, P, H, DH, dtype=torch.float64)
    strategy.at_site(site(Role.Q, 1), q, 0.5)
    (q * g).sum().backward()
    for h in range(H):
        p = pos.clone().requires_grad_(True)
        (torch.einsum("bpd,de->bpe", p, W_Q[h]) * 0.5 * g[:, :, h]).sum().backward()
        torch.testing.assert_close(sweep.positional[:, 1, h], (pos * p.grad).sum(-1), rtol=1e-12, atol=1e-14)
    dims = strategy.dims[1]
    torch.testing.assert_close(dims.sum(-1), sweep.positional[:, 1].sum(1), rtol=1e-12, atol=1e-13)
    positive, absolute = strategy.layer_reductions(sweep.positional)
    torch.testing.assert_close(positive[:, 1], dims.clamp(min=0).sum(-1))
    assert float(positive[:, 0].abs().max()) == 0.0 and float(absolute[:, 0].abs().max()) == 0.0


def test_shortformer_ignores_an_explained_query():
    """At an at_hook target the query is not consumed by Q K^T: no sink is attached."""
    fam = family(n_heads=H)
    sweep = FakeSweep(fam, B, P)
    strategy = Shortformer(sweep)
    q = torch.randn(B, P, H, DH, dtype=torch.float64, requires_grad=True)
    strategy.at_site(site(Role.Q, 0, consumer=False), q, 1.0)
    q.sum().backward()
    assert not strategy.dims
