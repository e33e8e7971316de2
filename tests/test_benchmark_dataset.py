"""benchmarks/dataset.py's quick mode produces a complete row: 1- and 2-process throughput (gloo,
started as torchrun does), the write share and, where /proc exists, the peak memory for N and 4N
prompts. Speed is never asserted."""

import math

import pytest
import torch

from benchmark_modules import load_benchmark

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def test_quick_row_is_complete():
    bench = load_benchmark("dataset")
    q = bench.QUICK
    row = bench.measure(q["model"], q["prompts"], q["batch_size"])

    assert (row["model"], row["prompts"], row["batch_size"]) == (q["model"], q["prompts"], q["batch_size"])
    assert row["parameters"] > 0 and row["batches"] == math.ceil(q["prompts"] / q["batch_size"])
    for key, world in (("one", 1), ("two", 2)):
        run = row[key]
        assert run["processes"] == world and run["threads"] == [1] * world
        assert sum(run["batches"]) == row["batches"]  # every batch written once, over the ranks
        for name in ("wall_s", "prompts_per_s", "write_share", "explain_share"):
            assert run[name] > 0, (key, name)
        assert run["write_share"] + run["explain_share"] < 1
    assert row["speedup"] > 0
    if bench.memory_available():
        mem = row["memory"]
        assert mem["n"]["prompts"] == q["prompts"] and mem["n4"]["prompts"] == 4 * q["prompts"]
        assert mem["n"]["base_bytes"] > 0 and mem["n4"]["base_bytes"] > 0
        # the quick run grows by 0.3-1 MiB, near the kernel's per-CPU RSS counter resolution, so a
        # growth of 0 is a valid reading here; then no ratio is made up
        assert mem["n"]["peak_bytes"] >= 0 and mem["n4"]["peak_bytes"] >= 0
        if mem["n"]["peak_bytes"] == 0:
            assert mem["ratio"] is None
        else:
            assert mem["ratio"] == pytest.approx(mem["n4"]["peak_bytes"] / mem["n"]["peak_bytes"])

    cells = bench.cells(row)
    assert len(cells) == len(bench.COLUMNS) and all(cells)
    table = bench.markdown([row], bench.environment()).splitlines()
    assert len({line.count("|") for line in table if line.startswith("|")}) == 1
