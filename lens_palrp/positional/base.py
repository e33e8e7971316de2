"""The contract of a positional-encoding strategy, and the registry that picks one per model.

One strategy per kind of positional encoding turns the relevance that reaches the encoding into
sinks (PA-LRP), or measures it so that a method without PE rules can report it as a leak. The
sweep calls the strategy at the hook points it cares about, hands it the score gradients if it
asks for them, and at the end asks it for the input-table relevance and for the two per-layer
reductions of ``combined()``: Eq. 11's positive parts (``"relu"``) and the authors' absolute
table sums (``"abs"``). A new encoding is one module with one class, registered by the
``positional_encoding`` name a family reports (``family.pe_type``).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type

import torch
from torch import Tensor

from lens_palrp.roles import Role


class PositionalEncoding:
    """Base strategy: the encoding has no sink of its own (every hook and reduction is empty).

    ``sweep`` gives: ``family``, ``method``, ``positional`` (the ``[batch, layers, heads, pos]``
    accumulator of attention-level sinks), ``leaves`` (the input sinks by role), ``n_pos``,
    ``attention_mask``, ``kv_grouped``, ``scores_materialized`` (False where every layer runs fused attention:
    no score or pattern tensor exists), ``roles`` (hook name -> role), ``caller_hooked`` (the names
    of hook points carrying the caller's own hooks), ``on_grad(tensor, fn)`` (``fn`` gets the gradient in the
    record dtype, float32 or better), ``observe(out, fn)`` (``fn(activation, gradient)`` for the
    hook point being run, the activation kept as autograd keeps it), ``accumulate(total, value)``
    (adds across devices) and ``take(role, layer)``.
    """

    needs_score_gradient = False  # ask the softmax observer for dL/dscores
    # why this encoding's sink needs the scores themselves, so that no fused kernel can serve it
    eager_attention_reason: Optional[str] = None
    keys_per_query_head = False  # a fused kernel reports each query head's key gradient (at_key_gradient)

    def __init__(self, sweep):
        self.sweep = sweep
        self.family = sweep.family

    def reads(self) -> Tuple[Role, ...]:
        """Roles whose rule-patched outputs this strategy takes from the sweep."""
        return ()

    def at_site(self, site, out: Tensor, share: float) -> None:
        """Called after the rule at every hook point of the forward (``out`` carries ``share``)."""

    def at_scores(self, layer: int, score_gradient: Tensor) -> None:
        """Called with ``dL/dscores`` ``[batch, heads, query, key]`` where the softmax is reached."""

    def at_key_gradient(self, layer: int, key: Tensor, grad: Tensor) -> None:
        """Under fused attention, where ``keys_per_query_head``: the key as each query head reads it
        (shared kv heads repeated) and that head's gradient of it, ``[batch, pos, heads, d_head]``."""

    def input_sums(self, sink_relevance: Dict[Role, Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
        """``(signed, positive part)`` sums over channels ``[batch, pos]`` of the input table's
        relevance, or None where the encoding has no input-level sink."""
        return None

    def layer_reductions(self, positional: Tensor) -> Tuple[Tensor, Tensor]:
        """``(positive, abs)`` ``[batch, layers, pos]`` reductions of each layer's positional sink
        for ``combined("relu")`` and ``combined("abs")``."""
        per_layer = positional.sum(2)
        return torch.zeros_like(per_layer), torch.zeros_like(per_layer)


ENCODINGS: Dict[str, Type[PositionalEncoding]] = {}


def register_encoding(*names: str) -> Callable[[Type[PositionalEncoding]], Type[PositionalEncoding]]:
    """Class decorator: ``cls`` handles the families whose ``pe_type`` is one of ``names``."""

    def register(cls: Type[PositionalEncoding]) -> Type[PositionalEncoding]:
        for name in names:
            if name in ENCODINGS and ENCODINGS[name] is not cls:
                raise ValueError(f"positional encoding {name!r} is handled by {ENCODINGS[name].__name__} already")
            ENCODINGS[name] = cls
        return cls

    return register


def encoding_for(pe_type: str) -> Type[PositionalEncoding]:
    try:
        return ENCODINGS[pe_type]
    except KeyError:
        raise NotImplementedError(
            f"positional encoding {pe_type!r} has no PA-LRP strategy; supported: {sorted(ENCODINGS)}"
        ) from None
