"""Small models the project trains and ships, each on a task where position decides the answer.

>>> lp.zoo.names()
['alibi-repeat', 'learned-absolute', 'rope-repeat']
>>> model, tokenizer = lp.zoo.load("rope-repeat")

Each model is a Hugging Face folder of a standard architecture in ``lens_palrp/zoo/weights/<name>``
(``config.json``, ``model.safetensors``, the zoo tokenizer, ``training.json``), package data: no
network. So it loads under either TransformerLens: as a ``TransformerBridge`` (3.9 and 4.x) or,
where TransformerLens 3.x is installed, as a ``HookedTransformer`` (the default there). Each comes
with the command that retrains it (``python -m lens_palrp.zoo.train NAME``).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from lens_palrp.load_args import DeviceLike, DeviceMap, DtypeLike, as_device, as_dtype

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
TOKENIZER_DIR = os.path.join(WEIGHTS_DIR, "tokenizer")
RECORD_FILE = "training.json"
KINDS = ("hooked", "bridge")

# the zoo tokenizer's ids (lens_palrp.zoo.tasks.VOCAB): <bos> = 0, <pad> = 1 (also its eos)
_TOKEN_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)

# every zoo model has the same sizes (BLOOM alone fixes its MLP at 4 * d_model = 256); they differ
# in block style and positional encoding. No dropout: training is the deterministic loop of train.py
MODELS: Dict[str, dict] = {
    "rope-repeat": {
        "description": "2-layer Llama model (RoPE, RMSNorm, gated SiLU MLP); at every position it "
        "outputs the token 3 positions back, so the answer is decided by position alone.",
        "task": {"name": "repeat-back", "k": 3, "n_pos": 16},
        "architecture": "LlamaForCausalLM",
        "config": dict(
            vocab_size=18, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=32,
            hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
            attention_dropout=0.0, tie_word_embeddings=False, **_TOKEN_IDS,
        ),
    },
    "learned-absolute": {
        "description": "2-layer GPT-2 model (learned position embeddings, LayerNorm, GELU); at every "
        "position after the third it outputs the token at absolute position 2.",
        "task": {"name": "absolute-position", "p": 2, "n_pos": 16},
        "architecture": "GPT2LMHeadModel",
        "config": dict(
            vocab_size=18, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=32,
            activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, tie_word_embeddings=False, **_TOKEN_IDS,
        ),
    },
    "alibi-repeat": {
        "description": "2-layer BLOOM model (ALiBi, LayerNorm, GELU MLP); at every position it "
        "outputs the previous token, so the answer is decided by the relative position alone.",
        "task": {"name": "repeat-back", "k": 1, "n_pos": 16},
        "architecture": "BloomForCausalLM",
        # BLOOM has no position table: n_positions only tells TransformerLens the context (n_ctx)
        "config": dict(
            vocab_size=18, hidden_size=64, n_layer=2, n_head=4, n_positions=32,
            layer_norm_epsilon=1e-5, hidden_dropout=0.0, attention_dropout=0.0,
            tie_word_embeddings=False, **_TOKEN_IDS,
        ),
    },
}


def hooked_available() -> bool:
    """Whether ``load(name, kind="hooked")`` works: HookedTransformer is TransformerLens 3.x only."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def bridge_available() -> bool:
    """Whether ``load(name, kind="bridge")`` works (TransformerLens 3.9 and 4.x)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """Whether the zoo's models load here, in any kind."""
    return hooked_available() or bridge_available()


def default_kind() -> str:
    """``"hooked"`` where TransformerLens 3.x offers HookedTransformer, else ``"bridge"``."""
    return "hooked" if hooked_available() else "bridge"


def names() -> List[str]:
    """The shipped models."""
    return sorted(MODELS)


def describe(name: str) -> str:
    return MODELS[_check(name)]["description"]


def _check(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; available: {names()}")
    return name


def folder(name: str) -> str:
    """The model's Hugging Face folder in the package."""
    return os.path.join(WEIGHTS_DIR, _check(name))


def tokenizer():
    """The zoo's word-level tokenizer (symbols ``a``..``p``), from the package folder."""
    from transformers import AutoTokenizer

    if not os.path.isdir(TOKENIZER_DIR):
        from lens_palrp.zoo.tasks import build_tokenizer

        build_tokenizer(TOKENIZER_DIR)
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def hf_config(name: str):
    """The Hugging Face config of a zoo model (``config.architectures`` set: the bridge reads it)."""
    import transformers

    spec = MODELS[_check(name)]
    model_class = getattr(transformers, spec["architecture"])
    config = model_class.config_class(**spec["config"])
    config.architectures = [spec["architecture"]]
    return config


def build_model(name: str, dtype: DtypeLike = torch.float32, device: DeviceLike = "cpu"):
    """An untrained Hugging Face model with the zoo model's configuration (eager attention: the
    computation TransformerLens reproduces), in ``dtype`` on ``device``."""
    import transformers

    model_class = getattr(transformers, MODELS[_check(name)]["architecture"])
    dtype, device = as_dtype(dtype), as_device(device)
    config = hf_config(name)
    config._attn_implementation = "eager"
    return model_class(config).to(device=device, dtype=dtype)


def load(name: str, kind: Optional[str] = None, dtype: DtypeLike = torch.float32, device: DeviceLike = "cpu",
         device_map: Optional[DeviceMap] = None) -> Tuple[object, object]:
    """``(model, tokenizer)`` for a shipped model, from package data (no network).

    ``kind``: ``"hooked"`` (a HookedTransformer, TransformerLens 3.x), ``"bridge"`` (a
    TransformerBridge) or None for ``default_kind()``: HookedTransformer where it exists.
    ``dtype`` (default float32) and ``device`` (default ``"cpu"``) as in ``lens_palrp.models``;
    ``device_map`` (bridges only) splits the model over devices as ``bridge_from_folder`` does,
    e.g. ``{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, ...}`` (module
    names from the Hugging Face model: ``build_model(name).named_children()``).
    """
    path = folder(name)
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path} has no weights; retrain them with: python -m lens_palrp.zoo.train {name}")
    kind = default_kind() if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    from lens_palrp import models

    if kind == "hooked":
        if not hooked_available():
            raise ImportError(
                "kind='hooked': HookedTransformer needs TransformerLens 3.x (TransformerLens 4 removed it); "
                "use kind='bridge' (or kind=None) for a TransformerBridge, or install transformer-lens 3.9 "
                "(pip install -c constraints.txt -e .)"
            )
        if device_map is not None:
            raise ValueError("device_map splits a TransformerBridge; load the zoo model with kind='bridge'")
        with models.quiet_loading():
            model = models.hooked_transformer_from_folder(path, dtype=dtype, device=device)
    else:
        with models.quiet_loading():
            model = models.bridge_from_folder(path, dtype=dtype, device=device, device_map=device_map)
        # the zoo's tasks start with <bos>; TransformerLens' BLOOM adapter assumes no BOS
        model.cfg.default_prepend_bos = True
    model.eval()
    model.cfg.model_name = name  # reports name the zoo model (not "custom" or the package folder)
    return model, model.tokenizer


def task(name: str):
    """The task a zoo model was trained on (``batch``, ``relevant_position``)."""
    from lens_palrp.zoo.tasks import make_task

    return make_task(MODELS[_check(name)]["task"])


def training_record(name: str) -> dict:
    """The retraining command's record: task, architecture and ``training`` (steps, loss, accuracy)."""
    with open(os.path.join(folder(name), RECORD_FILE)) as f:
        return json.load(f)


from lens_palrp.zoo import shapes  # noqa: E402,F401  (the shapes ViT, as lp.zoo.shapes; imports WEIGHTS_DIR from here)
