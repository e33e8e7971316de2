"""TransformerBridge specifics of GPT-J, OPT and OLMo: where their positions and norms differ
from what the generic bridge adapter assumes.

* **GPT-J** (adjacent-pair RoPE inside Hugging Face). The bridge's generic ``AttentionBridge``
  hands the whole attention to ``GPTJAttention``: ``hook_q`` / ``hook_k`` are the projections
  *before* the rotation, ``hook_rot_q`` / ``hook_rot_k`` never fire, no cos/sin hook exists, and
  the bridge config says ``rotary_adjacent_pairs=False`` although GPT-J rotates adjacent pairs
  (``rotate_every_two``). The attention is rebuilt at ``hook_z`` (``RebuildRotatedAttention``)
  from the in-path projections, rotated here with GPT-J's own sinusoid table at the position ids
  the model was called with (read from the attention's call, whichever form the transformers
  release passes them in); the rotated q and k pass the sweep's ``ROT_Q`` / ``ROT_K`` sites (the
  PA-LRP split and the RoPE sink) and the tables its ``ROPE_COS`` / ``ROPE_SIN`` sites. The rebuilt
  z is checked against the model's, as for every rebuild. Parallel attention and MLP (one
  ``ln1``) need nothing of their own: both read the same normalized stream.
* **OPT** (learned positions with an offset of 2, q scaled before the product). Both happen in
  Hugging Face where the bridge's hooks already see them (``hook_pos_embed`` is the table row
  actually added; ``hook_q`` is the unscaled projection and the scale is read from the module's
  ``scaling``), so only the rebuild's check needs to know one thing: Hugging Face's eager
  attention takes OPT's softmax in float32 even in a float64 model, so the rebuilt float64 z
  differs from the model's by float32 rounding and is checked at float32's tolerance
  (``attention_float32_reason``).
* **OLMo** (LayerNorm without weight or bias). A rule that detaches ``hook_scale`` makes the
  bridge rebuild the norm's output, multiplying by a ``weight`` the module does not have
  (``AttributeError``); ``ParameterFreeNorms`` gives those norm bridges a weight-free output for
  the sweep.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from lens_palrp.canonizers.attention_rebuild import RebuildAttention
from lens_palrp.canonizers.base import Canonizer
from lens_palrp.hooks.bridge_support import bridge_component
from lens_palrp.roles import HookRole, Role
from lens_palrp.rules.functional import rotate_every_two


def model_type(family) -> str:
    config = getattr(getattr(family.model, "original_model", None), "config", None)
    return str(getattr(config, "model_type", None) or "unknown")


def _hf_attention(family, layer: int):
    return family.model.blocks[layer].attn.original_component


def rotation_inside_attention(family) -> bool:
    """GPT-J: RoPE applied inside Hugging Face's attention, which the bridge does not reimplement."""
    return (model_type(family) == "gptj" and family.pattern_observed_only
            and all(type(_hf_attention(family, layer)).__name__ == "GPTJAttention"
                    for layer in range(family.n_layers)))


def attention_float32_reason(family) -> Optional[str]:
    """Why the model's own attention rounds to float32 whatever its dtype, or None."""
    kind = model_type(family)
    config = getattr(getattr(family.model, "original_model", None), "config", None)
    if kind == "gptj" and rotation_inside_attention(family):
        return "GPT-J's eager attention casts q and k to float32 for the scores"
    if kind == "opt" and getattr(config, "_attn_implementation", None) == "eager":
        return "OPT's eager_attention_forward takes the softmax in float32"
    return None


def adjust_facts(family) -> None:
    """Facts the bridge config states wrongly or not at all for these architectures."""
    family.attention_float32 = attention_float32_reason(family)
    if rotation_inside_attention(family):
        family.rotary_adjacent_pairs = True  # GPT-J's rotate_every_two; the bridge cfg says False
        family.rotary_dim = int(_hf_attention(family, 0).rotary_dim or family.d_head)


def adjust_roles(family, roles: Dict[str, HookRole]) -> Dict[str, HookRole]:
    """GPT-J: the rotated q/k and the tables have no hook point in the path; the rebuild runs
    their sites itself."""
    if rotation_inside_attention(family):
        drop = (Role.ROT_Q, Role.ROT_K, Role.ROPE_COS, Role.ROPE_SIN)
        roles = {name: hr for name, hr in roles.items() if hr.role not in drop}
    tables = [name for name, hr in roles.items() if hr.role in (Role.ROPE_COS, Role.ROPE_SIN)]
    if any(not family.has_hook(name) for name in tables):
        attention = type(family.model.blocks[0].attn.original_component).__name__
        raise NotImplementedError(
            f"lens_palrp cannot explain this TransformerBridge of {model_type(family)!r} yet: its RoPE is applied "
            f"inside Hugging Face's {attention} (no cos/sin hook point, rotated q/k not in the path); only "
            "GPT-J's rotation is rebuilt")
    return roles


def canonizers(family) -> List[Canonizer]:
    """The rewrites these architectures need; the generic rebuild where nothing else applies."""
    out: List[Canonizer] = []
    if any(_parameter_free(module) for module in _norm_bridges(family.model)):
        out.append(ParameterFreeNorms())
    if family.pattern_observed_only:
        out.append(RebuildRotatedAttention() if rotation_inside_attention(family) else RebuildAttention())
    return out


# ------------------------------------------------------------------------- OLMo's LayerNorm
def _norm_bridges(model):
    norm_bridge = bridge_component("normalization", "NormalizationBridge")
    return [] if norm_bridge is None else [m for m in model.modules() if isinstance(m, norm_bridge)]


def _parameter_free(module) -> bool:
    component = getattr(module, "original_component", None)
    return (component is not None and not isinstance(component, torch.nn.Identity)
            and getattr(component, "weight", None) is None and getattr(component, "bias", None) is None)


def _no_affine(hidden_states: Tensor, input_dtype: torch.dtype) -> Tensor:
    return hidden_states.to(input_dtype)


class ParameterFreeNorms(Canonizer):
    """Norm bridges around a LayerNorm without weight or bias (OLMo's ``OlmoLayerNorm``) rebuild
    their output without the affine step, on the instance, while the sweep runs."""

    _NONE = object()

    def register(self, family, sweep) -> None:
        self.swapped = []
        for module in _norm_bridges(family.model):
            if _parameter_free(module):
                self.swapped.append((module, module.__dict__.get("_apply_weight_and_bias", self._NONE)))
                module.__dict__["_apply_weight_and_bias"] = _no_affine  # not setattr: bridges forward it

    def remove(self) -> None:
        for module, previous in reversed(self.swapped):
            if previous is self._NONE:
                module.__dict__.pop("_apply_weight_and_bias", None)
            else:
                module.__dict__["_apply_weight_and_bias"] = previous
        self.swapped = []


# ------------------------------------------------------------------------- GPT-J's rotation
class RebuildRotatedAttention(RebuildAttention):
    """The attention rebuilt at ``hook_z`` with GPT-J's rotation in the rebuilt graph: the in-path
    projections (``attn.q`` / ``attn.k`` outputs, taken by module forward hooks) are rotated with
    the sin / cos rows the model's attention was called with (``_gptj_sin_cos``), exactly as
    ``GPTJAttention`` does (first ``rotary_dim`` channels, adjacent pairs), and the rotated q and
    k pass the sweep's ``ROT_Q`` / ``ROT_K`` sites, the tables its ``ROPE_COS`` / ``ROPE_SIN``."""

    unrotated = True

    def register(self, family, sweep) -> None:
        super().register(family, sweep)
        self._seen: Dict[tuple, Tensor] = {}
        self._handles = []
        for layer in range(family.n_layers):
            attn = family.model.blocks[layer].attn
            self._handles.append(attn.register_forward_pre_hook(self._tables_of(layer), with_kwargs=True))
            for part in ("q", "k"):
                self._handles.append(getattr(attn, part).register_forward_hook(self._output_of(layer, part)))

    def remove(self) -> None:
        for handle in getattr(self, "_handles", ()):
            handle.remove()
        self._handles, self._seen = [], {}
        super().remove()

    def _tables_of(self, layer: int):
        def hook(module, args, kwargs):
            self._seen[(layer, "tables")] = _gptj_sin_cos(_hf_attention(self.family, layer), kwargs, layer)
        return hook

    def _output_of(self, layer: int, part: str):
        def hook(module, args, output):
            self._seen[(layer, part)] = output
        return hook

    def queries_keys(self, layer: int):
        fam, sweep = self.family, self.sweep
        q, k = self._seen.pop((layer, "q")), self._seen.pop((layer, "k"))
        half_sin, half_cos = self._seen.pop((layer, "tables"))  # [batch, pos, rotary_dim / 2] each
        q, k = (t.reshape(*t.shape[:2], fam.n_heads, fam.d_head) for t in (q, k))
        rd = fam.rotary_dim
        sin, cos = (t.to(k.dtype).repeat_interleave(2, dim=-1) for t in (half_sin, half_cos))
        prefix = f"blocks.{layer}.attn."
        sweep.run_site(prefix + "hook_cos", HookRole(Role.ROPE_COS, layer), cos, True)
        sweep.run_site(prefix + "hook_sin", HookRole(Role.ROPE_SIN, layer), sin, True)

        def rotate(x: Tensor) -> Tensor:
            turned = x[..., :rd] * cos[:, :, None] + rotate_every_two(x[..., :rd], True) * sin[:, :, None]
            return torch.cat([turned, x[..., rd:]], dim=-1)

        q = sweep.run_site(prefix + "hook_rot_q", HookRole(Role.ROT_Q, layer), rotate(q), True)
        k = sweep.run_site(prefix + "hook_rot_k", HookRole(Role.ROT_K, layer), rotate(k), True)
        return q, k


def _gptj_sin_cos(hf_attn, kwargs, layer: int):
    """The sin and cos rows ``[batch, pos, rotary_dim / 2]`` one ``GPTJAttention`` call rotates
    with, read from the arguments of the call: transformers 5.24 and later pass them as
    ``position_embeddings`` (computed once by the model's ``rotary_emb``); earlier releases pass
    ``position_ids``, which index the attention's own ``embed_positions`` table (sin | cos)."""
    tables = kwargs.get("position_embeddings")
    if tables is not None:
        return tables
    positions, table = kwargs.get("position_ids"), getattr(hf_attn, "embed_positions", None)
    if positions is None or table is None:
        import transformers

        raise NotImplementedError(
            f"GPT-J layer {layer}: this transformers release ({transformers.__version__}) calls GPTJAttention "
            "with neither position_embeddings nor position_ids and an embed_positions table, so lens_palrp "
            "cannot read the rotation it applies")
    sincos = table.to(positions.device)[positions]
    return torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
