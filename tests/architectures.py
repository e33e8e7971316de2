"""Tiny random Hugging Face models of every architecture the bridge coverage claims, built offline
from their config classes, and the checks each must pass (``tests/test_architectures.py``).

Each builder returns a float64 model in eval mode with weights drawn so that every path carries
signal (norm gains near 1, projections ~0.3); ``biases=False`` zeroes every bias (and other additive
constants), so that conservation can be checked exactly. Vocabulary 18: the zoo tokenizer's.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

VOCAB = 18
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)


def _llama_like(config_name: str, model_name: str, **extra):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**{**COMMON, "intermediate_size": 48, "num_key_value_heads": 2,
                                                     "tie_word_embeddings": False, **extra})
        return getattr(transformers, model_name)(cfg)
    return build


def _from(config_name: str, model_name: str, **kwargs):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**kwargs)
        return getattr(transformers, model_name)(cfg)
    return build


# architecture name -> builder; the names are the README table's rows
BUILDERS: Dict[str, Callable] = {
    "llama": _llama_like("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=4),
    "qwen2": _llama_like("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    "qwen3_moe": _llama_like("Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=8, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
    "mixtral": _llama_like("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": _llama_like("GptOssConfig", "GptOssForCausalLM", head_dim=8, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=4, intermediate_size=16),
    "gemma": _llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=8),
    "gemma2": _llama_like("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=4,
                          attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gemma3": _llama_like("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=4),
    "phi3": _llama_like("Phi3Config", "Phi3ForCausalLM", pad_token_id=0),
    "olmo": _llama_like("OlmoConfig", "OlmoForCausalLM"),
    "olmo2": _llama_like("Olmo2Config", "Olmo2ForCausalLM"),
    "stablelm": _llama_like("StableLmConfig", "StableLmForCausalLM", partial_rotary_factor=0.5, use_qkv_bias=True),
    "starcoder2": _llama_like("Starcoder2Config", "Starcoder2ForCausalLM", sliding_window=4),
    "granite": _llama_like("GraniteConfig", "GraniteForCausalLM", embedding_multiplier=2.0, residual_multiplier=0.5,
                           attention_multiplier=0.3, logits_scaling=2.0),
    "gpt_bigcode": _from("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                         n_positions=64, multi_query=True),
    "qwen2_moe": _llama_like("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "cohere": _llama_like("CohereConfig", "CohereForCausalLM", logit_scale=0.5),
    "gpt2": _from("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                  n_positions=64),
    "gpt_neox": _from("GPTNeoXConfig", "GPTNeoXForCausalLM", **COMMON, intermediate_size=48, rotary_pct=0.5),
    "gptj": _from("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                  n_positions=64, rotary_dim=4),
    "opt": _from("OPTConfig", "OPTForCausalLM", **COMMON, ffn_dim=48, word_embed_proj_dim=32),
    "bloom": _from("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "mpt": _from("MptConfig", "MptForCausalLM", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                 max_seq_len=64),
    "falcon": _from("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, new_decoder_architecture=False, multi_query=True,
                    parallel_attn=True, bias=False),
    "phi": _from("PhiConfig", "PhiForCausalLM", **COMMON, intermediate_size=48, partial_rotary_factor=0.5),
    "bert": _from("BertConfig", "BertForMaskedLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=64),
    "t5": _from("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48,
                num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=16, decoder_start_token_id=0),
}


# builder name -> the Hugging Face model_type its config declares (the coverage table's key)
MODEL_TYPE = {"gemma3": "gemma3_text", "gptj": "gptj", "gpt_oss": "gpt_oss"}
MODEL_TYPE = {name: MODEL_TYPE.get(name, name) for name in BUILDERS}


def build(name: str, seed: int = 0, biases: bool = True):
    """The architecture's tiny model, float64, eval mode, weights drawn for signal."""
    torch.manual_seed(seed)
    hf = BUILDERS[name]()
    hf.config.architectures = [type(hf).__name__]
    if hasattr(hf.config, "_experts_implementation"):  # the default grouped_mm kernel refuses float64
        hf.config._experts_implementation = "eager"
    hf = hf.double().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            leaf = pname.rsplit(".", 1)[-1]
            if leaf == "bias" or pname.endswith("_bias") or "sinks" in leaf:
                if not biases and "relative_attention_bias" not in pname:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
            elif "norm" in pname.lower() or any(part.startswith("ln") for part in pname.split(".")):
                p.copy_(1.0 + torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
    return hf
