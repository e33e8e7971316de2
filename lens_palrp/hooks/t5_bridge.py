"""T5 (``T5ForConditionalGeneration``) as a TransformerLens ``TransformerBridge``: two stacks.

The bridge exposes ``encoder_blocks`` (``attn``, ``mlp``) and ``decoder_blocks`` (``self_attn``,
``cross_attn``, ``mlp``) instead of ``blocks``; attention runs in Hugging Face's ``T5Attention``, so
``hook_attn_scores`` / ``hook_pattern`` are fired afterwards from a rebuilt copy and only observe
(not in the path), while ``hook_q/k/v`` (the projections' outputs) and ``hook_z`` (the output
projection's input) are. T5 adds a learned relative position bias ``b_h(bucket(j - i))`` to
``q.k`` (no ``1/sqrt(d)`` scale), computed by the first layer of each stack and shared by its
layers; cross-attention has none. So the attention is rebuilt at ``hook_z`` with the rules
installed (``T5RebuildAttention``), the bias entering as a constant whose share of the scores'
relevance is the positional sink (``lens_palrp.positional.relative_bias``).

Layout of the results (the ``Attribution`` type is unchanged):

* positions: the encoder tokens, then the decoder tokens (``tokens`` is their concatenation);
  ``semantic`` holds both (the embedding is shared and runs once on the concatenation);
* layers (``positional``, ``heads``, ``heads_by_pos``, ``mlp``, ``residual``): encoder layers
  ``0 .. Le-1``, decoder self-attention ``Le .. Le+Ld-1``, decoder cross-attention
  ``Le+Ld .. Le+2Ld-1`` (``attr.computation["layers"]`` names each); a layer's records fill its
  own stack's positions (a cross-attention layer's heads the decoder positions, its sinks none);
  decoder MLPs sit in the decoder self-attention slots, ``residual`` is what enters each attention.
* the explained logit is a decoder position (``position=-1``: the last decoder token); the
  decoder input is ``explain(..., decoder_input=ids)`` (default: the decoder start token).

The norm rule replaces ``hook_scale``, after which the bridge computes T5's RMSNorm itself, its
variance in the model's dtype where Hugging Face's ``T5LayerNorm`` takes it in float32: under the
LRP methods a float64 model's logit differs from Hugging Face's at float32 rounding (2e-8 on the
test model); ``grad_x_input`` leaves the norms alone and matches exactly.

Not supported (``NotImplementedError``): padded batches, gated-activation MLPs (Flan-T5, mT5),
other encoder-decoder bridges (LongT5, Switch, T5Gemma), ``checkpoint=True``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from lens_palrp.canonizers.base import Canonizer
from lens_palrp.hooks.base import PreparedInput
from lens_palrp.hooks.hooked_transformer import TransformerLensFamily
from lens_palrp.hooks.transformer_bridge import TransformerBridgeFamily, is_transformer_bridge
from lens_palrp.roles import HookRole, Role

_SUPPORTED = ("t5",)


def _old_block_bridge() -> bool:
    """TransformerLens 3.x patches ``T5Block.forward`` to return the layout of transformers < 5.15,
    which newer T5 stacks cannot unpack (checked on TransformerLens 3.9 with transformers 5.23)."""
    import inspect
    from importlib.metadata import version

    from transformers.models.t5.modeling_t5 import T5Block

    major = int(version("transformer-lens").split(".")[0])
    return major < 4 and "output_attentions" not in inspect.signature(T5Block.forward).parameters


def is_encoder_decoder_bridge(model) -> bool:
    return is_transformer_bridge(model) and hasattr(model, "encoder_blocks") and hasattr(model, "decoder_blocks")


class T5BridgeFamily(TransformerBridgeFamily):
    """Adapter for a T5 ``TransformerBridge``: encoder and decoder side by side (module docstring)."""

    name = "TransformerBridge (T5)"
    options = ("decoder_input",)

    def __init__(self, model):
        self.model = model
        self.hf_config = getattr(getattr(model, "original_model", None), "config", None)
        TransformerLensFamily.__init__(self, model)  # runs check_supported
        hf = self.hf_config
        self.n_enc_layers = int(hf.num_layers)
        self.n_dec_layers = int(getattr(hf, "num_decoder_layers", None) or hf.num_layers)
        self.n_layers = self.n_enc_layers + 2 * self.n_dec_layers
        self.n_heads, self.d_head = int(hf.num_heads), int(hf.d_kv)
        self.pe_type = "relative_positional_bias"
        self.rotary_dim, self.n_kv_heads, self.attn_softcap = None, None, None
        self.causal = False  # the encoder and cross-attention are bidirectional; decoder masks itself
        self.encoder = False
        self.logits_supported = True
        self.pattern_observed_only = True
        self.score_roles = (Role.Q, Role.K)
        self._decoder_input: Optional[Tensor] = None
        self._n_enc = 0
        self._n_dec = 0
        self._bias: Dict[str, Tensor] = {}

    # ------------------------------------------------------------------ what is supported
    def check_supported(self) -> None:
        model_type = self._model_type()
        hf = self.hf_config
        if model_type not in _SUPPORTED:
            raise NotImplementedError(
                f"lens_palrp cannot explain this encoder-decoder TransformerBridge ({model_type!r}): only T5 "
                "(model_type 't5': relative position bias, ReLU MLP) is implemented; its attention, bias and MLP "
                "layout are unverified for the others"
            )
        if _old_block_bridge():
            raise NotImplementedError(
                "lens_palrp cannot explain a T5 TransformerBridge on TransformerLens < 4: its T5 block bridge "
                "returns the old (hidden, bias, weights, ...) tuple, which this transformers' T5 stack does not "
                "unpack, so the bridge's own forward fails; use TransformerLens >= 4.3"
            )
        if getattr(hf, "is_gated_act", False) or bool(getattr(self.cfg, "gated_mlp", False)):
            raise NotImplementedError(
                "lens_palrp cannot explain this T5 TransformerBridge yet: gated-activation MLP "
                f"(feed_forward_proj={getattr(hf, 'feed_forward_proj', None)!r}, Flan-T5 / mT5) is unverified"
            )
        self._check_verified()

    def canonizers(self):
        return [T5NormsAsRMS(), T5RebuildAttention()]

    def attention_sinks(self, layer: int):
        """T5's softmax has no learned sink column."""
        return None

    def norm_modules(self) -> List:
        """Every normalization bridge of both stacks."""
        blocks = list(self.model.encoder_blocks) + list(self.model.decoder_blocks)
        norms = [getattr(b, ln) for b in blocks for ln in ("ln1", "ln2", "ln3") if hasattr(b, ln)]
        return norms + [self.model.encoder_ln_final, self.model.decoder_ln_final]

    def fused_attention_refusal(self) -> Optional[str]:
        return "T5's attention is rebuilt eagerly with its relative position bias"

    def block_module(self, layer: int):
        raise NotImplementedError("T5 on the TransformerBridge: checkpoint=True is not supported (two stacks)")

    def unembed_module(self):
        return None  # the logits cover the decoder positions only; the full-length output is padded

    @property
    def final_hidden_hook(self) -> str:
        return f"decoder_blocks.{self.n_dec_layers - 1}.hook_out"

    # ------------------------------------------------------------------ layout
    def stack_of(self, layer: Optional[int]) -> str:
        """``encoder``, ``decoder`` (self-attention and MLP) or ``cross`` for a flat layer index."""
        if layer is not None and layer < self.n_enc_layers:
            return "encoder"
        if layer is None or layer < self.n_enc_layers + self.n_dec_layers:
            return "decoder"
        return "cross"

    def layer_names(self) -> List[str]:
        Le, Ld = self.n_enc_layers, self.n_dec_layers
        return ([f"encoder.{i}.attn" for i in range(Le)] + [f"decoder.{i}.self_attn" for i in range(Ld)]
                + [f"decoder.{i}.cross_attn" for i in range(Ld)])

    def record_positions(self, layer: Optional[int]) -> slice:
        n_enc, n_dec = self._n_enc, self._n_dec
        return slice(0, n_enc) if self.stack_of(layer) == "encoder" else slice(n_enc, n_enc + n_dec)

    def key_positions(self, layer: int) -> slice:
        stack = self.stack_of(layer)
        return slice(self._n_enc, self._n_enc + self._n_dec) if stack == "decoder" else slice(0, self._n_enc)

    def _attention(self, layer: int):
        """(bridge attention module, hook prefix) of a flat layer index."""
        Le, Ld = self.n_enc_layers, self.n_dec_layers
        stack = self.stack_of(layer)
        if stack == "encoder":
            return self.model.encoder_blocks[layer].attn, f"encoder_blocks.{layer}.attn"
        if stack == "decoder":
            return self.model.decoder_blocks[layer - Le].self_attn, f"decoder_blocks.{layer - Le}.self_attn"
        return self.model.decoder_blocks[layer - Le - Ld].cross_attn, f"decoder_blocks.{layer - Le - Ld}.cross_attn"

    def attention_module(self, layer: int):
        return self._attention(layer)[0]

    def _mlp(self, layer: int):
        if self.stack_of(layer) == "encoder":
            return self.model.encoder_blocks[layer].mlp
        return self.model.decoder_blocks[layer - self.n_enc_layers].mlp

    def hook_roles(self) -> Dict[str, HookRole]:
        Le, Ld = self.n_enc_layers, self.n_dec_layers
        roles: Dict[str, HookRole] = {"embed.hook_out": HookRole(Role.EMBED)}
        for i in range(Le):
            b = f"encoder_blocks.{i}"
            roles[f"{b}.hook_in"] = HookRole(Role.RESID_PRE, i)
            for ln in ("ln1", "ln2"):
                roles[f"{b}.{ln}.hook_scale"] = HookRole(Role.NORM_SCALE, i)
            roles[f"{b}.mlp.hook_pre"] = HookRole(Role.MLP_PRE, i)
            roles[f"{b}.mlp.hook_post"] = HookRole(Role.MLP_POST, i)
        roles["encoder_ln_final.hook_scale"] = HookRole(Role.NORM_SCALE, None)
        for i in range(Ld):
            b, self_l, cross_l = f"decoder_blocks.{i}", Le + i, Le + Ld + i
            roles[f"{b}.hook_in"] = HookRole(Role.RESID_PRE, self_l)
            roles[f"{b}.hook_resid_mid"] = HookRole(Role.RESID_PRE, cross_l)
            for ln, layer in (("ln1", self_l), ("ln2", cross_l), ("ln3", self_l)):
                roles[f"{b}.{ln}.hook_scale"] = HookRole(Role.NORM_SCALE, layer)
            roles[f"{b}.mlp.hook_pre"] = HookRole(Role.MLP_PRE, self_l)
            roles[f"{b}.mlp.hook_post"] = HookRole(Role.MLP_POST, self_l)
        roles["decoder_ln_final.hook_in"] = HookRole(Role.RESID_FINAL)
        roles["decoder_ln_final.hook_scale"] = HookRole(Role.NORM_SCALE, None)
        for layer in range(self.n_layers):
            prefix = self._attention(layer)[1]
            for role, hook in ((Role.Q, "hook_q"), (Role.K, "hook_k"), (Role.V, "hook_v"), (Role.Z, "hook_z")):
                roles[f"{prefix}.{hook}"] = HookRole(role, layer)
        missing = [name for name in roles if not self.has_hook(name)]
        if missing:
            raise NotImplementedError(f"this T5 TransformerBridge lacks hook points the rules need: {missing[:6]}")
        return roles

    # ------------------------------------------------------------------ model facts
    def activation(self, layer: int) -> Callable[[Tensor], Tensor]:
        hf_mlp = self._mlp(layer).original_component
        fn = getattr(hf_mlp, "act", None)
        if fn is None:
            raise NotImplementedError(f"cannot find the activation of {type(hf_mlp).__name__}")
        return fn

    def attn_scale(self, layer: int) -> float:
        return 1.0  # T5 folds the 1/sqrt(d) into its initialization: scores are q.k

    def relative_bias(self, layer: int) -> Optional[Tensor]:
        """The bias ``[heads, query, key]`` this layer adds to ``q.k`` (None: cross-attention),
        from the first layer's ``relative_attention_bias`` of the stack, as the forward builds it."""
        stack = self.stack_of(layer)
        if stack == "cross":
            return None
        if stack not in self._bias:
            first = self._attention(0 if stack == "encoder" else self.n_enc_layers)[0].original_component
            n = self._n_enc if stack == "encoder" else self._n_dec
            device = first.relative_attention_bias.weight.device
            with torch.no_grad():
                self._bias[stack] = first.compute_bias(n, n, device=device)[0].detach()
        return self._bias[stack]

    # ------------------------------------------------------------------ inputs
    def resolve_options(self, options):
        decoder_input = options.get("decoder_input")
        if decoder_input is not None:
            if isinstance(decoder_input, (list, tuple)):
                decoder_input = torch.tensor(decoder_input)
            if not isinstance(decoder_input, Tensor) or decoder_input.dtype.is_floating_point:
                raise TypeError(f"decoder_input must be integer token ids [batch, pos] or [pos], got {decoder_input!r}")
            decoder_input = decoder_input.long()
            if decoder_input.ndim == 1:
                decoder_input = decoder_input[None]
            if decoder_input.ndim != 2 or decoder_input.shape[1] == 0:
                raise ValueError(f"decoder_input must be [batch, pos] with pos >= 1, got {tuple(decoder_input.shape)}")
        self._decoder_input = decoder_input
        return {"decoder_input": decoder_input}

    def prepare(self, inputs, attention_mask, prepend_bos, position, device) -> PreparedInput:
        from lens_palrp.inputs import _check_vocabulary, prepare_tokens, resolve_positions

        enc = prepare_tokens(self, inputs, attention_mask, prepend_bos, device)
        if enc.attention_mask is not None:
            raise NotImplementedError("T5 on the TransformerBridge: padded batches (attention_mask) are not supported yet")
        batch = enc.tokens.shape[0]
        dec = self._decoder_input
        if dec is None:
            start = getattr(self.hf_config, "decoder_start_token_id", None)
            if start is None:
                raise ValueError("this T5 config has no decoder_start_token_id: pass explain(..., decoder_input=ids)")
            dec = torch.full((1, 1), int(start), dtype=torch.long)
        if dec.shape[0] == 1 and batch > 1:
            dec = dec.expand(batch, -1)
        if dec.shape[0] != batch:
            raise ValueError(f"decoder_input has {dec.shape[0]} rows, the encoder input {batch}")
        _check_vocabulary(dec, self.d_vocab)
        dec = dec.to(enc.tokens.device)
        self._n_enc, self._n_dec = enc.tokens.shape[1], dec.shape[1]
        self._bias = {}
        tokens = torch.cat([enc.tokens, dec], dim=1)
        str_tokens = [row + list(self.to_str_tokens(d)) for row, d in zip(enc.str_tokens, dec.cpu())]
        positions = resolve_positions(position, torch.full((batch,), self._n_dec)) + self._n_enc
        return PreparedInput(tokens, tokens, None, str_tokens, positions)

    def forward(self, tokens: Tensor, attention_mask: Optional[Tensor], fwd_hooks) -> Tensor:
        """The shared embedding once on encoder and decoder tokens together (one semantic sink),
        then Hugging Face's model on the two halves; the logits padded with zeros in front to the
        concatenated length, so the explained position indexes the decoder part."""
        n = self._n_enc
        with self.hooks_attached(fwd_hooks):
            embedded = self.model.embed(tokens)
            out = self.model.original_model(inputs_embeds=embedded[:, :n], decoder_inputs_embeds=embedded[:, n:],
                                            use_cache=False)
        logits = out.logits
        return torch.cat([logits.new_zeros(logits.shape[0], n, logits.shape[2]), logits], dim=1)

    def finish(self, attr, prepared, sink_relevance, options):
        attr.computation = {**(attr.computation or {}), "layers": self.layer_names(),
                            "positions": {"encoder": (0, self._n_enc),
                                          "decoder": (self._n_enc, self._n_enc + self._n_dec)}}
        return attr


class T5NormsAsRMS(Canonizer):
    """TransformerLens' normalization bridge recomputes its output itself once a hook replaces
    ``hook_scale`` (as the norm rule does), as an RMSNorm only where the wrapped class is named
    ``*RMSNorm*`` or the config says ``uses_rms_norm``; T5's ``T5LayerNorm`` is neither, so it would be
    recomputed as a *centered* LayerNorm and the forward would change. The bridges are told they
    are RMSNorms for the sweep (their own override attribute), and put back after."""

    def register(self, family, sweep) -> None:
        self._saved = []
        for norm in family.norm_modules():
            if "_uses_rms_norm_override" in vars(norm):
                self._saved.append((norm, norm._uses_rms_norm_override))
                norm._uses_rms_norm_override = True

    def remove(self) -> None:
        for norm, value in reversed(self._saved):
            norm._uses_rms_norm_override = value
        self._saved = []


class T5RebuildAttention(Canonizer):
    """T5's attention recomputed at ``hook_z`` from the in-path q, k, v with the rules installed:
    ``softmax(q.k + b + mask) v``, the bias ``b`` (the stack's relative bias, none in cross-attention)
    a constant and the decoder's causal mask added; the scores and the pattern run through the
    sweep's sites. The model's own z keeps its value; the rebuilt one carries the gradient, and is
    checked against it (Hugging Face takes this softmax in float32, so to float32 rounding)."""

    def register(self, family, sweep) -> None:
        self.family, self.sweep = family, sweep
        for name in [n for n, hr in sweep.roles.items() if hr.role in (Role.SCORES, Role.PATTERN)]:
            del sweep.roles[name]
        sweep.capture(Role.Q, Role.K, Role.V)
        sweep.transform(Role.Z, self.rebuild)

    def remove(self) -> None:
        self.family = self.sweep = None  # nothing of the model was changed

    def rebuild(self, site, z_model: Tensor) -> Tensor:
        fam, sweep, layer = self.family, self.sweep, site.layer
        q, k, v = sweep.take(Role.Q, layer), sweep.take(Role.K, layer), sweep.take(Role.V, layer)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
        bias = fam.relative_bias(layer)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)[None]
        if fam.stack_of(layer) == "decoder":
            n = scores.shape[-1]
            keep = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        prefix = fam._attention(layer)[1]
        scores = sweep.run_site(f"{prefix}.hook_attn_scores", HookRole(Role.SCORES, layer), scores, True)
        pattern = torch.softmax(scores, dim=-1)
        pattern = sweep.run_site(f"{prefix}.hook_pattern", HookRole(Role.PATTERN, layer), pattern, True)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        err = float((z.detach() - z_model.detach()).abs().max())
        scale = max(float(z_model.detach().abs().max()), 1.0)
        if err > (1e-9 if z.dtype == torch.float64 else 1e-4) * scale:
            raise NotImplementedError(
                f"T5 {fam.layer_names()[layer]}: the attention is not softmax(q.k + relative bias) v "
                f"(rebuilt z differs by {err:.3g}); lens_palrp cannot install its rules here"
            )
        return z_model.detach() + (z - z.detach())
