"""Mixture-of-experts MLPs on a TransformerBridge (Mixtral, Qwen3-MoE).

What TransformerLens gives (4.3 and 3.9 alike, checked on both): ``MoEBridge`` wraps Hugging
Face's sparse block with ``hook_in`` / ``hook_out``, and ``hook_pre`` / ``hook_post`` are aliases
of those two, so the dense-MLP roles at those names would be wrong; ``hook_router_scores`` fires
only for blocks that return a tuple; the router is a ``MoERouterBridge`` whose ``hook_out`` sees
the router logits *after* Hugging Face's router has computed its softmax from them (it observes,
it is not in the path), plus, on 4.3 only, ``hook_expert_weights`` / ``hook_expert_indices``.
Nothing inside the experts (the batched ``gate_up_proj`` / ``down_proj``, ``act(gate) * up``, the
weighting ``w_e * expert_e``) has a hook in either version.

So the block's forward is rewritten for the sweep (``MixtureOfExperts``, a reversible canonizer):
the model's router is called as it is (its values, the bridge's router hooks), and Hugging Face's
eager expert loop is repeated op for op (the same value, bit for bit), with the method's rules
installed where no hook can reach (the eager loop whatever ``config._experts_implementation``
says: a ``grouped_mm`` model's forward differs from it by rounding only): ``MLP_GATED`` on every expert's ``act(gate) * up`` (as on a
dense gated MLP) and ``MOE_ROUTED`` on every ``w_e * expert_e`` (``rules.RoutedShares``). The
router's softmax passes relevance as gradient x input (AttnLRP's rule for a softmax); what it
absorbs, ``sum w dy/dw - sum logits dy/dlogits``, is measured per layer and reported as
``conservation().router_absorbed``. ``attr.mlp`` holds, for a mixture-of-experts layer, the
relevance of the block's output per position (experts and router together).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lens_palrp.canonizers.base import Canonizer, ForwardSwap
from lens_palrp.roles import Role
from lens_palrp.rules import GatedShares, Rule, offset_gated_product

# Hugging Face sparse blocks whose forward ``MixtureOfExperts`` repeats: a top-k router ``gate``
# returning (logits, weights, indices), experts with batched bias-free ``gate_up_proj``
# [experts, 2 * d_mlp, d_model] and ``down_proj`` [experts, d_model, d_mlp], ``act(gate) * up``
# gpt-oss's GptOssMLP: a router with a bias, softmax over the top-k logits; experts in the transposed
# layout with biases, gate and up interleaved, (clamp(up) + 1) * glu(clamp(gate))
_REBUILT_GPT_OSS = "GptOssMLP"
_REBUILT = frozenset({"MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", _REBUILT_GPT_OSS})


def moe_layers(model) -> List[int]:
    """The blocks whose MLP is TransformerLens' ``MoEBridge``."""
    return [layer for layer, block in enumerate(model.blocks)
            if type(getattr(block, "mlp", None)).__name__ == "MoEBridge"]


def moe_refusal(model) -> Optional[str]:
    """Why this bridge's mixture-of-experts MLPs cannot be explained, or None (none, or rebuilt)."""
    layers = moe_layers(model)
    if not layers:
        return "mixture-of-experts MLP outside an MoEBridge" if getattr(model.cfg, "num_experts", None) else None
    kinds = sorted({type(model.blocks[layer].mlp.original_component).__name__ for layer in layers})
    other = [kind for kind in kinds if kind not in _REBUILT]
    if other:
        return (f"mixture-of-experts MLP {', '.join(other)}: only {', '.join(sorted(_REBUILT))} have their "
                "expert loop rebuilt with the rules")
    return None


def drop_dense_mlp_roles(model, roles) -> None:
    """On an ``MoEBridge`` ``mlp.hook_pre`` / ``hook_post`` are the block's input and output, not a
    dense MLP's pre-activation and product: their dense roles go (the canonizer installs the rules)."""
    for layer in moe_layers(model):
        prefix = f"blocks.{layer}.mlp."
        for name in [n for n in roles if n.startswith(prefix)]:
            del roles[name]


class _ExpertFamily:
    """The family as an expert's rules see it: the activation is the experts' own."""

    def __init__(self, family, act_fn):
        self._family, self._act_fn = family, act_fn

    def activation(self, layer: int):
        return self._act_fn

    def __getattr__(self, name):
        return getattr(self._family, name)


class _ExpertSite:
    """A node inside one expert (``rules.Site``): what its rule reads is handed over directly."""

    consumer = True
    edited = False  # no hook point inside an expert: no caller's hook can edit it

    def __init__(self, family, name: str, role: Role, layer: int, parts):
        self.family, self.name, self.role, self.layer, self._parts = family, name, role, layer, parts

    def take(self, role: Role) -> Tensor:
        if role not in self._parts:
            raise NotImplementedError(f"{self.name}: the rule for {self.role.name} reads {role.name}, which a "
                                      "mixture-of-experts expert does not provide")
        return self._parts[role]

    def add_input_sink(self, leaf: Tensor) -> None:  # pragma: no cover - no embedding inside an expert
        raise NotImplementedError("no input sink inside an expert")


def _feeds(source: Tensor, result: Tensor, limit: int = 256) -> bool:
    """Whether ``result`` was computed from ``source`` (a bounded walk of the autograd graph)."""
    target, todo = source.grad_fn, [result.grad_fn]
    seen: set = set()
    while todo and len(seen) < limit:
        node = todo.pop()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        todo.extend(parent for parent, _ in node.next_functions)
    return False


class MixtureOfExperts(Canonizer):
    """Swap the forward of every rebuilt sparse block (``_REBUILT``) for one with the rules."""

    def __init__(self, layers: List[int]):
        self.layers = list(layers)
        self._forwards = ForwardSwap()

    def register(self, family, sweep) -> None:
        for layer in self.layers:
            block = family.model.blocks[layer].mlp.original_component
            build = _gpt_oss_forward if type(block).__name__ == _REBUILT_GPT_OSS else _rebuilt_forward
            self._forwards.replace(block, build(block, layer, family, sweep))

    def remove(self) -> None:
        self._forwards.restore()


def _rebuilt_forward(block, layer: int, family, sweep):
    experts, router = block.experts, block.gate
    expert_family = _ExpertFamily(family, experts.act_fn)
    gated_rule, routed_rule = sweep.method.rule(Role.MLP_GATED), sweep.method.rule(Role.MOE_ROUTED)
    n_experts = experts.num_experts

    def forward(hidden_states: Tensor) -> Tensor:
        if block.training and getattr(block, "jitter_noise", 0):
            raise NotImplementedError(f"layer {layer}: the router's training-time jitter is not rebuilt (eval mode)")
        batch, n_pos, d_model = hidden_states.shape
        x = hidden_states.reshape(-1, d_model)
        logits, weights, indices = router(x)
        weights = _measured_router(sweep, layer, batch, logits, weights)
        out = torch.zeros_like(x)
        for expert, slot, token in _routed(indices, n_experts):
            gate, up = F.linear(x[token], experts.gate_up_proj[expert]).chunk(2, dim=-1)
            name = f"blocks.{layer}.mlp.experts.{int(expert)}"
            product = experts.act_fn(gate) * up
            site = _ExpertSite(expert_family, name + ".hook_post", Role.MLP_GATED, layer,
                               {Role.MLP_PRE: gate, Role.MLP_UP: up})
            product, _ = gated_rule.apply(product, site)
            expert_out = F.linear(product, experts.down_proj[expert])
            weight = weights[token, slot, None]
            routed = expert_out * weight
            site = _ExpertSite(expert_family, name + ".routed", Role.MOE_ROUTED, layer,
                               {Role.MOE_WEIGHT: weight, Role.MOE_EXPERT: expert_out})
            routed, _ = routed_rule.apply(routed, site)
            out.index_add_(0, token, routed.to(out.dtype))
        out = out.reshape(batch, n_pos, d_model)
        if out.requires_grad:  # attr.mlp: the block output's relevance per position
            out = sweep.observed(out, lambda a, g: sweep.accumulate(sweep.mlp[:, layer], (a * g).sum(-1)))
        return out

    return forward


def _routed(indices: Tensor, n_experts: int):
    """``(expert, slot, token)`` for each expert some token was routed to, in the order of Hugging
    Face's eager expert loop (index ``n_experts``: no expert)."""
    with torch.no_grad():
        mask = F.one_hot(indices, num_classes=n_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for (expert,) in hit:
        if expert == n_experts:
            continue
        slot, token = torch.where(mask[expert])
        yield expert, slot, token


def _gpt_oss_forward(block, layer: int, family, sweep):
    """``GptOssMLP.forward`` (its eager expert loop) op for op, with the rules: each expert's
    ``(clamp(up) + 1) * glu(clamp(gate))`` under ``rules.offset_gated_product`` with the shares of
    the method's ``MLP_GATED`` rule (plain gradient under a plain rule), ``MOE_ROUTED`` on each
    ``w_e * expert_e``. Returns ``(output, router_scores)`` as the block does."""
    experts, router = block.experts, block.router
    gated_rule, routed_rule = sweep.method.rule(Role.MLP_GATED), sweep.method.rule(Role.MOE_ROUTED)
    if type(gated_rule) is not Rule and not isinstance(gated_rule, GatedShares):
        raise NotImplementedError(f"gpt-oss experts take the shares of a GatedShares rule for MLP_GATED, not "
                                  f"{type(gated_rule).__name__}")
    n_experts, alpha, limit = experts.num_experts, experts.alpha, experts.limit

    def forward(hidden_states: Tensor):
        batch, n_pos, d_model = hidden_states.shape
        x = hidden_states.reshape(-1, d_model)
        logits, scores, indices = router(x)
        weights = _measured_router(sweep, layer, batch, logits, scores)
        out = torch.zeros_like(x, dtype=x.dtype, device=x.device)
        for expert, slot, token in _routed(indices, n_experts):
            gate_up = x[token] @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
            gate_pre, up_pre = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate_pre.clamp(min=None, max=limit)
            up = up_pre.clamp(min=-limit, max=limit)
            glu = gate * torch.sigmoid(gate * alpha)
            product = (up + 1) * glu
            if isinstance(gated_rule, GatedShares):
                product = offset_gated_product(gate_pre, glu, up_pre, up, product,
                                               gated_rule.gate_share, gated_rule.up_share)
            expert_out = product @ experts.down_proj[expert] + experts.down_proj_bias[expert]
            weight = weights[token, slot, None]
            routed = expert_out * weight
            site = _ExpertSite(family, f"blocks.{layer}.mlp.experts.{int(expert)}.routed", Role.MOE_ROUTED, layer,
                               {Role.MOE_WEIGHT: weight, Role.MOE_EXPERT: expert_out})
            routed, _ = routed_rule.apply(routed, site)
            out.index_add_(0, token, routed.to(x.dtype))
        out = out.reshape(batch, n_pos, d_model)
        if out.requires_grad:
            out = sweep.observed(out, lambda a, g: sweep.accumulate(sweep.mlp[:, layer], (a * g).sum(-1)))
        return out, scores

    return forward


def _measured_router(sweep, layer: int, batch: int, logits: Tensor, weights: Tensor) -> Tensor:
    """The routing weights (same value) with the router softmax's absorption recorded:
    ``R_out = sum w dy/dw`` (the relevance the routed products hand the weights) minus
    ``R_in = sum logits dy/dlogits`` (what reaches the router's linear map, and through it the
    residual stream), per example, into ``sweep.router_absorbed[:, layer]``. A router that takes
    its softmax in float32 (Mixtral) hands back float32 weights: in a float64 model they are cast
    to float64 first (exact; the expert products promote them anyway), so ``R_out`` is the
    relevance the products hand over, and the float32 rounding of the backward inside the router
    counts as absorbed there instead of going unexplained."""
    if not weights.requires_grad:
        return weights
    weights = weights.to(torch.promote_types(weights.dtype, logits.dtype))
    if not _feeds(logits, weights):
        raise NotImplementedError(
            f"layer {layer}: the router logits the MoE router returns are not those its weights were computed "
            "from (a hook at the router's hook_out edits or records them), so the router's absorption cannot be "
            "measured")
    absorbed = sweep.router_absorbed[:, layer]
    kept = logits.detach()
    sweep.on_grad(logits, lambda g: sweep.accumulate(absorbed, -(kept * g).reshape(batch, -1).sum(-1)))
    return sweep.observed(weights, lambda a, g: sweep.accumulate(absorbed, (a * g).reshape(batch, -1).sum(-1)))
