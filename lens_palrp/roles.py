"""The roles a hook point can play in the relevance sweep.

A model family (one module in ``lens_palrp.hooks``) declares which of its hook points plays which
role; a method (``lens_palrp.methods``) maps roles to rule objects. Adding a family means mapping
its hook names to these roles; adding a method means mapping these roles to rules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


class Role(enum.Enum):
    EMBED = "token embedding (semantic sink)"
    POS_EMBED = "input positional embedding (positional sink)"
    TOKEN_TYPE = "token-type (segment) embedding (its own sink, not positional)"
    NORM_SCALE = "normalization scale (detached under LRP)"
    RESID_PRE = "residual stream entering a layer"
    RESID_FINAL = "residual stream after the last layer"
    Q = "query (unrotated)"
    K = "key (unrotated)"
    ROT_Q = "rotated query (RoPE sink)"
    ROT_K = "rotated key (RoPE sink)"
    V = "value"
    SCORES = "attention scores before softmax"
    PATTERN = "attention pattern (softmax output)"
    Z = "per-head attention output before W_O"
    MLP_PRE = "MLP pre-activation (gate side for gated MLPs)"
    MLP_UP = "gated MLP linear (up) branch"
    MLP_MID = "MLP activation output before an activation LayerNorm"
    MLP_POST = "MLP activation output f(pre) (not gated)"
    MLP_GATED = "gated MLP product act(gate) * up (hook_post of a gated MLP)"
    MLP_NORMED_POST = "MLP output after an activation LayerNorm (SoLU-LN's hook_post)"
    LOGITS = "unembedding output before the output softcap"
    ROPE_COS = "RoPE cos table as the forward uses it (observed)"
    ROPE_SIN = "RoPE sin table as the forward uses it (observed)"
    MOE_WEIGHT = "routing weight of a selected expert (the router's output)"
    MOE_EXPERT = "a selected expert's output before its routing weight"
    MOE_ROUTED = "an expert's output times its routing weight (mixture-of-experts MLP)"


@dataclass(frozen=True)
class HookRole:
    role: Role
    layer: Optional[int] = None
