"""Figures and the HTML report: data arrays, titles and labels (not pixels); one real browser load."""

import shutil
import subprocess

import pytest
import torch

import lens_palrp as lp
from lens_palrp import analyses as an


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


def test_token_view_one_and_many_prompts(attr):
    fig = an.token_relevance_figure(attr)
    assert len(fig.data) == 3
    torch.testing.assert_close(as_tensor(fig.data[0].z[0]), attr.semantic[0].double())
    torch.testing.assert_close(as_tensor(fig.data[2].z[0]), attr.combined()[0].double())
    assert list(fig.data[0].x)[5] == "5:k"
    many = an.token_relevance_figure(attr, index=None)
    assert len(many.data) == 6 and len(many.data[3].x) == 5  # the second prompt, unpadded
    assert fig.data[0].colorscale is not None and fig.data[0].zmid == 0


def test_layer_views(attr):
    share = an.layer_share_data(attr)
    total = share["semantic (residual stream)"] + share["positional sink"]
    torch.testing.assert_close(total, torch.ones_like(total))
    fig = an.layer_share_figure(attr)
    assert fig.layout.barmode == "stack" and [d.name for d in fig.data] == list(share)
    assert fig.layout.xaxis.title.text == "layer"
    res = an.residual_figure(attr)
    torch.testing.assert_close(as_tensor(res.data[0].z), attr.residual[0].double())
    assert list(res.data[0].y)[-1] == "final" and res.layout.yaxis.title.text == "residual stream"


def test_report_holds_every_view(attr, tmp_path):
    path = attr.report(str(tmp_path / "r.html"))
    page = open(path, encoding="utf-8").read()
    for title in ("Token relevance", "Positional relevance per head", "Relevance through each head",
                  "share per layer", "residual stream", "target value", "semantic (token embeddings)"):
        assert title in page, title
    assert page.count("plotly.js") >= 1 and "cdn.plot.ly" not in page.split("<script")[0]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (Debian package chromium)")
def test_report_loads_in_headless_chromium_without_javascript_errors(attr, tmp_path):
    path = attr.report(str(tmp_path / "r.html"))
    run = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=8000", "--dump-dom", f"file://{path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert not errors, errors
    assert run.stdout.count('class="main-svg"') >= 5  # plotly drew the figures
