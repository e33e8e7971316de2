"""The relevance sweep: one hooked forward, one backward-like pass, layer by layer from the target.

The engine knows what each hook *role* does under each method (``lens_palrp.hooks.roles``); the
model family says which hook point plays which role. During the forward each hook installs its
rule as a gradient patch (the forward values stay bit-identical) and attaches a gradient hook that
reduces ``activation * gradient`` into the per-layer records the moment the backward reaches it,
so no activation-sized relevance tensor is kept unless the user asks for it with ``record``.
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lens_palrp import rules
from lens_palrp.hooks import family_for, unverified_architectures
from lens_palrp.hooks.roles import HookRole, Role
from lens_palrp.inputs import HookNames, prepare_tokens, resolve_hook_names, resolve_positions
from lens_palrp.methods import Method, get_method
from lens_palrp.result import Attribution
from lens_palrp.safety import model_left_unchanged
from lens_palrp.targets import HookTarget, TargetSpec, resolve_target

SUPPORTED_DTYPES = (torch.float32, torch.float64)


class _StopForward(Exception):
    """Raised by an ``at_hook`` target once its scalar is computed: nothing above is needed."""


# ---------------------------------------------------------------------------------------- sweep
class _Sweep:
    """State of one explanation: the hook functions of the forward and the records they fill."""

    def __init__(
        self,
        family,
        method: Method,
        batch: int,
        n_pos: int,
        dtype: torch.dtype,
        device,
        attention_mask: Optional[Tensor],
        record: Sequence[str],
        hook_target: Optional[HookTarget],
        record_gradients: Sequence[str] = (),
    ):
        self.family, self.method = family, method
        self.attention_mask = attention_mask
        self.record_names = set(record)
        self.gradient_names = set(record_gradients)
        self.gradients: Dict[str, Tensor] = {}
        self.hook_target = hook_target
        L, H = family.n_layers, family.n_heads
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
        self.heads_by_pos = z(batch, L, H, n_pos)
        self.positional = z(batch, L, H, n_pos)
        self.mlp = z(batch, L, n_pos)
        self.residual = z(batch, L + 1, n_pos)
        self.softmax_absorbed = z(batch, L)
        self.rope_cos: Dict[int, Tensor] = {}
        self.rope_sin: Dict[int, Tensor] = {}
        self.rope_tables: Dict[int, Tuple[Tensor, Tensor]] = {}
        self.shortformer_dims: Dict[int, Tensor] = {}
        self.n_pos = n_pos
        self.leaves: Dict[Role, Tensor] = {}
        self.captured: Dict[tuple, Tensor] = {}
        self.records: Dict[str, Tensor] = {}
        self.target_value: Optional[Tensor] = None
        # RoPE is split only under PA-LRP; additive PEs (input, shortformer, ALiBi) are measured
        # under every method, and reported as the leak where the method has no PE rule
        self.rope_split = method.positional_sinks
        self.additive_sinks = family.pe_type in ("standard", "shortformer", "alibi")
        self._handlers = {
            Role.EMBED: self._sink_leaf,
            Role.POS_EMBED: self._sink_leaf,
            Role.TOKEN_TYPE: self._sink_leaf,
            Role.NORM_SCALE: self._norm_scale,
            Role.RESID_PRE: self._residual,
            Role.RESID_FINAL: self._residual,
            Role.Q: self._query_key,
            Role.K: self._query_key,
            Role.ROT_Q: self._rotated_query_key,
            Role.ROT_K: self._rotated_query_key,
            Role.V: self._value,
            Role.SCORES: self._softcapped_scores,
            Role.PATTERN: self._pattern,
            Role.Z: self._head_outputs,
            Role.MLP_PRE: self._mlp_input,
            Role.MLP_UP: self._mlp_input,
            Role.MLP_MID: self._mlp_activation_before_norm,
            Role.MLP_POST: self._mlp_post,
            Role.LOGITS: self._raw_logits,
            Role.ROPE_COS: self._rope_table_seen,
            Role.ROPE_SIN: self._rope_table_seen,
        }
        # grouped kv heads that stay grouped (TransformerBridge): the key side of the RoPE sink
        # is credited per query head from the score gradients (see _gqa_key_sink)
        self.gqa_through_scores = family.n_kv_heads is not None and not family.ungroups_kv

    # -- helpers ---------------------------------------------------------------------------------
    def _on_grad(self, tensor: Tensor, fn: Callable[[Tensor], None]) -> None:
        """Call ``fn(grad)`` when the backward reaches ``tensor`` (if it is in the graph)."""
        if tensor.requires_grad:
            def hook(grad: Tensor) -> None:
                fn(grad)

            tensor.register_hook(hook)

    def _keep(self, name: str, relevance: Tensor) -> None:
        relevance = self.family.fold_kv(name, relevance.detach())
        self.records[name] = self.records[name] + relevance

    def _record_if_asked(self, name: str, out: Tensor, share: float = 1.0) -> None:
        if name in self.gradient_names:  # the rule-modified gradient reaching the activation
            self.gradients[name] = self.family.fold_kv(name, torch.zeros_like(out.detach()))

            def keep_grad(g):
                self.gradients[name] = self.gradients[name] + self.family.fold_kv(name, share * g.detach())

            self._on_grad(out, keep_grad)
        if name in self.record_names:
            # zeros where no relevance arrives (e.g. a gate held constant)
            self.records[name] = self.family.fold_kv(name, torch.zeros_like(out.detach()))
            def keep(g, out=out.detach()):
                rel = share * out * g
                self._keep(name, torch.where(torch.isfinite(rel), rel, torch.zeros_like(rel)))
            self._on_grad(out, keep)

    # -- one hook function per hook point --------------------------------------------------------
    def hook_fn(self, name: str, role: Optional[HookRole]):
        is_target = self.hook_target is not None and self.hook_target.hook_name == name

        def fn(act: Tensor, hook=None):
            out = self.apply_role(name, role, act, consumer=not is_target) if role else act
            if role is None:
                self._record_if_asked(name, out)
            if is_target:
                value = self.hook_target.fn(out)
                self.target_value = value
                raise _StopForward
            return out

        return fn

    def apply_role(self, name: str, hr: HookRole, act: Tensor, consumer: bool) -> Tensor:
        """Install the rule of ``hr.role`` on ``act`` and attach its records; returns the tensor
        the model continues with (same value). ``consumer=False`` at an ``at_hook`` target: the
        rule of the operation that would consume the activation (e.g. 1/2 for Q K^T) is skipped,
        since the explained scalar consumes it instead."""
        return self._handlers[hr.role](name, hr.role, hr.layer, act, consumer)

    def _sink_leaf(self, name, role, layer, act, consumer):
        """Embeddings become the autograd leaves: relevance stops here (the input sinks)."""
        leaf = act.detach().requires_grad_(True)
        self.leaves[role] = leaf
        self._record_if_asked(name, leaf)
        return leaf

    def _norm_scale(self, name, role, layer, act, consumer):
        """Identity rule on LayerNorm / RMSNorm: the scale is a constant."""
        if name in self.record_names:
            self.records[name] = torch.zeros_like(act.detach())
        return act.detach() if self.method.detach_norm_scale else act

    def _residual(self, name, role, layer, act, consumer):
        slot = layer if role is Role.RESID_PRE else self.family.n_layers
        self._on_grad(act, lambda g, a=act.detach(): self.residual[:, slot].add_((a * g).sum(-1)))
        self._record_if_asked(name, act)
        return act

    def _query_key(self, name, role, layer, act, consumer):
        """Uniform rule on ``Q K^T``; for shortformer, the per-layer positional sink."""
        share = self.method.qk_share if consumer else 1.0
        out = rules.scale_grad(act, share)
        if self.family.attn_softcap is not None or self.family.rebuild_attention:
            self.captured[(role, layer)] = out  # the softcap rule / the rebuilt attention reads it
        if self.additive_sinks and self.family.pe_type == "shortformer" and consumer:
            self._on_grad(out, lambda g: self._shortformer_sink(role, layer, share * g))
        self._record_if_asked(name, out, share)
        return out

    def _rotated_query_key(self, name, role, layer, act, consumer):
        """Uniform rule on ``Q K^T``; under PA-LRP also on ``R_i q_i`` (Eq. 10): half of the
        rotated channels' relevance to the content, half to the rotation (the RoPE sink)."""
        share = self.method.qk_share if consumer else 1.0
        factor: Union[float, Tensor] = share
        if self.rope_split:
            factor = torch.full((act.shape[-1],), share, dtype=act.dtype, device=act.device)
            factor[: self.family.rotary_dim] *= 0.5
        out = rules.scale_grad(act, factor)
        if self.family.attn_softcap is not None or (self.gqa_through_scores and self.rope_split):
            self.captured[(role, layer)] = out
        if self.rope_split and not (self.gqa_through_scores and role is Role.ROT_K and consumer):
            self._on_grad(out, lambda g, y=out.detach(): self._rope_sink(layer, y, share * g))
        self._record_if_asked(name, out, share)
        return out

    def _value(self, name, role, layer, act, consumer):
        """Uniform rule on ``A V``, value side."""
        share = self.method.value_share if consumer else 1.0
        out = rules.scale_grad(act, share)
        if self.family.rebuild_attention:
            self.captured[(role, layer)] = out
        self._record_if_asked(name, out, share)
        return out

    def _softcapped_scores(self, name, role, layer, act, consumer):
        """Identity rule on the attention softcap ``c tanh(x / c)``: the raw scores are recomputed
        from the (rule-patched) q and k, since no hook sits between the product and the cap."""
        m, fam = self.method, self.family
        if not (m.activation_identity and m.pattern_share is not None):
            self._record_if_asked(name, act)
            return act
        q_role, k_role = (Role.ROT_Q, Role.ROT_K) if fam.pe_type == "rotary" else (Role.Q, Role.K)
        q, k = self.captured.pop((q_role, layer)), self.captured.pop((k_role, layer))
        raw = torch.einsum("bqhd,bkhd->bhqk", q, k) / fam.attn_scale(layer)
        capped = fam.attn_softcap * torch.tanh(raw.detach() / fam.attn_softcap)
        out = rules.linearized(act, [raw], [rules.identity_rule_ratio(raw.detach(), capped)])
        self._record_if_asked(name, out)
        return out

    def _pattern(self, name, role, layer, act, consumer):
        """Uniform rule on ``A V``, pattern side (CP-LRP: constant); measures the softmax rule's
        absorption and the ALiBi sink from the gradient the softmax receives."""
        m = self.method
        if m.pattern_share is None and consumer:
            if name in self.record_names:
                self.records[name] = torch.zeros_like(act.detach())
            return act.detach()
        share = (m.pattern_share if m.pattern_share is not None else 1.0) if consumer else 1.0
        out = rules.scale_grad(act, share)
        self._on_grad(out, lambda g, p=act.detach(): self._softmax_sinks(layer, p, share * g))
        self._record_if_asked(name, out, share)
        return out

    def _head_outputs(self, name, role, layer, act, consumer):
        """Per-head relevance written into the residual stream: ``z * grad`` summed over d_head."""
        if self.family.rebuild_attention:
            act = self._rebuilt_attention(layer, act)
        self._on_grad(
            act,
            lambda g, a=act.detach(): self.heads_by_pos[:, layer].add_((a * g).sum(-1).transpose(1, 2)),
        )
        self._record_if_asked(name, act)
        return act

    def _rebuilt_attention(self, layer: int, z_model: Tensor) -> Tensor:
        """``softmax(q k^T / scale + mask) v`` from the rule-patched q, k, v, for models whose
        pattern hook only observes. Its value must equal the model's z (else the attention is
        not plain softmax attention and the rules would be wrong: raise); the model continues
        with its own value, the gradient flows through the rebuilt graph."""
        fam = self.family
        q = self.captured.pop((Role.Q, layer))
        k = self.captured.pop((Role.K, layer))
        v = self.captured.pop((Role.V, layer))
        if k.shape[2] != q.shape[2]:
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / fam.attn_scale(layer)
        n = scores.shape[-1]
        keep = torch.ones(n, n, dtype=torch.bool, device=scores.device)
        if fam.causal:
            keep = keep.tril()
        keep = keep[None, None]
        if self.attention_mask is not None:
            keep = keep & self.attention_mask.bool()[:, None, None, :]
        pattern = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        pattern = self._pattern(f"blocks.{layer}.attn.hook_pattern", Role.PATTERN, layer, pattern, True)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        err = float((z.detach() - z_model.detach()).abs().max())
        scale = float(z_model.detach().abs().max())
        tol = 1e-4 if z.dtype != torch.float64 else 1e-9
        if err > tol * max(scale, 1.0):
            raise NotImplementedError(
                f"layer {layer}: the attention is not plain softmax(q k^T / scale) v "
                f"(rebuilt z differs by {err:.3g}); lens_palrp cannot install its rules here"
            )
        return z_model.detach() + (z - z.detach())

    def _mlp_input(self, name, role, layer, act, consumer):
        self.captured[(role, layer)] = act  # read (and released) by the activation's rule
        self._record_if_asked(name, act)
        return act

    def _mlp_activation_before_norm(self, name, role, layer, act, consumer):
        """SoLU-LN: identity rule on the activation; the following LayerNorm is a norm scale."""
        out = act
        if self.method.activation_identity:
            out = rules.identity_rule(self.captured.pop((Role.MLP_PRE, layer)), act)
        self._record_if_asked(name, out)
        return out

    def _mlp_post(self, name, role, layer, act, consumer):
        """Identity rule on the activation, or the uniform rule on a gated product."""
        m, fam = self.method, self.family
        out = act
        # release the captured inputs: the rule keeps only what its backward needs
        pre = self.captured.pop((Role.MLP_PRE, layer), None)
        up = self.captured.pop((Role.MLP_UP, layer), None)
        if fam.gated_mlp:
            if m.gate_share is not None:
                gate_act = fam.activation(layer)(pre.detach())
                out = rules.gated_product(pre, gate_act, up, act, m.gate_share, m.up_share)
        elif m.activation_identity and not fam.activation_has_norm:
            out = rules.identity_rule(pre, act)
        self._on_grad(out, lambda g, a=out.detach(): self.mlp[:, layer].add_((a * g).sum(-1)))
        self._record_if_asked(name, out)
        return out

    def _rope_table_seen(self, name, role, layer, act, consumer):
        """RoPE tables exactly as the forward uses them (``[batch, pos, rotary_dim]``)."""
        table = act.detach()[:, :, None, :]
        if role is Role.ROPE_COS:
            self.captured[(role, layer)] = table
        else:
            self.rope_tables[layer] = (self.captured.pop((Role.ROPE_COS, layer)), table)
        return act

    def _raw_logits(self, name, role, layer, act, consumer):
        """Unembedding output before the output softcap, for the identity rule on the cap."""
        self.captured[(role, None)] = act
        self._record_if_asked(name, act)
        return act

    # -- positional sinks ------------------------------------------------------------------------
    def _rope_sink(self, layer: int, rotated: Tensor, grad: Tensor) -> None:
        """Eq. 10: half of R(q~) (and of R(k~)) on the rotated channels goes to the rotation."""
        rd = self.family.rotary_dim
        y, g = rotated[..., :rd], grad[..., :rd]
        if y.shape[2] != self.family.n_heads:  # a grouped key explained directly (at_hook)
            r = self.family.n_heads // y.shape[2]  # no query head reads it: share it evenly
            y, g = y.repeat_interleave(r, dim=2), g.repeat_interleave(r, dim=2) / r
        self.positional[:, layer].add_(0.5 * (y * g).sum(-1).transpose(1, 2))
        if layer not in self.rope_tables:  # the query and the key side share the layer's tables
            cos, sin = self.family.rotary_tables(layer, self.n_pos, self.attention_mask)
            self.rope_tables[layer] = (cos.to(g.dtype), sin.to(g.dtype))
        cos, sin = self.rope_tables[layer]
        # entries of the layer's rotation, shared by all heads: summed over heads (dim 2)
        c, s = rules.rope_table_relevance(y, g, cos, sin, self.family.rotary_adjacent_pairs, head_dim=2)
        self.rope_cos[layer] = self.rope_cos.get(layer, 0) + 0.5 * c
        self.rope_sin[layer] = self.rope_sin.get(layer, 0) + 0.5 * s

    def _gqa_key_sink(self, layer: int, score_grad: Tensor) -> None:
        """Key side of Eq. 10 when kv heads stay grouped: query head ``h`` reads its kv head's
        rotated key through its own scores, so its share of the key gradient is
        ``sum_i dy/dS_hij q~_hi / scale``; each query head is credited with exactly that part."""
        q = self.captured.pop((Role.ROT_Q, layer)).detach()  # [batch, pos, heads, d_head]
        k = self.captured.pop((Role.ROT_K, layer)).detach()  # [batch, pos, kv_heads, d_head]
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        key_grad = torch.einsum("bhqk,bqhd->bkhd", score_grad, q) / self.family.attn_scale(layer)
        self._rope_sink(layer, k, self.method.qk_share * key_grad)

    def _shortformer_sink(self, role: Role, layer: int, grad: Tensor) -> None:
        """Epsilon rule on ``ln1(x) + P`` at the query/key input: ``R(P) = P * (W g)``."""
        pos = self.leaves[Role.POS_EMBED].detach()
        W_Q, W_K = self.family.shortformer_projections(layer)
        W = (W_Q if role is Role.Q else W_K).to(grad.dtype)
        back = torch.einsum("bphe,hde->bphd", grad, W)  # gradient at the q/k input, per head
        per_head = (back * pos[:, :, None, :]).sum(-1)  # [batch, pos, heads]
        self.positional[:, layer].add_(per_head.transpose(1, 2))
        dims = back.sum(2) * pos
        self.shortformer_dims[layer] = self.shortformer_dims.get(layer, 0) + dims

    def _softmax_sinks(self, layer: int, pattern: Tensor, grad: Tensor) -> None:
        sinks = self.family.attention_sinks(layer)
        if sinks is not None:
            sinks = sinks.detach().to(grad.dtype)[None, :, None]
        alibi = self.additive_sinks and self.family.pe_type == "alibi"
        gqa = self.gqa_through_scores and self.rope_split
        r_out, r_in, score_grad = rules.softmax_relevance(pattern, grad, sinks, score_grad=alibi or gqa)
        self.softmax_absorbed[:, layer].add_((r_out - r_in).sum((1, 2)))
        if gqa:
            self._gqa_key_sink(layer, score_grad)
        if alibi:
            bias = self.family.alibi_bias(layer, self.n_pos).to(grad.dtype)
            self.positional[:, layer].add_(rules.alibi_position_relevance(bias * score_grad))

    # -- per-layer positive / abs reductions for combined() ----------------------------------------
    def layer_reductions(self) -> Tuple[Tensor, Tensor]:
        pos_layer = self.positional.sum(2)  # [batch, layers, pos]
        positive = torch.zeros_like(pos_layer)
        absolute = torch.zeros_like(pos_layer)
        pe = self.family.pe_type
        for layer in range(self.family.n_layers):
            if pe == "rotary" and layer in self.rope_cos:
                c, s = self.rope_cos[layer], self.rope_sin[layer]
                positive[:, layer] = c.clamp(min=0).sum(-1) + s.clamp(min=0).sum(-1)
                absolute[:, layer] = c.sum(-1).abs() + s.sum(-1).abs()
            elif pe == "shortformer" and layer in self.shortformer_dims:
                d = self.shortformer_dims[layer]
                positive[:, layer] = d.clamp(min=0).sum(-1)
                absolute[:, layer] = d.sum(-1).abs()
            elif pe == "alibi":
                positive[:, layer] = pos_layer[:, layer].clamp(min=0)
                absolute[:, layer] = pos_layer[:, layer].abs()
        return positive, absolute


# ---------------------------------------------------------------------------------------- explain
def explain(
    model,
    tokens,
    target: TargetSpec,
    method: str = "pa_lrp",
    position: Union[int, Tensor] = -1,
    record: HookNames = None,
    attention_mask: Optional[Tensor] = None,
    prepend_bos: Optional[bool] = None,
    record_gradients: HookNames = None,
    patch_rule: Optional[str] = None,
    gamma: Optional[float] = None,
    allow_unverified: bool = False,
) -> Attribution:
    """Explain ``target`` on ``tokens`` with one hooked forward and one relevance sweep.

    Args:
        model: a TransformerLens ``HookedTransformer``, ``HookedEncoder``, ``TransformerBridge``,
            or a ``lens_palrp.hooks.vit.HookedViT`` image classifier.
        tokens: a LongTensor ``[batch, pos]``, or a string / list of strings tokenized with the
            model's tokenizer (never truncated). Padding on either side is recognised from
            ``attention_mask``, or from runs of the pad id that differ between rows (as
            ``model.to_tokens([...])`` leaves them). Results are right-aligned: example ``i``'s
            real tokens are positions ``0 .. n_i - 1`` whatever side the input was padded on.
            For a ViT: float images ``[batch, channels, height, width]`` (normalized for the model).
        target: a token id (int, single-token string, or ``[batch]`` tensor) whose logit at
            ``position`` is explained; a pair ``(correct, wrong)`` for a logit difference; a
            callable ``metric(logits) -> [batch]`` or ``metric(logits, positions) -> [batch]``
            (``positions``: each example's explained position in the right-aligned logits, so a
            metric on a padded batch never reads a pad); or ``lp.at_hook(hook_name, fn)``.
        method: ``"pa_lrp"`` (default), ``"attn_lrp"``, ``"cp_lrp"`` or ``"grad_x_input"``.
        position: the position of the explained logit, counted within each example's own
            tokens (``-1``: its last real token); an int or a ``[batch]`` tensor of ints.
        record: a hook name, a list of them, or a filter ``callable(name) -> bool`` (as
            TransformerLens' ``names_filter``): their relevance (same shape as the activation) is
            kept in ``attr.hooks``.
        attention_mask: ``[batch, pos]`` of 0 (pad) and 1 (real token), left or right padding.
        prepend_bos: passed to the tokenizer for string input (model default when None).
        record_gradients: hook names (as ``record``) whose *rule-modified gradient* (relevance / activation, the
            modified-gradient view of LRP) is kept in ``attr.gradients`` (for attribution-patching
            style estimates, see ``lens_palrp.analyses.relevance_patching``).
        patch_rule: ViT only: the rule that takes the patch embeddings' relevance to pixels
            (``attr.pixels``): ``"gamma"`` (default, as the paper's vision setup, with ``gamma``)
            or ``"epsilon"``. The patch-level maps do not depend on it.
        gamma: the LRP-gamma parameter of ``patch_rule="gamma"`` (>= 0; default 0.25).
        allow_unverified: explain a TransformerBridge whose architecture is not among the
            verified ones (``lens_palrp.hooks.transformer_bridge.VERIFIED_ARCHITECTURES``); the
            maps are then unchecked, and a warning says so.

    The sweep runs in eval mode (dropout off). The model is left exactly as it was: hooks
    removed, ``requires_grad``, gradients, every module's training flag and the config restored,
    whether ``explain`` returns or raises. Calls on one model from several threads run one after
    the other.
    """
    if not isinstance(allow_unverified, bool):  # "no" would be truthy and opt in
        raise TypeError(f"allow_unverified must be True or False, got {allow_unverified!r}")
    # the sweep needs autograd even when the caller is in no_grad / inference mode
    with torch.inference_mode(False), torch.enable_grad():
        with unverified_architectures(allow_unverified):
            return _explain(model, tokens, target, method, position, record, attention_mask, prepend_bos,
                            record_gradients, patch_rule, gamma)


def _explain(model, tokens, target, method, position, record, attention_mask, prepend_bos,
             record_gradients, patch_rule=None, gamma=None) -> Attribution:
    family = family_for(model)
    vision = getattr(family, "vision", False)
    if (patch_rule is not None or gamma is not None) and not vision:
        raise ValueError("patch_rule and gamma apply to vision transformers (HookedViT) only")
    patch_rule = patch_rule or "gamma"
    gamma = 0.25 if gamma is None else gamma
    if patch_rule not in ("gamma", "epsilon"):
        raise ValueError(f"patch_rule must be 'gamma' or 'epsilon', got {patch_rule!r}")
    if vision and patch_rule == "gamma":  # before the sweep, not after it
        family.check_gamma(gamma)
    m = get_method(method)
    record = resolve_hook_names(record, family, "record")
    record_gradients = resolve_hook_names(record_gradients, family, "record_gradients")
    dtype = next(model.parameters()).dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the model is in {dtype}; lens_palrp computes the sweep in float32 or float64 only "
            "(half precision loses the small relevances of deep layers). Explain a float32 copy: "
            "lp.explain(copy.deepcopy(model).to(torch.float32), ...)"
        )
    device = next(model.parameters()).device
    if vision:  # images in; position ids stand in for tokens; the class logits sit on [CLS]
        if attention_mask is not None:
            raise ValueError("attention_mask does not apply to images")
        if isinstance(position, bool) or not (isinstance(position, numbers.Integral) and int(position) in (-1, 0)):
            raise ValueError("position does not apply to image classifiers: the logits sit on [CLS]")
        inputs, tokens, str_tokens = family.prepare_inputs(tokens, device)
        batch, n_pos = tokens.shape
        positions = torch.zeros(batch, dtype=torch.long)
    else:
        prepared = prepare_tokens(family, tokens, attention_mask, prepend_bos, device)
        tokens, attention_mask, str_tokens = prepared.tokens, prepared.attention_mask, prepared.str_tokens
        inputs = tokens
        batch, n_pos = tokens.shape
        positions = resolve_positions(position, prepared.lengths)
    target_fn, hook_target = resolve_target(target, batch, positions, family, padded=attention_mask is not None)
    if hook_target is None and not family.logits_supported:
        raise NotImplementedError(
            f"{family.name} encoders: the MLM head's activation has no hook, so logit targets "
            "cannot get the LRP rules; explain a hidden state with lp.at_hook(...) or "
            "lp.explain_similarity(...)"
        )

    sweep = _Sweep(family, m, batch, n_pos, dtype, device, attention_mask, record, hook_target, record_gradients)
    roles = family.hook_roles()
    names = set(roles) | set(record) | set(record_gradients) | ({hook_target.hook_name} if hook_target else set())
    fwd_hooks = [(name, sweep.hook_fn(name, roles.get(name))) for name in names]

    with model_left_unchanged(model, family):
        try:
            logits = family.forward(inputs, attention_mask, fwd_hooks)
        except _StopForward:
            logits = None
        if hook_target is not None:
            if sweep.target_value is None:
                raise ValueError(
                    f"at_hook: hook point {hook_target.hook_name!r} was not reached in the forward pass"
                )
            value = sweep.target_value
        else:
            raw = sweep.captured.get((Role.LOGITS, None))
            if raw is not None and m.activation_identity:
                logits = rules.identity_rule(raw, logits)  # identity rule on the output softcap
            value = target_fn(logits)
        value = _check_target_value(value, batch)
        if not value.requires_grad:
            raise ValueError("the target does not depend on the input: nothing to explain")
        roles_in_graph = list(sweep.leaves)
        grads = torch.autograd.grad(value.sum(), [sweep.leaves[r] for r in roles_in_graph], allow_unused=True)
        if all(g is None for g in grads):  # it requires grad only through tensors of its own
            raise ValueError("the target does not depend on the input: nothing to explain")
    sink_relevance = {  # relevance of each input sink: embedding x gradient (Eq. 5, epsilon = 0)
        r: sweep.leaves[r].detach() * (torch.zeros_like(sweep.leaves[r]) if g is None else g)
        for r, g in zip(roles_in_graph, grads)
    }
    attr = _assemble(sweep, family, m, tokens, attention_mask, str_tokens, positions, value.detach(), sink_relevance)
    if vision:
        attr.vision, attr.pixels = family.vision_outputs(inputs.detach(), sink_relevance[Role.EMBED], patch_rule, gamma)
    return attr


def _check_target_value(value, batch: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"the target must evaluate to a tensor [batch], got {type(value).__name__}")
    if value.ndim == 0 and batch == 1:
        value = value.reshape(1)
    if value.shape != (batch,):
        raise ValueError(f"the target must evaluate to shape [batch]=({batch},), got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"the target value is not finite: {value.tolist()}")
    return value


def _assemble(sweep, family, m, tokens, attention_mask, str_tokens, positions, value, sink_relevance) -> Attribution:
    r_embed = sink_relevance[Role.EMBED]
    if Role.POS_EMBED in sink_relevance and family.pe_type == "standard":
        r_pos = sink_relevance[Role.POS_EMBED]
        positional_input, positional_input_positive = r_pos.sum(-1), r_pos.clamp(min=0).sum(-1)
    else:  # shortformer's table enters per layer: its sinks are in `positional`
        positional_input = torch.zeros_like(r_embed[..., 0])
        positional_input_positive = torch.zeros_like(positional_input)
    token_type = sink_relevance.get(Role.TOKEN_TYPE)
    token_type = token_type.sum(-1) if token_type is not None else torch.zeros_like(r_embed[..., 0])
    layer_positive, layer_abs = sweep.layer_reductions()
    positional = sweep.positional
    leak_layers = torch.zeros_like(sweep.softmax_absorbed)
    leak_input = torch.zeros_like(value)
    if not m.positional_sinks:  # no PE rule: the positional relevance leaks, reported, not mapped
        leak_layers, leak_input = positional.sum((2, 3)), positional_input.sum(-1)
        positional = torch.zeros_like(positional)
        positional_input = torch.zeros_like(positional_input)
        positional_input_positive = torch.zeros_like(positional_input)
        layer_positive, layer_abs = torch.zeros_like(layer_positive), torch.zeros_like(layer_abs)
    mask = attention_mask if attention_mask is not None else torch.ones_like(tokens)
    attr = Attribution(
        semantic=r_embed.sum(-1),
        positional=positional,
        positional_input=positional_input,
        token_type=token_type,
        heads=sweep.heads_by_pos.sum(-1),
        heads_by_pos=sweep.heads_by_pos,
        mlp=sweep.mlp,
        residual=sweep.residual,
        target_value=value,
        tokens=tokens,
        str_tokens=str_tokens,
        method=m.name,
        attention_mask=mask,
        target_position=positions,
        hooks=sweep.records,
        gradients=sweep.gradients,
        semantic_positive=r_embed.clamp(min=0).sum(-1),
        positional_input_positive=positional_input_positive,
        positional_layer_positive=layer_positive,
        positional_layer_abs=layer_abs,
        softmax_absorbed_per_layer=sweep.softmax_absorbed,
        positional_leak_per_layer=leak_layers,
        positional_leak_input=leak_input,
        model_name=str(getattr(family.cfg, "model_name", "")),
    )
    _check_finite(attr)
    return attr


def _check_finite(attr: Attribution) -> None:
    for name in ("semantic", "positional", "positional_input", "token_type", "heads_by_pos", "mlp", "residual"):
        if not bool(torch.isfinite(getattr(attr, name)).all()):
            raise FloatingPointError(
                f"the relevance '{name}' contains NaN or inf; check the model's weights and inputs"
            )
