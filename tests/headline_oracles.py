"""Independent recomputations of the headline maps from recorded relevances, shared by the
HookedTransformer and the bridge versions of the headline-map tests."""

from __future__ import annotations

import torch


def mixed_signs(x):
    assert float(x.max()) > 1e-6 and float(x.min()) < -1e-6, "the check needs entries of both signs"


def alibi_positions(rp):
    """Eq. 16 written out: ``rp[..., i, j] = R(P_ij)``; query ``i`` gets ``i R / (i - j)``, key ``j``
    gets ``-j R / (i - j)`` (j < i). Returns ``[..., pos]``."""
    n = rp.shape[-1]
    i = torch.arange(n, dtype=rp.dtype)[:, None]
    j = torch.arange(n, dtype=rp.dtype)[None, :]
    w = torch.where(i > j, 1.0 / torch.where(i > j, i - j, 1.0), 0.0)
    return (i * w * rp).sum(-1) + (-j * w * rp).sum(-2)


def alibi_reductions(attr, cache, names, n_heads, assert_close):
    """Per layer: the ALiBi sink from the recorded score relevance (``R(s) / s`` is the score
    gradient) and the canonical bias ``m_h (j - i)`` with slopes ``2^(-8 h / H)``, checked against
    ``attr.positional``; returns the Eq. 11 ``relu`` (of each layer's head-summed map), ``abs``, and
    the wrong per-head ``relu`` that a check must tell apart. ``[batch, pos]`` each."""
    batch, n = attr.semantic.shape
    pos = torch.arange(n, dtype=torch.float64)
    slopes = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float64) / n_heads)
    bias = slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])  # [heads, query, key]
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    relu = torch.zeros(batch, n, dtype=torch.float64)
    absolute, per_head_relu = torch.zeros_like(relu), torch.zeros_like(relu)
    for layer, name in enumerate(names):
        scores = cache[name].double()
        ok = visible & (scores != 0)
        grad = torch.where(ok, attr.hooks[name] / torch.where(ok, scores, 1.0), 0.0)
        per_head = alibi_positions(bias * grad)  # [batch, heads, pos]
        assert_close(attr.positional[:, layer], per_head)
        summed = per_head.sum(1)
        mixed_signs(summed)
        relu += summed.clamp(min=0)
        absolute += summed.abs()
        per_head_relu += per_head.clamp(min=0).sum(1)
    return relu, absolute, per_head_relu
