"""explain_dataset over two processes (torch.distributed, gloo, CPU) as ``torchrun`` would start
them: the environment variables only, the process group started by explain_dataset itself. Every
shard equals the single-process run's bit for bit, and a run whose rank crashed is finished by
running again (here: in one process)."""

import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import lens_palrp as lp
from lens_palrp.dataset import _shard
from lens_palrp.io import load_attribution

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

GEN = torch.Generator().manual_seed(1)
PROMPTS = [torch.randint(2, 12, (int(n),), generator=GEN).tolist() for n in torch.randint(3, 14, (64,), generator=GEN)]
TARGETS = [int(t) for t in torch.randint(2, 12, (64,), generator=GEN)]
BATCH = 8


def _model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lp.zoo.load("rope-repeat")[0]


def _rank(rank: int, world: int, port: int, out: str, crash_after: int) -> None:
    """One rank as torchrun starts it: the launcher's environment, nothing else."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model = _model()
    if crash_after and rank == 1:  # this rank dies after its first batch
        import lens_palrp.dataset as ds

        written = []
        original = ds._write_shard

        def write_then_die(out_, k, attr):
            original(out_, k, attr)
            written.append(k)
            if len(written) == crash_after:
                os._exit(3)

        ds._write_shard = write_then_die
    lp.explain_dataset(model, PROMPTS, TARGETS, out=out, batch_size=BATCH, progress=False)
    torch.distributed.destroy_process_group()


def _single_process(out: str):
    """The single-process run, on one thread as each rank runs: a batch is then computed by the
    same kernels in the same order in both, so the shards can be compared bit for bit (with
    another thread count a parallel reduction may split, and round, differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return lp.explain_dataset(_model(), PROMPTS, TARGETS, out=out, batch_size=BATCH, progress=False)
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shards(out: str, n: int):
    return [load_attribution(_shard(out, k)) for k in range(n)]


def test_two_gloo_processes_give_the_single_process_results(tmp_path):
    single = _single_process(str(tmp_path / "one"))
    out = str(tmp_path / "two")
    mp.start_processes(_rank, args=(2, _free_port(), out, 0), nprocs=2, join=True, start_method="spawn")
    two = lp.DatasetAttribution.load(out)
    assert two.complete and len(two) == len(single) == 64 and two.plan == single.plan
    for a, b in zip(_shards(out, len(two.plan)), _shards(single.path, len(single.plan))):
        for name in ("semantic", "positional", "heads", "heads_by_pos", "positional_input", "target_value"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    for i in (0, 31, 63):  # dataset order, whichever rank computed it
        assert torch.equal(two[i].semantic, single[i].semantic)


def test_a_crashed_rank_is_finished_by_running_again(tmp_path):
    out = str(tmp_path / "crash")
    context = mp.start_processes(_rank, args=(2, _free_port(), out, 1), nprocs=2, join=False, start_method="spawn")
    try:
        while not context.join(timeout=120):
            pass
    except Exception:  # rank 1 exited with code 3 after one batch; rank 0 is terminated by the launcher
        pass
    partial = lp.DatasetAttribution.load(out)
    assert not partial.complete and partial.missing
    done_before = [k for k in range(len(partial.plan)) if os.path.exists(_shard(out, k))]
    mtimes = {k: os.stat(_shard(out, k)).st_mtime_ns for k in done_before}
    res = lp.explain_dataset(_model(), PROMPTS, TARGETS, out=out, batch_size=BATCH, progress=False)
    assert res.complete
    assert {k: os.stat(_shard(out, k)).st_mtime_ns for k in done_before} == mtimes
    single = _single_process(str(tmp_path / "one"))
    for i in range(0, 64, 9):
        assert torch.equal(res[i].semantic, single[i].semantic)
