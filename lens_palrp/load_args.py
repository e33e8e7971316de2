"""Where and in what precision a model loads: the argument checks every loader shares.

The loaders (``lens_palrp.models``, ``lens_palrp.zoo``, ``HookedViT``) take ``device``,
``dtype`` and, for TransformerBridges, an accelerate ``device_map``. A typo there would
otherwise surface deep inside ``torch`` or ``from_pretrained`` (or not at all: an unknown dtype
name could silently fall back to float32), so each value is checked once, here, and a bad one
raises an error that names the argument, the value and what is accepted.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from lens_palrp.precision import RECORD_DTYPES

DeviceLike = Union[str, torch.device, int]
DtypeLike = Union[str, torch.dtype]
DeviceMap = Union[str, Dict[str, DeviceLike]]

# the precisions the engine explains models in (lens_palrp.precision: float8 and integer types
# hold no model lens_palrp runs)
DTYPES = tuple(RECORD_DTYPES)
_DTYPE_NAMES: Dict[str, torch.dtype] = {
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}
# accelerate's automatic placements (transformers' ``from_pretrained(device_map=...)``)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def as_dtype(dtype: DtypeLike, name: str = "dtype") -> torch.dtype:
    """``dtype`` as a ``torch.dtype``: a floating-point ``torch.dtype`` the engine computes in,
    or its name (``"bfloat16"``, ``"torch.float16"``, ``"bf16"``, ``"fp32"``, ...)."""
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key not in _DTYPE_NAMES:
            raise ValueError(f"{name}={dtype!r} is not a dtype name lens_palrp loads models in; "
                             f"use one of {sorted(_DTYPE_NAMES)} (or a torch.dtype)")
        return _DTYPE_NAMES[key]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or its name (e.g. torch.float32 or \"bfloat16\"), "
                        f"got {type(dtype).__name__} {dtype!r}")
    if dtype not in DTYPES:
        raise ValueError(f"{name}={dtype}: lens_palrp loads models in {', '.join(str(d) for d in DTYPES)}")
    return dtype


def as_optional_dtype(dtype: Optional[DtypeLike], name: str = "dtype") -> Optional[torch.dtype]:
    """``as_dtype``, with ``None`` passed through (loaders where None means "the model's own")."""
    return None if dtype is None else as_dtype(dtype, name)


def as_device(device: DeviceLike, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``: a ``torch.device``, a string (``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, ``"mps"``) or a CUDA index. Refused: names torch does not know, ``meta``
    (no data to compute with), and a CUDA / MPS device this machine does not have, so that a
    missing GPU is reported at load time, not as a failure deep in the first forward pass."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"{name} must be a torch.device, a string like \"cpu\" or \"cuda:0\", or a CUDA index, "
                        f"got {type(device).__name__} {device!r}")
    if isinstance(device, int) and device < 0:
        raise ValueError(f"{name}={device}: a CUDA index is 0 or more")
    try:
        resolved = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name}={device!r} is not a device torch knows ({err}); "
                         "use e.g. \"cpu\", \"cuda\" or \"cuda:0\"") from None
    if resolved.type == "meta":
        raise ValueError(f"{name}={device!r}: the meta device holds no weights to explain with")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device!r}: CUDA is not available here (torch.cuda.is_available() is False)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{name}={device!r}: MPS is not available here")
    return resolved


def as_device_map(device_map: DeviceMap, name: str = "device_map") -> DeviceMap:
    """A device map for transformers' ``from_pretrained``: one of accelerate's strategies
    (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) or a dict from module
    name (``"model.layers.0"``, ``""`` for the whole model) to a device; each device is checked
    like ``device`` (``"disk"`` is passed on: accelerate offloads such modules to disk). Needs
    ``accelerate``, which does the placement."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ImportError(f"{name} needs accelerate, which places the modules: pip install accelerate") from None
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(f"{name}={device_map!r}: as a string, one of {DEVICE_MAP_STRATEGIES} "
                             "(or a dict from module name to device)")
        return device_map
    if not isinstance(device_map, dict):
        raise TypeError(f"{name} must be a dict from module name to device or one of {DEVICE_MAP_STRATEGIES}, "
                        f"got {type(device_map).__name__}")
    if not device_map:
        raise ValueError(f"{name} is empty: map each module (e.g. \"model.layers.0\") to a device")
    checked: Dict[str, DeviceLike] = {}
    for module, device in device_map.items():
        if not isinstance(module, str):
            raise TypeError(f"{name} keys are module names (str), got {module!r}")
        if isinstance(device, str) and device.strip().lower() == "disk":
            checked[module] = "disk"
            continue
        resolved = as_device(device, name=f"{name}[{module!r}]")
        checked[module] = device if isinstance(device, int) else str(resolved)
    return checked


def as_n_devices(n_devices: int, device: torch.device, name: str = "n_devices") -> int:
    """TransformerLens' ``n_devices`` (layers spread over that many CUDA devices): 1, or more
    with a CUDA ``device`` on a machine with that many."""
    if isinstance(n_devices, bool) or not isinstance(n_devices, int):
        raise TypeError(f"{name} must be an int, got {type(n_devices).__name__} {n_devices!r}")
    if n_devices < 1:
        raise ValueError(f"{name}={n_devices}: at least 1")
    if n_devices > 1:
        if device.type != "cuda":
            raise ValueError(f"{name}={n_devices} spreads layers over CUDA devices; device={str(device)!r} is not one")
        if torch.cuda.device_count() < n_devices:
            raise ValueError(f"{name}={n_devices}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return n_devices
