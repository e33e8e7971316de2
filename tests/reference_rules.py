"""Slow, element-by-element closed forms of every rule, written from the equations.

Nothing here uses autograd or lens_palrp: these are the oracles the fast rules are checked against.
"""

from __future__ import annotations

import torch


def uniform_matmul(a: torch.Tensor, b: torch.Tensor, r_out: torch.Tensor):
    """AttnLRP matmul rule (epsilon = 0, uniform split): ``out_ij = sum_k a_ik b_kj``;
    ``R(a_ik) = sum_j a_ik b_kj / (2 out_ij) R_ij``, same for ``b``."""
    n, k = a.shape
    m = b.shape[1]
    out = a @ b
    ra = torch.zeros_like(a)
    rb = torch.zeros_like(b)
    for i in range(n):
        for j in range(m):
            for kk in range(k):
                share = a[i, kk] * b[kk, j] / (2 * out[i, j]) * r_out[i, j]
                ra[i, kk] += share
                rb[kk, j] += share
    return ra, rb


def identity(r_out: torch.Tensor) -> torch.Tensor:
    """Identity rule: every element keeps its relevance."""
    return r_out.clone()


def gated(gate_pre, up, act, r_out, gate_share, up_share):
    """Uniform rule on ``act(gate) * up`` then identity through ``act``, element by element."""
    r_gate = torch.zeros_like(gate_pre)
    r_up = torch.zeros_like(up)
    flat = range(gate_pre.numel())
    for idx in flat:
        r_gate.view(-1)[idx] = gate_share * r_out.view(-1)[idx]
        r_up.view(-1)[idx] = up_share * r_out.view(-1)[idx]
    return r_gate, r_up


def softmax_deep_taylor(scores: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """AttnLRP softmax rule: ``R(x_i) = x_i (R_i - s_i sum_j R_j)`` for one row."""
    s = torch.softmax(scores, -1)
    total = sum(float(v) for v in r_out)
    return torch.tensor([float(scores[i]) * (float(r_out[i]) - float(s[i]) * total) for i in range(len(scores))],
                        dtype=scores.dtype)


def rotation_matrix(cos_row, sin_row, adjacent: bool, rotary_dim: int, d_head: int):
    """The block rotation R_i of Eq. 7 for one position, pass-through channels as identity."""
    R = torch.eye(d_head, dtype=cos_row.dtype)
    half = rotary_dim // 2
    for m in range(half):
        a, b = (2 * m, 2 * m + 1) if adjacent else (m, m + half)
        c, s = float(cos_row[a]), float(sin_row[a])
        R[a, a], R[a, b] = c, -s
        R[b, a], R[b, b] = s, c
    return R


def rope_entry_relevance(x, R, r_out):
    """Uniform rule on ``y = R x``: entry ``R_ab`` gets ``1/2 R_ab x_b / y_a * R(y_a)``."""
    y = R @ x
    rel = torch.zeros_like(R)
    for a in range(R.shape[0]):
        for b in range(R.shape[1]):
            if R[a, b] != 0 and y[a] != 0:
                rel[a, b] = 0.5 * R[a, b] * x[b] / y[a] * r_out[a]
    return rel


def alibi_split(bias_rel: torch.Tensor) -> torch.Tensor:
    """Eq. 16 with the conservation sign: ``R(i) = i R(P)/(i-j)``, ``R(j) = -j R(P)/(i-j)``."""
    n = bias_rel.shape[-1]
    out = torch.zeros(n, dtype=bias_rel.dtype)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            rp = float(bias_rel[i, j])
            out[i] += i * rp / (i - j)
            out[j] += -j * rp / (i - j)
    return out


def epsilon_sum(e: torch.Tensor, p: torch.Tensor, r_z: torch.Tensor, eps: float = 0.0):
    """Eq. 5: ``R(P) = P R(z) / (E + P + eps)`` (and the same for E), element-wise."""
    z = e + p + eps
    return e * r_z / z, p * r_z / z

