"""Attribution.save / Attribution.load round trip."""

import json

import pytest
import torch

import lens_palrp as lp

if not lp.zoo.available():
    pytest.skip("uses the zoo model (TransformerLens 3.x)", allow_module_level=True)


def test_round_trip_keeps_every_field(tmp_path):
    model, _ = lp.zoo.load("rope-repeat")
    attr = lp.explain(model, ["c h a p k b e g", "a b c"], "k", record=["blocks.0.attn.hook_pattern"])
    path = attr.save(str(tmp_path / "attr.safetensors"), model_config=model.cfg)
    back = lp.Attribution.load(path)
    for name, value in attr.__dict__.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(back, name), value), name
    assert back.hooks.keys() == attr.hooks.keys()
    assert torch.equal(back.hooks["blocks.0.attn.hook_pattern"], attr.hooks["blocks.0.attn.hook_pattern"])
    assert back.str_tokens == attr.str_tokens and back.method == "pa_lrp"
    torch.testing.assert_close(back.combined("abs"), attr.combined("abs"))
    assert str(back.conservation()) == str(attr.conservation())
    meta = back.metadata
    assert meta["format_version"] == 1 and "transformer-lens" in meta["versions"]
    assert meta["model_config"]["n_layers"] == 2


def test_newer_format_is_refused(tmp_path):
    model, _ = lp.zoo.load("rope-repeat")
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
