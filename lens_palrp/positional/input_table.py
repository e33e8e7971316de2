"""Learned or sinusoidal position tables added to the token embedding at the input (GPT-2, BERT,
ViT): the table's relevance ``P * dy/dP`` is the input-level positional sink (Eq. 5, epsilon 0)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import Tensor

from lens_palrp.roles import Role
from lens_palrp.positional.base import PositionalEncoding, register_encoding


@register_encoding("standard")
class InputTable(PositionalEncoding):
    def input_sums(self, sink_relevance: Dict[Role, Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
        relevance = sink_relevance.get(Role.POS_EMBED)
        if relevance is None:
            return None
        return relevance.sum(-1), relevance.clamp(min=0).sum(-1)
