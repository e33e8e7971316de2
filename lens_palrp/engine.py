"""The relevance sweep: one hooked forward, one backward-like pass, layer by layer from the target.

Three parts meet here and know nothing of each other by name: the model *family* says which hook
point plays which role (``lens_palrp.hooks``), the *method* says which rule each role gets
(``lens_palrp.methods``), and the *positional strategy* of the model's encoding turns what reaches
it into sinks (``lens_palrp.positional``); *canonizers* the family asks for rewrite the model or
the sweep first (``lens_palrp.canonizers``). During the forward each hook installs its rule as a
gradient patch (the forward values stay bit-identical) and attaches gradient hooks that reduce
``activation * gradient`` into the per-layer records the moment the backward reaches them, so no
activation-sized relevance tensor is kept unless the user asks for it with ``record``.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor

from lens_palrp.canonizers import (
    ATTENTION_MODES, CheckpointBlocks, FusedAttention, LogitsAtPositions, canonized, fused_attention_refusal,
)
from lens_palrp.canonizers.fused_attention import MATERIALIZED_ROLES
from lens_palrp.hooks import FAMILY_OPTIONS, family_for, unverified_architectures
from lens_palrp.roles import HookRole, Role
from lens_palrp.inputs import HookNames, resolve_hook_names
from lens_palrp.methods import Method, get_method
from lens_palrp.observers import observed
from lens_palrp.devices import Placement, placement_for
from lens_palrp.positional import PositionalEncoding, encoding_for
from lens_palrp.precision import Precision, precision_for
from lens_palrp.records import Records
from lens_palrp.result import Attribution, Reductions, check_finite
from lens_palrp.rules import Rule, softmax_input_relevance, softmax_output_relevance
from lens_palrp.safety import model_left_unchanged
from lens_palrp.user_hooks import forward_hooked, refuse_backward_hooks, with_aliases
from lens_palrp.labels import describe
from lens_palrp.targets import HookTarget, LogitTarget, TargetSpec, resolve_target

class _StopForward(Exception):
    """Raised by an ``at_hook`` target once its scalar is computed: nothing above is needed."""


class _Site:
    """One hook point as its rule sees it (``lens_palrp.rules.Site``)."""

    __slots__ = ("sweep", "name", "role", "layer", "consumer", "rule", "family", "edited")

    def __init__(self, sweep: "Sweep", name: str, role: Role, layer: Optional[int], consumer: bool, rule: Rule):
        self.sweep, self.name, self.role, self.layer = sweep, name, role, layer
        self.consumer, self.rule, self.family = consumer, rule, sweep.family
        self.edited = name in sweep.caller_hooked

    def take(self, role: Role) -> Tensor:
        return self.sweep.take(role, self.layer)

    def add_input_sink(self, leaf: Tensor) -> None:
        self.sweep.leaves[self.role] = leaf


# ---------------------------------------------------------------------------------------- sweep
class Sweep:
    """State of one explanation: the hook functions of the forward and the records they fill."""

    encoding: PositionalEncoding  # the positional strategy, chosen once the canonizers have run

    def __init__(self, family, method: Method, batch: int, n_pos: int, precision: Precision, placement: Placement,
                 attention_mask: Optional[Tensor], record: Sequence[str], hook_target: Optional[HookTarget],
                 record_gradients: Sequence[str] = ()):
        self.family, self.method = family, method
        self.n_pos, self.attention_mask = n_pos, attention_mask
        self.record_names, self.gradient_names = set(record), set(record_gradients)
        self.hook_target = hook_target
        self.precision, self.placement = precision, placement
        L, H = family.n_layers, family.n_heads
        z = lambda *shape: torch.zeros(*shape, dtype=precision.records, device=placement.device)  # noqa: E731
        self.heads_by_pos = z(batch, L, H, n_pos)
        self.positional = z(batch, L, H, n_pos)  # attention-level positional sinks (the strategies')
        self.mlp = z(batch, L, n_pos)
        self.residual = z(batch, L + 1, n_pos)
        self.softmax_absorbed = z(batch, L)
        self.router_absorbed = z(batch, L)  # mixture-of-experts routers' softmax (lens_palrp.hooks.bridge_moe)
        self.leaves: Dict[Role, Tensor] = {}
        self.scores_materialized = True  # False once FusedAttention runs every layer without them
        self.replaying = False  # a block's forward runs once more (CheckpointBlocks)
        self.caller_hooked: Set[str] = set()  # names of hook points carrying the caller's forward hooks
        self.records: Dict[str, Tensor] = {}
        self.gradients: Dict[str, Tensor] = {}
        self.target_value: Optional[Tensor] = None
        self.roles: Dict[str, HookRole] = dict(family.hook_roles())
        # set by canonizers: kv heads shared by query heads, and how to fold records back
        self.kv_grouped = family.n_kv_heads is not None
        self.fold_record: Callable[[str, Tensor], Tensor] = lambda name, relevance: relevance
        self._transforms: Dict[Role, List[Callable[[_Site, Tensor], Tensor]]] = {}
        self._readers: Counter = Counter({Role.LOGITS: 1})  # the output rule completes from the raw logits
        self._captured: Dict[Tuple[Role, Optional[int]], List] = {}
        self._patterns: Dict[int, Tensor] = {}  # each softmax's output until the backward reaches its input
        self._pattern_shares: Dict[int, float] = {}  # the relevance leaving each softmax, read in finish
        self._z_shares: Dict[int, float] = {}
        self._site_out: Optional[Tensor] = None  # the hook point being run, and what observes it
        self._site_callbacks: List[Callable[[Tensor, Tensor], None]] = []
        # rule sites the forward ran, those whose output took part in autograd, and those the
        # backward reached (``never_ran``, ``unreached``)
        self.checking_path = False  # set for the pass that checks every rule site is in the path
        self._ran: Set[str] = set()
        self._fired: Set[str] = set()
        self._reached: Set[str] = set()

    # -- what canonizers and strategies use ------------------------------------------------------
    def capture(self, *roles: Role) -> None:
        """Keep the rule-patched output of ``roles`` (per layer) for one more reader."""
        self._readers.update(roles)

    def transform(self, role: Role, fn: Callable[[_Site, Tensor], Tensor]) -> None:
        """Replace the activation of ``role`` by ``fn(site, act)`` (same value) before its rule."""
        self._transforms.setdefault(role, []).append(fn)

    def take(self, role: Role, layer: Optional[int]) -> Tensor:
        """A captured output; released once its last reader took it."""
        entry = self._captured.get((role, layer))
        if entry is None:
            raise NotImplementedError(
                f"{self.family.name}: a rule of method {self.method.name!r} reads the output of {role.name} in layer "
                f"{layer}, but this model has no hook point of that role there (or it was read already)"
            )
        entry[1] -= 1
        if entry[1] == 0:
            del self._captured[(role, layer)]
        return entry[0]

    def on_grad(self, tensor: Tensor, fn: Callable[[Tensor], None]) -> None:
        """Call ``fn(grad)`` when the backward reaches ``tensor`` (if it is in the graph), with the
        gradient in the record dtype, a float16 backward's seed scale divided out
        (``lens_palrp.precision``): whatever ``fn`` multiplies it with is promoted, so every
        relevance is formed in float32 or better. Not while a block is recomputed
        (``replaying``): its tensors are either the recomputation's own, which the backward never
        visits, or the first forward's (the block's input), whose hooks are attached already."""
        if tensor.requires_grad and not self.replaying:
            unscale = self.precision.unscale

            def hook(grad: Tensor) -> None:
                fn(unscale(grad))

            tensor.register_hook(hook)

    def observe(self, tensor: Tensor, fn: Callable[[Tensor, Tensor], None]) -> None:
        """Call ``fn(activation, grad)`` when the backward reaches the output of the hook point
        being run (``tensor``), the gradient as ``on_grad`` gives it. The activation travels as
        an autograd saved tensor (``lens_palrp.observers``), not in a closure: recomputed with
        its block under ``checkpoint=True`` instead of kept for every layer."""
        if tensor is not self._site_out:
            raise RuntimeError("Sweep.observe takes the output of the hook point being run")
        if tensor.requires_grad:
            unscale = self.precision.unscale
            self._site_callbacks.append(lambda a, g: fn(a, unscale(g)))

    def observed(self, tensor: Tensor, fn: Callable[[Tensor, Tensor], None]) -> Tensor:
        """``tensor`` (same value) with ``fn(activation, grad)`` called in the backward, for a
        rewrite's own tensors (a fused kernel's inputs): the caller continues with the result."""
        unscale = self.precision.unscale
        return observed(tensor, [lambda a, g: fn(a, unscale(g))])

    def accumulate(self, total: Tensor, value: Tensor) -> None:
        """``total += value``, with ``value`` brought to the results' device (``lens_palrp.devices``)."""
        total.add_(self.placement.gather(value))

    def start(self) -> None:
        """After the canonizers: pick the positional strategy and count who reads what."""
        self.encoding = encoding_for(self.family.pe_type)(self)
        for role in {hr.role for hr in self.roles.values()}:
            self.capture(*self.method.rule(role).reads(self.family))
        self.capture(*self.encoding.reads())

    # -- one hook function per hook point --------------------------------------------------------
    def hook_fns(self, names: Iterable[str]) -> List[Tuple[str, Callable]]:
        """One hook function per hook *point*: names that are aliases of one point (a bridge's
        ``hook_pos_embed`` and ``pos_embed.hook_out``) share it, so a record of either sees the
        activation after the role's rule, whatever order the hooks would have run in."""
        points = self.family.hook_points()
        by_point: Dict[int, List[str]] = {}
        for name in sorted(names):
            by_point.setdefault(id(points.get(name, name)), []).append(name)
        hooks = []
        for aliases in by_point.values():
            names = sorted(aliases, key=lambda n: n not in self.roles)  # the role's own name first
            hooks.append((names[0], self.hook_fn(names, self.roles.get(names[0]))))
        return hooks

    def hook_fn(self, names: List[str], role: Optional[HookRole]):
        """The forward hook of one hook point known by ``names`` (the first plays ``role``)."""
        target = self.hook_target if self.hook_target is not None and self.hook_target.hook_name in names else None

        def fn(act: Tensor, hook=None):
            if role is not None:
                out = self.run_site(names, role, act, consumer=target is None)
            else:
                def attach(out: Tensor) -> None:
                    for alias in names:
                        self._record(alias, out, 1.0)

                out = self._observing(act, attach)
            if target is not None and not self.replaying:
                self.target_value = self.placement.gather(target.fn(out))
                raise _StopForward
            return out

        return fn

    def run_site(self, names: Union[str, Sequence[str]], hr: HookRole, act: Tensor, consumer: bool) -> Tensor:
        """Install the rule of ``hr.role`` on ``act`` and attach the records; returns the tensor
        the model continues with (same value). ``consumer=False`` at an ``at_hook`` target: the
        rule of the operation that would consume the activation (e.g. 1/2 for Q K^T) is skipped,
        since the explained scalar consumes it instead."""
        names = [names] if isinstance(names, str) else list(names)
        name, role, layer = names[0], hr.role, hr.layer
        self._ran.add(name)
        rule = self.method.rule(role)
        site = _Site(self, name, role, layer, consumer, rule)
        for transform in self._transforms.get(role, ()):
            act = transform(site, act)
        out, share = rule.apply(act, site)
        if share is None:  # held constant: no relevance passes, the record holds zeros
            for alias in names:
                if alias in self.record_names:
                    self.records.setdefault(alias, torch.zeros_like(out.detach(), dtype=self.precision.records))
        else:
            def attach(out: Tensor) -> None:
                if self.checking_path and out.requires_grad:
                    # through the observer node: a new tensor, so a model that recomputes around an
                    # unedited hook (TransformerLens' norms) takes the path the rules' edits take
                    self._fired.add(name)
                    self._site_callbacks.append(lambda a, g: self._reached.add(name))
                self.encoding.at_site(site, out, share)
                observe = _OBSERVERS.get(role)
                if observe is not None:
                    observe(self, site, out, share)
                for alias in names:
                    self._record(alias, out, share)

            out = self._observing(out, attach)
        if self._readers[role]:  # readers use the observed tensor: their gradient is seen too
            self._captured[(role, layer)] = [out, self._readers[role]]
        return out

    def _observing(self, out: Tensor, attach: Callable[[Tensor], object]) -> Tensor:
        """Run ``attach(out)``, which registers what observes ``out`` (``observe``), and return
        ``out`` behind one observer node (one saved tensor per hook point)."""
        self._site_out, self._site_callbacks = out, []
        try:
            attach(out)
            return observed(out, self._site_callbacks)
        finally:
            self._site_out, self._site_callbacks = None, []

    # -- per-layer records -----------------------------------------------------------------------
    def _observe_residual(self, site, out, share):
        layer = site.layer
        slot = self.family.n_layers if layer is None else layer  # the final residual has no layer
        at = self.family.record_positions(layer)
        self.observe(out, lambda a, g: self.accumulate(self.residual[:, slot, at], (a * g).sum(-1)))

    def _observe_heads(self, site, out, share):
        """Per-head relevance written into the residual stream: ``z * grad`` summed over d_head."""
        layer = site.layer
        self._z_shares[layer] = share
        at = self.family.record_positions(layer)
        self.observe(out, lambda a, g: self.accumulate(self.heads_by_pos[:, layer, :, at],
                                                       (a * g).sum(-1).transpose(1, 2)))

    def _observe_mlp(self, site, out, share):
        layer = site.layer
        at = self.family.record_positions(layer)
        self.observe(out, lambda a, g: self.accumulate(self.mlp[:, layer, at], (a * g).sum(-1)))

    def _observe_softmax_output(self, site, out, share):
        """The relevance leaving the softmax, ``sum_j p_j g_j`` (``g``: the gradient the pattern
        passes on). What the softmax absorbs is that minus what enters it through the scores; a
        learned sink logit (GPT-OSS) is a constant of the softmax, so its part counts as absorbed.

        Where the pattern feeds the head output ``z = A V`` (``hook_z``, in every family; an
        element-wise gate after it changes nothing), ``sum_ij p_ij sum_d g_id v_jd = sum_id z_id
        g_id``: the sum is the layer's per-head relevance, which the ``Z`` observer reduces
        anyway, times the pattern's and z's shares; ``finish`` reads it from there, and no
        ``[query, key]``-sized product is formed. Only at an ``at_hook`` target on the pattern
        itself (no z follows) is it formed here."""
        layer = site.layer
        if site.consumer:
            self._pattern_shares[layer] = share
            # the pattern (which A V keeps for its backward anyway) waits for the scores' gradient
            self.observe(out, lambda p, g: self._patterns.__setitem__(layer, p))
        else:
            self.observe(out, lambda p, g: (self._patterns.__setitem__(layer, p),
                                            self._softmax_output(layer, p, share * g)))

    def _softmax_output(self, layer: int, pattern: Tensor, grad: Tensor) -> None:
        self.accumulate(self.softmax_absorbed[:, layer], softmax_output_relevance(pattern, grad).sum((1, 2)))

    def _observe_softmax_input(self, site, out, share):
        """The relevance entering the softmax, ``sum_j s_j dL/ds_j``, from the gradient autograd
        computes at the scores anyway and the pattern of the same layer (no score is kept for the
        backward: ``rules.softmax_input_relevance``); positional strategies that ask for the
        score gradient (``needs_score_gradient``) get it as it is."""
        layer = site.layer
        self.on_grad(out, lambda g: self._softmax_input(layer, share * g))

    def _softmax_input(self, layer: int, grad: Tensor) -> None:
        pattern = self._patterns.pop(layer)
        sinks = self.family.attention_sinks(layer)
        if sinks is not None:
            sinks = sinks.detach().to(grad.dtype)[None, :, None]
        r_in = softmax_input_relevance(pattern, grad, sinks)
        self.accumulate(self.softmax_absorbed[:, layer], -r_in.sum((1, 2)))
        if self.encoding.needs_score_gradient:
            self.encoding.at_scores(layer, grad)

    def _record(self, name: str, out: Tensor, share: float) -> None:
        """``attr.hooks[name]`` (relevance) and ``attr.gradients[name]`` (rule-modified gradient)."""
        fold, dtype = self.fold_record, self.precision.records
        # setdefault: a block recomputed under checkpoint=True runs its hooks once more
        if name in self.gradient_names:
            self.gradients.setdefault(name, fold(name, torch.zeros_like(out.detach(), dtype=dtype)))

            def keep_grad(g):
                self.gradients[name] = self.gradients[name] + fold(name, share * g.detach())

            self.on_grad(out, keep_grad)
        if name in self.record_names:
            self.records.setdefault(name, fold(name, torch.zeros_like(out.detach(), dtype=dtype)))  # zeros where none arrives

            def keep(a, g):
                rel = share * a * g
                rel = torch.where(torch.isfinite(rel), rel, torch.zeros_like(rel))
                self.records[name] = self.records[name] + fold(name, rel.detach())

            if out.requires_grad:
                self.observe(out, keep)

    # -- after the backward ----------------------------------------------------------------------
    def never_ran(self) -> List[str]:
        """Rule sites the forward never ran: the model computes that quantity elsewhere, or not
        at all, and a rule installed there does not act (the scores and pattern under fused
        attention are not formed by design). Meaningful for a forward that ran every layer."""
        unformed = {Role.SCORES, Role.PATTERN} if not self.scores_materialized else set()
        return sorted(name for name, hr in self.roles.items() if name not in self._ran and hr.role not in unformed)

    def unreached(self) -> List[str]:
        """Rule sites whose output the forward computed with autograd but the backward never
        reached (an observe-only hook point); tracked while ``checking_path``. Only a method
        without held-constant rules (``grad_x_input``) must reach every site."""
        return sorted(self._fired - self._reached)

    def finish(self) -> None:
        """What is read off the other records once the backward is done: each softmax's output
        relevance from its layer's per-head relevance (``_observe_softmax_output``)."""
        for layer, share in self._pattern_shares.items():
            r_out = self.heads_by_pos[:, layer].sum((1, 2)) * (share * self._z_shares.get(layer, 0.0))
            self.softmax_absorbed[:, layer].add_(r_out)

    # -- after the forward -----------------------------------------------------------------------
    def complete_output(self, logits: Tensor) -> Tensor:
        """The output rule (e.g. the identity rule on an output softcap) on the model's logits."""
        raw = self._captured.pop((Role.LOGITS, None), None)
        logits = logits if raw is None else self.method.rule(Role.LOGITS).complete(raw[0], logits)
        return self.placement.gather(logits)  # the last layer's device: where the target indexes


_OBSERVERS = {
    Role.RESID_PRE: Sweep._observe_residual,
    Role.RESID_FINAL: Sweep._observe_residual,
    Role.Z: Sweep._observe_heads,
    Role.MLP_POST: Sweep._observe_mlp,
    Role.MLP_GATED: Sweep._observe_mlp,
    Role.MLP_NORMED_POST: Sweep._observe_mlp,
    Role.PATTERN: Sweep._observe_softmax_output,
    Role.SCORES: Sweep._observe_softmax_input,
}


# ---------------------------------------------------------------------------------------- explain
def explain(
    model,
    tokens,
    target: TargetSpec,
    method: Union[str, Method] = "pa_lrp",
    position: Union[int, Tensor] = -1,
    record: HookNames = None,
    attention_mask: Optional[Tensor] = None,
    prepend_bos: Optional[bool] = None,
    record_gradients: HookNames = None,
    allow_unverified: bool = False,
    attention: str = "auto",
    checkpoint: bool = False,
    **options,
) -> Attribution:
    """Explain ``target`` on ``tokens`` with one hooked forward and one relevance sweep.

    Args:
        model: a TransformerLens ``HookedTransformer``, ``HookedEncoder``, ``TransformerBridge``,
            a ``lens_palrp.hooks.vit.HookedViT`` image classifier, or a Hugging Face
            ``PreTrainedModel``, explained through a ``TransformerBridge`` built once per model object
            (``lens_palrp.models.explainable``; pass ``tokenizer=`` unless the model's
            ``name_or_path`` folder holds one). The Hugging Face model is left untouched.
        tokens: a LongTensor ``[batch, pos]``, or a string / list of strings tokenized with the
            model's tokenizer (never truncated). Padding on either side is recognised from
            ``attention_mask``, or from runs of the pad id that differ between rows (as
            ``model.to_tokens([...])`` leaves them). Results are right-aligned: example ``i``'s
            real tokens are positions ``0 .. n_i - 1`` whatever side the input was padded on.
            For a ViT: float images ``[batch, channels, height, width]`` (normalized for the model).
        target: a token id (int, single-token string, or ``[batch]`` tensor) whose logit at
            ``position`` is explained, or a list with one per prompt (``[" Mary", " Anna"]``); a
            pair ``(correct, wrong)`` for a logit difference, or one pair per prompt
            (``[(" Mary", " John"), (" Anna", " Tom")]``); a
            callable ``metric(logits) -> [batch]`` or ``metric(logits, positions) -> [batch]``
            (``positions``: each example's explained position in the right-aligned logits, so a
            metric on a padded batch never reads a pad); or ``lp.at_hook(hook_name, fn)``.
        method: ``"pa_lrp"`` (default), ``"attn_lrp"``, ``"cp_lrp"``, ``"grad_x_input"``, the name
            of a method registered with ``lens_palrp.methods.register_method``, or a ``Method``.
        position: the position of the explained logit, counted within each example's own
            tokens (``-1``: its last real token); an int or a ``[batch]`` tensor of ints.
        record: a hook name, a list of them, or a filter ``callable(name) -> bool`` (as
            TransformerLens' ``names_filter``): their relevance (same shape as the activation) is
            kept in ``attr.hooks``.
        attention_mask: ``[batch, pos]`` of 0 (pad) and 1 (real token), left or right padding.
        prepend_bos: passed to the tokenizer for string input (model default when None).
        record_gradients: hook names (as ``record``) whose *rule-modified gradient* (relevance /
            activation, the modified-gradient view of LRP) is kept in ``attr.gradients`` (for
            attribution-patching style estimates, see ``lens_palrp.analyses.relevance_patching``).
        allow_unverified: explain a TransformerBridge whose architecture is not among the
            verified ones (``lens_palrp.hooks.transformer_bridge.VERIFIED_ARCHITECTURES``); the
            maps are then unverified, and a warning says so; it is still refused where a hook point
            the rules patch is not run or not in the computation path (one extra gradient x input
            pass checks it).
        attention: ``"auto"`` (default): attention runs through PyTorch's fused kernel wherever
            the method, the positional encoding, the records and the model allow it (no
            ``[query, key]`` tensor is formed or kept; ``lens_palrp.canonizers.FusedAttention``),
            eager otherwise; ``"eager"``: always eager (to record ``hook_pattern`` or
            ``hook_attn_scores``, say); ``"fused"``: fused, or a ``ValueError`` saying why not.
            ``attr.computation`` says which ran, and why eager. The maps agree either way.
            A layer whose ``hook_attn_scores`` or ``hook_pattern`` carries a hook of the caller's
            runs eagerly under ``"auto"`` (``"mixed"``, ``attr.computation["eager_layers"]``);
            ``"fused"`` then refuses.
        checkpoint: recompute each block's forward during the sweep, as gradient checkpointing
            does (``lens_palrp.canonizers.CheckpointBlocks``): with fused attention, the memory
            above the weights is about one block's activations plus the residual stream entering
            each block, at the cost of a second forward. The maps are unchanged. Hooks the
            caller left on the model run a second time while a block is recomputed.
        **options: options of the model's family. ``HookedViT``: ``patch_rule``, the rule that
            takes the patch embeddings' relevance to pixels (``attr.pixels``): ``"gamma"``
            (default, as the paper's vision setup) or ``"epsilon"``; ``gamma``, its parameter
            (>= 0, default 0.25). The patch-level maps do not depend on them.

    Hooks the caller left on the model (forward hooks and pre-hooks on hook points) are part
    of the explained computation; the sweep's own run after them. Backward hooks are refused.
    The sweep runs in eval mode (dropout off). The model is left exactly as it was: hooks
    removed (the caller's kept), ``requires_grad``, gradients, every module's training flag and the config restored,
    whether ``explain`` returns or raises. Calls on one model from several threads run one after
    the other.
    """
    from lens_palrp.models import explainable

    # a Hugging Face model object: its cached TransformerBridge (the object itself is not touched)
    model = explainable(model, options.pop("tokenizer", None))
    if not isinstance(allow_unverified, bool):  # "no" would be truthy and opt in
        raise TypeError(f"allow_unverified must be True or False, got {allow_unverified!r}")
    if not isinstance(checkpoint, bool):
        raise TypeError(f"checkpoint must be True or False, got {checkpoint!r}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION_MODES))}, got {attention!r}")
    # the sweep needs autograd even when the caller is in no_grad / inference mode
    with torch.inference_mode(False), torch.enable_grad():
        with unverified_architectures(allow_unverified):
            args = (model, tokens, target, method, position, record, attention_mask, prepend_bos,
                    record_gradients, attention, checkpoint, options)
            try:
                return _explain(*args)
            except _ScaledBackwardOverflow:  # float16: the seeded backward overflowed; once more unscaled
                return _explain(*args, scale_gradients=False)


def rule_sites(model, method: Union[str, Method] = "pa_lrp") -> Dict[str, Tuple[HookRole, Rule]]:
    """Where ``explain`` installs rules on ``model``: hook name -> (role, the method's rule), after
    the family's canonizers (e.g. a bridge whose pattern only observes has no pattern site)."""
    family, m = family_for(model), get_method(method)
    sweep = Sweep(family, m, 1, 1, Precision(torch.float32, torch.float32), Placement(torch.device("cpu")),
                  None, (), None)
    with model_left_unchanged(model), canonized(family.canonizers(), family, sweep):
        return {name: (hr, m.rule(hr.role)) for name, hr in sweep.roles.items()}


def _family_options(family, options) -> dict:
    """The family's own options, checked; an option of another family is named as such."""
    unknown = sorted(set(options) - set(family.options))
    if unknown:
        owners = sorted({FAMILY_OPTIONS[name] for name in unknown if name in FAMILY_OPTIONS})
        if owners:
            verb = "applies" if len(unknown) == 1 else "apply"
            raise ValueError(f"{' and '.join(unknown)} {verb} to {' and '.join(owners)} only, not to a {family.name}")
        raise TypeError(f"explain() got an unexpected keyword argument {unknown[0]!r}")
    return family.resolve_options({k: v for k, v in options.items() if v is not None})


class _ScaledBackwardOverflow(Exception):
    """A float16 sweep whose seeded backward (``precision.FLOAT16_GRADIENT_SCALE``) overflowed."""


def _explain(model, tokens, target, method, position, record, attention_mask, prepend_bos,
             record_gradients, attention, checkpoint, options, scale_gradients: bool = True,
             family=None, off_path: Optional[List[str]] = None) -> Attribution:
    family = family if family is not None else family_for(model)
    if getattr(family, "unverified", False) and off_path is None:
        _require_hooks_in_path(family, model, tokens, target, method, position, attention_mask, prepend_bos,
                               attention, checkpoint, options)
    options = _family_options(family, options)
    m = get_method(method)
    record = resolve_hook_names(record, family, "record")
    record_gradients = resolve_hook_names(record_gradients, family, "record_gradients")
    precision, placement = precision_for(model, scale_gradients), placement_for(model)
    prepared = family.prepare(tokens, attention_mask, prepend_bos, position, placement.device)
    batch, n_pos = prepared.tokens.shape
    target_fn, hook_target = resolve_target(target, batch, prepared.positions, family,
                                            padded=prepared.attention_mask is not None)
    if hook_target is None and not family.logits_supported:
        raise NotImplementedError(
            f"{family.name} encoders: the MLM head's activation has no hook, so logit targets "
            "cannot get the LRP rules; explain a hidden state with lp.at_hook(...) or "
            "lp.explain_similarity(...)"
        )

    sweep = Sweep(family, m, batch, n_pos, precision, placement, prepared.attention_mask, record, hook_target,
                  record_gradients)
    sweep.checking_path = off_path is not None
    named = set(record) | set(record_gradients) | ({hook_target.hook_name} if hook_target else set())
    # under the model's lock: the caller's hooks are read while no other thread's sweep has its own attached
    with model_left_unchanged(model):
        computation, canonizers, target_fn = _plan(family, m, sweep, attention, checkpoint, named, target_fn)
        with canonized(canonizers, family, sweep):
            sweep.start()
            fwd_hooks = sweep.hook_fns(set(sweep.roles) | named)
            # attached until the backward is done: a recomputed block (checkpoint=True) runs them again
            with family.hooks_attached(fwd_hooks):
                value, grads, roles_in_graph = _forward_backward(family, sweep, prepared, target_fn, hook_target,
                                                                 batch, precision)
            sweep.finish()
    if hook_target is None:  # every layer ran: each rule site must have
        _refuse_sites(family, sweep.never_ran(), "never run by the forward (the model computes that quantity "
                      "elsewhere), so the rules installed there would not act")
    if off_path is not None:
        off_path.extend(sweep.unreached())
    sink_relevance = {  # relevance of each input sink: embedding x gradient (Eq. 5, epsilon = 0)
        r: precision.relevance(sweep.leaves[r].detach(), torch.zeros_like(sweep.leaves[r]) if g is None else g)
        for r, g in zip(roles_in_graph, grads)
    }
    try:
        attr = _assemble(sweep, prepared, precision.upcast(value.detach()), sink_relevance)
        attr.computation = computation
    except FloatingPointError as err:
        if precision.gradient_scale != 1.0:
            raise _ScaledBackwardOverflow from err
        raise
    attr = family.finish(attr, prepared, sink_relevance, options)
    attr.prompt_text, attr.target_label = describe(family, prepared, target, target_fn, hook_target)  # for reports
    return attr


def _plan(family, method: Method, sweep: Sweep, attention: str, checkpoint: bool, named, target_fn):
    """How this sweep runs (``attr.computation``), the canonizers that make it so, and the target
    as the canonizers leave it; reads the hooks the caller left on the model (refusing backward
    ones), so it runs under the model's lock."""
    refuse_backward_hooks(family)
    hooked = forward_hooked(family)
    sweep.caller_hooked = with_aliases(family, hooked)
    computation = _computation(family, method, attention, checkpoint, named, sweep.roles, hooked)
    canonizers = list(family.canonizers())
    if _unembed_explained_positions(family, target_fn, named):
        canonizers.append(LogitsAtPositions(target_fn.positions))
        target_fn = target_fn.at_first_position()
        computation["logits"] = "explained positions"
    if computation["attention"] != "eager":
        canonizers.append(FusedAttention(computation["eager_layers"]))  # type: ignore[arg-type]
    if checkpoint:
        canonizers.append(CheckpointBlocks())
    return computation, canonizers, target_fn


def _require_hooks_in_path(family, model, tokens, target, method, position, attention_mask, prepend_bos,
                           attention, checkpoint, options) -> None:
    """For an architecture nobody verified: every hook point the rules patch must be in the
    computation path, or the maps would silently miss what flows around it (an observe-only
    hook). Checked under ``grad_x_input``, which holds nothing constant, so every rule site the
    forward ran must be reached by the backward; ``method`` itself is checked when it is that."""
    off_path: List[str] = []
    # a scalar of every logit of the explained position reaches whatever the output depends on
    probe = (lambda logits, positions: logits[torch.arange(len(positions)), positions].sum(-1)) \
        if family.logits_supported else target
    _explain(model, tokens, probe, "grad_x_input", position, None, attention_mask, prepend_bos, None,
             attention, checkpoint, options, family=family, off_path=off_path)
    _refuse_sites(family, off_path, "not in the computation path (the model computes its output around "
                  "them), so the rules installed there would not act")


def _refuse_sites(family, names: List[str], why: str) -> None:
    if names:
        raise NotImplementedError(
            f"{family.describe()} cannot be explained: the hook points {names[:6]}"
            f"{' ...' if len(names) > 6 else ''} are {why}"
        )


def _forward_backward(family, sweep: Sweep, prepared, target_fn, hook_target, batch: int, precision: Precision):
    """The hooked forward, the target's value and the backward to the input sinks."""
    try:
        logits = family.forward(prepared.inputs, prepared.attention_mask, ())
    except _StopForward:
        logits = None
    if hook_target is not None:
        if sweep.target_value is None:
            raise ValueError(
                f"at_hook: hook point {hook_target.hook_name!r} was not reached in the forward pass"
            )
        value = sweep.target_value
    else:
        value = target_fn(sweep.complete_output(logits))
    value = _check_target_value(value, batch, precision)
    if not value.requires_grad:
        raise ValueError("the target does not depend on the input: nothing to explain")
    roles_in_graph = list(sweep.leaves)
    seed = torch.full((), precision.gradient_scale, dtype=value.dtype, device=value.device)
    grads = torch.autograd.grad(value.sum(), [sweep.leaves[r] for r in roles_in_graph], seed, allow_unused=True)
    if all(g is None for g in grads):  # it requires grad only through tensors of its own
        raise ValueError("the target does not depend on the input: nothing to explain")
    return value, grads, roles_in_graph


def _unembed_explained_positions(family, target_fn, named) -> bool:
    """Whether the logits are needed at the explained positions only: a logit (difference)
    target on a model with positions, and no record at the unembedding's own hook points."""
    if not isinstance(target_fn, LogitTarget) or family.unembed_module() is None:
        return False
    return not any(name.startswith("unembed.") for name in named)


def _computation(family, method: Method, attention: str, checkpoint: bool, named,
                 roles: Dict[str, HookRole], hooked: Sequence[str] = ()) -> Dict[str, object]:
    """How the sweep runs: ``{"attention": "fused" | "eager" | "mixed", "eager_reason": why eager
    (None when fused), "eager_layers": the layers whose attention runs eagerly, "checkpoint":
    bool, "logits": "all positions"}`` (``"explained positions"`` once ``LogitsAtPositions`` is
    chosen). A hook the caller left at a point fused attention skips (``hooked``) keeps that
    layer eager, the others fused (``"mixed"``); ``attention="fused"`` that cannot be is a
    ValueError."""
    everything = list(range(family.n_layers))
    if attention == "eager":
        reason: Optional[str] = "attention='eager' was asked for"
        eager = everything
    else:
        # a name is compared by its hook point: an alias of a bridge's hook_pattern is the pattern too
        points = family.hook_points()
        formed = {id(points.get(n, n)): hr.layer or 0 for n, hr in roles.items() if hr.role in MATERIALIZED_ROLES}
        materialized = {n for n in named if id(points.get(n, n)) in formed}
        reason = fused_attention_refusal(family, method, encoding_for(family.pe_type), materialized)
        eager = everything if reason else []
        skipped = {n: formed[id(points[n])] for n in hooked if id(points.get(n, n)) in formed}
        if reason is None and skipped:
            eager = sorted(set(skipped.values()))
            reason = (f"a hook the caller added at {', '.join(sorted(skipped))} runs only in eager attention "
                      f"(eager in layer{'s' if len(eager) > 1 else ''} {', '.join(map(str, eager))})")
        if reason is not None and attention == "fused":
            raise ValueError(f"attention='fused' is not possible here: {reason}. Use attention='auto' or 'eager'")
    mode = "fused" if not eager else "eager" if eager == everything else "mixed"
    return {"attention": mode, "eager_reason": reason, "eager_layers": eager, "checkpoint": checkpoint,
            "logits": "all positions"}


def _check_target_value(value, batch: int, precision: Precision) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"the target must evaluate to a tensor [batch], got {type(value).__name__}")
    if value.ndim == 0 and batch == 1:
        value = value.reshape(1)
    if value.shape != (batch,):
        raise ValueError(f"the target must evaluate to shape [batch]=({batch},), got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"the target value is not finite: {value.tolist()} {precision.non_finite_hint()}")
    return value


def _assemble(sweep: Sweep, prepared, value: Tensor, sink_relevance: Dict[Role, Tensor]) -> Attribution:
    """The sweep's records as an ``Attribution``; the positional strategy supplies its sums."""
    r_embed = sink_relevance[Role.EMBED]
    no_input_sink = torch.zeros_like(r_embed[..., 0])
    input_sums = sweep.encoding.input_sums(sink_relevance)
    positional_input, positional_input_positive = input_sums or (no_input_sink, torch.zeros_like(no_input_sink))
    token_type = sink_relevance.get(Role.TOKEN_TYPE)
    token_type = token_type.sum(-1) if token_type is not None else torch.zeros_like(r_embed[..., 0])
    layer_positive, layer_abs = sweep.encoding.layer_reductions(sweep.positional)
    positional = sweep.positional
    leak_layers = torch.zeros_like(sweep.softmax_absorbed)
    leak_input = torch.zeros_like(value)
    if not sweep.method.positional.sinks:  # no PE rule: the positional relevance leaks, reported, not mapped
        leak_layers, leak_input = positional.sum((2, 3)), positional_input.sum(-1)
        positional = torch.zeros_like(positional)
        positional_input = torch.zeros_like(positional_input)
        positional_input_positive = torch.zeros_like(positional_input)
        layer_positive, layer_abs = torch.zeros_like(layer_positive), torch.zeros_like(layer_abs)
    tokens, attention_mask = prepared.tokens, prepared.attention_mask
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
        str_tokens=prepared.str_tokens,
        method=sweep.method.name,
        attention_mask=mask,
        target_position=prepared.positions,
        hooks=Records(sweep.records),  # the Attribution sets their n_layers and wording
        gradients=Records(sweep.gradients),
        model_name=str(getattr(sweep.family.cfg, "model_name", "")),
        _reductions=Reductions(
            semantic_positive=r_embed.clamp(min=0).sum(-1),
            positional_input_positive=positional_input_positive,
            positional_layer_positive=layer_positive,
            positional_layer_abs=layer_abs,
            softmax_absorbed_per_layer=sweep.softmax_absorbed,
            router_absorbed_per_layer=sweep.router_absorbed,
            positional_leak_per_layer=leak_layers,
            positional_leak_input=leak_input,
        ),
    )
    check_finite(attr, sweep.precision.describe_non_finite)  # the fields the table marks finite
    return attr
