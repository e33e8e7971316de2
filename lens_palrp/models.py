"""Load your own models offline: Hugging Face folders or objects as TransformerLens models.

``HookedTransformer.from_pretrained`` takes its configuration from TransformerLens' table of
official model names, so it cannot load a local or custom-sized checkpoint. These helpers build
the ``HookedTransformerConfig`` from the Hugging Face config itself and convert the weights with
TransformerLens' own converters; ``bridge_from_folder`` boots a ``TransformerBridge``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch


def _llama_config(c, dtype):
    from transformer_lens import HookedTransformerConfig

    theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None
    return HookedTransformerConfig(
        d_model=c.hidden_size, d_head=head_dim, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=head_dim, rotary_base=theta, rotary_adjacent_pairs=False, gated_mlp=True,
        n_key_value_heads=kv, final_rms=True, eps=c.rms_norm_eps,
        original_architecture="LlamaForCausalLM", dtype=dtype,
    )


def _gpt2_config(c, dtype):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, n_layers=c.n_layer, n_ctx=c.n_positions, d_vocab=c.vocab_size,
        act_fn=c.activation_function, normalization_type="LN", positional_embedding_type="standard",
        eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel", dtype=dtype,
    )


_CONVERTERS = {
    "LlamaForCausalLM": ("llama", "convert_llama_weights", _llama_config),
    "GPT2LMHeadModel": ("gpt2", "convert_gpt2_weights", _gpt2_config),
}


def hooked_transformer_from_hf(hf_model, tokenizer=None, dtype: Optional[torch.dtype] = None):
    """A ``HookedTransformer`` with the weights of a Hugging Face LLaMA-family or GPT-2 model.

    No weight processing (no LayerNorm folding): the model computes what the Hugging Face model
    computes. For other architectures use ``bridge_from_folder``.
    """
    import importlib

    from transformer_lens import HookedTransformer

    arch = type(hf_model).__name__
    if arch not in _CONVERTERS:
        raise NotImplementedError(
            f"no HookedTransformer conversion for {arch} here (supported: {sorted(_CONVERTERS)}); "
            "use lens_palrp.models.bridge_from_folder for a TransformerBridge"
        )
    module, fn, make_config = _CONVERTERS[arch]
    dtype = dtype or next(hf_model.parameters()).dtype
    cfg = make_config(hf_model.config, dtype)
    convert = getattr(importlib.import_module(f"transformer_lens.pretrained.weight_conversions.{module}"), fn)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    state = {k: v.to(dtype) for k, v in convert(hf_model, cfg).items()}
    model.load_state_dict(state, strict=False)
    return model.eval()


def hooked_transformer_from_folder(folder: str, dtype: Optional[torch.dtype] = torch.float32):
    """``hooked_transformer_from_hf`` for a local Hugging Face folder (weights + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return hooked_transformer_from_hf(hf.eval(), tokenizer, dtype)


def bridge_from_folder(folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A ``TransformerBridge`` booted from a local Hugging Face folder (needs tokenizer files)."""
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return TransformerBridge.boot_transformers(folder, device=device, dtype=dtype)
