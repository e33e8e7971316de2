"""Small models the project trains and ships, each on a task where position decides the answer.

>>> lp.zoo.names()
['alibi-repeat', 'learned-absolute', 'rope-repeat']
>>> model, tokenizer = lp.zoo.load("rope-repeat")

Weights live in ``lens_palrp/zoo/weights`` (package data, no network); each comes with the command
that retrains it (``python -m lens_palrp.zoo.train NAME``).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Tuple

import torch

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
TOKENIZER_DIR = os.path.join(WEIGHTS_DIR, "tokenizer")

# every zoo model has the same sizes; they differ in block style and positional encoding
_SIZES = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=32, d_vocab=18, default_prepend_bos=True)

MODELS: Dict[str, dict] = {
    "rope-repeat": {
        "description": "2-layer LLaMA-style RoPE model (RMSNorm, gated SiLU MLP); at every position "
        "it outputs the token 3 positions back, so the answer is decided by position alone.",
        "task": {"name": "repeat-back", "k": 3, "n_pos": 16},
        "config": dict(_SIZES, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                       rotary_adjacent_pairs=False, gated_mlp=True, final_rms=True),
    },
    "learned-absolute": {
        "description": "2-layer GPT-2-style model (learned position embeddings, LayerNorm, GELU); at "
        "every position after the third it outputs the token at absolute position 2.",
        "task": {"name": "absolute-position", "p": 2, "n_pos": 16},
        "config": dict(_SIZES, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard"),
    },
    "alibi-repeat": {
        "description": "2-layer ALiBi model (LayerNorm, ReLU MLP); at every position it outputs the "
        "previous token, so the answer is decided by the relative position alone.",
        "task": {"name": "repeat-back", "k": 1, "n_pos": 16},
        "config": dict(_SIZES, act_fn="relu", normalization_type="LN", positional_embedding_type="alibi"),
    },
}


def available() -> bool:
    """The zoo's models are HookedTransformers: they need TransformerLens 3.x."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def names() -> List[str]:
    """The shipped models."""
    return sorted(MODELS)


def describe(name: str) -> str:
    return MODELS[_check(name)]["description"]


def _check(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; available: {names()}")
    return name


def tokenizer():
    """The zoo's word-level tokenizer (symbols ``a``..``p``), from the package folder."""
    from transformers import AutoTokenizer

    if not os.path.isdir(TOKENIZER_DIR):
        from lens_palrp.zoo.tasks import build_tokenizer

        build_tokenizer(TOKENIZER_DIR)
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def build_model(name: str, with_tokenizer: bool = True, dtype=torch.float32):
    """An untrained ``HookedTransformer`` with the zoo model's configuration."""
    if not available():
        raise ImportError(
            "lens_palrp's zoo models are HookedTransformers, which TransformerLens 4 removed: "
            "install transformer-lens 3.9 (pip install -c constraints.txt -e .)"
        )
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**MODELS[_check(name)]["config"], dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return HookedTransformer(cfg, tokenizer=tokenizer() if with_tokenizer else None)


def load(name: str, dtype=torch.float32) -> Tuple["HookedTransformer", object]:  # noqa: F821
    """``(model, tokenizer)`` for a shipped model, loaded from package data (no network)."""
    model = build_model(name, dtype=dtype)
    path = os.path.join(WEIGHTS_DIR, f"{name}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; retrain it with: python -m lens_palrp.zoo.train {name}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    model.eval()
    return model, model.tokenizer


def task(name: str):
    """The task a zoo model was trained on (``batch``, ``relevant_position``)."""
    from lens_palrp.zoo.tasks import make_task

    return make_task(MODELS[_check(name)]["task"])


def training_record(name: str) -> dict:
    with open(os.path.join(WEIGHTS_DIR, f"{_check(name)}.json")) as f:
        return json.load(f)


from lens_palrp.zoo import shapes  # noqa: E402,F401  (the shapes ViT, as lp.zoo.shapes; imports WEIGHTS_DIR from here)
