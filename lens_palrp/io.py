"""Save and load an ``Attribution``: tensors in safetensors, everything else in JSON beside them."""

from __future__ import annotations

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
    save_file(tensors, path)
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, default=str)
    return path


def load_attribution(path: str):
    from safetensors.torch import load_file

    from lens_palrp.result import Attribution

    meta_path = path + ".json"
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} is missing: an Attribution is saved as two files")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved in Attribution format {version}, newer than this lens_palrp reads "
            f"({FORMAT_VERSION}, lens_palrp {_versions()['lens_palrp']}): upgrade lens_palrp"
        )
    tensors = load_file(path)
    fields: Dict[str, Any] = dict(meta["fields"])
    hooks, gradients = {}, {}
    for key, value in tensors.items():
        if key.startswith(_TENSOR_PREFIX):
            fields[key[len(_TENSOR_PREFIX):]] = value
        elif key.startswith(_HOOK_PREFIX):
            hooks[key[len(_HOOK_PREFIX):]] = value
        elif key.startswith(_GRAD_PREFIX):
            gradients[key[len(_GRAD_PREFIX):]] = value
    fields["hooks"] = hooks
    fields["gradients"] = gradients
    attr = Attribution(**fields)
    attr.metadata = {k: v for k, v in meta.items() if k != "fields"}
    return attr
