"""Save and load an ``Attribution``: one safetensors file whose header holds the metadata as JSON.

Format 2 (written by ``save``): the tensors ``field.<name>`` (public tensor fields),
``hook.<hook name>`` / ``grad.<hook name>`` (``attr.hooks`` / ``attr.gradients``) and
``reduction.<name>`` (the internal ``Reductions``); the safetensors header's ``__metadata__`` maps
``"lens_palrp"`` to a JSON object: ``format_version``, ``versions``, ``fields`` (the fields that are
no tensors: ``str_tokens``, ``method``, ``model_name``, ``vision``, and ``null`` for an absent
optional tensor), ``records`` (the hook names of ``hooks`` and ``gradients`` in their order),
``default_aggregation`` and, when given, ``model_config``.

Format 1 (read only): the same JSON object in ``path + '.json'`` beside the tensors, with the
internal reductions among the ``field.`` tensors.

Which tensors a file must hold, and their shapes, come from the field table in ``result.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch

from lens_palrp.result import (
    FIELDS, FIELDS_BY_NAME, FILE, RECORDS, REDUCTION_FIELDS, REDUCTIONS, TENSOR, Attribution, Reductions,
    shape_sizes,
)

FORMAT_VERSION = 2
HEADER_KEY = "lens_palrp"  # the safetensors header's metadata key holding the JSON
_TENSOR_PREFIX = "field."
_HOOK_PREFIX = "hook."
_GRAD_PREFIX = "grad."
_REDUCTION_PREFIX = "reduction."
_RECORD_PREFIXES = {"hooks": _HOOK_PREFIX, "gradients": _GRAD_PREFIX}


def _versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("lens_palrp", "transformer-lens", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _cpu(value: torch.Tensor) -> torch.Tensor:
    return value.detach().cpu().contiguous()


def save_attribution(attr, path: str, model_config: Any = None) -> str:
    """Write ``path`` (one safetensors file, format 2, metadata in its header); returns ``path``."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # safetensors would report a temporary file's name instead
        raise FileNotFoundError(f"cannot save the Attribution to {path}: the folder {folder} does not exist")
    tensors, meta = {}, {"format_version": FORMAT_VERSION, "versions": _versions(), "fields": {}}
    for spec in FIELDS:
        value = getattr(attr, spec.name)
        if spec.kind == FILE:  # a loaded file's own header: this file gets a fresh one
            continue
        if value is None:
            meta["fields"][spec.name] = None
        elif spec.kind == TENSOR:
            tensors[_TENSOR_PREFIX + spec.name] = _cpu(value)
        elif spec.kind == RECORDS:
            for hook, recorded in value.items():
                tensors[_RECORD_PREFIXES[spec.name] + hook] = _cpu(recorded)
        elif spec.kind == REDUCTIONS:
            for rspec in REDUCTION_FIELDS:
                tensors[_REDUCTION_PREFIX + rspec.name] = _cpu(getattr(value, rspec.name))
        else:
            meta["fields"][spec.name] = value
    meta["default_aggregation"] = "relu"
    # safetensors lists its tensors sorted by name: the order in which the records were taken
    meta["records"] = {name: list(getattr(attr, name) or ()) for name in _RECORD_PREFIXES}
    if model_config is not None:
        cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(vars(model_config))
        meta["model_config"] = json.loads(json.dumps(cfg, default=str))
    header = json.dumps(meta, default=str)
    try:
        save_file(tensors, path, metadata={HEADER_KEY: header})
    except Exception as err:  # safetensors' own error type names no path we passed
        raise OSError(f"cannot write the Attribution tensors to {path}: {err}") from None
    return path


# ------------------------------------------------------------------------------------------- load
def _parse_metadata(path: str, where: str, text: Any) -> Dict[str, Any]:
    """The JSON object (from ``where``: the .json file or the header key), checked to be
    Attribution metadata of a format this version reads."""
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON ({err}): the metadata is truncated or corrupt") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where} holds a JSON {type(meta).__name__}, not the Attribution metadata object")
    if "format_version" not in meta:
        raise ValueError(f"{where} has no format_version: it is not Attribution metadata, or it is corrupt")
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{where}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved in Attribution format {version}, newer than this lens_palrp reads "
            f"({FORMAT_VERSION}, lens_palrp {_versions()['lens_palrp']}): upgrade lens_palrp"
        )
    if version < 1:
        raise ValueError(f"{where}: format_version {version} does not exist (formats 1..{FORMAT_VERSION})")
    if not isinstance(meta.get("fields"), dict):
        raise ValueError(f"{where} has no 'fields' object: the metadata is corrupt")
    return meta


def _read_file(path: str) -> Tuple[Optional[str], Dict[str, torch.Tensor]]:
    """The header's ``lens_palrp`` metadata text (None when it has none) and the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # SafetensorError / OSError: a raw message without the file name
        raise ValueError(f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt") from None
    return header.get(HEADER_KEY), tensors


def _read(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Metadata and tensors of a format-2 file, or of a format-1 pair (``path`` and ``path.json``)."""
    meta_path = path + ".json"
    if not os.path.exists(path):
        if os.path.exists(meta_path):
            raise FileNotFoundError(f"{path} is missing (its metadata {meta_path} exists): a format-1 "
                                    "Attribution is saved as two files")
        raise FileNotFoundError(f"{path}: no such Attribution file")
    header, tensors = _read_file(path)
    if header is not None:
        meta = _parse_metadata(path, f"{path} (header key {HEADER_KEY!r})", header)
        if meta["format_version"] < 2:
            raise ValueError(f"{path}: its header says format_version {meta['format_version']}, but format 1 "
                             "keeps the metadata in a .json file: the header is corrupt")
        return meta, tensors
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{meta_path} is missing: {path} has no Attribution metadata in its header (key {HEADER_KEY!r}), "
            "so it is either a format-1 Attribution, saved as two files, or no Attribution at all"
        )
    try:
        with open(meta_path, "rb") as f:
            text = f.read()
    except OSError as err:
        raise OSError(f"cannot read {meta_path}: {err}") from None
    meta = _parse_metadata(path, meta_path, text)
    if meta["format_version"] != 1:
        raise ValueError(f"{meta_path}: format_version {meta['format_version']} keeps its metadata in the "
                         f"safetensors header, not in a .json file: the metadata file is corrupt")
    return meta, tensors


def _split_tensors(path: str, tensors: Dict[str, torch.Tensor], version: int):
    """Field tensors, records by kind, and reduction tensors, by name."""
    fields, records, reductions = {}, {"hooks": {}, "gradients": {}}, {}
    reduction_names = {s.name for s in REDUCTION_FIELDS}
    for key, value in tensors.items():
        if key.startswith(_TENSOR_PREFIX):
            name = key[len(_TENSOR_PREFIX):]
            if version == 1 and name in reduction_names:  # format 1 kept them among the fields
                reductions[name] = value
            else:
                fields[name] = value
        elif key.startswith(_HOOK_PREFIX):
            records["hooks"][key[len(_HOOK_PREFIX):]] = value
        elif key.startswith(_GRAD_PREFIX):
            records["gradients"][key[len(_GRAD_PREFIX):]] = value
        elif key.startswith(_REDUCTION_PREFIX) and version >= 2:
            reductions[key[len(_REDUCTION_PREFIX):]] = value
        else:
            known = "field., hook., grad. or reduction." if version >= 2 else "field., hook. or grad."
            raise ValueError(f"{path}: tensor {key!r} is not an Attribution tensor ({known})")
    return fields, records, reductions


def _in_recorded_order(path: str, records: Dict[str, Dict[str, torch.Tensor]], meta: Dict[str, Any]):
    """The records in the order the header lists (format 2); format 1 kept no order: by name."""
    order = meta.get("records")
    if order is None:
        return {kind: dict(sorted(table.items())) for kind, table in records.items()}
    if not (isinstance(order, dict) and all(isinstance(order.get(k), list) for k in records)):
        raise ValueError(f"{path}: the header's 'records' must list the hooks and gradients, got {order!r:.120}")
    for kind, table in records.items():
        if sorted(order[kind]) != sorted(table):
            raise ValueError(f"{path}: the header lists the {kind} {order[kind]}, the file holds the tensors of "
                             f"{sorted(table)}: the file is inconsistent")
    return {kind: {name: table[name] for name in order[kind]} for kind, table in records.items()}


def _reductions(path: str, found: Dict[str, torch.Tensor], stored_fields: Dict[str, Any], version: int):
    """The internal ``Reductions``: all of them, or none where the file says there were none."""
    names = [s.name for s in REDUCTION_FIELDS]
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{path}: unknown internal reductions {unknown} (saved by another lens_palrp version?)")
    if version == 1:  # a format-1 file of a hand-built Attribution may hold none (null fields)
        nulls = [n for n in names if n in stored_fields and stored_fields.pop(n) is None]
        if not found and len(nulls) == len(names):
            return None
    elif not found and "_reductions" in stored_fields and stored_fields["_reductions"] is None:
        return None
    if found and "router_absorbed_per_layer" not in found and "softmax_absorbed_per_layer" in found:
        # saved before mixture-of-experts routers were measured: none absorbed anything
        found = {**found, "router_absorbed_per_layer": torch.zeros_like(found["softmax_absorbed_per_layer"])}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{path}: the saved Attribution lacks the internal reductions {missing}: "
                         "the file is incomplete")
    return Reductions(**{n: found[n] for n in names})


def _check_shapes(path: str, fields: Dict[str, Any], records, reductions, meta: Dict[str, Any]) -> None:
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
    image_size = None
    vision = fields.get("vision")
    if vision is not None:
        size = vision.get("image_size") if isinstance(vision, dict) else None
        if not (isinstance(size, list) and len(size) == 2):
            raise ValueError(f"{path}: vision must hold image_size [height, width], got {vision!r:.120}")
        image_size = size
    sizes = shape_sizes(batch, n_pos, layers, heads, image_size)
    implied = (f"(batch {batch} from str_tokens, pos {n_pos} from 'semantic', layers {layers} and heads {heads} "
               "from 'positional')")
    checks = [(spec, fields.get(spec.name)) for spec in FIELDS]
    checks += [(spec, getattr(reductions, spec.name) if reductions is not None else None) for spec in REDUCTION_FIELDS]
    for spec, value in checks:
        if value is None or spec.kind == RECORDS:
            continue
        shape = spec.expected_shape(sizes)
        if shape is not None and tuple(value.shape) != shape:
            raise ValueError(f"{path}: tensor '{spec.name}' has shape {tuple(value.shape)}, expected {shape} {implied}")
    for kind, table in (("hook", records["hooks"]), ("gradient", records["gradients"])):
        for name, value in table.items():
            if value.ndim == 0 or value.shape[0] != batch:
                raise ValueError(f"{path}: recorded {kind} {name!r} has shape {tuple(value.shape)}, "
                                 f"expected a leading batch dimension of {batch}")


def load_attribution(path: str):
    """Read what ``save_attribution`` wrote (format 2, or a format-1 pair), refusing (with the file
    and the problem named) a missing file, a corrupt file or header, an unknown format and tensors
    whose shapes disagree."""
    meta, tensors = _read(path)
    version = meta["format_version"]
    fields, records, found_reductions = _split_tensors(path, tensors, version)
    records = _in_recorded_order(path, records, meta)
    stored = dict(meta["fields"])
    reductions = _reductions(path, found_reductions, stored, version)
    stored.pop("_reductions", None)
    for name, value in stored.items():
        if name in fields:
            raise ValueError(f"{path}: field {name!r} is both a tensor and a metadata value")
        fields[name] = value
    unknown = sorted(n for n in fields if n not in FIELDS_BY_NAME or FIELDS_BY_NAME[n].kind in (FILE, REDUCTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown Attribution fields {unknown} (saved by another lens_palrp version?)")
    loose = sorted(n for n in fields if FIELDS_BY_NAME[n].kind == RECORDS)
    if loose:
        raise ValueError(f"{path}: fields {loose} are saved as hook./grad. tensors, not as metadata values")
    required = [s.name for s in FIELDS if s.required and s.kind not in (RECORDS, REDUCTIONS, FILE)]
    missing = sorted(n for n in required if n not in fields)
    if missing:
        raise ValueError(f"{path}: the saved Attribution lacks the fields {missing}: the file is incomplete")
    for spec in FIELDS:
        value = fields.get(spec.name)
        if spec.kind == TENSOR and value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: field {spec.name!r} must be a tensor, got {type(value).__name__}")
    for name in required:
        if FIELDS_BY_NAME[name].kind == TENSOR and fields[name] is None:
            raise ValueError(f"{path}: tensor {name!r} is missing from the file")
    _check_shapes(path, fields, records, reductions, meta)
    attr = Attribution(**fields, **records, _reductions=reductions)
    attr.metadata = {k: v for k, v in meta.items() if k != "fields"}
    return attr

