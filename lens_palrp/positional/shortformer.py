"""Shortformer: the position table enters every layer's queries and keys (``ln1(x) + P``), not
the residual stream. The epsilon rule on that sum gives the per-layer sink
``R(P) = P * (W_Q g_q + W_K g_k)``, per head from each head's query/key gradient; the table's
input relevance is 0 (its sinks are all at attention level)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from lens_palrp.roles import Role
from lens_palrp.positional.base import PositionalEncoding, register_encoding


@register_encoding("shortformer")
class Shortformer(PositionalEncoding):
    def __init__(self, sweep):
        super().__init__(sweep)
        self.dims: Dict[int, Tensor] = {}  # per layer: the sink per position and channel

    def at_site(self, site, out: Tensor, share: float) -> None:
        if site.role in (Role.Q, Role.K) and site.consumer:
            role, layer = site.role, site.layer
            self.sweep.on_grad(out, lambda g: self._sink(role, layer, share * g))

    def _sink(self, role: Role, layer: int, grad: Tensor) -> None:
        pos = self.sweep.leaves[Role.POS_EMBED].detach()
        W_Q, W_K = self.family.shortformer_projections(layer)
        W = (W_Q if role is Role.Q else W_K).to(grad.dtype)
        back = torch.einsum("bphe,hde->bphd", grad, W)  # gradient at the q/k input, per head
        per_head = (back * pos[:, :, None, :]).sum(-1)  # [batch, pos, heads]
        self.sweep.accumulate(self.sweep.positional[:, layer], per_head.transpose(1, 2))
        self.dims[layer] = self.dims.get(layer, 0) + back.sum(2) * pos

    def layer_reductions(self, positional: Tensor) -> Tuple[Tensor, Tensor]:
        positive, absolute = super().layer_reductions(positional)
        for layer, d in self.dims.items():
            positive[:, layer] = d.clamp(min=0).sum(-1)
            absolute[:, layer] = d.sum(-1).abs()
        return positive, absolute
