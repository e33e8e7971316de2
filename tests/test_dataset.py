"""explain_dataset in one process: every prompt's maps equal its own explain call, results are
written per batch and reread in dataset order, a stopped run resumes without redoing shards, and a
folder of another run is refused."""

import json
import os
import warnings

import pytest
import torch

import lens_palrp as lp
from lens_palrp.dataset import RUN_FILE, _shard

GEN = torch.Generator().manual_seed(0)
PROMPTS = [torch.randint(2, 12, (int(n),), generator=GEN).tolist() for n in torch.randint(4, 12, (14,), generator=GEN)]
TARGETS = [int(t) for t in torch.randint(2, 12, (14,), generator=GEN)]
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 zoo model: a padded batch against a single run


@pytest.fixture(scope="module")
def zoo():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lp.zoo.load("rope-repeat")[0]


def assert_same_as_single_run(res, model, i, target, position=-1, method="pa_lrp"):
    n = len(PROMPTS[i])
    a = res[i]
    b = lp.explain(model, torch.tensor([PROMPTS[i]]), target, position=position, method=method)
    assert a.attention_mask[0, :n].all() and not a.attention_mask[0, n:].any()
    torch.testing.assert_close(a.semantic[0, :n], b.semantic[0], **TOL)
    torch.testing.assert_close(a.positional[0, ..., :n], b.positional[0], **TOL)
    torch.testing.assert_close(a.heads[0], b.heads[0], **TOL)
    torch.testing.assert_close(a.target_value, b.target_value, **TOL)
    assert a.str_tokens[0][:n] == b.str_tokens[0]


def test_every_prompt_equals_its_own_explanation(zoo, tmp_path):
    res = lp.explain_dataset(zoo, PROMPTS, TARGETS, out=str(tmp_path), batch_size=4, progress=False)
    assert isinstance(res, lp.DatasetAttribution) and len(res) == len(PROMPTS) and res.complete
    for i in range(len(PROMPTS)):
        assert_same_as_single_run(res, zoo, i, TARGETS[i])
    # batched by length: each batch's prompts differ in length by as little as the sort allows
    lengths = [[len(PROMPTS[i]) for i in rows] for rows in res.plan]
    assert [max(l) for l in lengths] == sorted(max(l) for l in lengths)
    assert len(os.listdir(tmp_path)) == 2 + len(res.plan)  # run.json, index.json, one shard per batch
    index = json.load(open(tmp_path / "index.json"))["index"]
    assert sorted(int(i) for i in index) == list(range(len(PROMPTS)))
    reopened = lp.DatasetAttribution.load(str(tmp_path))
    torch.testing.assert_close(reopened[3].semantic, res[3].semantic, rtol=0, atol=0)


def test_targets_positions_and_methods(zoo, tmp_path):
    pairs = [(t, 2) for t in TARGETS]
    positions = [len(p) - 2 for p in PROMPTS]
    res = lp.explain_dataset(zoo, PROMPTS, pairs, position=positions, method="attn_lrp", out=str(tmp_path),
                             batch_size=5, progress=False)
    for i in (0, 7, 13):
        assert_same_as_single_run(res, zoo, i, pairs[i], position=positions[i], method="attn_lrp")
    assert res.method == "attn_lrp"


def test_targets_and_positions_as_tensors_or_arrays(zoo, tmp_path):
    import numpy as np

    positions = [len(p) - 1 for p in PROMPTS]
    a = lp.explain_dataset(zoo, PROMPTS, torch.tensor(TARGETS), position=torch.tensor(positions),
                           out=str(tmp_path / "tensor"), batch_size=5, progress=False)
    b = lp.explain_dataset(zoo, PROMPTS, np.array(TARGETS), position=np.array(positions),
                           out=str(tmp_path / "array"), batch_size=5, progress=False)
    for i in (0, 9):
        assert_same_as_single_run(a, zoo, i, TARGETS[i])
        assert torch.equal(a[i].semantic, b[i].semantic)


def test_a_hugging_face_dataset_with_prompt_and_target_columns(zoo, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"ids": PROMPTS, "answer": TARGETS})
    res = lp.explain_dataset(zoo, ds, prompt_column="ids", target_column="answer", out=str(tmp_path),
                             batch_size=6, progress=False)
    for i in (1, 12):
        assert_same_as_single_run(res, zoo, i, TARGETS[i])
    with pytest.raises(ValueError, match="no column 'prompt'"):
        lp.explain_dataset(zoo, ds, out=str(tmp_path / "other"), progress=False)


def test_a_stopped_run_resumes_without_redoing_shards(zoo, tmp_path):
    out = str(tmp_path)
    full = lp.explain_dataset(zoo, PROMPTS, TARGETS, out=out, batch_size=4, progress=False)
    expected = [full[i].semantic.clone() for i in range(len(PROMPTS))]
    os.remove(_shard(out, 1))
    os.remove(os.path.join(out, "index.json"))
    partial = lp.DatasetAttribution.load(out)
    assert not partial.complete and partial.missing == sorted(partial.plan[1])
    with pytest.raises(KeyError, match="has not been explained yet"):
        partial[partial.plan[1][0]]
    kept = {k: os.stat(_shard(out, k)).st_mtime_ns for k in (0, 2, 3)}
    res = lp.explain_dataset(zoo, PROMPTS, TARGETS, out=out, batch_size=4, progress=False)
    assert res.complete and os.path.exists(os.path.join(out, "index.json"))
    assert {k: os.stat(_shard(out, k)).st_mtime_ns for k in (0, 2, 3)} == kept  # not redone
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(res[i].semantic, expected[i], rtol=0, atol=0)


@pytest.mark.parametrize("change", ["targets", "method", "batch_size"])
def test_a_folder_of_another_run_is_refused(zoo, tmp_path, change):
    out = str(tmp_path)
    lp.explain_dataset(zoo, PROMPTS, TARGETS, out=out, batch_size=4, progress=False)
    kwargs = dict(targets=TARGETS, method="pa_lrp", batch_size=4)
    kwargs[change] = {"targets": [t + 1 for t in TARGETS], "method": "cp_lrp", "batch_size": 3}[change]
    what = {"targets": "prompts", "method": "method", "batch_size": "batch_size"}[change]
    with pytest.raises(ValueError, match=f"other settings.*{what}"):
        lp.explain_dataset(zoo, PROMPTS, out=out, progress=False, **kwargs)


def test_a_folder_of_other_weights_is_refused(zoo, tmp_path):
    out = str(tmp_path)
    lp.explain_dataset(zoo, PROMPTS, TARGETS, out=out, batch_size=4, progress=False)
    weight = next(zoo.parameters())
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1.0
    try:
        with pytest.raises(ValueError, match="other settings.*model_config"):
            lp.explain_dataset(zoo, PROMPTS, TARGETS, out=out, batch_size=4, progress=False)
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_bad_arguments(zoo, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        lp.explain_dataset(zoo, PROMPTS, TARGETS, batch_size=0)
    with pytest.raises(ValueError, match="13 targets for 14 prompts"):
        lp.explain_dataset(zoo, PROMPTS, TARGETS[:-1])
    with pytest.raises(ValueError, match="no prompts"):
        lp.explain_dataset(zoo, [], 3)
    with pytest.raises(FileNotFoundError, match="not an explain_dataset folder"):
        lp.DatasetAttribution.load(str(tmp_path))
    res = lp.explain_dataset(zoo, PROMPTS[:3], 3, progress=False)  # a temporary folder
    assert os.path.isfile(os.path.join(res.path, RUN_FILE))
    with pytest.raises(IndexError, match="out of range"):
        res[3]


def test_string_prompts_string_targets_and_records(zoo, tmp_path):
    prompts = ["c h a p k b e g", "a b c d a b", "k e g c h a p k b"]
    targets = ["k", "c", "e"]
    record = ["blocks.0.attn.hook_z"]
    res = lp.explain_dataset(zoo, prompts, targets, record=record, out=str(tmp_path), batch_size=2, progress=False)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        a, b = res[i], lp.explain(zoo, prompt, target, record=record)
        n = b.semantic.shape[1]
        torch.testing.assert_close(a.semantic[0, :n], b.semantic[0], **TOL)
        torch.testing.assert_close(a.hooks[record[0]][0, :n], b.hooks[record[0]][0], **TOL)


def test_dataset_statistics_read_the_shards(zoo, tmp_path):
    """The DatasetAttribution's statistics are analyses.dataset_stats over its shards (one pass),
    equal to collecting the same prompts' single-run explanations; the report writes."""
    from lens_palrp.analyses import collect

    res = lp.explain_dataset(zoo, PROMPTS, TARGETS, out=str(tmp_path), batch_size=4, progress=False)
    singles = (lp.explain(zoo, torch.tensor([p]), t) for p, t in zip(PROMPTS, TARGETS))
    reference = collect(singles, n_boot=0)
    stats = res.stats(n_boot=0)
    assert stats.n == len(PROMPTS)
    order = [i for rows in res.plan for i in rows]  # the shards hold the prompts in plan order
    torch.testing.assert_close(stats.positional_per_prompt, reference.positional_per_prompt[order], rtol=1e-4,
                               atol=1e-6)
    torch.testing.assert_close(stats.positional_mean, reference.positional_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.by_distance_mean, reference.by_distance_mean, rtol=1e-4, atol=1e-6)
    top = res.top_heads(k=3, n_boot=200)
    assert len(top) == 3 and all(h["low"] <= h["mean"] <= h["high"] for h in top)
    path = res.report(str(tmp_path / "report.html"))
    assert os.path.getsize(path) > 0


def test_the_dataset_demo_finds_the_tasks_offset(tmp_path):
    """demos/dataset.py on 48 repeat-back prompts: the top positional head's relevance by distance
    peaks at the task's offset, 3."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "demos", "dataset.py"), "--prompts", "48",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "PYTHONPATH": root})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "peaks at 3 (the task's offset is 3)" in run.stdout
    assert os.path.isfile(tmp_path / "report.html")
