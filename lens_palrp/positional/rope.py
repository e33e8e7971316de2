"""RoPE: the rotation ``R_i`` applied to queries and keys. Under a rule that splits the rotated
product (``rules.RotatedShare``: Eq. 10), the share the rotation keeps is the positional sink
``rotation_share * R(q~)`` (and ``R(k~)``) per layer, head and position, and the relevance of the
cos and sin table entries (Eq. 7-9) gives the per-layer tables of ``combined()``.

Where grouped kv heads stay grouped (a TransformerBridge), one rotated key serves several query
heads: each query head is credited with its own part of the key gradient, recovered from its score
gradient, so the key side of the sink is exact per query head."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from lens_palrp.roles import Role
from lens_palrp.positional.base import PositionalEncoding, register_encoding
from lens_palrp.rules.functional import rope_table_relevance


@register_encoding("rotary")
class Rotary(PositionalEncoding):
    def __init__(self, sweep):
        super().__init__(sweep)
        self.cos: Dict[int, Tensor] = {}  # per layer: relevance of the cos entries [batch, pos, rotary_dim]
        self.sin: Dict[int, Tensor] = {}
        self.tables: Dict[int, Tuple[Tensor, Tensor]] = {}  # cos, sin as the forward used them
        self._observed_cos: Dict[int, Tensor] = {}
        self.adjacent: Dict[int, bool] = {}  # per layer: the pair layout the observed tables show
        self._table_miss: Dict[int, Tuple[Tensor, Tensor]] = {}  # per layer: |cos + sin terms - sink|, |sink|
        self.key_rule = sweep.method.rule(Role.ROT_K)
        # keys read by several query heads: the key side is credited per query head, from the
        # score gradients (eager attention) or from a fused kernel's per-head key gradient
        self.keys_per_query_head = sweep.kv_grouped and self.key_rule.splits_rotation
        self.keys_through_scores = self.keys_per_query_head and sweep.scores_materialized
        self.needs_score_gradient = self.keys_through_scores
        if self.keys_through_scores:
            self._refuse_edited_scores(sweep)

    @staticmethod
    def _refuse_edited_scores(sweep) -> None:
        """The key credit reads the gradient of the scores as the caller's hook left them; a hook
        that changes them (a rescale, a mask) changes that gradient against the one of ``q k^T``
        the rule needs, and the key-side sink would be silently off."""
        edited = sorted(n for n, hr in sweep.roles.items() if hr.role is Role.SCORES and n in sweep.caller_hooked)
        if edited:
            raise NotImplementedError(
                f"a hook the caller added at {', '.join(edited)} cannot be explained on this model: its grouped kv "
                "heads get their RoPE key sink per query head from the gradient of q k^T, read at the scores; "
                "hook hook_pattern, hook_rot_q / hook_rot_k or hook_z instead")

    def reads(self) -> Tuple[Role, ...]:
        return (Role.ROT_Q, Role.ROT_K) if self.keys_through_scores else ()

    def at_site(self, site, out: Tensor, share: float) -> None:
        role, layer = site.role, site.layer
        if role is Role.ROPE_COS:  # tables observed where the forward uses them (bridges)
            self._observed_cos[layer] = self._full_width(out.detach())[:, :, None, :]
            self.adjacent[layer] = self._layout(self._observed_cos[layer], layer)
        elif role is Role.ROPE_SIN:
            self.tables[layer] = (self._observed_cos.pop(layer), self._full_width(out.detach())[:, :, None, :])
        elif role in (Role.ROT_Q, Role.ROT_K) and site.rule.splits_rotation:
            if self.keys_per_query_head and role is Role.ROT_K and site.consumer:
                return  # credited per query head in at_scores / at_key_gradient
            kept = site.rule.rotation_share
            self.sweep.observe(out, lambda y, g: self._sink(layer, y, share * g, kept))

    def _layout(self, cos: Tensor, layer: int) -> bool:
        """Whether a table pairs adjacent channels (``c0 c0 c1 c1 ...``, GPT-J, Cohere) rather than
        the two halves (``c0 c1 ... c0 c1 ...``): read from the table the forward used, since a
        bridge's config need not say (Cohere's claims halves). Both at once (position 0 only):
        either layout gives the same split; neither: a layout the rules do not know."""
        rd = cos.shape[-1]
        halves = torch.equal(cos[..., : rd // 2], cos[..., rd // 2:])
        pairs = torch.equal(cos[..., 0::2], cos[..., 1::2])
        if not (halves or pairs):
            raise NotImplementedError(
                f"layer {layer}: the RoPE cos table pairs its channels neither by halves nor by adjacent "
                "pairs; lens_palrp cannot split its relevance")
        return pairs and not halves

    def _full_width(self, table: Tensor) -> Tensor:
        """GPT-OSS's bridge observes half-width tables (one entry per channel pair) and duplicates
        them after the hook for the rotate-half rotation: the same layout here."""
        rd = self.family.rotary_dim
        return torch.cat([table, table], dim=-1) if rd is not None and table.shape[-1] * 2 == rd else table

    def at_scores(self, layer: int, score_gradient: Tensor) -> None:
        """Query head ``h`` reads its kv head's rotated key through its own scores, so its share of
        the key gradient is ``sum_i dL/dS_hij q~_hi / scale``; each query head gets that part."""
        dtype = score_gradient.dtype  # the record dtype; q and k are in the model's
        q = self.sweep.take(Role.ROT_Q, layer).detach().to(dtype)  # [batch, pos, heads, d_head]
        k = self.sweep.take(Role.ROT_K, layer).detach().to(dtype)  # [batch, pos, kv_heads, d_head]
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        if getattr(self.family, "attn_softcap", None) is not None:  # the gradient the score rule sends through the cap
            raw = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.family.attn_scale(layer)
            score_gradient = self.sweep.method.rule(Role.SCORES).raw_score_gradient(self.family, raw, score_gradient)
        key_grad = torch.einsum("bhqk,bqhd->bkhd", score_gradient, q) / self.family.attn_scale(layer)
        self.at_key_gradient(layer, k, key_grad)

    def at_key_gradient(self, layer: int, key: Tensor, grad: Tensor) -> None:
        self._sink(layer, key, self.key_rule.share * grad, self.key_rule.rotation_share)

    def _sink(self, layer: int, rotated: Tensor, grad: Tensor, kept: float) -> None:
        """What the rotation keeps of ``R(y) = y * grad`` on the rotated channels, per head, and
        its split over the cos and sin table entries, summed over heads (one table per layer)."""
        fam = self.family
        rd = fam.rotary_dim
        y, g = rotated[..., :rd].to(grad.dtype), grad[..., :rd]  # in the record dtype (precision)
        if y.shape[2] != fam.n_heads:  # a grouped key explained directly (at_hook)
            r = fam.n_heads // y.shape[2]  # no query head reads it: share it evenly
            y, g = y.repeat_interleave(r, dim=2), g.repeat_interleave(r, dim=2) / r
        self.sweep.accumulate(self.sweep.positional[:, layer], kept * (y * g).sum(-1).transpose(1, 2))
        if layer not in self.tables:  # the query and the key side share the layer's tables
            cos, sin = fam.rotary_tables(layer, self.sweep.n_pos, self.sweep.attention_mask)
            self.tables[layer] = (cos.to(g.dtype), sin.to(g.dtype))
        cos, sin = (t.to(g.dtype) for t in self.tables[layer])
        c, s = rope_table_relevance(y, g, cos, sin, self.adjacent.get(layer, fam.rotary_adjacent_pairs), head_dim=2)
        # the cos and sin terms add up to the rotated product channel by channel exactly when the
        # tables pair the channels as the rotation did: the mismatch is checked once, at the end
        miss, size = self._table_miss.get(layer, (0, 0))
        sink = (y * g).sum(2)
        self._table_miss[layer] = (miss + (c + s - sink).abs().sum(), size + sink.abs().sum())
        self.cos[layer] = self.cos.get(layer, 0) + kept * c
        self.sin[layer] = self.sin.get(layer, 0) + kept * s

    def layer_reductions(self, positional: Tensor) -> Tuple[Tensor, Tensor]:
        for layer, (miss, size) in self._table_miss.items():  # else combined()'s tables would be wrong
            if float(miss) > 1e3 * torch.finfo(miss.dtype).eps * (float(size) + torch.finfo(miss.dtype).tiny):
                raise NotImplementedError(
                    f"layer {layer}: the RoPE tables do not rebuild the rotated query/key (pair layout or "
                    "rotated width differs from the rotation the model applied)")
        positive, absolute = super().layer_reductions(positional)
        for layer in range(self.family.n_layers):
            if layer in self.cos:
                c, s = self.cos[layer], self.sin[layer]
                positive[:, layer] = c.clamp(min=0).sum(-1) + s.clamp(min=0).sum(-1)
                absolute[:, layer] = c.sum(-1).abs() + s.sum(-1).abs()
        return positive, absolute
