"""Attention rebuilt in the path, for models whose ``hook_pattern`` only observes.

A TransformerBridge that hands attention to Hugging Face (BERT) exposes q, k and v in the path but
the pattern only as a copy, so a rule installed on it would change nothing. This canonizer drops
the observed scores and pattern from the sweep's roles and, at ``hook_z``, recomputes
``softmax(q k^T / scale + mask) v`` from the rule-patched q, k and v, the pattern passing through
the sweep's ``PATTERN`` rule. The model continues with its own z (the value is unchanged) and the
gradient flows through the rebuilt graph, the rebuilt scores and pattern passing the sweep's
sites of those roles. The rebuilt z must equal the model's; where it does not,
the attention is not plain softmax attention and the rules would be wrong: refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lens_palrp.canonizers.base import Canonizer
from lens_palrp.roles import HookRole, Role


class RebuildAttention(Canonizer):
    def register(self, family, sweep) -> None:
        self.family, self.sweep = family, sweep
        for name in [n for n, hr in sweep.roles.items() if hr.role in (Role.SCORES, Role.PATTERN)]:
            del sweep.roles[name]
        sweep.capture(Role.V, *(() if self.unrotated else (Role.Q, Role.K)))
        sweep.transform(Role.Z, self.rebuild)

    unrotated = False  # True: q and k come from ``queries_keys`` (a rotation rebuilt in a subclass)

    def queries_keys(self, layer: int):
        """The rule-patched q and k ``[batch, pos, heads, d_head]`` the scores are rebuilt from."""
        return self.sweep.take(Role.Q, layer), self.sweep.take(Role.K, layer)

    def remove(self) -> None:
        self.family = self.sweep = None  # nothing of the model was changed

    def rebuild(self, site, z_model: Tensor) -> Tensor:
        fam, sweep, layer = self.family, self.sweep, site.layer
        q, k = self.queries_keys(layer)
        v = sweep.take(Role.V, layer)
        if k.shape[2] != q.shape[2]:
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / fam.attn_scale(layer)
        n = scores.shape[-1]
        keep = torch.ones(n, n, dtype=torch.bool, device=scores.device)
        if fam.causal:
            keep = keep.tril()
        keep = keep[None, None]
        if sweep.attention_mask is not None:
            keep = keep & sweep.attention_mask.bool()[:, None, None, :]
        scores = sweep.run_site(f"blocks.{layer}.attn.hook_attn_scores", HookRole(Role.SCORES, layer),
                                scores.masked_fill(~keep, float("-inf")), True)
        pattern = torch.softmax(scores, dim=-1)
        pattern = sweep.run_site(f"blocks.{layer}.attn.hook_pattern", HookRole(Role.PATTERN, layer), pattern, True)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        err = float((z.detach() - z_model.detach()).abs().max())
        scale = float(z_model.detach().abs().max())
        # float32's tolerance where the attention computes in float32: a float32 model, or a float64
        # one whose Hugging Face attention rounds to float32 (family.attention_float32 says where)
        reason = getattr(fam, "attention_float32", None) if z.dtype == torch.float64 else None
        tol = 1e-9 if z.dtype == torch.float64 and reason is None else 1e-4
        if err > tol * max(scale, 1.0):
            raise NotImplementedError(
                f"layer {layer}: the attention is not plain softmax(q k^T / scale) v (rebuilt z differs by "
                f"{err:.3g}, tolerance {tol:g} of max |z|{': ' + reason if reason else ''}); "
                "lens_palrp cannot install its rules here"
            )
        return z_model.detach() + (z - z.detach())
