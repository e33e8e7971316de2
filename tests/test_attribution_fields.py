"""The field table of ``Attribution`` (result.FIELDS) and what is derived from it: ``attr[i]``,
``to``, the finiteness check. Every check walks the table, so a field added to ``Attribution``
is checked here without editing this file."""

import copy
import dataclasses

import pytest
import torch

import lens_palrp as lp
from lens_palrp.records import Records
from lens_palrp.result import (
    FIELDS, FILE, RECORDS, REDUCTION, REDUCTION_FIELDS, REDUCTIONS, TENSOR, VALUE, Attribution, Reductions,
    check_finite,
)
from lens_palrp.zoo import shapes

AGGREGATIONS = [(a, p) for a in ("relu", "abs", "signed") for p in ("all", "semantic", "positional")]
KINDS = {TENSOR, RECORDS, VALUE, FILE, REDUCTIONS}


@pytest.fixture(scope="module", params=["text-pa_lrp", "text-attn_lrp", "vit"])
def attr(request, zoo):
    """A padded batch of three with records (PA-LRP, and AttnLRP whose leak reductions are
    non-zero), and a batch of three images (pixels and vision facts)."""
    if request.param == "vit":
        images = shapes.batch(3, seed=3)[0]
        return lp.explain(shapes.load(), images, torch.tensor([0, 1, 2]), record=["blocks.0.attn.hook_pattern"],
                          record_gradients=["blocks.1.hook_resid_pre"])
    model, _ = zoo
    method = request.param.split("-")[1]
    return lp.explain(model, ["c h a p k b e g", "a b c", "k e g"], "k", method=method,
                      record=["hook_embed", "blocks.0.attn.hook_pattern"], record_gradients=["blocks.1.attn.hook_z"])


def test_the_table_is_the_dataclass():
    assert [s.name for s in FIELDS] == [f.name for f in dataclasses.fields(Attribution)]
    assert [s.name for s in REDUCTION_FIELDS] == [f.name for f in dataclasses.fields(Reductions)]
    assert {s.kind for s in FIELDS} <= KINDS and {s.kind for s in REDUCTION_FIELDS} == {REDUCTION}
    assert [s.name for s in FIELDS if s.kind == REDUCTIONS] == ["_reductions"]
    # the relevances the engine has always refused to return with NaN or inf in them
    assert {s.name for s in FIELDS if s.finite} == {"semantic", "positional", "positional_input", "token_type",
                                                    "heads_by_pos", "mlp", "residual"}


def test_every_field_is_declared_and_set(attr):
    assert set(vars(attr)) == {s.name for s in FIELDS}
    assert isinstance(attr._reductions, Reductions)


def _rows(spec, value, rows):
    """What ``attr[rows]`` must hold in field ``spec`` of value ``value``."""
    if value is None:
        return None
    if spec.kind in (TENSOR, REDUCTION):
        return value[rows]
    if spec.kind == RECORDS:
        return {k: v[rows] for k, v in value.items()}
    return value[rows] if spec.per_example else value


def _assert_field(spec, got, want):
    if want is None:
        assert got is None, spec.name
    elif spec.kind in (TENSOR, REDUCTION):
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want), spec.name
    elif spec.kind == RECORDS:
        assert type(got) is Records and list(got) == list(want), spec.name
        for key in want:
            assert torch.equal(got[key], want[key]), (spec.name, key)
    else:
        assert got == want, spec.name


@pytest.mark.parametrize("index", [0, 1, -1, 2, slice(1, 3), slice(0, 3, 2), slice(None)])
def test_indexing_cuts_every_field_alike(attr, index):
    rows = slice(index % 3, index % 3 + 1) if isinstance(index, int) else index
    one = attr[index]
    assert type(one) is Attribution and one.batch_size == len(range(3)[rows])
    for spec in FIELDS:
        if spec.kind == REDUCTIONS:
            for rspec in REDUCTION_FIELDS:
                _assert_field(rspec, getattr(one._reductions, rspec.name), getattr(attr._reductions, rspec.name)[rows])
        else:
            _assert_field(spec, getattr(one, spec.name), _rows(spec, getattr(attr, spec.name), rows))


@pytest.mark.parametrize("i", [0, 1, 2])
def test_an_example_gives_the_batchs_numbers_bit_for_bit(attr, i):
    one = attr[i]
    for aggregation, parts in AGGREGATIONS:
        assert torch.equal(one.combined(aggregation, parts), attr.combined(aggregation, parts)[i:i + 1]), aggregation
    c, c1 = attr.conservation(), one.conservation()
    for name in c.__dataclass_fields__:
        assert torch.equal(getattr(c1, name), getattr(c, name)[i:i + 1]), name
    assert one.top_tokens(0, k=3) == attr.top_tokens(i, k=3)
    if attr.vision is not None:
        assert torch.equal(one.patch_map(), attr.patch_map()[i:i + 1])
        assert torch.equal(one.pixel_map("pixels"), attr.pixel_map("pixels")[i:i + 1])


def test_bad_indices_are_refused(attr):
    with pytest.raises(IndexError, match="out of range for a batch of 3"):
        attr[3]
    with pytest.raises(TypeError, match="an int or a slice"):
        attr["0"]
    with pytest.raises(TypeError, match="an int or a slice"):
        attr[0.0]


def test_to_moves_every_tensor_and_keeps_the_rest(attr):
    moved = attr.to("meta")  # a device no tensor is on: a forgotten one stays on the CPU
    for spec in FIELDS:
        value, before = getattr(moved, spec.name), getattr(attr, spec.name)
        if spec.kind == TENSOR and before is not None:
            assert value.device.type == "meta" and value.shape == before.shape, spec.name
        elif spec.kind == RECORDS:
            assert type(value) is Records and list(value) == list(before)
            assert all(v.device.type == "meta" for v in value.values()), spec.name
        elif spec.kind == REDUCTIONS:
            assert all(getattr(value, r.name).device.type == "meta" for r in REDUCTION_FIELDS)
        else:
            assert value == before, spec.name


@pytest.mark.parametrize("name", [s.name for s in FIELDS if s.finite])
def test_a_non_finite_relevance_is_refused_by_name(attr, name):
    bad = copy.deepcopy(attr)
    if getattr(bad, name) is None:
        pytest.skip(f"{name} is None here")
    value = getattr(bad, name).clone()
    value.view(-1)[0] = float("nan")
    setattr(bad, name, value)
    with pytest.raises(FloatingPointError, match=f"the relevance '{name}' contains NaN or inf"):
        check_finite(bad)
    check_finite(attr)


def test_without_reductions_combined_and_conservation_say_so(attr):
    bare = attr.to("cpu")
    bare._reductions = None
    assert torch.equal(bare.combined("signed"), attr.combined("signed"))
    for call in (lambda: bare.combined("relu"), lambda: bare.combined("abs"), bare.conservation):
        with pytest.raises(ValueError, match="internal reductions"):
            call()
    assert bare[0]._reductions is None
