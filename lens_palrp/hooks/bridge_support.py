"""Which Hugging Face architectures lens_palrp explains on a TransformerBridge, and how each was checked.

One row per architecture: the README's coverage table is this table, and
``tests/test_architectures.py`` runs the same checks on a tiny random model of every row
(gradient x input equal to autograd on the bare Hugging Face model, every rule's hook point in
the computation path by intervention, conservation under pa_lrp / attn_lrp / cp_lrp, nonzero
positional sinks). A bridge whose ``model_type`` is in no verified row is refused unless the caller
opts in (``allow_unverified=True``); then the engine still refuses it when a hook point the rules
patch is never run or is off the computation path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class ArchitectureSupport:
    name: str  # as researchers call it
    model_types: Tuple[str, ...]  # Hugging Face config.model_type values it covers
    encoding: str  # the positional encoding, as PA-LRP sees it
    refused: Optional[str] = None  # None: verified; else why it is refused
    notes: str = ""  # what the row covers beyond the plain decoder
    test: str = "tests/test_architectures.py"  # where its checks run (beside the per-family tests)
    # the oldest TransformerLens whose bridge of it was verified, and what goes wrong before it
    min_transformer_lens: Optional[Tuple[int, int]] = None
    older_bridge_problem: str = ""

    @property
    def verified(self) -> bool:
        return self.refused is None

    def refusal_here(self) -> Optional[str]:
        """Why it is refused with the installed TransformerLens, or None."""
        if self.refused:
            return self.refused
        if self.min_transformer_lens and transformer_lens_version() < self.min_transformer_lens:
            wanted = ".".join(map(str, self.min_transformer_lens))
            return f"TransformerLens < {wanted}: {self.older_bridge_problem}; use TransformerLens >= {wanted}"
        return None

    def markdown(self) -> str:
        """This row as the README's table writes it."""
        supported = f"yes: {self.notes}" if self.verified else f"refused: {self.refused}"
        return f"| {self.name} | {self.encoding} | {supported} | [`{self.test.rsplit('/', 1)[-1]}`]({self.test}) |"


ARCHITECTURES: Tuple[ArchitectureSupport, ...] = (
    ArchitectureSupport("Llama", ("llama",), "RoPE", notes="grouped kv heads, gated MLP, fused attention"),
    ArchitectureSupport("Mistral", ("mistral",), "RoPE", notes="sliding window"),
    ArchitectureSupport("Qwen2", ("qwen2",), "RoPE", notes="q/k/v biases"),
    ArchitectureSupport("Qwen3", ("qwen3",), "RoPE", notes="q/k norms"),
    ArchitectureSupport("Qwen3-MoE", ("qwen3_moe",), "RoPE", notes="q/k norms, mixture of experts (routed-product rule)"),
    ArchitectureSupport("Mixtral", ("mixtral",), "RoPE", notes="mixture of experts (routed-product rule), sliding window"),
    ArchitectureSupport("gpt-oss", ("gpt_oss",), "RoPE (half-width tables)",
                        notes="attention sinks, alternating windows, clamped SwiGLU experts"),
    ArchitectureSupport("Gemma", ("gemma",), "RoPE", notes="scaled embedding, (1 + w) RMSNorm"),
    ArchitectureSupport("Gemma-2", ("gemma2",), "RoPE",
                        notes="attention and output softcaps (identity rule), alternating sliding windows"),
    ArchitectureSupport("Gemma-3", ("gemma3", "gemma3_text"), "RoPE", notes="q/k norms, sliding windows"),
    ArchitectureSupport("OLMo-2", ("olmo2",), "RoPE", notes="q/k norms, post-norms"),
    ArchitectureSupport("Phi-3", ("phi3",), "RoPE", notes="joint qkv (rotated q/k routed through their hooks), joint gate-up MLP"),
    ArchitectureSupport("Phi", ("phi",), "RoPE (partial)", notes="parallel attention + MLP, one shared norm"),
    ArchitectureSupport("GPT-NeoX / Pythia", ("gpt_neox",), "RoPE (partial)",
                        notes="joint qkv (rotated q/k routed through their hooks), parallel attention + MLP"),
    ArchitectureSupport("Falcon", ("falcon",), "RoPE", notes="joint qkv, multi-query, parallel attention + MLP "
                        "(the RoPE variant; ALiBi Falcon is not verified)"),
    ArchitectureSupport("OLMo", ("olmo",), "RoPE", notes="LayerNorm without weight or bias"),
    ArchitectureSupport("GPT-J", ("gptj",), "RoPE (adjacent pairs, partial)",
                        notes="rotation inside Hugging Face's attention, rebuilt; parallel attention + MLP"),
    ArchitectureSupport("OPT", ("opt",), "learned absolute (offset 2)", notes="float32 eager softmax in Hugging Face"),
    ArchitectureSupport("StableLM", ("stablelm",), "RoPE (partial)", notes="LayerNorm, q/k/v biases"),
    ArchitectureSupport("Starcoder2", ("starcoder2",), "RoPE", notes="LayerNorm, biases, sliding window"),
    ArchitectureSupport("Granite", ("granite",), "RoPE",
                        notes="embedding, residual, attention and logit multipliers"),
    ArchitectureSupport("GPT-BigCode / StarCoder", ("gpt_bigcode",), "learned absolute", notes="multi-query attention"),
    ArchitectureSupport("Cohere", ("cohere",), "RoPE (adjacent pairs)",
                        notes="parallel attention + MLP, logit scale; the table layout read from the observed "
                              "tables; TransformerLens >= 4.3",
                        min_transformer_lens=(4, 3),
                        older_bridge_problem="its Cohere bridge computes other logits than the Hugging Face model "
                                             "it wraps"),
    ArchitectureSupport("Qwen2-MoE", ("qwen2_moe",), "RoPE",
                        refused="its shared expert (a gated dense MLP beside the routed ones) has no rebuilt rule yet"),
    ArchitectureSupport("GPT-2", ("gpt2",), "learned absolute", notes="biases, LayerNorm"),
    ArchitectureSupport("BLOOM", ("bloom",), "ALiBi", notes="embedding LayerNorm"),
    ArchitectureSupport("BERT", ("bert",), "learned absolute + token type",
                        notes="bidirectional; hidden-state targets (lp.at_hook)"),
    ArchitectureSupport("MPT", ("mpt",), "ALiBi",
                        refused="ALiBi attention of 'mpt': its bias is added in a form lens_palrp does not rebuild "
                        "(verified ALiBi: BLOOM's)"),
    ArchitectureSupport("T5", ("t5",), "relative position bias (its own sink)",
                        notes="encoder-decoder (decoder_input=); TransformerLens >= 4.3",
                        test="tests/test_bridge_t5.py"),
)


def bridge_component(module: str, name: str) -> Optional[Any]:
    """``transformer_lens.model_bridge.generalized_components.<module>.<name>``, or None where this
    TransformerLens has no such component (the checks that need it then refuse or skip)."""
    import importlib

    try:
        found = importlib.import_module(f"transformer_lens.model_bridge.generalized_components.{module}")
    except ImportError:  # pragma: no cover - older TransformerLens
        return None
    return getattr(found, name, None)


def transformer_lens_version() -> Tuple[int, int]:
    from importlib.metadata import version

    major, minor = (version("transformer-lens").split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def support_for(model_type: str) -> Optional[ArchitectureSupport]:
    return _BY_TYPE.get(model_type)


def verified_model_types() -> Tuple[str, ...]:
    """Verified with the installed TransformerLens."""
    return tuple(t for row in ARCHITECTURES if row.refusal_here() is None for t in row.model_types)


_BY_TYPE: Dict[str, ArchitectureSupport] = {t: row for row in ARCHITECTURES for t in row.model_types}
