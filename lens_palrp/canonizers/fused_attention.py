"""Fused attention: ``softmax(q k^T / scale + mask) v`` through PyTorch's fused kernel
(``scaled_dot_product_attention``), the attention rules as factors on the gradients of q and k.

Eager attention forms the scores and the pattern, ``[batch, heads, query, key]`` per layer, and
autograd keeps them for the backward: memory quadratic in the context. A fused kernel forms
neither. The rules still hold, because every rule on the path between q, k, v and z is a
constant factor on a gradient:

* the uniform rule at ``A V`` gives the pattern ``1/2`` of the relevance: the gradient into the
  softmax is halved, so the gradients the kernel returns for q and k are halved (they are linear
  in it); the value's ``1/2`` is the ``V`` rule at ``hook_v``, outside the kernel;
* the softmax passes relevance as gradient x input (AttnLRP), which is what the kernel computes;
* the uniform rule at ``q k^T`` and the RoPE split are the rules at ``hook_rot_q`` /
  ``hook_rot_k`` (or ``hook_q`` / ``hook_k``), outside the kernel, as in eager mode;
* CP-LRP's pattern held constant is the factor 0: q and k enter the kernel detached.

What eager mode reads off the pattern and the scores is had otherwise:

* the relevance entering each softmax, ``sum s dL/ds``, is ``sum q dL/dq`` at the kernel's query
  (``s = q k^T / scale`` is linear in q); what leaves it is the layer's per-head relevance
  (``Sweep.finish``); their difference is the softmax's absorption, per layer;
* a key shared by several query heads (grouped-query attention) is repeated per query head
  before the kernel where the positional strategy credits keys per query head
  (``keys_per_query_head``): the kernel's gradient of each copy is that head's key gradient.

Which sweeps cannot use it (``fused_attention_refusal``): a method whose pattern or score rule is
no constant factor, an encoding whose sink needs the scores (ALiBi), records or targets at
``hook_attn_scores`` / ``hook_pattern`` (they do not exist), and attention the family cannot
express through the kernel (softcaps, attention sinks, ...). ``explain(attention="auto")`` then
runs eager attention and says why in ``attr.computation``.

The rewrite itself: each attention module's ``forward`` is replaced, on the instance, by the
family's fused forward (the same hook points up to ``hook_rot_q`` / ``hook_rot_k`` / ``hook_v``
and from ``hook_z`` on, the kernel between); ``remove`` deletes the instance attribute again.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lens_palrp.canonizers.base import Canonizer, ForwardSwap
from lens_palrp.roles import Role
from lens_palrp.rules import scale_grad

ATTENTION_MODES = ("auto", "fused", "eager")
MATERIALIZED_ROLES = (Role.SCORES, Role.PATTERN)  # the tensors only eager attention forms


def attention_gradient_factor(method, family) -> Tuple[Optional[float], Optional[str]]:
    """The method's score and pattern rules as one factor on the gradients of q and k, and the
    pattern's own factor (the share of ``A V``'s relevance the pattern receives); None where a
    rule is no constant factor."""
    pattern_rule, score_rule = method.rule(Role.PATTERN), method.rule(Role.SCORES)
    pattern, scores = pattern_rule.gradient_factor(family), score_rule.gradient_factor(family)
    if pattern is None:
        return None, f"method {method.name!r}'s rule at the attention pattern ({pattern_rule!r}) is no constant gradient factor"
    if scores is None:
        return None, f"method {method.name!r}'s rule at the attention scores ({score_rule!r}) is no constant gradient factor"
    return pattern, None


def fused_attention_refusal(family, method, encoding_cls, materialized_names) -> Optional[str]:
    """Why this sweep needs eager attention, or None where the fused kernel serves it."""
    if not hasattr(family, "fused_attention_forward"):
        return f"{family.name} has no fused attention forward"
    _, reason = attention_gradient_factor(method, family)
    if reason:
        return reason
    if encoding_cls.eager_attention_reason:
        return encoding_cls.eager_attention_reason
    if materialized_names:
        return f"{', '.join(sorted(materialized_names))} is recorded or explained: only eager attention forms it"
    return family.fused_attention_refusal()


class FusedAttention(Canonizer):
    """Every attention module of the model runs its fused forward during the sweep, except those
    of ``eager_layers`` (a layer whose scores or pattern carry a hook of the caller's): they keep
    their own forward, their score and pattern rules and their softmax observers, and each
    layer's records are the same either way, so the layers mix."""

    def __init__(self, eager_layers: Sequence[int] = ()):
        self._forwards = ForwardSwap()
        self._settings = ExitStack()
        self.eager_layers = frozenset(eager_layers)

    def register(self, family, sweep) -> None:
        self.family, self.sweep = family, sweep
        self.pattern_factor, _ = attention_gradient_factor(sweep.method, family)
        self.score_factor = sweep.method.rule(Role.SCORES).gradient_factor(family)
        fused = [layer for layer in range(family.n_layers) if layer not in self.eager_layers]
        for name in [n for n, hr in sweep.roles.items() if hr.role in MATERIALIZED_ROLES and hr.layer in fused]:
            del sweep.roles[name]
        sweep.scores_materialized = bool(self.eager_layers)  # some layer still forms them
        # a family's mask setting for its fused forward, restored in remove; not where eager layers
        # remain (they read the mask the model builds for its own attention)
        masks = getattr(family, "fused_attention_masks", None)
        if masks is not None and not self.eager_layers:
            self._settings.enter_context(masks())
        for layer in fused:
            self._forwards.replace(family.attention_module(layer), family.fused_attention_forward(layer, self.kernel))

    def remove(self) -> None:
        self._forwards.restore()
        self._settings.close()
        self.family = self.sweep = None

    def kernel(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
               mask: Optional[Tensor] = None, zero_empty_rows: bool = True) -> Tensor:
        """``softmax(q k^T / scale + mask) v`` with the rules installed; ``q`` ``[batch, heads,
        query, d_head]``, ``k`` / ``v`` ``[batch, kv_heads, key, d_head]`` as they leave their hook
        points (the rules of q, k, v already on them), the result ``[batch, heads, query, d_head]``.

        ``mask``: None (``causal`` alone), boolean (True: attend) or additive, broadcastable to
        ``[batch, heads, query, key]``. A query that sees no key gets a zero output where
        ``zero_empty_rows`` (as TransformerLens' eager attention); otherwise what the additive
        mask gives (Hugging Face's finite minimum: the mean of the values)."""
        sweep, encoding = self.sweep, self.sweep.encoding
        factor = self.pattern_factor * self.score_factor
        n_heads, n_kv = q.shape[1], k.shape[1]
        per_head_keys = n_kv != n_heads and encoding.keys_per_query_head and factor != 0
        if n_kv != n_heads and (per_head_keys or not _GQA_KERNEL):
            k = k.repeat_interleave(n_heads // n_kv, dim=1)
            v = v.repeat_interleave(n_heads // n_kv, dim=1)
        if factor == 0:  # the pattern held constant: no relevance reaches q or k
            q, k = q.detach(), k.detach()
        else:
            sweep._pattern_shares[layer] = self.pattern_factor  # what leaves the softmax: Sweep.finish
            q = sweep.observed(q, lambda a, g: sweep.accumulate(sweep.softmax_absorbed[:, layer],
                                                                -(a * g).sum((1, 2, 3))))
            if per_head_keys:
                k = sweep.observed(k, lambda a, g: encoding.at_key_gradient(layer, a.transpose(1, 2),
                                                                            g.transpose(1, 2)))
            q, k = scale_grad(q, factor), scale_grad(k, factor)
        empty = None
        if mask is not None:
            if mask.dtype == torch.bool:
                empty = ~mask.any(-1, keepdim=True)
                mask = mask | empty  # attend anywhere, then zeroed: no NaN forward or backward
            else:
                lowest = torch.finfo(mask.dtype).min
                empty = (mask <= lowest).all(-1, keepdim=True)
                mask = mask.clamp(min=lowest)  # -inf rows would give NaN
            mask = mask.to(q.device)
        kwargs = {"enable_gqa": True} if k.shape[1] != n_heads else {}
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           scale=1.0 / scale, **kwargs)
        if empty is not None and zero_empty_rows:
            z = z.masked_fill(empty, 0.0)
        return z


def _has_gqa_kernel() -> bool:
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try it
        q = torch.zeros(1, 2, 1, 1)
        try:
            F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


_GQA_KERNEL = _has_gqa_kernel()
