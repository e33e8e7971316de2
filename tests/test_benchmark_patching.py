"""benchmarks/patching.py's quick mode (one zoo model, 8 pairs) produces a complete record: every
estimator x component type x statistic with a finite value and an interval around it, the head
split, the ablation's variants, timings, and a markdown table with one column count. Speed and
the size of the correlations are never asserted."""

import json
import math

import pytest

from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    bench = load_benchmark("patching")
    out = tmp_path_factory.mktemp("patching") / "quick.json"
    result = bench.main(["--quick", "--json", str(out)])
    return bench, result, json.loads(out.read_text())


def test_every_method_and_component_has_a_finite_value_inside_its_interval(quick):
    bench, result, saved = quick
    assert saved["tasks"] and saved["tasks"][0]["n_pairs"] == bench.QUICK["pairs"]
    task = saved["tasks"][0]
    rows = {(r["method"], r["component"], r["statistic"]): r for r in task["agreement"]}
    statistics = ("mean_spearman_per_pair", "mean_pearson_per_pair", "spearman_of_means", "pearson_of_means")
    for method in bench.ESTIMATORS:
        for comp in bench.COMPONENTS:
            for stat in statistics:
                row = rows[(method, comp, stat)]
                value, low, high = row["value"], row["low"], row["high"]
                assert all(math.isfinite(x) for x in (value, low, high)), (method, comp, stat, row)
                assert -1 - 1e-9 <= low <= high <= 1 + 1e-9, (method, comp, stat, row)
                assert low - 1e-9 <= value <= high + 1e-9, (method, comp, stat, row)
                assert row["n_pairs"] == bench.QUICK["pairs"]


def test_ablation_head_split_and_timings_are_recorded(quick):
    bench, result, saved = quick
    task = saved["tasks"][0]
    assert {r["method"] for r in task["ablation"]} == set(bench.ZOO_VARIANTS)
    assert [r["method"] for r in task["head_split"]] == list(bench.ESTIMATORS) + list(bench.ZOO_VARIANTS)
    for r in task["head_split"]:
        for key in ("spearman_big", "sign_all", "sign_small"):
            value, low, high = r[key]
            assert low - 1e-9 <= value <= high + 1e-9 and 0 <= r["sign_all"][0] <= 1, (r["method"], key)
    (group,) = task["groups"]
    assert group["components"] == list(bench.COMPONENTS) and group["pairs"] == bench.QUICK["pairs"]
    assert group["patching_s"] > 0 and group["estimates_s"] > 0
    # the zoo task is solved on the clean prompts and flipped by the corruption
    assert group["clean_metric"] > 0 > group["corrupted_metric"]


def test_the_corruption_changes_only_the_answer_position(quick):
    bench = quick[0]
    task = bench.zoo_task("rope-repeat", 8)
    differs = (task.clean != task.corrupted)
    zoo_task = bench.lp.zoo.task("rope-repeat")
    src = zoo_task.relevant_position(task.clean.shape[1] - 1)
    assert differs[:, src].all() and differs.sum() == 8


def test_markdown_tables_have_one_column_count(quick):
    bench, result, _ = quick
    blocks, current = [], []
    for line in bench.markdown(result).splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.count("|"))
        elif current:
            blocks.append(current)
            current = []
    assert len(blocks) == 3  # two agreement tables and the head split
    assert all(len(set(b)) == 1 for b in blocks), blocks
    assert len(blocks[0]) == 2 + len(bench.ESTIMATORS) + len(bench.ZOO_VARIANTS)
