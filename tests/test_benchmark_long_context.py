"""benchmarks/long_context.py produces complete rows, fit and tables on its quick sizes (memory and
speed values are never asserted: they belong to the benchmark's results)."""

import itertools
import os

import pytest

from benchmark_modules import load_benchmark
import torch


def _long_context():
    return load_benchmark("long_context")


@pytest.fixture
def one_thread():
    """One torch thread, as the benchmark's runs use: on a small shared machine the default
    spins its threads against other work and takes several times as long."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", ["hooked", "bridge"])
def test_quick_rows_are_complete(family, one_thread):
    lc = _long_context()
    if not lc.speed.family_available(family):
        pytest.skip(f"no {family} family with this TransformerLens")
    linux = os.path.exists("/proc/self/clear_refs")  # the CPU peak-memory method reads /proc
    token_sizes, depth_sizes = lc.sweeps(**lc.QUICK)
    assert depth_sizes[-1] is token_sizes[0]  # the size both sweeps share is measured once
    done = {}
    for size in token_sizes + depth_sizes:
        if size.name not in done:  # in this process: the subprocess only adds start-up time
            done[size.name] = lc.measure(size, family, "cpu", repeats=1, memory=lc.memory_child if linux else None)
    token_rows = [done[s.name] for s in token_sizes]
    depth_rows = [done[s.name] for s in depth_sizes]

    configs = set(lc.CONFIGS)
    for row, size in zip(token_rows + depth_rows, token_sizes + depth_sizes):
        assert (row["family"], row["dtype"], row["size"]) == (family, "float32", size.name)
        assert (row["shape"]["tokens"], row["shape"]["layers"]) == (size.tokens, size.layers)
        assert row["errors"] == {"time": {}, "memory": {}}
        assert set(row["time_s"]) == configs
        assert all(row["time_s"][k] > 0 for k in configs)
        # fused where it was asked for (attention="auto" must not have fallen back), eager where forced
        assert row["attention"] == lc.EXPECTED_ATTENTION
        if linux:
            assert set(row["peak_bytes"]) == configs
            assert all(b is not None and b >= 0 for b in row["peak_bytes"].values())  # tiny calls may not grow RSS
        assert row["weights_bytes"] > 0

    result = lc.fit(token_rows, depth_rows, list(lc.CONFIGS))
    assert result["token_counts"] == list(lc.QUICK["tokens"])
    assert result["depths"] == list(lc.QUICK["depths"])
    assert set(result["configs"]) == configs
    for f in result["configs"].values():
        assert set(f) == {"exponent", "neighbours", "mib_per_token", "marginal_mib_per_token", "depth_ratio",
                          "mib_per_layer"}
        assert len(f["neighbours"]) == len(token_rows) - 1
    assert result["residual_mib_per_layer"] > 0

    env = lc.speed.environment("cpu", lc.speed.DTYPES["float32"], family, 1, linux)
    text = lc.markdown(token_rows, depth_rows, result, env, list(lc.CONFIGS))
    tables = [list(g) for is_table, g in itertools.groupby(text.splitlines(), lambda s: s.startswith("|")) if is_table]
    assert len(tables) == 3  # tokens, depth, fit
    for table in tables:
        assert len({line.count("|") for line in table}) == 1  # every row has every column


def test_a_call_out_of_memory_is_reported_and_the_run_goes_on():
    lc = _long_context()

    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 16.00 GiB")

    def broken():
        raise RuntimeError("a bug, not memory")

    fns = {"plain": lc.speed.Call(lambda: None, lambda: None), "eager": lc.speed.Call(out_of_memory, lambda: None)}
    errors = {}
    times = lc.time_calls(fns, 2, "cpu", errors)
    assert times["plain"] is not None and times["eager"] is None
    assert errors == {"eager": "out of memory (timing)"}
    with pytest.raises(RuntimeError, match="a bug"):  # anything else is raised
        lc.time_calls({"fused": lc.speed.Call(broken, lambda: None)}, 1, "cpu", {})

    row = dict(size="x", shape=dict(layers=1, d_model=64, tokens=8), weights_bytes=2**20,
               time_s=times, peak_bytes={"plain": 2.0**20, "eager": None},
               attention={"eager": None}, errors={"time": errors, "memory": {"eager": "out of memory (memory)"}})
    cells = {h: get(row) for h, get in lc.columns(["plain", "eager"])}
    assert (cells["eager s"], cells["eager MiB"], cells["plain MiB"]) == ("OOM", "OOM", "1.0")
