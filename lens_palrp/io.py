"""Save and load an ``Attribution``: tensors in safetensors, everything else in JSON beside them."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict

import torch

FORMAT_VERSION = 1
_TENSOR_PREFIX = "field."
_HOOK_PREFIX = "hook."
_GRAD_PREFIX = "grad."


def _versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("lens_palrp", "transformer-lens", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def save_attribution(attr, path: str, model_config: Any = None) -> str:
    """Write ``path`` (safetensors) and ``path + '.json'`` (metadata); returns ``path``."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # safetensors would report a temporary file's name instead
        raise FileNotFoundError(f"cannot save the Attribution to {path}: the folder {folder} does not exist")
    tensors, meta = {}, {"format_version": FORMAT_VERSION, "versions": _versions(), "fields": {}}
    for name, value in attr.__dict__.items():
        if isinstance(value, torch.Tensor):
            tensors[_TENSOR_PREFIX + name] = value.detach().cpu().contiguous()
        elif name == "hooks":
            for hook, rel in value.items():
                tensors[_HOOK_PREFIX + hook] = rel.detach().cpu().contiguous()
        elif name == "gradients":
            for hook, grad in value.items():
                tensors[_GRAD_PREFIX + hook] = grad.detach().cpu().contiguous()
        elif name == "metadata":
            continue
        elif value is None:
            meta["fields"][name] = None
        else:
            meta["fields"][name] = value
    meta["default_aggregation"] = "relu"
    if model_config is not None:
        cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(vars(model_config))
        meta["model_config"] = json.loads(json.dumps(cfg, default=str))
    try:
        save_file(tensors, path)
    except Exception as err:  # safetensors' own error type names no path we passed
        raise OSError(f"cannot write the Attribution tensors to {path}: {err}") from None
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, default=str)
    return path


def _read_metadata(path: str, meta_path: str) -> Dict[str, Any]:
    """The JSON half, checked to be an object from a format this version reads."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err}): the metadata file is truncated or corrupt") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds a JSON {type(meta).__name__}, not the Attribution metadata object")
    if "format_version" not in meta:
        raise ValueError(f"{meta_path} has no format_version: it is not Attribution metadata, or it is corrupt")
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{meta_path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved in Attribution format {version}, newer than this lens_palrp reads "
            f"({FORMAT_VERSION}, lens_palrp {_versions()['lens_palrp']}): upgrade lens_palrp"
        )
    if version < 1:
        raise ValueError(f"{meta_path}: format_version {version} does not exist (formats 1..{FORMAT_VERSION})")
    if not isinstance(meta.get("fields"), dict):
        raise ValueError(f"{meta_path} has no 'fields' object: the metadata file is corrupt")
    return meta


def _read_tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # SafetensorError / OSError: a raw message without the file name
        raise ValueError(f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt") from None


def _fields_by_kind():
    """Names of Attribution's fields: all, required (no default), and those that hold a tensor."""
    from lens_palrp.result import Attribution

    every = {f.name: f for f in dataclasses.fields(Attribution)}
    required = {n for n, f in every.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    tensors = {n for n, f in every.items() if "Tensor" in str(f.type) and "Dict" not in str(f.type)}
    return set(every), required, tensors


def _check_shapes(path: str, fields: Dict[str, Any], hooks, gradients, meta: Dict[str, Any]) -> None:
    """Every tensor's shape follows from the batch of ``str_tokens``, the positions of
    ``semantic`` and the layers and heads of ``positional`` (checked against the saved model
    config): a file whose tensors disagree would otherwise fail later, far from the cause, or
    silently misalign."""
    str_tokens = fields.get("str_tokens")
    if not (isinstance(str_tokens, list) and str_tokens and all(isinstance(t, list) for t in str_tokens)):
        raise ValueError(f"{path}: str_tokens must be a non-empty list of token lists, got {str_tokens!r:.80}")
    batch, semantic = len(str_tokens), fields["semantic"]
    if semantic.ndim != 2 or semantic.shape[0] != batch:
        raise ValueError(f"{path}: tensor 'semantic' has shape {tuple(semantic.shape)}, expected [batch, pos] "
                         f"with batch {batch} (the examples of str_tokens)")
    n_pos = int(semantic.shape[1])
    longest = max(len(t) for t in str_tokens)
    if longest > n_pos:  # rows of a padded batch are shorter, never longer
        raise ValueError(f"{path}: str_tokens has a row of {longest} tokens, the tensors have {n_pos} positions")
    positional = fields["positional"]
    if positional.ndim != 4:
        raise ValueError(f"{path}: tensor 'positional' must be [batch, layers, heads, pos], got shape "
                         f"{tuple(positional.shape)}")
    layers, heads = int(positional.shape[1]), int(positional.shape[2])
    cfg = meta.get("model_config") or {}
    for key, got in (("n_layers", layers), ("n_heads", heads)):
        want = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(want, int) and not isinstance(want, bool) and want != got:
            raise ValueError(f"{path}: tensor 'positional' has {got} {key[2:]}, the saved model config "
                             f"{key}={want}")
    b, p, L, H = batch, n_pos, layers, heads
    expected = {
        "semantic": (b, p), "positional": (b, L, H, p), "positional_input": (b, p), "heads": (b, L, H),
        "heads_by_pos": (b, L, H, p), "mlp": (b, L, p), "residual": (b, L + 1, p), "target_value": (b,),
        "tokens": (b, p), "attention_mask": (b, p), "target_position": (b,), "token_type": (b, p),
        "semantic_positive": (b, p), "positional_input_positive": (b, p), "positional_layer_positive": (b, L, p),
        "positional_layer_abs": (b, L, p), "softmax_absorbed_per_layer": (b, L), "positional_leak_per_layer": (b, L),
        "positional_leak_input": (b,),
    }
    vision = fields.get("vision")
    if vision is not None:
        size = vision.get("image_size") if isinstance(vision, dict) else None
        if not (isinstance(size, list) and len(size) == 2):
            raise ValueError(f"{path}: vision must hold image_size [height, width], got {vision!r:.120}")
        expected["pixels"] = (b, int(size[0]), int(size[1]))
    implied = f"(batch {b} from str_tokens, pos {p} from 'semantic', layers {L} and heads {H} from 'positional')"
    for name, shape in expected.items():
        value = fields.get(name)
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(value.shape)}, expected {shape} {implied}")
    for kind, table in (("hook", hooks), ("gradient", gradients)):
        for name, value in table.items():
            if value.ndim == 0 or value.shape[0] != b:
                raise ValueError(f"{path}: recorded {kind} {name!r} has shape {tuple(value.shape)}, "
                                 f"expected a leading batch dimension of {b}")


def load_attribution(path: str):
    """Read what ``save_attribution`` wrote, refusing (with the file and the problem named) a
    missing half, a corrupt file, an unknown format and tensors whose shapes disagree."""
    from lens_palrp.result import Attribution

    meta_path = path + ".json"
    if not os.path.exists(path) and not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path}: no such Attribution file (nor its metadata {meta_path})")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} is missing: an Attribution is saved as two files")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing (its metadata {meta_path} exists): an Attribution is "
                                "saved as two files")
    meta = _read_metadata(path, meta_path)
    tensors = _read_tensors(path)
    every, required, tensor_fields = _fields_by_kind()
    fields: Dict[str, Any] = dict(meta["fields"])
    hooks, gradients = {}, {}
    for key, value in tensors.items():
        if key.startswith(_TENSOR_PREFIX):
            fields[key[len(_TENSOR_PREFIX):]] = value
        elif key.startswith(_HOOK_PREFIX):
            hooks[key[len(_HOOK_PREFIX):]] = value
        elif key.startswith(_GRAD_PREFIX):
            gradients[key[len(_GRAD_PREFIX):]] = value
        else:
            raise ValueError(f"{path}: tensor {key!r} is not an Attribution tensor (field., hook. or grad.)")
    unknown = sorted(set(fields) - every)
    if unknown:
        raise ValueError(f"{path}: unknown Attribution fields {unknown} (saved by another lens_palrp version?)")
    missing = sorted(required - set(fields) - {"hooks", "gradients"})
    if missing:
        raise ValueError(f"{path}: the saved Attribution lacks the fields {missing}: the file is incomplete")
    for name in sorted(tensor_fields & set(fields)):
        if fields[name] is not None and not isinstance(fields[name], torch.Tensor):
            raise ValueError(f"{path}: field {name!r} must be a tensor, got {type(fields[name]).__name__}")
    for name in sorted(required & tensor_fields):
        if fields[name] is None:
            raise ValueError(f"{path}: tensor {name!r} is missing from the file")
    _check_shapes(path, fields, hooks, gradients, meta)
    fields["hooks"] = hooks
    fields["gradients"] = gradients
    attr = Attribution(**fields)
    attr.metadata = {k: v for k, v in meta.items() if k != "fields"}
    return attr
