"""Throughput, the cost of writing and peak memory of ``lp.explain_dataset`` (issue 16).

    python benchmarks/dataset.py --quick                          # tiny, seconds (the test's size)
    python benchmarks/dataset.py                                  # the zoo model, 2048 prompts, batch 8
    python benchmarks/dataset.py --model 4x256 --lengths 16-128 --prompts 256
    python benchmarks/dataset.py --out benchmarks/out/dataset.md --json benchmarks/out/dataset.json

What is measured, in one run, on one model and ``--prompts`` N random prompts (token ids, lengths
drawn uniformly from ``--lengths``, one prompt at the longest length so that the largest batch is
the same whatever N; one random target token each; seed 0):

1. **Prompts per second, 1 and 2 processes.** Each process is started as ``torchrun`` starts one:
   ``torch.multiprocessing`` spawn, then ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``
   and ``LOCAL_RANK`` in its environment; ``torch.set_num_threads(1)`` in every process, the
   single process included, so that 2 processes use 2 cores against 1. Each process loads the
   model, builds the prompts, starts the ``gloo`` process group (2 processes), explains one warm-up
   batch per rank (``explain_dataset`` into another folder: one-time costs are charged to neither),
   then the clock runs from a barrier to a barrier around ``explain_dataset(model, prompts,
   targets, batch_size=..., out=folder, progress=False)``: model loading and process start are
   not in it; the run's own barriers, ``run.json`` and ``index.json`` are. Prompts per second is
   N over the slowest rank's wall time; the speed-up is the 2-process rate over the 1-process rate.
2. **The share of writing.** ``lens_palrp.dataset._write_shard`` (an ``Attribution`` saved as
   safetensors to a temporary name and renamed) and ``lens_palrp.dataset.explain`` are wrapped
   with clocks in every rank; their time summed over the ranks over the ranks' summed wall time
   is the write share and the explain share. The rest is the run's bookkeeping (tokens to tensors,
   the plan, padding, the digest, ``run.json``, the index) and waiting at barriers.
3. **Peak memory, N and 4N prompts**, same batch size, each in a fresh Python process (1 thread):
   the model loaded and the prompts built, the same run once as a warm-up (into another folder: the
   first call at each batch shape fills caches that stay, about 10 MiB in all on the zoo model,
   which would otherwise be charged to the run and grow with the number of shapes met), then the growth of the peak resident
   set (``VmHWM``, reset through ``/proc/self/clear_refs`` just before) during ``explain_dataset``,
   as ``speed.py`` measures it (``MALLOC_MMAP_THRESHOLD_=65536``: freed blocks leave the resident
   set at once). One batch is in memory at a time, so the ratio 4N / N should be about 1; what
   does grow with N is the run's bookkeeping (the plan, the prompts' digest, ``run.json``,
   ``index.json``), small next to a batch of any real model. The process is pinned to one CPU:
   Linux folds its per-CPU resident-page counts into the total in batches, so on many CPUs growth
   of a few MiB can read as 0; pinned, the blur is one batch (128 KiB to a few hundred KiB). A
   growth that still reads 0 gives no ratio ("-"). Linux only (``/proc``); elsewhere, and with
   ``--no-memory``, it is left out.

Models (``--model``): a shipped zoo model by name (default ``rope-repeat``: 2 layers, d_model 64,
vocabulary 18, context 32; lengths 4-32 by default), or ``LxD``, a random Llama-style model of
``benchmarks/speed.py`` (L layers, d_model D, d_head 64, vocabulary 1000, context the longest
length; HookedTransformer under TransformerLens 3.x, the bridge under 4.x). ``--quick``: the zoo
model, 32 prompts (128 for the memory's 4N), batch 4. ``--out FILE`` appends the table with the
machine and versions to a markdown file, ``--json FILE`` writes the row. No GPU is used (gloo on
CPU): on a machine with GPUs, ``explain_dataset`` runs one rank per GPU (the model put on
``cuda:LOCAL_RANK``, ``nccl``), which this script does not measure. Speed is never asserted:
``tests/test_benchmark_dataset.py`` checks that the quick row is complete. The results and their
reading: ``benchmarks/results/dataset.md``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from typing import List, Optional, Tuple

import torch

warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_MODEL = "rope-repeat"
QUICK = dict(model=DEFAULT_MODEL, prompts=32, batch_size=4)
DEFAULTS = dict(model=DEFAULT_MODEL, prompts=2048, batch_size=8)
SEED = 0


if HERE not in sys.path:  # benchmarks/ is not a package: speed.py is imported as a top-level module
    sys.path.insert(0, HERE)
import speed  # noqa: E402


# ------------------------------------------------------------------------------------ model, prompts
def _random_shape(model: str) -> Optional[Tuple[int, int]]:
    m = re.fullmatch(r"(\d+)x(\d+)", model)
    return (int(m[1]), int(m[2])) if m else None


def check_model(model: str, lengths: Tuple[int, int]) -> None:
    """A zoo name or ``LxD``, and lengths the model's context holds (else ValueError)."""
    import lens_palrp as lp

    lo, hi = lengths
    if not 1 <= lo <= hi:
        raise ValueError(f"lengths must be 1 <= lo <= hi, got {lo}-{hi}")
    shape = _random_shape(model)
    if shape is None:
        if model not in lp.zoo.names():
            raise ValueError(f"unknown model {model!r}: one of {', '.join(lp.zoo.names())} or LxD (e.g. 4x256)")
        n_ctx = lp.zoo.MODELS[model]["config"].get("max_position_embeddings",
                                                   lp.zoo.MODELS[model]["config"].get("n_positions"))
        if hi > n_ctx:
            raise ValueError(f"{model} has a context of {n_ctx} tokens: lengths up to {hi} do not fit")
    elif shape[1] % 64 or shape[0] < 1:
        raise ValueError(f"--model {model}: LxD needs d_model a multiple of 64")


def default_lengths(model: str) -> Tuple[int, int]:
    return (4, 32) if _random_shape(model) is None else (16, 128)


def load_model(model: str, lengths: Tuple[int, int]):
    """``(model, vocabulary size)``: a zoo model, or a random ``LxD`` model (seed 0)."""
    import lens_palrp as lp

    shape = _random_shape(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if shape is None:
            m = lp.zoo.load(model)[0]
        else:
            size = speed.parse_size(f"{shape[0]}x{shape[1]}-{lengths[1]}")
            m, _ = speed.build(size, lp.zoo.default_kind())
    return m, int(m.cfg.d_vocab)


def make_prompts(n: int, vocab: int, lengths: Tuple[int, int], seed: int = SEED):
    """``n`` prompts (1-d token-id tensors, ids from 2: the zoo's 0 and 1 are <bos> and <pad>) of
    random lengths in ``lengths``, the first at the longest; one random target each."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = lengths
    sizes = torch.randint(lo, hi + 1, (n,), generator=g)
    sizes[0] = hi
    prompts = [torch.randint(2, vocab, (int(k),), generator=g) for k in sizes]
    targets = [int(t) for t in torch.randint(2, vocab, (n,), generator=g)]
    return prompts, targets


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ the ranks
class _Clocks:
    """Wraps ``lens_palrp.dataset``'s ``explain`` and ``_write_shard`` with clocks."""

    def __init__(self):
        import lens_palrp.dataset as ds

        self.ds, self.seconds, self.calls = ds, {"explain": 0.0, "write": 0.0}, {"explain": 0, "write": 0}
        self.original = {"explain": ds.explain, "write": ds._write_shard}

        def clocked(name):
            fn = self.original[name]

            def run(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - t0
                    self.calls[name] += 1

            return run

        ds.explain, ds._write_shard = clocked("explain"), clocked("write")

    def restore(self):
        self.ds.explain, self.ds._write_shard = self.original["explain"], self.original["write"]


def _rank(rank: int, world: int, port: int, spec: dict, results: str) -> None:
    """One process as ``torchrun`` starts it (its environment), timing ``explain_dataset``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import lens_palrp as lp

    lengths = tuple(spec["lengths"])
    model, vocab = load_model(spec["model"], lengths)
    prompts, targets = make_prompts(spec["prompts"], vocab, lengths)
    dist = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group(backend="gloo")
    b = spec["batch_size"]
    warm = b * world  # one warm-up batch per rank, into its own folder
    lp.explain_dataset(model, prompts[:warm], targets[:warm], batch_size=b, out=os.path.join(spec["folder"], "warm"),
                       progress=False)
    clocks = _Clocks()
    try:
        if dist is not None:
            dist.barrier()
        t0 = time.perf_counter()
        lp.explain_dataset(model, prompts, targets, batch_size=b, out=os.path.join(spec["folder"], "run"),
                           progress=False)
        if dist is not None:
            dist.barrier()
        wall = time.perf_counter() - t0
    finally:
        clocks.restore()
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, wall_s=wall, explain_s=clocks.seconds["explain"], write_s=clocks.seconds["write"],
                       batches=clocks.calls["write"], threads=torch.get_num_threads()), f)
    if dist is not None:
        dist.destroy_process_group()


def _importable_self():
    """This file as the module ``dataset`` (importable by name in the spawned processes, which get
    this process's ``sys.path``), whatever name it was loaded under here."""
    if HERE not in sys.path:
        sys.path.append(HERE)
    module = importlib.import_module("dataset")
    if not os.path.samefile(module.__file__, __file__):
        raise RuntimeError(f"'import dataset' finds {module.__file__}, not {__file__}")
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(model: str, prompts: int, batch_size: int, lengths: Tuple[int, int], world: int) -> dict:
    """``world`` processes (1 thread each) explaining ``prompts`` prompts: prompts per second (the
    slowest rank's wall time) and the write and explain shares (summed over the ranks)."""
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp(prefix="bench_dataset_")
    try:
        spec = dict(model=model, prompts=prompts, batch_size=batch_size, lengths=list(lengths),
                    folder=os.path.join(tmp, "out"))
        results = os.path.join(tmp, "results")
        os.makedirs(results)
        env_root = os.environ.get("PYTHONPATH", "")
        if ROOT not in env_root.split(os.pathsep):  # the spawned processes import this checkout's lens_palrp
            os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env_root] if env_root else []))
        mp.start_processes(_importable_self()._rank, args=(world, _free_port(), spec, results), nprocs=world,
                           join=True, start_method="spawn")
        ranks = []
        for r in range(world):
            with open(os.path.join(results, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = max(r["wall_s"] for r in ranks)
    total = sum(r["wall_s"] for r in ranks)
    return dict(processes=world, wall_s=wall, prompts_per_s=prompts / wall,
                write_share=sum(r["write_s"] for r in ranks) / total,
                explain_share=sum(r["explain_s"] for r in ranks) / total,
                batches=[r["batches"] for r in ranks], threads=[r["threads"] for r in ranks])


# ------------------------------------------------------------------------------------ memory
def memory_child(model: str, prompts: int, batch_size: int, lengths: Tuple[int, int]) -> dict:
    """Peak resident-set growth (bytes) during one ``explain_dataset`` of ``prompts`` prompts, the
    model loaded, the prompts built and one warm-up run done before (run in a fresh process)."""
    import lens_palrp as lp

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        # Linux counts resident pages per CPU and folds them into the total (read by VmRSS / VmHWM)
        # in batches, so a process spread over many CPUs can hide a few MiB of growth; on one CPU the
        # unfolded remainder is at most one batch (32 pages or twice the CPU count, whichever is more)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    m, vocab = load_model(model, lengths)
    ps, ts = make_prompts(prompts, vocab, lengths)
    tmp = tempfile.mkdtemp(prefix="bench_dataset_mem_")
    try:
        # the warm-up is the whole run, into another folder: every batch shape has been met once (the
        # first call at a new shape fills caches for good), so what is measured is what a run needs
        lp.explain_dataset(m, ps, ts, batch_size=batch_size, out=os.path.join(tmp, "warm"), progress=False)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
            f.write("5")
        base = speed._status_kb("VmRSS")
        lp.explain_dataset(m, ps, ts, batch_size=batch_size, out=os.path.join(tmp, "run"), progress=False)
        peak = speed._status_kb("VmHWM")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(prompts=prompts, base_bytes=base * 1024, peak_bytes=max(0, peak - base) * 1024)


def peak_memory(model: str, prompts: int, batch_size: int, lengths: Tuple[int, int]) -> dict:
    """``memory_child`` in a fresh Python process."""
    spec = json.dumps([model, prompts, batch_size, list(lengths)])
    code = ("import sys, json; sys.path.insert(0, %r); import dataset as d; m, n, b, l = json.loads(%r); "
            "print(json.dumps(d.memory_child(m, n, b, tuple(l))))" % (HERE, spec))
    path = os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join([ROOT] + ([path] if path else [])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"the memory subprocess ({prompts} prompts) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_available() -> bool:
    return os.path.exists("/proc/self/clear_refs")


# ------------------------------------------------------------------------------------ the row
def measure(model: str = DEFAULT_MODEL, prompts: int = 2048, batch_size: int = 8,
            lengths: Optional[Tuple[int, int]] = None, memory: bool = True) -> dict:
    """One row: 1- and 2-process throughput, the write and explain shares, and (``memory`` and
    Linux) the peak memory for N and 4N prompts."""
    lengths = tuple(lengths or default_lengths(model))
    check_model(model, lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, _ = load_model(model, lengths)
    params = n_parameters(m)
    del m
    one = throughput(model, prompts, batch_size, lengths, 1)
    two = throughput(model, prompts, batch_size, lengths, 2)
    row = dict(model=model, parameters=params, prompts=prompts, batch_size=batch_size, lengths=list(lengths),
               batches=-(-prompts // batch_size), one=one, two=two,
               speedup=two["prompts_per_s"] / one["prompts_per_s"], memory=None)
    if memory and memory_available():
        small = peak_memory(model, prompts, batch_size, lengths)
        large = peak_memory(model, 4 * prompts, batch_size, lengths)
        ratio = large["peak_bytes"] / small["peak_bytes"] if small["peak_bytes"] > 0 else None
        row["memory"] = dict(n=small, n4=large, ratio=ratio)
    return row


# ------------------------------------------------------------------------------------ tables
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mem(key):
    def get(r):
        return "-" if r["memory"] is None else _fmt(r["memory"][key]["peak_bytes"] / 2**20, ".1f")

    return get


COLUMNS = [
    ("model", lambda r: r["model"]),
    ("params", lambda r: f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] >= 1e5 else str(r["parameters"])),
    ("prompts N", lambda r: str(r["prompts"])),
    ("batch", lambda r: str(r["batch_size"])),
    ("lengths", lambda r: "-".join(map(str, r["lengths"]))),
    ("1 proc prompts/s", lambda r: _fmt(r["one"]["prompts_per_s"], ".1f")),
    ("2 procs prompts/s", lambda r: _fmt(r["two"]["prompts_per_s"], ".1f")),
    ("speed-up", lambda r: _fmt(r["speedup"], ".2f")),
    ("1 proc s", lambda r: _fmt(r["one"]["wall_s"], ".2f")),
    ("2 procs s", lambda r: _fmt(r["two"]["wall_s"], ".2f")),
    ("write share 1p", lambda r: _fmt(100 * r["one"]["write_share"], ".1f") + "%"),
    ("write share 2p", lambda r: _fmt(100 * r["two"]["write_share"], ".1f") + "%"),
    ("explain share 1p", lambda r: _fmt(100 * r["one"]["explain_share"], ".1f") + "%"),
    ("explain share 2p", lambda r: _fmt(100 * r["two"]["explain_share"], ".1f") + "%"),
    ("peak MiB N", _mem("n")),
    ("peak MiB 4N", _mem("n4")),
    ("4N/N", lambda r: "-" if r["memory"] is None else _fmt(r["memory"]["ratio"], ".2f")),
]


def cells(row: dict) -> List[str]:
    return [get(row) for _, get in COLUMNS]


def environment() -> dict:
    env = speed.environment("cpu", torch.float32, "-", 1, memory_available())
    import lens_palrp as lp

    env["family"] = lp.zoo.default_kind()
    try:
        env["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "-"
    return env


def markdown(rows: List[dict], env: dict) -> str:
    lines = [
        f"### explain_dataset on cpu, pa_lrp, float32, 1 thread per process ({env['date']})",
        "",
        f"CPU {env['cpu']}; torch {env['torch']}, TransformerLens {env['transformer_lens']} ({env['family']}), "
        f"transformers {env['transformers']}, Python {env['python']}; commit {env['commit']}; "
        "processes started as torchrun does (gloo); peak memory: "
        + ("CPU VmHWM growth during explain_dataset, N and 4N prompts in fresh processes." if env["memory"] != "not measured"
           else "not measured."),
        "",
        "| " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n\n"


# ------------------------------------------------------------------------------------ main
_positive_int = speed._positive_int


def _lengths(text: str) -> Tuple[int, int]:
    m = re.fullmatch(r"(\d+)-(\d+)", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise argparse.ArgumentTypeError(f"LO-HI with 1 <= LO <= HI, got {text!r}")
    return int(m[1]), int(m[2])


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"a zoo model name or LxD (a random Llama-style model); default {DEFAULT_MODEL}")
    parser.add_argument("--prompts", type=_positive_int, help=f"N (default {DEFAULTS['prompts']}; "
                        f"the memory is also measured at 4N)")
    parser.add_argument("--batch-size", type=_positive_int, help=f"prompts per batch (default {DEFAULTS['batch_size']})")
    parser.add_argument("--lengths", type=_lengths, help="prompt lengths LO-HI in tokens (default 4-32 for a zoo "
                        "model, 16-128 for LxD)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['prompts']} prompts, batch {QUICK['batch_size']} "
                        "(unless given)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", help="append the table, with the machine and versions, to this markdown file")
    parser.add_argument("--json", help="write the row (and the environment) to this file")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else DEFAULTS
    model = args.model or base["model"]
    lengths = args.lengths or default_lengths(model)
    try:
        check_model(model, lengths)
    except ValueError as err:
        parser.error(str(err))
    prompts, batch = args.prompts or base["prompts"], args.batch_size or base["batch_size"]
    env = environment()
    print(f"explain_dataset, {model}, {prompts} prompts of {lengths[0]}-{lengths[1]} tokens, batch {batch}; "
          f"{env['cpu']}; torch {env['torch']}, TransformerLens {env['transformer_lens']}; commit {env['commit']}",
          flush=True)
    row = measure(model, prompts, batch, lengths, memory=not args.no_memory)
    width = max(len(h) for h, _ in COLUMNS)
    for (h, _), c in zip(COLUMNS, cells(row)):
        print(f"  {h.ljust(width)}  {c}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=[row]), f, indent=1)
    if args.out:
        with open(args.out, "a") as f:
            f.write(markdown([row], env))
    return row


if __name__ == "__main__":
    main()
