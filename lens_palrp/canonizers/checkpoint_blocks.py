"""Block-wise recomputation: each block's forward runs again during the sweep, as gradient
checkpointing does, so that the activations of only one block are held at a time.

Each block's ``forward`` is replaced, on the instance, by the same forward under PyTorch's
non-reentrant ``torch.utils.checkpoint``: the forward keeps only the block's inputs (the residual
stream entering it, and what else the model passes, such as RoPE tables); when the backward
reaches the block, its forward is run once more and its saved tensors recomputed, then freed
when the backward leaves it. ``remove`` deletes the instance attribute again.

Why the relevance sweep survives it: the sweep's rules are gradient patches in the graph of the
first forward, which the backward walks as without recomputation; its records are reductions
that observer nodes (``lens_palrp.observers``) compute from autograd saved tensors, which the
recomputation restores. The hooks run a second time in the recomputed forward and must build the
same graph; what they do besides (a record's first zeros, an ``at_hook`` target) happens once:
``Sweep.replaying`` is True while a block is recomputed.
"""

from __future__ import annotations

from typing import Set

import torch
from torch.utils.checkpoint import checkpoint

from lens_palrp.canonizers.base import Canonizer, ForwardSwap


class CheckpointBlocks(Canonizer):
    def __init__(self):
        self._forwards = ForwardSwap()
        self._ran: Set[int] = set()

    def register(self, family, sweep) -> None:
        self.sweep = sweep
        for layer in range(family.n_layers):
            module = family.block_module(layer)
            self._forwards.replace(module, self._checkpointed(layer, module.forward))

    def remove(self) -> None:
        self._forwards.restore()
        self.sweep = None

    def _checkpointed(self, layer: int, forward):
        def run_once_more(*args, **kwargs):
            replay = layer in self._ran
            self._ran.add(layer)
            sweep, before = self.sweep, self.sweep.replaying
            sweep.replaying = replay
            try:
                return forward(*args, **kwargs)
            finally:
                sweep.replaying = before

        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(run_once_more, *args, use_reentrant=False, **kwargs)

        return checkpointed
