import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")

import pytest  # noqa: E402


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
