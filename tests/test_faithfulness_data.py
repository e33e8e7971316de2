"""The faithfulness benchmark's text sources: CI's quick run must work from the shipped sample on a
fresh machine, and a missing Debian fortunes package must fail in one clear line."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def bench():
    """benchmarks/faithfulness.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("faithfulness_bench", os.path.join(ROOT, "benchmarks", "faithfulness.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_ships_enough_text_for_the_quick_run(bench, monkeypatch):
    monkeypatch.setattr(bench, "TEXTS_SOURCE", "sample")
    texts = bench.corpus_texts()
    assert len(texts) == 40 and all(t.isascii() for t in texts)
    pairs = bench.sentence_pairs(40, seed=0)  # the quick run takes 6, the full run's size is 40
    assert len(set(pairs)) == 40
    assert bench.sentence_pairs(6, seed=0) == bench.sentence_pairs(6, seed=0)  # seeded
    assert os.path.exists(os.path.join(ROOT, "benchmarks", "data", "README.md"))  # origin and licence


def test_missing_fortunes_fail_in_one_line(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "TEXTS_SOURCE", "fortunes")
    monkeypatch.setattr(bench, "FORTUNES", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as info:
        bench.corpus_texts()
    message = str(info.value)
    assert "apt-get install fortunes-min" in message and "--texts sample" in message and "\n" not in message


def test_too_few_pairs_is_an_error_not_a_smaller_run(bench, monkeypatch):
    monkeypatch.setattr(bench, "TEXTS_SOURCE", "sample")
    with pytest.raises(SystemExit, match="--pairs"):
        bench.sentence_pairs(10_000, seed=0)


def test_quick_run_writes_only_under_the_ignored_out_folder(bench):
    out = os.path.join(ROOT, "benchmarks", "out")
    table, store = bench.output_paths(quick=True)
    assert table.startswith(out + os.sep) and store.startswith(out + os.sep)
    assert bench.output_paths(quick=True, out="demos/out/x.md")[1].startswith(out + os.sep)
    # the full run keeps its published place
    table, store = bench.output_paths(quick=False)
    assert table == os.path.join(ROOT, "benchmarks", "results", "faithfulness.md")
    assert store == os.path.join(ROOT, "benchmarks", "results", "faithfulness")
    with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as f:
        assert "benchmarks/out/" in f.read().split()


def test_paired_line_is_a_minus_b_resampled_in_pairs(bench):
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(100, generator=g, dtype=torch.float64) * 10 + 20
    metrics = {"pa_lrp": {"x": base - 2.0}, "attn_lrp": {"x": base}}
    line = bench.paired_line(metrics, [("x", "X")], seed=0)
    # every sample 2 lower: the paired interval is exactly -2; resampling the two methods apart
    # would spread it over about +-4; -10% of AttnLRP's mean
    rel = 100 * -2.0 / abs(float(base.mean()))
    assert line == f"Paired, pa_lrp minus attn_lrp on the same samples: X -2.000 [-2.000, -2.000], {rel:+.1f}%."
    assert bench.paired_line({"pa_lrp": metrics["pa_lrp"]}, [("x", "X")], seed=0) == ""
