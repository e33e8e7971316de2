"""Dataset statistics (lens_palrp.analyses.dataset_stats) against a slow reference.

The statistics are collected from left-padded batches (explained right-aligned) and checked
against numbers computed here, one prompt at a time, from unpadded single ``explain`` runs: so
padding, batching, streaming and the distance indexing are all checked at once. Runs on the zoo's
RoPE model (HookedTransformer on TransformerLens 3.x, the bridge on 4.x) in float64.
"""

import math

import plotly.graph_objects as go
import pytest
import torch

import lens_palrp as lp

if not lp.zoo.available():
    pytest.skip("neither HookedTransformer nor TransformerBridge imports", allow_module_level=True)

from lens_palrp.analyses import dataset_stats as ds  # noqa: E402

PAD, TARGET = 1, 5
LENGTHS = [5, 9, 3, 12, 7, 14, 4, 10, 6, 13, 8, 11]
BATCHES = [range(0, 4), range(4, 8), range(8, 12)]
# position within each prompt's own tokens: the second batch explains earlier positions
POSITIONS = [-1, -1, -1, -1, 2, 5, 1, -3, -1, -1, -1, -1]


def close(actual, expected):
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def setup():
    model = lp.zoo.load("rope-repeat", dtype=torch.float64)[0]
    gen = torch.Generator().manual_seed(16)
    prompts = [[0] + torch.randint(2, 18, (n - 1,), generator=gen).tolist() for n in LENGTHS]

    def batch(rows):
        """Left-padded ids and mask, as a tokenizer with padding_side='left' gives them."""
        width = max(LENGTHS[i] for i in rows)
        tokens = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            tokens[r, width - LENGTHS[i]:] = torch.tensor(prompts[i])
            mask[r, width - LENGTHS[i]:] = 1
        position = torch.tensor([POSITIONS[i] for i in rows])
        return lp.explain(model, tokens, TARGET, attention_mask=mask, position=position)

    def batches():  # a generator: collect sees one batch at a time
        for rows in BATCHES:
            yield batch(list(rows))

    singles = [lp.explain(model, torch.tensor([p]), TARGET, position=POSITIONS[i]) for i, p in enumerate(prompts)]
    stats = ds.collect(batches(), n_boot=500, seed=3)
    return stats, singles


def reference(singles):
    """Every statistic computed the slow way from single, unpadded runs."""
    pos = torch.stack([a.positional[0].sum(-1) for a in singles])
    heads = torch.stack([a.heads[0] for a in singles])
    share_h, share_p, by_d = [], [], {}
    for a in singles:
        h_mass = [float(sum(abs(float(a.heads[0, l, h])) for h in range(a.heads.shape[2])))
                  for l in range(a.heads.shape[1])]
        p_mass = [float(a.positional[0, l].abs().sum()) for l in range(a.positional.shape[1])]
        share_h.append(torch.tensor([m / sum(h_mass) for m in h_mass]))
        share_p.append(torch.tensor([m / sum(p_mass) for m in p_mass]))
        q = int(a.target_position[0])
        for d in range(q + 1):
            by_d.setdefault(d, []).append(a.positional[0, :, :, q - d])
    return pos, heads, torch.stack(share_h), torch.stack(share_p), by_d


def test_statistics_equal_a_per_prompt_reference(setup):
    stats, singles = setup
    pos, heads, share_h, share_p, by_d = reference(singles)
    # the second batch really explains positions before the last token
    assert [int(a.target_position[0]) for a in singles[4:8]] == [2, 5, 1, 7]
    assert stats.n == 12 and stats.method == "pa_lrp"
    close(stats.positional_per_prompt, pos)
    close(stats.heads_per_prompt, heads)
    close(stats.positional_mean, pos.mean(0))
    close(stats.positional_std, pos.std(0))
    close(stats.heads_mean, heads.mean(0))
    close(stats.heads_std, heads.std(0))
    close(stats.layer_share_heads_mean, share_h.mean(0))
    close(stats.layer_share_heads_std, share_h.std(0))
    close(stats.layer_share_positional_mean, share_p.mean(0))
    close(stats.layer_share_positional_std, share_p.std(0))
    close(stats.layer_share_heads_mean.sum(), torch.tensor(1.0))
    assert float(pos.abs().max()) > 1e-3  # RoPE: the positional sinks hold real relevance

    max_d = max(by_d)
    assert max_d == max(int(a.target_position[0]) for a in singles) == 12
    assert stats.by_distance_mean.shape == (2, 4, max_d + 1)
    assert stats.by_distance_count.tolist() == [len(by_d[d]) for d in range(max_d + 1)]
    for d in range(max_d + 1):
        values = torch.stack(by_d[d])
        close(stats.by_distance_mean[..., d], values.mean(0))
        close(stats.by_distance_std[..., d], values.std(0) if len(values) > 1 else torch.zeros_like(values[0]))


def test_batching_does_not_change_the_statistics(setup):
    """The same prompts streamed as single runs give the same numbers (and std 0 for one prompt)."""
    stats, singles = setup
    again = ds.collect(iter(singles), n_boot=500, seed=3)
    for name in ("positional_mean", "positional_std", "heads_mean", "layer_share_positional_std",
                 "by_distance_mean", "by_distance_std", "positional_ci", "heads_ci"):
        close(getattr(again, name), getattr(stats, name))
    one = ds.collect([singles[0]], n_boot=0)
    assert one.n == 1 and float(one.positional_std.abs().max()) == 0 and one.positional_ci is None


def test_top_heads_bootstrap(setup):
    stats, _ = setup
    for which, values in (("positional", stats.positional_per_prompt), ("semantic", stats.heads_per_prompt)):
        rows = ds.top_heads(stats, k=5, which=which, n_boot=500, seed=3)
        mean = values.mean(0)
        order = mean.reshape(-1).abs().sort(descending=True).indices[:5].tolist()
        assert [(r["layer"], r["head"]) for r in rows] == [divmod(i, 4) for i in order]
        ci = stats.positional_ci if which == "positional" else stats.heads_ci
        for r in rows:
            l, h = r["layer"], r["head"]
            assert r["mean"] == pytest.approx(float(mean[l, h]), abs=1e-12)
            assert r["low"] <= r["mean"] <= r["high"] and r["low"] < r["high"]
            # the seeded resamples are shared by all heads: collect's interval is the same
            assert (r["low"], r["high"]) == pytest.approx((float(ci[0, l, h]), float(ci[1, l, h])), abs=1e-12)
            # a percentile interval of a mean is near the normal one (loosely, at n = 12)
            normal = 2 * 1.96 * float(values[:, l, h].std()) / math.sqrt(stats.n)
            assert 0.4 * normal < r["high"] - r["low"] < 1.6 * normal
        assert ds.top_heads(stats, k=5, which=which, n_boot=500, seed=3) == rows
        assert ds.top_heads(stats, k=5, which=which, n_boot=500, seed=4) != rows
    assert len(ds.top_heads(stats, k=100)) == 8 and ds.top_heads(stats, k=0) == []
    with pytest.raises(ValueError, match="which must be"):
        ds.top_heads(stats, which="combined")
    with pytest.raises(ValueError, match="n_boot"):
        ds.top_heads(stats, n_boot=0)


def test_figures_plot_their_data(setup, tmp_path):
    stats, _ = setup
    fig = ds.dataset_positional_heads_figure(stats)
    assert isinstance(fig, go.Figure)
    heat = fig.data[0]
    assert [list(r) for r in heat.z] == ds.dataset_positional_heads_data(stats).tolist()
    assert list(heat.y) == ["L0", "L1"] and list(fig.layout.yaxis.tickvals) == ["L0", "L1"]
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.height and heat.colorbar.title.text
    assert heat.zmax == pytest.approx(float(stats.positional_mean.abs().max())) and heat.zmin == -heat.zmax
    semantic = ds.dataset_positional_heads_figure(stats, "semantic").data[0]
    assert [list(r) for r in semantic.z] == stats.heads_mean.tolist()

    fig = ds.dataset_layer_share_figure(stats)
    for bar, (mean, std) in zip(fig.data, ds.dataset_layer_share_data(stats).values()):
        assert list(bar.y) == mean.tolist() and list(bar.error_y.array) == std.tolist()

    data = ds.dataset_distance_data(stats, k=3)
    fig = ds.dataset_distance_figure(stats, k=3)
    assert len(fig.data) == 3 == len(data["series"])
    for line, (name, values) in zip(fig.data, data["series"].items()):
        assert line.name == name and list(line.y) == values.tolist()
        assert list(line.x) == list(range(stats.max_distance + 1))
    chosen = ds.dataset_distance_data(stats, heads=[(1, 2)])["series"]
    assert list(chosen) == ["L1H2"] and chosen["L1H2"].tolist() == stats.by_distance_mean[1, 2].tolist()
    with pytest.raises(ValueError, match="does not exist"):
        ds.dataset_distance_data(stats, heads=[(2, 0)])

    rows = ds.dataset_top_heads_data(stats, k=4, n_boot=200, seed=1)
    bar = ds.dataset_top_heads_figure(stats, k=4, n_boot=200, seed=1).data[0]
    assert list(bar.y) == [r["mean"] for r in rows]
    assert list(bar.x) == [f"L{r['layer']}H{r['head']}" for r in rows]
    assert list(bar.error_y.array) == [r["high"] - r["mean"] for r in rows]
    assert list(bar.error_y.arrayminus) == [r["mean"] - r["low"] for r in rows]

    path = ds.dataset_report(stats, str(tmp_path / "dataset.html"))
    text = open(path, encoding="utf-8").read()
    assert text.count("plotly-graph-div") >= 5 and "12</p>" in text


def test_collect_refuses_what_is_not_one_dataset(setup):
    _, singles = setup
    with pytest.raises(ValueError, match="no prompts"):
        ds.collect([])
    with pytest.raises(TypeError, match="expected an Attribution"):
        ds.collect([singles[0], "x"])
    other = singles[1][0:1]
    other.method = "attn_lrp"
    with pytest.raises(ValueError, match="one model explained by one method"):
        ds.collect([singles[0], other])
