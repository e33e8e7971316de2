"""LRP rules as small pure functions.

Every rule here is realized as *gradient x input with a patched backward*: the forward value of a
node is left bit-identical, only the gradient that flows through it changes, so that
``R(x) = x * dy/dx`` read at any node equals the rule's relevance. The functions fall in two groups:

* gradient patches used during the hooked forward (``scale_grad``, ``linearized``,
  ``identity_rule_ratio``, ``gated_product``);
* closed-form reductions used on (activation, gradient) pairs during the sweep
  (``rope_table_relevance``, ``alibi_position_relevance``, ``softmax_input_relevance``, ...).

Each has a slow element-wise reference in ``tests/reference_rules.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Factor = Union[float, Tensor]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient multiplied by a constant (or broadcastable tensor)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: Factor) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: Factor) -> Tensor:
    """Same value as ``x``; the gradient flowing back into ``x`` is multiplied by ``factor``.

    This is the uniform rule for a product seen from one factor: with ``factor=0.5`` the factor
    receives half the relevance of the product.
    """
    if isinstance(factor, (int, float)) and factor == 1:
        return x
    return _ScaleGrad.apply(x, factor)


class _Linearized(torch.autograd.Function):
    """Forward returns ``value``; backward sends ``grad * weight_i`` to ``input_i``."""

    @staticmethod
    def forward(ctx, value: Tensor, *inputs_and_weights: Tensor) -> Tensor:
        weights = inputs_and_weights[1::2]
        ctx.save_for_backward(*weights)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grads = [None]
        for weight in ctx.saved_tensors:
            grads.extend([grad * weight, None])
        return tuple(grads)


def linearized(value: Tensor, inputs: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """A node whose forward value is ``value`` and whose local Jacobian is ``diag(weight_i)``.

    Used to replace a non-linear node ``value = f(inputs)`` by the linear map an LRP rule
    prescribes, without recomputing or changing the value.
    """
    args = []
    for x, w in zip(inputs, weights):
        args.extend([x, w.detach()])
    return _Linearized.apply(value.detach(), *args)


def identity_rule_ratio(x: Tensor, fx: Tensor) -> Tensor:
    """Gradient of the identity rule ``R(x) = R(f(x))``: ``f(x) / x`` (0 where ``x == 0``).

    Where ``x == 0`` the input relevance ``x * grad`` is 0 whatever the ratio, so no epsilon is
    needed and the rule is exact element-wise for every ``f`` with ``f(0) = 0``.
    """
    return torch.where(x == 0, 0.0, fx / x)  # 0/0 -> NaN is discarded by the where


def identity_rule(x: Tensor, fx: Tensor) -> Tensor:
    """Element-wise non-linearity under the identity rule: value ``fx``, relevance passes 1:1."""
    return linearized(fx, [x], [identity_rule_ratio(x.detach(), fx.detach())])


def gated_product(
    gate_pre: Tensor,
    gate_act: Tensor,
    up: Tensor,
    value: Tensor,
    gate_share: float,
    up_share: float,
    edited: bool = False,
) -> Tensor:
    """``value = act(gate_pre) * up (+ bias)`` under the uniform product rule.

    ``gate_share`` / ``up_share`` are the parts of the product's relevance each factor gets
    (AttnLRP: 1/2 and 1/2; CP-LRP: 0 and 1, the gate treated as a constant). The activation on the
    gate side follows the identity rule, so ``gate_pre`` receives exactly the gate's share.

    ``edited``: ``value`` is what a hook of the caller's made of the product (a scaled or ablated
    neuron), not the product itself. The edit is taken as the element-wise factor ``value /
    product`` (0 where the product is 0: what a hook put there from nothing is a constant, absorbed
    as a bias is), so the factors share the relevance of the value that flows on, not of the
    product the hook replaced."""
    gate_pre_d, gate_act_d, up_d = gate_pre.detach(), gate_act.detach(), up.detach()
    edit = identity_rule_ratio(gate_act_d * up_d, value.detach()) if edited else 1.0
    inputs, weights = [], []
    if gate_share:
        inputs.append(gate_pre)
        weights.append(gate_share * up_d * identity_rule_ratio(gate_pre_d, gate_act_d) * edit)
    if up_share:
        inputs.append(up)
        weights.append(up_share * gate_act_d * edit)
    return linearized(value, inputs, weights)


def rotate_every_two(x: Tensor, adjacent_pairs: bool) -> Tensor:
    """The ``J`` of RoPE: maps each rotated pair ``(a, b)`` to ``(-b, a)``, in either layout."""
    if adjacent_pairs:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([-b, a], dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_table_relevance(
    rotated: Tensor,
    grad: Tensor,
    cos: Tensor,
    sin: Tensor,
    adjacent_pairs: bool,
    head_dim: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Relevance of the cos and sin entries of the RoPE rotation ``R`` (Eq. 7-10).

    ``rotated = x * cos + J(x) * sin`` is a sum of products of content ``x`` and table entries;
    the per-term relevance ``term * grad`` is returned for the cos and the sin terms (same shape as
    ``rotated``, or summed over ``head_dim`` when the heads share one table). Their sum is
    ``rotated * grad``. The caller applies the uniform-rule share. The content ``x`` is recovered
    by the inverse rotation, ``x = (y cos - J(y) sin) / (cos^2 + sin^2)``, exact because both
    entries of a pair share one angle.
    """
    norm = cos * cos + sin * sin
    x = (rotated * cos - rotate_every_two(rotated, adjacent_pairs) * sin) / norm
    on_cos, on_sin = x * grad, rotate_every_two(x, adjacent_pairs) * grad
    if head_dim is not None:
        on_cos, on_sin = on_cos.sum(head_dim), on_sin.sum(head_dim)
        cos, sin = cos.squeeze(head_dim), sin.squeeze(head_dim)
    return on_cos * cos, on_sin * sin


def alibi_split_weights(n_pos: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """Weights of Eq. 16 with the conservation-correct sign.

    ``P_ij = m (j - i)`` is split over the query position ``i`` and the key position ``j`` by the
    epsilon rule on ``i + (-j)``: ``R(i) = i R(P) / (i - j)``, ``R(j) = -j R(P) / (i - j)``. The
    two shares sum to ``R(P)``. Where ``i == j`` the bias is 0 and both weights are 0.
    Positions count from 0, as TransformerLens builds the bias.
    """
    i = torch.arange(n_pos, dtype=dtype, device=device)[:, None]
    j = torch.arange(n_pos, dtype=dtype, device=device)[None, :]
    diff = i - j
    safe = torch.where(diff == 0, torch.ones_like(diff), diff)
    to_query = torch.where(diff == 0, torch.zeros_like(diff), i / safe)
    to_key = torch.where(diff == 0, torch.zeros_like(diff), -j / safe)
    return to_query, to_key


def alibi_position_relevance(bias_relevance: Tensor) -> Tensor:
    """Per-position relevance ``[..., pos]`` from the ALiBi bias relevance ``[..., query, key]``."""
    n_pos = bias_relevance.shape[-1]
    to_query, to_key = alibi_split_weights(n_pos, bias_relevance.dtype, bias_relevance.device)
    return (bias_relevance * to_query).sum(-1) + (bias_relevance * to_key).sum(-2)


def softmax_output_relevance(pattern: Tensor, grad: Tensor) -> Tensor:
    """Relevance leaving a softmax per row, ``R_out = sum_j p_j g_j`` ``[..., query]``, from its
    output ``p`` and the gradient ``g`` the output passes on."""
    return (pattern * grad).sum(-1)


def softmax_input_relevance(pattern: Tensor, score_grad: Tensor, sink_logit: Optional[Tensor] = None) -> Tensor:
    """Relevance entering a softmax per row under the deep Taylor rule with bias, ``R_in = sum_j
    s_j dy/ds_j`` ``[..., query]``, from its output ``p`` and the gradient autograd computed at its
    input ``s`` (``p_j (g_j - <p, g>)``). The scores are not needed, so none is kept for the
    backward: inside a row ``s_j = log p_j + c``, and ``sum_j dy/ds_j`` is 0 for a plain softmax,
    so ``R_in = sum_j dy/ds_j log p_j`` (a masked key has ``p = 0`` and a gradient of exactly 0:
    it contributes 0). Where a learned sink logit joins the softmax (GPT-OSS), ``c = sink_logit -
    log p_sink`` and ``sum_j dy/ds_j = <p, g> p_sink`` do not vanish: ``R_in`` gains ``c sum_j
    dy/ds_j``; the sink's own share is absorbed, as a bias's is. ``R_out - R_in`` summed over rows
    is what the softmax rule absorbs."""
    r_in = torch.special.xlogy(score_grad, pattern).sum(-1)
    if sink_logit is not None:
        p_sink = (1 - pattern.sum(-1).to(score_grad.dtype)).clamp(min=torch.finfo(score_grad.dtype).tiny)
        r_in = r_in + (sink_logit - torch.log(p_sink)) * score_grad.sum(-1)
    return r_in


def linear_gamma_relevance(x: Tensor, weight: Tensor, bias: Optional[Tensor], relevance: Tensor,
                           gamma: float = 0.25, eps: float = 1e-9) -> Tensor:
    """LRP-gamma (``gamma = 0``: LRP-epsilon) through ``z = x W^T + b``: the input relevance.

    Each contribution ``c_ij = x_i w_ji`` is enhanced where it is positive, ``c + gamma c^+``
    (the form valid for inputs of either sign, e.g. normalized pixels), and the output
    relevance ``R_j`` is split in proportion: ``R_i = sum_j c'_ij / (sum_i c'_ij + b'_j) R_j``
    with ``b' = b + gamma b^+``. The bias keeps its share, so ``sum_i R_i = sum_j R_j - bias
    share``. ``eps`` only stabilizes the sign-preserving division.

    Shapes: ``x [..., in]``, ``weight [out, in]``, ``relevance [..., out]`` -> ``[..., in]``.
    Vectorized without ``[..., out, in]`` contributions: ``c^+`` is ``x^+ w^+ + x^- w^-``.
    """
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    z = x @ weight.T + gamma * (x_pos @ w_pos.T + x_neg @ w_neg.T)
    if bias is not None:
        z = z + bias + gamma * bias.clamp(min=0)
    s = relevance / (z + eps * torch.where(z >= 0, 1.0, -1.0))
    return x * (s @ weight) + gamma * (x_pos * (s @ w_pos) + x_neg * (s @ w_neg))
