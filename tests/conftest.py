import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")

import pytest  # noqa: E402
import torch  # noqa: E402

from devices import DEVICES  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests (the CUDA case of ``DEVICES``) skip where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def float64_softmax(monkeypatch):
    """``bridges.softmax_in_float64`` for the test."""
    from bridges import softmax_in_float64

    softmax_in_float64(monkeypatch)


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs on: ``"cpu"``, and ``"cuda"`` (marked ``gpu``) where there is one."""
    return request.param


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``(model, tokenizer)``: the zoo's RoPE model (TransformerLens 3.x); under TransformerLens 4
    a random Llama bridge of the same size with the same tokenizer, so input handling is tested
    on both."""
    import lens_palrp as lp

    if lp.zoo.available():
        return lp.zoo.load("rope-repeat")
    pytest.importorskip("transformer_lens.model_bridge")
    from bridges import tiny_llama

    _, bridge = tiny_llama(tmp_path_factory.mktemp("llama"))
    return bridge, bridge.tokenizer
