"""Attribution.save / Attribution.load round trip."""

import json

import pytest
import torch

import lens_palrp as lp


@pytest.fixture(scope="module", params=["zoo", "llama-bridge", "gpt2-bridge-compat"])
def model(request, tmp_path_factory):
    """The zoo's RoPE model, and TransformerBridges (TransformerLens 3.9 and 4.x) in the default
    hook naming and in compatibility mode, whose configs are saved beside the tensors."""
    if request.param == "zoo":
        if not lp.zoo.available():
            pytest.skip("the zoo models do not load here")
        return lp.zoo.load("rope-repeat")[0]
    pytest.importorskip("transformer_lens.model_bridge")
    from bridges import tiny_gpt2, tiny_llama

    _, bridge = (tiny_llama if request.param.startswith("llama") else tiny_gpt2)(tmp_path_factory.mktemp("m"))
    if request.param.endswith("compat"):
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def test_round_trip_keeps_every_field(model, tmp_path):
    attr = lp.explain(model, ["c h a p k b e g", "a b c"], "k", record=["blocks.0.attn.hook_pattern"],
                      record_gradients=["blocks.1.attn.hook_z"])
    path = attr.save(str(tmp_path / "attr.safetensors"), model_config=model.cfg)
    back = lp.Attribution.load(path)
    for name, value in attr.__dict__.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(back, name), value), name
    assert back.hooks.keys() == attr.hooks.keys() and back.gradients.keys() == attr.gradients.keys()
    assert torch.equal(back.hooks["blocks.0.attn.hook_pattern"], attr.hooks["blocks.0.attn.hook_pattern"])
    assert torch.equal(back.gradients["blocks.1.attn.hook_z"], attr.gradients["blocks.1.attn.hook_z"])
    assert back.str_tokens == attr.str_tokens and back.method == "pa_lrp"
    torch.testing.assert_close(back.combined("abs"), attr.combined("abs"))
    assert str(back.conservation()) == str(attr.conservation())
    meta = back.metadata
    assert meta["format_version"] == 1 and "transformer-lens" in meta["versions"]
    assert meta["model_config"]["n_layers"] == 2


def test_newer_format_is_refused(model, tmp_path):
    path = lp.explain(model, "a b c d", "a").save(str(tmp_path / "a.safetensors"))
    with open(path + ".json") as f:
        meta = json.load(f)
    meta["format_version"] = 99
    with open(path + ".json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="newer"):
        lp.Attribution.load(path)
    with pytest.raises(FileNotFoundError):
        lp.Attribution.load(str(tmp_path / "missing.safetensors"))
