"""Devices of a sweep: where the results live when the model's layers sit on several devices.

A model split with a device map (accelerate's ``device_map`` on a TransformerBridge's Hugging
Face model, TransformerLens' ``n_devices``) runs each block on its own device. The sweep leaves
every activation and gradient where the model put it; only the small per-layer reductions cross
devices, into accumulators on the *results device*: the device of the input embedding, which is
where the token ids go in and the input-sink relevance is formed. On a model on one device
``gather`` is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Placement:
    device: torch.device

    def gather(self, tensor: Tensor) -> Tensor:
        """``tensor`` on the results device (itself when it is there already; differentiable)."""
        return tensor if tensor.device == self.device else tensor.to(self.device)


def placement_for(model) -> Placement:
    """Results on the device of the model's first parameter: its input embedding in every
    supported family (TransformerLens registers ``embed`` first; a bridge its embedding bridge)."""
    param = next(model.parameters(), None)
    return Placement(param.device if param is not None else torch.device("cpu"))
