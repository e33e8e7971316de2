"""``Attribution.to_frame`` (tidy tables), ``_repr_html_`` (the notebook view) and what an
explanation records for reports: the model's name, the decoded prompt and the target in words."""

import dataclasses

import pytest
import torch

import lens_palrp as lp

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def model():
    if not lp.zoo.available():
        pytest.skip("the zoo models do not load here")
    return lp.zoo.load("rope-repeat")[0]


@pytest.fixture(scope="module")
def attr(model):
    """Two prompts of different lengths: the second is padded."""
    return lp.explain(model, ["c h a p k b e g", "a b c d"], ("k", "a"))


def test_tokens_frame_has_one_row_per_real_token(attr):
    frame = attr.to_frame("tokens")
    assert list(frame.columns) == ["example", "position", "token", "semantic", "positional", "combined", "explained"]
    n_real = [int(m.sum()) for m in attr.attention_mask]
    assert len(frame) == sum(n_real) and frame.groupby("example").size().tolist() == n_real  # no padding rows
    for row in frame.itertuples():
        b, p = row.example, row.position
        assert row.token == attr.str_tokens[b][p]
        assert row.semantic == pytest.approx(float(attr.semantic[b, p]), abs=0, rel=1e-12)
        positional = attr.positional_input[b, p] + attr.positional[b, :, :, p].sum()
        assert row.positional == pytest.approx(float(positional), rel=1e-6, abs=1e-12)
        assert row.combined == pytest.approx(float(attr.combined()[b, p]), rel=1e-12)
        assert row.explained == (p == int(attr.target_position[b]))
    assert frame["explained"].sum() == attr.batch_size
    # per example, the frame's sums are the conservation table's totals
    c = attr.conservation()
    sums = frame.groupby("example")[["semantic", "positional"]].sum()
    torch.testing.assert_close(torch.tensor(sums["semantic"].values), c.semantic.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.tensor(sums["positional"].values), (c.positional_input + c.positional).double(),
                               rtol=1e-5, atol=1e-8)
    signed = attr.to_frame("tokens", aggregation="signed")
    assert signed["combined"].tolist() == pytest.approx((signed["semantic"] + signed["positional"]).tolist(), rel=1e-5)


def test_heads_and_layers_frames(attr):
    heads = attr.to_frame("heads")
    batch, layers, n_heads, _ = attr.positional.shape
    assert list(heads.columns) == ["example", "layer", "head", "relevance", "positional"]
    assert len(heads) == batch * layers * n_heads
    for row in heads.sample(10, random_state=0).itertuples():
        assert row.relevance == pytest.approx(float(attr.heads[row.example, row.layer, row.head]), rel=1e-12)
        assert row.positional == pytest.approx(
            float(attr.positional[row.example, row.layer, row.head].sum()), rel=1e-12)
    per_layer = attr.to_frame("layers")
    assert list(per_layer.columns) == ["example", "layer", "positional_sink", "residual_in", "mlp"]
    assert len(per_layer) == batch * layers
    c = attr.conservation()
    sink = torch.tensor(per_layer["positional_sink"].values).reshape(batch, layers)
    torch.testing.assert_close(sink, c.positional_per_layer.double(), rtol=1e-6, atol=1e-9)
    residual = torch.tensor(per_layer["residual_in"].values).reshape(batch, layers)
    torch.testing.assert_close(residual, attr.residual[:, :-1].sum(-1).double(), rtol=1e-6, atol=1e-9)
    # the heads frame's positional column sums to the layers frame's sink
    by_layer = heads.groupby(["example", "layer"])["positional"].sum().values
    assert by_layer.tolist() == pytest.approx(per_layer["positional_sink"].tolist(), rel=1e-6, abs=1e-12)


def test_to_frame_refuses_an_unknown_kind(attr):
    with pytest.raises(ValueError, match="kind must be one of"):
        attr.to_frame("neurons")


def test_notebook_view_is_small_escaped_html(attr):
    page = attr._repr_html_()
    assert "plotly" not in page.lower() and "<script" not in page and len(page) < 40_000
    for b in range(attr.batch_size):
        for p in range(int(attr.attention_mask[b].sum())):
            value = float(attr.semantic[b, p])
            assert f"semantic {value:.6g}" in page  # exact numbers in the spans' titles
    assert "logit of &#x27;k&#x27; minus logit of &#x27;a&#x27;" in page and "target value" in page
    hostile = dataclasses.replace(attr[0], str_tokens=[["<script>alert(1)</script>", "&", "'\"", *attr.str_tokens[0][3:]]])
    html = hostile._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "'\"" not in html and "&#x27;&quot;" in html


def test_notebook_view_of_a_large_batch_shows_a_few_and_says_so(model):
    big = lp.explain(model, ["c h a p k b e g"] * 5, "k")
    page = big._repr_html_()
    assert page.count("<b>example ") == 3 and "2 more examples not shown" in page
    bare = dataclasses.replace(big[0], _reductions=None)  # built by hand: still renders
    assert "semantic" in bare._repr_html_()


def test_prompt_text_target_label_and_model_name(model, attr, tmp_path):
    assert attr.model_name == "rope-repeat"
    assert attr.prompt_text == ["c h a p k b e g", "a b c d"]  # decoded: the spaces kept
    assert attr.target_label == ["logit of 'k' minus logit of 'a'"] * 2
    one = lp.explain(model, "c h a p k b e g", "k")
    assert one.target_label == ["logit of 'k'"]

    def margin(logits):
        return logits[:, -1, 3] - logits[:, -1, 4]

    assert lp.explain(model, "c h a p k", margin).target_label == ["the metric margin(logits)"]
    hooked = lp.explain(model, "c h a p k", lp.at_hook("blocks.0.hook_resid_post", lambda a: a[:, -1, 0]))
    assert hooked.target_label == ["a scalar of the activation at hook blocks.0.hook_resid_post"]
    assert attr[1].prompt_text == ["a b c d"] and attr[1].target_label == attr.target_label[1:]
    loaded = lp.Attribution.load(attr.save(str(tmp_path / "a.safetensors")))
    assert loaded.prompt_text == attr.prompt_text and loaded.target_label == attr.target_label
