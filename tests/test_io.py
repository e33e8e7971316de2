"""Attribution.save / Attribution.load: format 2 (one safetensors file, metadata in its header),
bit-exact round trips, the version-1 files of tests/data, and the errors of damaged files."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lens_palrp as lp
from lens_palrp.io import FORMAT_VERSION, HEADER_KEY
from lens_palrp.records import Records
from lens_palrp.result import FIELDS, REDUCTION_FIELDS, RECORDS, REDUCTIONS, TENSOR

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
V1_FILES = ("v1_llama_pa_lrp", "v1_gpt2_pa_lrp", "v1_gpt2_attn_lrp")
AGGREGATIONS = [(a, p) for a in ("relu", "abs", "signed") for p in ("all", "semantic", "positional")]
RECORD = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_rot_k"]


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


@pytest.fixture(scope="module")
def attr(model):
    from lens_palrp.hooks import family_for

    record = [n for n in RECORD + ["hook_embed"] if family_for(model).has_hook(n)]  # no hook_rot_k in GPT-2
    return lp.explain(model, ["c h a p k b e g", "a b c"], "k", record=record,
                      record_gradients=["blocks.1.attn.hook_z"])


@pytest.fixture()
def saved(attr, model, tmp_path):
    return attr.save(str(tmp_path / "attr.safetensors"), model_config=model.cfg)


# ------------------------------------------------------------------------------ helpers
def header(path):
    """The lens_palrp metadata of a format-2 file, read with safetensors alone."""
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()[HEADER_KEY])


def rewrite(path, meta=None, tensors=None, raw=None):
    """Write ``path`` again with edited metadata (a dict, or ``raw`` header text) and/or tensors."""
    old_tensors = load_file(path)
    text = raw if raw is not None else json.dumps(meta if meta is not None else header(path))
    save_file({k: v.contiguous() for k, v in (tensors if tensors is not None else old_tensors).items()}, path,
              metadata={HEADER_KEY: text})


def edit_meta(path, change):
    meta = header(path)
    change(meta)
    rewrite(path, meta)


def edit_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    rewrite(path, tensors=tensors)


def refused(kind, path, fragment):
    with pytest.raises(kind) as info:
        lp.Attribution.load(path)
    message = str(info.value)
    assert fragment in message and os.path.basename(path) in message, message
    return message


def assert_same(a, b):
    """Every field of the table, the records and the internal reductions, bit for bit (dtype
    included), and every number combined() and conservation() give."""
    for spec in FIELDS:
        x, y = getattr(a, spec.name), getattr(b, spec.name)
        if spec.kind == TENSOR and x is not None:
            assert y is not None and x.dtype == y.dtype and torch.equal(x, y), spec.name
        elif spec.kind == RECORDS:
            assert type(y) is Records and list(x) == list(y), spec.name
            assert y.n_layers == x.n_layers == a.positional.shape[1]
            for key in x:
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (spec.name, key)
        elif spec.kind == REDUCTIONS:
            for rspec in REDUCTION_FIELDS:
                rx, ry = getattr(x, rspec.name), getattr(y, rspec.name)
                assert rx.dtype == ry.dtype and torch.equal(rx, ry), rspec.name
        elif spec.name != "metadata":
            assert x == y, spec.name
    for aggregation, parts in AGGREGATIONS:
        assert torch.equal(a.combined(aggregation, parts), b.combined(aggregation, parts)), (aggregation, parts)
    ca, cb = a.conservation(), b.conservation()
    for name in ca.__dataclass_fields__:
        assert torch.equal(getattr(ca, name), getattr(cb, name)), name


# ------------------------------------------------------------------------------ format 2
def test_round_trip_is_bit_exact(attr, saved, model):
    back = lp.Attribution.load(saved)
    assert_same(attr, back)
    assert back.hooks["pattern", 0] is back.hooks["blocks.0.attn.hook_pattern"]
    meta = back.metadata
    assert meta["format_version"] == FORMAT_VERSION == 2 and "transformer-lens" in meta["versions"]
    assert meta["model_config"]["n_layers"] == 2 and "fields" not in meta


def test_one_file_with_the_metadata_in_its_header(attr, saved, tmp_path):
    assert os.listdir(tmp_path) == ["attr.safetensors"]  # no .json beside it
    meta = header(saved)
    assert meta["format_version"] == 2 and meta["fields"]["str_tokens"] == attr.str_tokens
    assert meta["fields"]["method"] == "pa_lrp" and meta["default_aggregation"] == "relu"
    names = set(load_file(saved))
    want = {"field." + s.name for s in FIELDS if s.kind == TENSOR and getattr(attr, s.name) is not None}
    want |= {"reduction." + s.name for s in REDUCTION_FIELDS}
    want |= {"hook." + k for k in attr.hooks} | {"grad." + k for k in attr.gradients}
    assert names == want


def test_the_file_reads_with_safetensors_alone(attr, saved):
    """What docs/results.md promises: Eq. 11's map from the raw tensors of the file."""
    t = load_file(saved)
    relu = t["reduction.semantic_positive"] + t["reduction.positional_input_positive"] \
        + t["reduction.positional_layer_positive"].sum(1)
    assert torch.equal(relu, attr.combined("relu"))
    assert torch.equal(t["hook.blocks.0.attn.hook_pattern"], attr.hooks["pattern", 0])


def test_a_loaded_attribution_saves_again_alike(saved, tmp_path):
    back = lp.Attribution.load(saved)
    again = lp.Attribution.load(back.save(str(tmp_path / "again.safetensors")))
    assert_same(back, again)


def test_a_stale_json_beside_a_format_2_file_is_not_read(attr, saved):
    with open(saved + ".json", "w") as f:
        f.write("[not the metadata")
    assert_same(attr, lp.Attribution.load(saved))


def test_an_attribution_without_reductions_round_trips(attr, tmp_path):
    bare = attr.to("cpu")
    bare._reductions = None
    back = lp.Attribution.load(bare.save(str(tmp_path / "bare.safetensors")))
    assert back._reductions is None and header(str(tmp_path / "bare.safetensors"))["fields"]["_reductions"] is None
    assert torch.equal(back.combined("signed"), attr.combined("signed"))
    with pytest.raises(ValueError, match="internal reductions"):
        back.combined("relu")


# ------------------------------------------------------------------------------ format 2: errors
def test_newer_format_is_refused_naming_both_versions(saved):
    edit_meta(saved, lambda m: m.update(format_version=99))
    refused(ValueError, saved, "format 99, newer than this lens_palrp reads (2")


@pytest.mark.parametrize("version, fragment", [
    (0, "format_version 0 does not exist"),
    (1, "format 1 keeps the metadata in a .json file"),
    ("2", "format_version must be an integer, got '2'"),
    (2.0, "format_version must be an integer"),
])
def test_impossible_versions_in_the_header(saved, version, fragment):
    edit_meta(saved, lambda m: m.update(format_version=version))
    refused(ValueError, saved, fragment)


@pytest.mark.parametrize("raw, fragment", [
    ('{"format_version": 2, "fields": {', "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not the Attribution metadata object"),
    ('{"fields": {}}', "has no format_version"),
    ('{"format_version": 2, "fields": []}', "no 'fields' object"),
])
def test_a_corrupt_header_is_refused(saved, raw, fragment):
    rewrite(saved, raw=raw)
    message = refused(ValueError, saved, fragment)
    assert HEADER_KEY in message


def test_a_truncated_or_foreign_file_is_refused(saved):
    data = open(saved, "rb").read()
    open(saved, "wb").write(data[: len(data) // 2])
    refused(ValueError, saved, "not a readable safetensors file")
    open(saved, "wb").write(b"\x00garbage" * 4)
    refused(ValueError, saved, "truncated or corrupt")
    save_file({"weight": torch.ones(2)}, saved)  # a safetensors file, but no Attribution
    refused(FileNotFoundError, saved, f".json is missing: {saved} has no Attribution metadata in its header")


def test_records_keep_their_order_and_must_match_the_header(attr, saved):
    back = lp.Attribution.load(saved)
    assert list(back.hooks) == list(attr.hooks) != sorted(attr.hooks)  # safetensors sorts its tensors
    edit_meta(saved, lambda m: m["records"]["hooks"].pop())
    refused(ValueError, saved, "the file is inconsistent")


def test_missing_file(tmp_path):
    refused(FileNotFoundError, str(tmp_path / "none.safetensors"), "no such Attribution file")


def test_shape_mismatch_names_the_field(saved):
    t = load_file(saved)
    b, L, p = t["field.residual"].shape[0], t["field.positional"].shape[1], t["field.semantic"].shape[1]
    for key, cut, fragment in [
        ("field.tokens", t["field.tokens"][:, :-1], f"'tokens' has shape ({b}, {p - 1}), expected ({b}, {p})"),
        ("field.residual", t["field.residual"][:, :-1], f"'residual' has shape ({b}, {L}, {p}), expected ({b}, {L + 1}, {p})"),
        ("reduction.positional_layer_abs", t["reduction.positional_layer_abs"][:, :, :-1],
         f"'positional_layer_abs' has shape ({b}, {L}, {p - 1}), expected ({b}, {L}, {p})"),
        ("reduction.positional_leak_input", t["reduction.positional_leak_input"][:1],
         f"'positional_leak_input' has shape (1,), expected ({b},)"),
        ("hook.blocks.0.attn.hook_pattern", t["hook.blocks.0.attn.hook_pattern"][:1], f"leading batch dimension of {b}"),
    ]:
        edit_tensors(saved, lambda d: d.update({key: cut}))
        refused(ValueError, saved, fragment)
        edit_tensors(saved, lambda d: d.update({key: t[key]}))
    edit_tensors(saved, lambda d: d.update({"field.semantic": t["field.semantic"][:1]}))
    refused(ValueError, saved, f"'semantic' has shape (1, {p}), expected [batch, pos] with batch {b}")
    edit_tensors(saved, lambda d: d.update({"field.semantic": t["field.semantic"][:, :-1]}))
    refused(ValueError, saved, f"str_tokens has a row of {p} tokens, the tensors have {p - 1} positions")
    edit_tensors(saved, lambda d: d.update({"field.semantic": t["field.semantic"]}))
    edit_meta(saved, lambda m: m["model_config"].update(n_layers=7))
    refused(ValueError, saved, "model config n_layers=7")


def test_missing_or_unknown_contents_are_named(saved):
    t = load_file(saved)
    edit_tensors(saved, lambda d: d.pop("reduction.positional_leak_input"))
    refused(ValueError, saved, "lacks the internal reductions ['positional_leak_input']")
    edit_tensors(saved, lambda d: d.update({"reduction.positional_leak_input": t["reduction.positional_leak_input"],
                                            "reduction.colour": torch.ones(2)}))
    refused(ValueError, saved, "unknown internal reductions ['colour']")
    edit_tensors(saved, lambda d: (d.pop("reduction.colour"), d.update({"weight": torch.ones(2)})))
    refused(ValueError, saved, "tensor 'weight' is not an Attribution tensor")
    edit_tensors(saved, lambda d: (d.pop("weight"), d.pop("field.semantic")))
    refused(ValueError, saved, "lacks the fields ['semantic']")
    edit_tensors(saved, lambda d: d.update({"field.semantic": t["field.semantic"]}))
    edit_meta(saved, lambda m: m["fields"].update(colour="red"))
    refused(ValueError, saved, "unknown Attribution fields ['colour']")
    edit_meta(saved, lambda m: (m["fields"].pop("colour"), m["fields"].update(pixels=[1, 2])))
    refused(ValueError, saved, "field 'pixels' must be a tensor, got list")
    edit_meta(saved, lambda m: (m["fields"].update(pixels=None), m["fields"].pop("str_tokens")))
    refused(ValueError, saved, "lacks the fields ['str_tokens']")


# ------------------------------------------------------------------------------ format 1 files
def v1_path(name):
    return os.path.join(DATA, name + ".safetensors")


@pytest.fixture(scope="module")
def v1_expected():
    return load_file(os.path.join(DATA, "v1_expected.safetensors"))


@pytest.mark.parametrize("name", V1_FILES)
def test_version_1_file_loads_with_its_numbers(name, v1_expected):
    attr = lp.Attribution.load(v1_path(name))
    assert attr.metadata["format_version"] == 1 and attr.metadata["model_config"]["n_layers"] == 2
    stored = load_file(v1_path(name))
    reductions = {s.name for s in REDUCTION_FIELDS}
    for key, value in stored.items():  # every tensor of the file where it belongs
        kind, _, rest = key.partition(".")
        if kind == "field":
            got = getattr(attr._reductions if rest in reductions else attr, rest)
        else:
            got = (attr.hooks if kind == "hook" else attr.gradients)[rest]
        assert got.dtype == value.dtype and torch.equal(got, value), key
    assert type(attr.hooks) is Records and attr.hooks.n_layers == 2
    for aggregation, parts in AGGREGATIONS:  # what the format-1 code computed from the same file
        assert torch.equal(attr.combined(aggregation, parts), v1_expected[f"{name}.combined.{aggregation}.{parts}"])
    c = attr.conservation()
    for field in c.__dataclass_fields__:
        key = f"{name}.conservation.{field}"
        if key not in v1_expected:  # added after format 1 (router_absorbed): a format-1 model had no router
            assert not getattr(c, field).any(), field
            continue
        assert torch.equal(getattr(c, field), v1_expected[key]), field


def test_version_1_records_take_shorthand_keys():
    attr = lp.Attribution.load(v1_path("v1_llama_pa_lrp"))
    assert torch.equal(attr.hooks["pattern", 0], attr.hooks["blocks.0.attn.hook_pattern"])
    assert torch.equal(attr.hooks["rot_k", -1], attr.hooks["blocks.1.attn.hook_rot_k"])
    assert torch.equal(attr.gradients["z", -1], attr.gradients["blocks.1.attn.hook_z"])


@pytest.mark.parametrize("name", V1_FILES)
def test_version_1_file_equals_a_fresh_computation(name):
    """The fixtures were written by the format-1 code from these models and inputs."""
    from data.make_v1_fixture import CASES, explain  # skips where HookedTransformer is gone

    _, fresh = explain(CASES[name])
    attr = lp.Attribution.load(v1_path(name))
    tight = dict(rtol=1e-12, atol=1e-14)
    for spec in FIELDS:
        x, y = getattr(fresh, spec.name), getattr(attr, spec.name)
        if spec.kind == TENSOR and x is not None:
            torch.testing.assert_close(y, x, **tight, msg=spec.name)
        elif spec.kind == RECORDS:
            assert list(x) == list(y)
            for key in x:
                torch.testing.assert_close(y[key], x[key], **tight, msg=key)
        elif spec.kind == REDUCTIONS:
            for rspec in REDUCTION_FIELDS:
                torch.testing.assert_close(getattr(y, rspec.name), getattr(x, rspec.name), **tight, msg=rspec.name)
        elif spec.name not in ("metadata", "computation", "prompt_text", "target_label"):  # format 1 predates them
            assert x == y, spec.name


def test_version_1_resaves_as_version_2(tmp_path):
    attr = lp.Attribution.load(v1_path("v1_llama_pa_lrp"))
    path = attr.save(str(tmp_path / "v2.safetensors"))
    assert header(path)["format_version"] == 2 and not os.path.exists(path + ".json")
    assert_same(attr, lp.Attribution.load(path))


@pytest.fixture()
def v1_copy(tmp_path):
    for suffix in ("", ".json"):
        shutil.copy(v1_path("v1_gpt2_pa_lrp") + suffix, str(tmp_path / "v1.safetensors") + suffix)
    return str(tmp_path / "v1.safetensors")


def edit_json(path, change):
    with open(path + ".json") as f:
        meta = json.load(f)
    change(meta)
    with open(path + ".json", "w") as f:
        json.dump(meta, f)


def test_version_1_errors(v1_copy):
    path = v1_copy
    edit_json(path, lambda m: m.update(format_version=99))
    refused(ValueError, path, "format 99, newer than this lens_palrp reads (2")
    edit_json(path, lambda m: m.update(format_version=2))  # format 2 never writes a .json
    refused(ValueError, path, "keeps its metadata in the safetensors header")
    edit_json(path, lambda m: m.update(format_version=1))
    text = open(path + ".json").read()
    open(path + ".json", "w").write(text[: len(text) // 2])
    refused(ValueError, path, ".json is not valid JSON")
    open(path + ".json", "w").write(text)
    edit_json(path, lambda m: m["model_config"].update(n_heads=3))
    refused(ValueError, path, "model config n_heads=3")
    edit_json(path, lambda m: m["model_config"].update(n_heads=4))
    t = load_file(path)
    save_file(dict(t, **{"field.semantic_positive": t["field.semantic_positive"][:, :-1].contiguous()}), path)
    refused(ValueError, path, "'semantic_positive' has shape (2, 6), expected (2, 7)")
    save_file(t, path)
    lp.Attribution.load(path)  # undamaged again
    os.remove(path + ".json")
    refused(FileNotFoundError, path, ".json is missing")
    open(path + ".json", "w").write(text)
    os.remove(path)
    refused(FileNotFoundError, path, "is missing (its metadata")


def test_vision_attribution_round_trips_and_checks_pixels(tmp_path):
    from lens_palrp.zoo import shapes

    vit = shapes.load()
    attr = lp.explain(vit, shapes.batch(2, seed=3)[0], torch.tensor([0, 1]), record=["blocks.0.attn.hook_pattern"])
    path = attr.save(str(tmp_path / "vit.safetensors"), model_config=vit.cfg)
    back = lp.Attribution.load(path)
    assert_same(attr, back)
    assert back.vision == attr.vision and torch.equal(back.pixel_map("pixels"), attr.pixel_map("pixels"))
    h, w = attr.pixels.shape[1:]
    edit_tensors(path, lambda d: d.update({"field.pixels": d["field.pixels"][:, : h // 2]}))
    refused(ValueError, path, f"'pixels' has shape (2, {h // 2}, {w}), expected (2, {h}, {w})")
