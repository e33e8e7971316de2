"""The RoPE strategy on its own (``lens_palrp.positional.rope``), against closed forms."""

import math

import pytest
import torch

from lens_palrp.positional import encoding_for
from lens_palrp.positional.rope import Rotary
from lens_palrp.roles import Role
from lens_palrp.rules import RotatedShare, UniformShare

from strategy_fakes import FakeSweep, family, site

B, P, H, D, RD = 2, 5, 2, 8, 6


def _tables(n_pos, rd, base=10000.0):
    freq = base ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    angle = torch.arange(n_pos, dtype=torch.float64)[:, None] * freq[None]
    angle = torch.cat([angle, angle], -1)  # half-split layout
    return angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]


def _fam():
    cos, sin = _tables(P, RD)
    fam = family(n_heads=H, rotary_dim=RD)
    fam.rotary_tables = lambda layer, n_pos, mask: (cos, sin)
    return fam, cos, sin


def test_registered_for_rotary():
    assert encoding_for("rotary") is Rotary


def test_sink_is_the_rotation_share_of_the_rotated_channels_and_tables_conserve_it():
    """Eq. 10 per head and position; Eq. 7-9: the cos and sin table parts add up to the sink summed
    over heads (each entry against an explicit rotation matrix: test_rules)."""
    torch.manual_seed(0)
    fam, cos, sin = _fam()
    sweep = FakeSweep(fam, B, P)
    strategy = Rotary(sweep)
    y = torch.randn(B, P, H, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, P, H, D, dtype=torch.float64)
    rule = RotatedShare(0.5, 0.5)
    strategy.at_site(site(Role.ROT_Q, 1, rule), y, 0.5)
    (y * g).sum().backward()
    rel = 0.5 * (y.detach() * g)  # the relevance the q side of Q K^T holds (share 0.5)
    expected = 0.5 * rel[..., :RD].sum(-1).transpose(1, 2)  # half of the rotated channels'
    torch.testing.assert_close(sweep.positional[:, 1], expected, rtol=1e-12, atol=1e-14)
    assert float(sweep.positional[:, 0].abs().max()) == 0.0
    c, s = strategy.cos[1], strategy.sin[1]
    torch.testing.assert_close(c.sum(-1) + s.sum(-1), expected.sum(1), rtol=1e-12, atol=1e-13)


def test_no_split_rule_no_sink():
    """AttnLRP's uniform rule passes everything to q and k: the strategy records nothing."""
    fam, _, _ = _fam()
    sweep = FakeSweep(fam, B, P, method="attn_lrp")
    strategy = Rotary(sweep)
    y = torch.randn(B, P, H, D, dtype=torch.float64, requires_grad=True)
    strategy.at_site(site(Role.ROT_Q, 0, UniformShare(0.5)), y, 0.5)
    y.sum().backward()
    assert float(sweep.positional.abs().max()) == 0.0 and not strategy.cos


def test_grouped_keys_are_credited_per_query_head_from_the_scores():
    """With 1 kv head read by 2 query heads, the key sink of query head h is the rotation share of
    ``k~ * dL/dk~`` restricted to head h's path through its own scores (checked by autograd on an
    explicit per-head score computation)."""
    torch.manual_seed(1)
    fam, _, _ = _fam()
    fam.attn_scale = lambda layer: math.sqrt(D)
    sweep = FakeSweep(fam, B, P, kv_grouped=True)
    strategy = Rotary(sweep)
    assert strategy.needs_score_gradient and strategy.reads() == (Role.ROT_Q, Role.ROT_K)
    q = torch.randn(B, P, H, D, dtype=torch.float64)
    k = torch.randn(B, P, 1, D, dtype=torch.float64)
    score_grad = torch.randn(B, H, P, P, dtype=torch.float64)
    sweep.captured = {(Role.ROT_Q, 0): q, (Role.ROT_K, 0): k}
    strategy.at_scores(0, score_grad)
    for h in range(H):  # autograd: the gradient reaching k through head h's scores only
        kh = k[:, :, 0].clone().requires_grad_(True)
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], kh) / math.sqrt(D)
        (scores * score_grad[:, h]).sum().backward()
        expected = 0.5 * (kh.detach() * 0.5 * kh.grad)[..., :RD].sum(-1)  # rotation half of the 1/2 share
        torch.testing.assert_close(sweep.positional[:, 0, h], expected, rtol=1e-12, atol=1e-14)


def test_relu_and_abs_reductions_per_layer():
    """``relu``: positive parts of every cos and sin entry; ``abs``: |sum cos| + |sum sin|."""
    fam, _, _ = _fam()
    strategy = Rotary(FakeSweep(fam, B, P))
    c = torch.tensor([[[1.0, -2.0], [0.5, 0.5]]], dtype=torch.float64)
    s = torch.tensor([[[-1.0, 3.0], [-0.5, -0.25]]], dtype=torch.float64)
    strategy.cos, strategy.sin = {1: c}, {1: s}
    positive, absolute = strategy.layer_reductions(torch.zeros(1, 2, H, 2, dtype=torch.float64))
    torch.testing.assert_close(positive[0, 1], torch.tensor([4.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(absolute[0, 1], torch.tensor([1.0 + 2.0, 1.0 + 0.75], dtype=torch.float64))
    assert float(positive[:, 0].abs().max()) == 0.0
