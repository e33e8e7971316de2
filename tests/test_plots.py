"""Figures and the HTML report: data arrays, titles, labels, heights and colour ranges (not
pixels; tests/test_report_browser.py loads a report in a real browser)."""

import os
import re

import pytest
import torch

import lens_palrp as lp
from lens_palrp import analyses as an
from lens_palrp.analyses import plots


@pytest.fixture(scope="module", params=["zoo", "llama-bridge"])
def attr(request, tmp_path_factory):
    """An explanation of the zoo's RoPE model, and of a Llama TransformerBridge (TransformerLens
    3.9 and 4.x) with the same tokenizer: the figures read the Attribution alone."""
    if request.param == "zoo":
        if not lp.zoo.available():
            pytest.skip("the zoo models do not load here")
        model, _ = lp.zoo.load("rope-repeat")
    else:
        pytest.importorskip("transformer_lens.model_bridge")
        from bridges import tiny_llama

        _, model = tiny_llama(tmp_path_factory.mktemp("llama"))
    return lp.explain(model, ["c h a p k b e g", "a b c d"], "k")


def as_tensor(z):
    return torch.tensor(z, dtype=torch.float64)


def max_abs(values) -> float:
    return float(torch.as_tensor(values, dtype=torch.float64).abs().max())


def test_per_head_heatmaps_with_position_menu(attr):
    fig = an.positional_heads_figure(attr)
    torch.testing.assert_close(as_tensor(fig.data[0].z), attr.positional[0].sum(-1).double())
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert "Positional relevance per head" in fig.layout.title.text
    buttons = fig.layout.updatemenus[0].buttons
    assert len(buttons) == 1 + 9 and buttons[0].label == "all positions" and "'k'" in buttons[6].label
    torch.testing.assert_close(as_tensor(buttons[6].args[0]["z"][0]), attr.positional[0, :, :, 5].double())
    at5 = an.positional_heads_figure(attr, position=5)
    torch.testing.assert_close(as_tensor(at5.data[0].z), attr.positional[0, :, :, 5].double())
    short = an.positional_heads_figure(attr, index=1)  # padded example: its own positions only
    assert len(short.layout.updatemenus[0].buttons) == 1 + 5
    heads = an.heads_figure(attr)
    torch.testing.assert_close(as_tensor(heads.data[0].z), attr.heads[0].double())
    torch.testing.assert_close(an.heads_data(attr, 0), attr.heads[0])


@pytest.mark.parametrize("which", ["positional", "heads"])
def test_every_menu_view_has_its_own_symmetric_colour_range(attr, which):
    """The sum over positions and one position differ by orders of magnitude: each view's range is
    its own largest |value| (a button that kept the first view's zmin/zmax fails here)."""
    per_pos = (attr.positional if which == "positional" else attr.heads_by_pos)[0].double()
    figure = an.positional_heads_figure if which == "positional" else an.heads_figure
    views = [per_pos[..., :9].sum(-1)] + [per_pos[..., p] for p in range(9)]
    fig = figure(attr)
    buttons = fig.layout.updatemenus[0].buttons
    assert len(buttons) == len(views)
    for button, view in zip(buttons, views):
        args = button.args[0]
        torch.testing.assert_close(as_tensor(args["z"][0]), view)
        limit = max(max_abs(view), 1e-12)
        assert args["zmax"][0] == pytest.approx(limit, rel=1e-6) and args["zmin"][0] == pytest.approx(-limit, rel=1e-6)
        assert args["zauto"] == [False]
    limits = {round(b.args[0]["zmax"][0], 12) for b in buttons}
    assert len(limits) > 1  # the views really differ: one shared range would be wrong here
    trace = fig.data[0]
    assert trace.zauto is False and trace.zmax == pytest.approx(max_abs(views[0]), rel=1e-6)
    assert trace.zmin == -trace.zmax
    at3 = figure(attr, position=3)  # a figure opened at one position starts on that view's range
    assert at3.data[0].zmax == pytest.approx(max(max_abs(views[4]), 1e-12), rel=1e-6)
    assert at3.layout.updatemenus[0].active == 4


def test_layer_axes_list_every_layer_with_layer_0_on_top(attr):
    layers = [f"L{l}" for l in range(attr.positional.shape[1])]
    for fig in (an.positional_heads_figure(attr), an.heads_figure(attr), an.layer_share_figure(attr)):
        axis = fig.layout.yaxis
        assert axis.tickmode == "array" and list(axis.tickvals) == layers and list(axis.ticktext) == layers
        assert axis.autorange == "reversed"  # categories run top-down: L0 first, on top
    heads = [f"H{h}" for h in range(attr.positional.shape[2])]
    assert list(an.heads_figure(attr).layout.xaxis.tickvals) == heads
    residual = an.residual_figure(attr).layout.yaxis
    assert list(residual.tickvals) == [f"into {l}" for l in layers] + ["final"] and residual.autorange == "reversed"


def test_every_figure_has_a_fixed_height_and_every_heatmap_a_colour_bar(attr):
    figures = an.report_figures(attr)
    for fig in figures:
        assert isinstance(fig.layout.height, int) and 250 <= fig.layout.height <= 2000, fig.layout.title.text
        for trace in fig.data:
            if trace.type == "heatmap":
                assert trace.showscale is not False and trace.colorbar is not None
    # more layers, taller figure: the height follows the rows, not the window
    layers = attr.positional.shape[1]
    assert an.positional_heads_figure(attr).layout.height == plots.FIGURE_FRAME_PX + plots.ROW_PX * max(layers, 3)


def test_token_view_one_and_many_prompts(attr):
    fig = an.token_relevance_figure(attr)
    assert len(fig.data) == 3
    torch.testing.assert_close(as_tensor(fig.data[0].z[0]), attr.semantic[0].double())
    torch.testing.assert_close(as_tensor(fig.data[2].z[0]), attr.combined()[0].double())
    assert list(fig.data[0].x)[5] == "5:k"
    many = an.token_relevance_figure(attr, index=None)
    assert len(many.data) == 6 and len(many.data[3].x) == 5  # the second prompt, unpadded
    assert fig.data[0].colorscale is not None


def test_token_rows_each_have_their_own_colour_scale_and_bar(attr):
    many = an.token_relevance_figure(attr, index=None)
    expected = [values for i in range(attr.batch_size) for values in an.token_rows_data(attr, i).values()]
    domains = []
    for k, (trace, values) in enumerate(zip(many.data, expected)):
        limit = max_abs(values)
        assert trace.zmax == pytest.approx(limit, rel=1e-6) and trace.zmin == pytest.approx(-limit, rel=1e-6)
        axis = many.layout["yaxis" if k == 0 else f"yaxis{k + 1}"]
        lo, hi = axis.domain
        domains.append((lo, hi))
        # the row's colour bar sits beside the row it scales
        assert trace.colorbar.y == pytest.approx((lo + hi) / 2) and trace.colorbar.len == pytest.approx(hi - lo)
    assert len({round(t.zmax, 9) for t in many.data}) == len(many.data)  # six different scales here
    ordered = sorted(domains, reverse=True)
    assert ordered == domains  # top to bottom, in row order
    for (lo_above, _), (_, hi_below) in zip(domains, domains[1:]):
        assert hi_below < lo_above  # strips never overlap


def test_multi_prompt_titles_sit_in_the_gap_above_their_block(attr):
    many = an.token_relevance_figure(attr, index=None)
    titles = list(many.layout.annotations)
    assert [t.text.split("</b>")[0] for t in titles] == ["<b>#0", "<b>#1"]
    assert "c h a p k b e g" in titles[0].text and "a b c d" in titles[1].text  # the decoded prompts
    first_strip_top = [many.layout[f"yaxis{k}" if k > 1 else "yaxis"].domain[1] for k in (1, 4)]
    block0_bottom = many.layout["yaxis3"].domain[0]
    assert titles[0].y >= first_strip_top[0] - 1e-9
    assert first_strip_top[1] <= titles[1].y < block0_bottom  # between block 0's ticks and block 1


def test_layer_views(attr):
    share = an.layer_share_data(attr)
    total = share["semantic (residual stream)"] + share["positional sink"]
    torch.testing.assert_close(total, torch.ones_like(total))
    fig = an.layer_share_figure(attr)
    assert fig.layout.barmode == "stack" and [d.name for d in fig.data] == list(share)
    assert all(d.orientation == "h" for d in fig.data)
    torch.testing.assert_close(as_tensor(fig.data[1].x), share["positional sink"].double())
    assert fig.layout.yaxis.title.text == "layer"
    res = an.residual_figure(attr)
    torch.testing.assert_close(as_tensor(res.data[0].z), attr.residual[0].double())
    assert list(res.data[0].y)[-1] == "final" and res.layout.yaxis.title.text == "residual stream"
    assert res.data[0].zmax == pytest.approx(max_abs(attr.residual[0]), rel=1e-6)


def _figure_heights(page: str):
    return [int(h) for h in re.findall(r'<div style="height:(\d+)px; width:100%;">', page)]


def test_report_names_model_method_target_and_prompt(attr, tmp_path):
    path = attr.report(str(tmp_path / "r.html"))
    page = open(path, encoding="utf-8").read()
    for title in ("Token relevance", "Positional relevance per head", "Relevance through each head",
                  "share per layer", "residual stream", "target value", "semantic (token embeddings)"):
        assert title in page, title
    assert attr.model_name and attr.model_name != "custom"
    assert f"<b>model</b> {attr.model_name}" in page and "<b>method</b> pa_lrp" in page
    assert "logit of &#x27;k&#x27; at position 8 (&#x27;g&#x27;)" in page  # target and position
    assert "c h a p k b e g</span>" in page  # the prompt with its spaces
    assert _figure_heights(page) == [fig.layout.height for fig in an.report_figures(attr)]


def test_report_inlines_plotly_once_or_writes_it_beside(attr, tmp_path):
    from plotly.offline import get_plotlyjs

    banner = get_plotlyjs()[:200]
    inline = open(attr.report(str(tmp_path / "inline.html")), encoding="utf-8").read()
    assert inline.count(banner) == 1 and not re.findall(r"<script[^>]*\bsrc=", inline)  # nothing fetched
    folder = tmp_path / "beside"
    folder.mkdir()
    page_path = attr.report(str(folder / "r.html"), plotlyjs="beside")
    beside = open(page_path, encoding="utf-8").read()
    assert banner not in beside and "<script src='plotly.min.js'></script>" in beside
    assert open(folder / "plotly.min.js", encoding="utf-8").read() == get_plotlyjs()
    assert len(beside) < len(inline) / 10
    stamp = os.stat(folder / "plotly.min.js").st_mtime_ns
    attr.report(str(folder / "second.html"), index=1, plotlyjs="beside")  # shared, not rewritten
    assert os.stat(folder / "plotly.min.js").st_mtime_ns == stamp
    with pytest.raises(ValueError, match="plotlyjs must be one of"):
        attr.report(str(tmp_path / "x.html"), plotlyjs="cdn")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        attr.report(str(tmp_path / "missing" / "x.html"))
