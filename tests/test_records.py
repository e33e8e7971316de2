"""``attr.hooks`` / ``attr.gradients`` as ``Records``: a dict by hook name that also takes
TransformerLens' ``(name, layer)`` shorthand, negative layers and short names."""

import copy
import pickle

import pytest
import torch

import lens_palrp as lp
from lens_palrp.records import Records

RECORD = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_rot_k"]


# ------------------------------------------------------------------------------ Records alone
def four_layers():
    """Records of a 4-layer model where only layers 0 and 2 were recorded: negative layers must
    count from the model's layers, not from what happens to be recorded."""
    return Records({"blocks.0.attn.hook_pattern": torch.zeros(1, 2), "blocks.2.attn.hook_pattern": torch.ones(1, 2),
                    "blocks.3.hook_resid_post": torch.full((1, 2), 3.0), "hook_embed": torch.full((1, 2), 5.0)},
                   n_layers=4)


def test_name_layer_keys_resolve_with_get_act_name():
    r = four_layers()
    assert r["pattern", 0] is r["blocks.0.attn.hook_pattern"]
    assert r["pattern", 2] is r["blocks.2.attn.hook_pattern"]
    assert r["resid_post", 3] is r["blocks.3.hook_resid_post"]
    assert r["embed"] is r["hook_embed"]  # a short name without a layer
    assert r[("hook_embed",)] is r["hook_embed"]


def test_negative_layers_count_from_the_models_layers():
    r = four_layers()
    assert r["pattern", -2] is r["blocks.2.attn.hook_pattern"]
    assert r["pattern", -4] is r["blocks.0.attn.hook_pattern"]
    assert r["resid_post", -1] is r["blocks.3.hook_resid_post"]
    assert r["pattern", torch.tensor(-2)] is r["blocks.2.attn.hook_pattern"]
    with pytest.raises(KeyError, match="out of range for a model of 4 layers"):
        r["pattern", -5]
    with pytest.raises(KeyError, match="needs the model's number of layers"):
        Records(dict(r))["pattern", -1]


def test_a_missing_key_names_the_hook_and_what_was_recorded():
    r = four_layers()
    with pytest.raises(KeyError) as info:
        r["pattern", -1]
    message = str(info.value)
    assert "('pattern', -1) (hook 'blocks.3.attn.hook_pattern')" in message
    assert "'blocks.0.attn.hook_pattern', 'blocks.2.attn.hook_pattern'" in message and "record=" in message
    with pytest.raises(KeyError, match=r"no gradient recorded at 'blocks.9.hook_x'.*record_gradients="):
        Records({}, n_layers=2, what="gradient")["blocks.9.hook_x"]
    with pytest.raises(KeyError, match="recorded: nothing"):
        Records()["pattern", 0]
    with pytest.raises(TypeError, match="the layer of key"):
        r["pattern", 1.0]
    with pytest.raises(TypeError, match="hook name or a tuple"):
        r[0]


def test_it_is_still_a_dict():
    plain = {"blocks.0.attn.hook_pattern": torch.zeros(1), "hook_embed": torch.ones(1)}
    r = Records(plain, n_layers=2)
    assert isinstance(r, dict) and r == plain and len(r) == 2 and list(r) == list(plain)
    assert list(r.keys()) == list(plain.keys()) and list(r.items()) == list(plain.items())
    assert "hook_embed" in r and ("pattern", 0) in r and ("pattern", -2) in r
    assert ("pattern", 1) not in r and ("pattern", -9) not in r and 3 not in r
    assert r.get(("pattern", 0)) is plain["blocks.0.attn.hook_pattern"] and r.get(("pattern", 1)) is None
    for kept in (r.copy(), copy.deepcopy(r), pickle.loads(pickle.dumps(r)), r.to("cpu"), r.select(slice(0, 1))):
        assert type(kept) is Records and kept.n_layers == 2 and kept.what == "relevance" and list(kept) == list(r)


# ------------------------------------------------------------------------------ on an Attribution
@pytest.fixture(scope="module")
def attr(zoo):
    model, _ = zoo
    return lp.explain(model, ["c h a p k b e g", "a b c"], "k", record=RECORD,
                      record_gradients=["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"])


def test_attribution_records_take_shorthand(attr):
    assert type(attr.hooks) is Records and type(attr.gradients) is Records
    assert attr.hooks.n_layers == attr.positional.shape[1] == 2
    assert attr.hooks["pattern", 0] is attr.hooks["blocks.0.attn.hook_pattern"]
    assert attr.hooks["rot_k", -1] is attr.hooks["blocks.1.attn.hook_rot_k"]
    assert attr.hooks["embed"] is attr.hooks["hook_embed"]
    assert attr.gradients["z", -2] is attr.gradients["blocks.0.attn.hook_z"]
    assert attr.gradients["z", -1] is attr.gradients["blocks.1.attn.hook_z"]
    with pytest.raises(KeyError, match=r"\('pattern', -1\) \(hook 'blocks.1.attn.hook_pattern'\); recorded: "
                                       r"'hook_embed', 'blocks.0.attn.hook_pattern', 'blocks.1.attn.hook_rot_k'"):
        attr.hooks["pattern", -1]


def test_records_class_survives_copies_and_files(attr, tmp_path):
    back = lp.Attribution.load(attr.save(str(tmp_path / "a.safetensors")))
    for other in (attr.to("cpu"), attr[1], attr[0:2], copy.deepcopy(attr), back):
        for name in ("hooks", "gradients"):
            records = getattr(other, name)
            assert type(records) is Records and records.n_layers == 2 and list(records) == list(getattr(attr, name))
        assert other.hooks.what == "relevance" and other.gradients.what == "gradient"
        assert other.hooks["rot_k", -1].shape[0] == other.batch_size


def test_assigning_a_plain_dict_gives_records(attr):
    copy_ = attr.to("cpu")
    copy_.hooks = {"blocks.1.attn.hook_pattern": attr.semantic}
    assert type(copy_.hooks) is Records and copy_.hooks["pattern", -1] is copy_.hooks["blocks.1.attn.hook_pattern"]
