"""The unembedding at the explained positions only.

A logit or a logit difference (``explain(model, tokens, " Paris")``) reads one position per
example, yet the model unembeds every position: ``[batch, pos, vocab]`` logits, and the backward
forms their gradient of the same size. At 64k tokens and a 128k vocabulary that is 16 GiB in
bfloat16, twice. This rewrite hands the unembedding module each example's explained position of
its input only, ``[batch, 1, d_model]``, so the model returns ``[batch, 1, vocab]`` logits and the
target reads position 0 of them (``LogitTarget.at_first_position``). Every map is unchanged: the
other positions' logits never reached the target. A metric on the logits (any callable) may read
any position and keeps them all, as do records of the unembedding's own hook points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lens_palrp.canonizers.base import Canonizer, ForwardSwap


class LogitsAtPositions(Canonizer):
    def __init__(self, positions: Tensor):
        self.positions = positions  # [batch] each example's explained position
        self._forwards = ForwardSwap()

    def register(self, family, sweep) -> None:
        module = family.unembed_module()
        original = module.forward
        positions = self.positions

        def forward(hidden: Tensor, *args, **kwargs):
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return original(hidden[rows, positions.to(hidden.device)][:, None], *args, **kwargs)

        self._forwards.replace(module, forward)

    def remove(self) -> None:
        self._forwards.restore()
