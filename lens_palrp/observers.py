"""Observer nodes: how the sweep reads ``activation * gradient`` without keeping activations itself.

Every record the sweep fills is a reduction of an activation times the gradient that reaches it.
A tensor hook would need the activation held by a Python closure from the forward to the
backward: every layer's activations alive at once, whatever autograd does. An observer node is an
identity in the graph whose backward hands ``(activation, gradient)`` to its callbacks, the
activation kept as an autograd *saved tensor*. Autograd keeps it exactly as long as the backward
needs it, and block-wise recomputation (``explain(..., checkpoint=True)``, which recomputes the
saved tensors of one block at a time) frees and recomputes it like any other: records then cost
one block's activations, not all layers'. Where the observed tensor is autograd's own saved
tensor as well (the usual case: the next matmul keeps its input) the node costs no memory.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import Tensor

Callback = Callable[[Tensor, Tensor], None]  # (activation, gradient) -> None


class _Observed(torch.autograd.Function):
    """Identity forward; backward calls every callback with the saved input and the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, callbacks: Sequence[Callback]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.callbacks = callbacks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        for callback in ctx.callbacks:
            callback(x, grad)
        return grad, None


def observed(x: Tensor, callbacks: List[Callback]) -> Tensor:
    """``x`` (same value) with ``callbacks`` called on ``(x, dL/dx)`` in the backward; ``x``
    itself where there is nothing to call or no gradient will reach it."""
    if not callbacks or not x.requires_grad:
        return x
    return _Observed.apply(x, tuple(callbacks))
