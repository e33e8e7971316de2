"""Tiny random Hugging Face models booted as TransformerBridges (float64, the zoo's tokenizer)."""

from __future__ import annotations

import os
import shutil

import torch

import lens_palrp as lp
from lens_palrp.zoo import TOKENIZER_DIR


def save_with_tokenizer(hf_model, folder):
    """A local model folder as boot_transformers expects it: weights, config, tokenizer files."""
    hf_model.save_pretrained(folder)
    for f in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), os.path.join(folder, f))
    return folder


def boot(folder, device="cpu"):
    return lp.models.bridge_from_folder(str(folder), dtype=torch.float64, device=device)


def tiny_llama(folder):
    """``(hf_model, bridge)``: 2 layers, grouped-query attention, RoPE, gated SiLU MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=18, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    hf = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0, 0.3)
    return hf, boot(save_with_tokenizer(hf, folder))


def tiny_gpt2(folder):
    """``(hf_model, bridge)``: 2 layers, learned positions, LayerNorm, biases."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=18, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    cfg.architectures = ["GPT2LMHeadModel"]
    hf = GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "ln" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, 0.3)
    return hf, boot(save_with_tokenizer(hf, folder))


def tiny_gpt_neox(folder):
    """``(hf_model, bridge)``: a Pythia-style model (tests of the unverified-architecture refusal
    take ``gpt_neox`` off ``VERIFIED_ARCHITECTURES`` to use it)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(2)
    cfg = GPTNeoXConfig(vocab_size=18, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32, rotary_pct=0.5)
    cfg.architectures = ["GPTNeoXForCausalLM"]
    hf = GPTNeoXForCausalLM(cfg).double().eval()
    return hf, boot(save_with_tokenizer(hf, folder))


def tiny_bloom(folder, n_heads=4, biases=True):
    """``(hf_model, bridge)``: 2 layers, ALiBi, embedding LayerNorm, tanh-GELU MLP, biases (zero
    with ``biases=False``); ``n_heads`` that is not a power of two gets BLOOM's interleaved slopes."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(3)
    cfg = BloomConfig(vocab_size=18, hidden_size=8 * n_heads, n_layer=2, n_head=n_heads)
    cfg.architectures = ["BloomForCausalLM"]
    hf = BloomForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1) if biases else p.zero_()
            elif "layernorm" in name or "ln_f" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, 0.3)
    return hf, boot(save_with_tokenizer(hf, folder))


def softmax_in_float64(monkeypatch):
    """Attention (and router) softmaxes that TransformerLens or Hugging Face take in float32 whatever
    the model's dtype run in float64 for a float64 input (nothing else changes): that rounding caps a
    float64 model's conservation at ~1e-7 of the logit, and the tests of the rules look past it."""
    original = torch.nn.functional.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = None
        return original(input, dim=dim, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


def bridge_from_model(hf):
    """A float64 bridge around the Hugging Face model object ``hf`` (the zoo's tokenizer)."""
    import warnings

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lp.models.bridge_from_hf(hf, tokenizer, dtype=torch.float64)
