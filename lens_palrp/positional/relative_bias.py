"""T5's relative position bias: a learned ``b_h(bucket(j - i))`` added to the scores ``q.k``.

The scores are a sum of two terms, so (as for ALiBi, Eq. 15 with eps = 0) the bias receives
``b * dL/dscores`` and the content term ``q.k`` the rest. A learned function of the offset has no
part of its own per query and per key (unlike ALiBi's ``m (j - i)``), so each entry's relevance is
credited to its key position, per layer and head: ``R[h, j] = sum_i b_h(i, j) dL/ds_hij``. The
family says which attention has a bias (``relative_bias(layer)``, None for cross-attention) and
which result positions its keys occupy (``key_positions(layer)``).
"""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from lens_palrp.positional.base import PositionalEncoding, register_encoding


@register_encoding("relative_positional_bias")
class RelativeBias(PositionalEncoding):
    needs_score_gradient = True
    eager_attention_reason = "the relative-bias sink is the bias times the score gradient, per query and key"

    def at_scores(self, layer: int, score_gradient: Tensor) -> None:
        bias = self.family.relative_bias(layer)
        if bias is None:  # T5's cross-attention has none
            return
        per_key = (bias.to(score_gradient.dtype) * score_gradient).sum(-2)  # [batch, heads, key]
        self.sweep.accumulate(self.sweep.positional[:, layer, :, self.family.key_positions(layer)], per_key)

    def layer_reductions(self, positional: Tensor) -> Tuple[Tensor, Tensor]:
        per_layer = positional.sum(2)  # no channels: the layer's head-summed sink per position
        return per_layer.clamp(min=0), per_layer.abs()
