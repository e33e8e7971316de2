"""Devices the suite runs a test on: the CPU always, CUDA where there is one.

``DEVICES`` parametrizes a test (or ``device``, the fixture in conftest, does it for any test that
asks for it); the CUDA case carries the ``gpu`` marker, which conftest turns into a skip ("no
CUDA device") on a machine without one, so the CPU case runs exactly as before everywhere.
"""

import pytest
import torch

from lens_palrp.result import FIELDS, TENSOR

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def assert_on_device(attr, device) -> None:
    """Every tensor field of an ``Attribution`` (records too) is on ``device``'s type (``"cuda"``
    matches ``cuda:0``): the results live where the model computed them."""
    kind = torch.device(device).type
    for spec in FIELDS:
        value = getattr(attr, spec.name)
        if spec.kind == TENSOR and value is not None:
            assert value.device.type == kind, f"{spec.name} on {value.device}, the model on {device}"
    for records in (attr.hooks, attr.gradients):
        for name, value in records.items():
            assert value.device.type == kind, f"record {name} on {value.device}, the model on {device}"
