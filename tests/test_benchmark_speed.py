"""benchmarks/speed.py's measurement functions produce a complete row (speed itself is never asserted)."""

import os

import pytest

from benchmark_modules import load_benchmark


def _speed():
    return load_benchmark("speed")


@pytest.mark.parametrize("family", ["hooked", "bridge"])
def test_quick_row_is_complete(family):
    speed = _speed()
    if not speed.family_available(family):
        pytest.skip(f"no {family} family with this TransformerLens")
    linux = os.path.exists("/proc/self/clear_refs")  # the CPU peak-memory method reads /proc
    size = speed.parse_size(speed.QUICK)
    row = speed.measure(size, family, "cpu", repeats=1, memory=speed.peak_memory_child if linux else None)

    calls = list(speed.BASELINES[family]) + list(speed.METHODS)
    assert set(row["time_s"]) == set(calls)
    assert all(row["time_s"][k] > 0 for k in calls)
    assert set(row["time_ratio"]) == set(speed.ratio_keys(family))
    assert all(r is not None and r > 0 for r in row["time_ratio"].values())
    if linux:
        assert set(row["peak_bytes"]) == set(calls)
        assert all(b >= 0 for b in row["peak_bytes"].values())  # tiny calls may not grow the resident set
    assert set(row["memory_ratio"]) == set(speed.ratio_keys(family))
    assert (row["family"], row["dtype"], row["shape"]["tokens"]) == (family, "float32", size.tokens)

    cols = speed.columns(family)
    assert len(speed._cells(row, cols)) == len(cols)  # every column has a cell
    env = speed.environment("cpu", speed.DTYPES["float32"], family, 1, linux)
    table = speed.markdown([row], env).splitlines()
    assert len({line.count("|") for line in table if line.startswith("|")}) == 1
