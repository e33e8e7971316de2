"""ALiBi: the bias ``m_h (j - i)`` added to the scores. Its relevance is ``bias * dL/dscores``
(Eq. 15), split over the query and the key position by the epsilon rule on ``i + (-j)`` (Eq. 16,
``rules.alibi_position_relevance``), per layer and head."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from lens_palrp.positional.base import PositionalEncoding, register_encoding
from lens_palrp.rules.functional import alibi_position_relevance


@register_encoding("alibi")
class Alibi(PositionalEncoding):
    needs_score_gradient = True
    eager_attention_reason = "ALiBi's positional sink is its bias times the score gradient, per query and key"

    def at_scores(self, layer: int, score_gradient: Tensor) -> None:
        bias = self.family.alibi_bias(layer, self.sweep.n_pos).to(score_gradient.dtype)
        self.sweep.accumulate(self.sweep.positional[:, layer], alibi_position_relevance(bias * score_gradient))

    def layer_reductions(self, positional: Tensor) -> Tuple[Tensor, Tensor]:
        per_layer = positional.sum(2)  # one bias per layer: its per-position sink is the table
        return per_layer.clamp(min=0), per_layer.abs()
