"""Long contexts (issue 14): how peak memory and time of ``lp.explain`` grow with the number of
tokens and with depth, with fused attention and block checkpointing on and off.

    python benchmarks/long_context.py --quick                        # tiny sizes, seconds
    python benchmarks/long_context.py --threads 1                    # the CPU sweeps (minutes)
    python benchmarks/long_context.py --family bridge --shape 4x512 --tokens 512,2048 --depths 2,8
    python benchmarks/long_context.py --device cuda --dtype bfloat16 --shape 8b \\
        --tokens 4096,16384,32768,65536,131072 --configs plain,fused,fused_ckpt
    python benchmarks/long_context.py --markdown benchmarks/out/long.md --json benchmarks/out/long.json

The targets: with ``attention="auto"`` (fused) and ``checkpoint=True``, peak memory linear in the
tokens and flat in depth. Each row is one random Llama-style model (built by ``speed.build``: a
``TransformerBridge`` around a Hugging Face ``LlamaForCausalLM``, or a ``HookedTransformer``;
RoPE, RMSNorm, gated MLP) and one random sequence; every call differentiates the logit of token 3
at the last position. The configurations (``--configs``):

* ``plain``: the family's own forward + backward to the token embeddings (``speed.lens_plain``,
  parameters frozen), the least any gradient attribution costs. It runs the model's own eager
  attention and keeps every block's activations: the reference a user has without lens_palrp;
* ``eager``: ``explain(method="pa_lrp", attention="eager")``, attention patterns formed and kept;
* ``fused``: ``explain(method="pa_lrp")``, attention through ``scaled_dot_product_attention``;
* ``fused_ckpt``: ``explain(method="pa_lrp", checkpoint=True)``, each block recomputed during the
  backward, so only the residual stream entering each block is kept across the model;
* ``eager_ckpt``: ``explain(method="pa_lrp", attention="eager", checkpoint=True)``: one block's
  patterns at a time.

A row says which attention each ``explain`` call really ran (``attr.computation["attention"]``):
``auto`` falls back to eager where fused attention cannot serve, and the row would show it.

Measured as ``benchmarks/speed.py`` does, reusing its functions: time is the median of
``--repeats`` interleaved rounds after one warm-up of each call (``--repeats 0``: not timed); peak
memory is taken in a fresh subprocess per row, every call warmed up there first, then each
measured in turn above what was allocated before it (the weights): on CPU the growth of the peak
resident set (``VmHWM``, with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks leave at once), on
CUDA ``max_memory_allocated``. Note that every call computes the logits at all positions, ``[tokens,
vocabulary]``: linear in the tokens, and at a 128256-token vocabulary a large share of the peak
(64k tokens in bfloat16: 16 GiB), as in any full forward.

Two sweeps: tokens (``--shape`` at each of ``--tokens``) and depth (``--shape`` with each of
``--depths`` layers at ``--depth-tokens`` tokens; ``--depths ''`` skips it). From them the fit:
per configuration, the exponent of memory in tokens (log-log slope between the two largest token
counts, and between each pair of neighbours: 1 is linear, 2 quadratic), MiB per token at the
largest count, and the ratio of memory at the deepest to the shallowest model with the MiB each
layer adds (to compare with the residual stream a checkpointed block keeps, tokens x d_model).

Shapes: ``LxD`` (L layers, d_model D, d_head 64, d_mlp 4D, vocabulary 1000, multi-head), or the
named GPU shapes of ``speed.py`` without their token count: ``1b`` (Llama-3.2-1B) and ``8b``
(Llama-3-8B: 32 layers, d_model 4096, 32 heads, 8 kv heads, vocabulary 128256). CPU defaults:
``4x256`` at 256-4096 tokens and 2, 4, 8, 16 layers at 1024 tokens. CUDA defaults: ``8b`` at
4096-131072 tokens and 8, 16, 32 layers at 16384 tokens; a call that runs out of GPU memory is
reported as OOM in its cell and the run goes on (eager attention at 16k tokens needs 16 GiB of
bfloat16 pattern per layer: use ``--configs`` to leave it out). For the comparison with LXT's
published figures on an 80 GB H100 (8B, bfloat16; fused attention: 4k 0.29 s 13.4 GiB, 16k
1.46 s 53.6 GiB; fused + checkpointing: 16k 1.97 s 7.1 GiB, 32k 5.1 s 14.2 GiB, 64k 14.7 s 28.3
GiB) run the CUDA example above. ``--family``, ``--threads``, ``--markdown`` (appends the tables
with the machine and versions) and ``--json`` are as in ``speed.py``. The CPU results and their
reading: ``benchmarks/results/long_context.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))


def _sibling(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package), loaded once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


speed = _sibling("speed")

# name -> explain's keyword arguments (None: the plain forward + backward)
CONFIGS: Dict[str, Optional[dict]] = {
    "plain": None,
    "eager": dict(attention="eager"),
    "fused": dict(),  # attention="auto": fused wherever it can be
    "fused_ckpt": dict(checkpoint=True),
    "eager_ckpt": dict(attention="eager", checkpoint=True),
}
LABELS = {"plain": "plain", "eager": "eager", "fused": "fused", "fused_ckpt": "fused+ckpt",
          "eager_ckpt": "eager+ckpt"}
EXPECTED_ATTENTION = {"eager": "eager", "fused": "fused", "fused_ckpt": "fused", "eager_ckpt": "eager"}

CPU_DEFAULTS = dict(shape="4x256", tokens=(256, 512, 1024, 2048, 4096), depths=(2, 4, 8, 16), depth_tokens=1024)
GPU_DEFAULTS = dict(shape="8b", tokens=(4096, 16384, 32768, 65536, 131072), depths=(8, 16, 32), depth_tokens=16384)
QUICK = dict(shape="2x128", tokens=(32, 64), depths=(1, 2), depth_tokens=32)


# ------------------------------------------------------------------------------------ sizes
def size_for(shape: str, tokens: int, layers: Optional[int] = None):
    """A ``speed.Size``: ``shape`` is ``LxD`` or a named GPU shape (``1b``, ``8b``); ``layers``
    replaces its depth."""
    named = f"{shape}-512"
    if named in speed.NAMED:
        base = speed.NAMED[named]
        depth = "" if layers is None or layers == base.layers else f"/{layers}L"
        return dataclasses.replace(base, name=f"{shape}{depth}-{tokens}", tokens=tokens,
                                   layers=base.layers if layers is None else layers)
    try:
        depth, width = shape.split("x")
        return speed.parse_size(f"{layers if layers is not None else int(depth)}x{int(width)}-{tokens}")
    except ValueError:
        names = sorted({n.rsplit("-", 1)[0] for n in speed.NAMED})
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(names)} or LxD "
                         "(layers x d_model, a multiple of 64), e.g. 4x256") from None


def sweeps(shape: str, tokens: Sequence[int], depths: Sequence[int], depth_tokens: int):
    """``(token sweep, depth sweep)``: lists of sizes; a size in both is the same object."""
    by_tokens = [size_for(shape, t) for t in tokens]
    known = {s.name: s for s in by_tokens}
    by_depth = []
    for layers in depths:
        s = size_for(shape, depth_tokens, layers)
        by_depth.append(known.setdefault(s.name, s))
    return by_tokens, by_depth


# ------------------------------------------------------------------------------------ calls
def calls(model, tokens, configs: Sequence[str], seen: dict) -> Dict[str, "speed.Call"]:
    """Name -> ``speed.Call``; an ``explain`` call writes ``attr.computation`` into ``seen``."""
    import lens_palrp as lp

    frozen, as_built = (lambda: model.requires_grad_(False)), (lambda: model.requires_grad_(True))

    def explain(name, kwargs):
        def run():
            attr = lp.explain(model, tokens, speed.TARGET, method="pa_lrp", **kwargs)
            seen[name] = dict(attr.computation)
        return run

    out = {}
    for name in configs:
        kwargs = CONFIGS[name]
        if kwargs is None:
            out[name] = speed.Call(lambda: speed.lens_plain(model, tokens), frozen)
        else:
            out[name] = speed.Call(explain(name, kwargs), as_built)
    return out


def _out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def _release(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def _attempt(fn: Callable[[], object], device: str, errors: dict, name: str, where: str):
    """``fn()``, or None where it ran out of memory (noted in ``errors``; the run goes on)."""
    try:
        return fn()
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise
        errors[name] = f"out of memory ({where})"
    _release(device)  # after the except clause: the failed call's tensors are unreachable now
    return None


def time_calls(fns: Dict[str, "speed.Call"], repeats: int, device: str, errors: dict) -> Dict[str, Optional[float]]:
    """Median seconds of each call over ``repeats`` interleaved rounds after one warm-up; None for
    a call that ran out of memory (or for all, when ``repeats`` is 0)."""
    if repeats == 0:
        return {k: None for k in fns}

    def timed(call):
        def run():
            call.setup()
            speed.sync(device)
            t0 = time.perf_counter()
            call.run()
            speed.sync(device)
            return time.perf_counter() - t0
        return run

    live = [k for k in fns if _attempt(timed(fns[k]), device, errors, k, "timing") is not None]
    times: Dict[str, List[float]] = {k: [] for k in live}
    for r in range(repeats):
        shift = r % max(1, len(live))
        for k in live[shift:] + live[:shift]:
            if k not in errors:
                seconds = _attempt(timed(fns[k]), device, errors, k, "timing")
                if seconds is not None:
                    times[k].append(seconds)
    return {k: statistics.median(times[k]) if k not in errors and times.get(k) else None for k in fns}


# ------------------------------------------------------------------------------------ memory
def memory_child(size, family: str, device: str, dtype: torch.dtype, threads: Optional[int],
                 configs: Sequence[str]) -> dict:
    """``{"peak_bytes": name -> bytes or None, "errors": ..., "attention": ...}`` on one freshly
    built model: every call warmed up, then each measured by ``speed.peak_bytes``."""
    if threads:
        torch.set_num_threads(threads)
    model, tokens = speed.build(size, family, device, dtype)
    seen: dict = {}
    errors: dict = {}
    fns = calls(model, tokens, configs, seen)
    for name, call in fns.items():  # one-time allocations are charged to none of the calls
        _attempt(lambda: (call.setup(), call.run()), device, errors, name, "memory warm-up")
    peaks = {name: None if name in errors else
             _attempt(lambda: speed.peak_bytes(call, device), device, errors, name, "memory")
             for name, call in fns.items()}
    return dict(peak_bytes=peaks, errors=errors, attention={k: v["attention"] for k, v in seen.items()})


def peak_memory(size, family: str, device: str, dtype: torch.dtype, threads: Optional[int],
                configs: Sequence[str]) -> dict:
    """``memory_child`` in a fresh Python process (large blocks through mmap, as in speed.py)."""
    spec = json.dumps([dataclasses.asdict(size), family, device, str(dtype).replace("torch.", ""), threads,
                       list(configs)])
    code = ("import sys, json; sys.path.insert(0, %r); import long_context as lc; "
            "s, f, d, t, n, c = json.loads(%r); "
            "print(json.dumps(lc.memory_child(lc.speed.Size(**s), f, d, lc.speed.DTYPES[t], n, c)))"
            % (HERE, spec))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        killed = " (killed: out of memory?)" if out.returncode in (-9, 137) else ""
        raise RuntimeError(f"the memory subprocess for {size.name} failed{killed}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ rows
def measure(size, family: str, device: str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 3,
            memory: Optional[Callable[..., dict]] = peak_memory, threads: Optional[int] = None,
            configs: Sequence[str] = tuple(CONFIGS)) -> dict:
    """One row: seconds and peak bytes (above the weights) of each configuration, the attention
    each ``explain`` call ran, and out-of-memory errors by configuration. ``memory``:
    ``peak_memory`` (a subprocess), ``memory_child`` (this process) or None."""
    model, tokens = speed.build(size, family, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    seen: dict = {}
    errors: dict = {"time": {}, "memory": {}}
    t = time_calls(calls(model, tokens, configs, seen), repeats, device, errors["time"])
    del model, tokens
    _release(device)  # the memory subprocess needs the room
    mem = None
    if memory is not None:
        try:
            mem = memory(size, family, device, dtype, threads, configs)
        except RuntimeError as err:
            if "subprocess" not in str(err):
                raise
            errors["memory"] = {k: "memory subprocess failed" for k in configs}
            print(str(err)[-1500:], file=sys.stderr)
        else:
            errors["memory"] = mem["errors"]
    attention = {k: v["attention"] for k, v in seen.items()}
    if mem is not None:
        attention = {**mem["attention"], **attention}
    return dict(size=size.name, shape=dataclasses.asdict(size), family=family, device=str(device),
                dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(), repeats=repeats,
                configs=list(configs), weights_bytes=weights, time_s=t,
                peak_bytes=None if mem is None else mem["peak_bytes"],
                attention={k: attention.get(k) for k in configs if CONFIGS[k] is not None}, errors=errors)


# ------------------------------------------------------------------------------------ the fit
def _mib(row: dict, name: str) -> Optional[float]:
    peaks = row.get("peak_bytes")
    if not peaks or peaks.get(name) is None or peaks[name] <= 0:
        return None
    return peaks[name] / 2**20


def _slope(x1: float, y1: Optional[float], x2: float, y2: Optional[float]) -> Optional[float]:
    if y1 is None or y2 is None:
        return None
    return math.log(y2 / y1) / math.log(x2 / x1)


def fit(token_rows: List[dict], depth_rows: List[dict], configs: Sequence[str]) -> dict:
    """Per configuration: ``exponent`` (memory vs tokens, log-log, the two largest token counts),
    ``neighbours`` (the same between each pair of neighbouring counts), ``mib_per_token`` (at the
    largest count), ``marginal_mib_per_token`` (between the two largest), ``depth_ratio``
    (deepest / shallowest) and ``mib_per_layer`` (their difference per added layer); and
    ``residual_mib_per_layer``, the residual stream one block's input holds at the depth sweep's
    tokens (what each checkpointed block keeps)."""
    rows = sorted((r for r in token_rows if "peak_bytes" in r), key=lambda r: r["shape"]["tokens"])
    deep = sorted((r for r in depth_rows if "peak_bytes" in r), key=lambda r: r["shape"]["layers"])
    out: dict = {"configs": {}}
    for name in configs:
        f: dict = dict(exponent=None, neighbours=[], mib_per_token=None, marginal_mib_per_token=None,
                       depth_ratio=None, mib_per_layer=None)
        pts = [(r["shape"]["tokens"], _mib(r, name)) for r in rows]
        f["neighbours"] = [_slope(a[0], a[1], b[0], b[1]) for a, b in zip(pts, pts[1:])]
        if len(pts) >= 2:
            (t1, m1), (t2, m2) = pts[-2], pts[-1]
            f["exponent"] = _slope(t1, m1, t2, m2)
            if m1 is not None and m2 is not None:
                f["marginal_mib_per_token"] = (m2 - m1) / (t2 - t1)
        if pts and pts[-1][1] is not None:
            f["mib_per_token"] = pts[-1][1] / pts[-1][0]
        if len(deep) >= 2:
            lo, hi = deep[0], deep[-1]
            m_lo, m_hi = _mib(lo, name), _mib(hi, name)
            if m_lo is not None and m_hi is not None:
                f["depth_ratio"] = m_hi / m_lo
                f["mib_per_layer"] = (m_hi - m_lo) / (hi["shape"]["layers"] - lo["shape"]["layers"])
        out["configs"][name] = f
    out["token_counts"] = [r["shape"]["tokens"] for r in rows]
    out["depths"] = [r["shape"]["layers"] for r in deep]
    if deep:
        s, itemsize = deep[0]["shape"], torch.finfo(speed.DTYPES[deep[0]["dtype"]]).bits // 8
        out["residual_mib_per_layer"] = s["tokens"] * s["d_model"] * itemsize / 2**20
    return out


# ------------------------------------------------------------------------------------ tables
def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def columns(configs: Sequence[str]):
    """``(header, row -> text)`` of a sweep's table."""
    def shape(key):
        return lambda r: str(r["shape"][key])

    def cell(kind, name, spec, scale=1.0):
        def get(r):
            why = r["errors"]["time" if kind == "time_s" else "memory"].get(name)
            if why:
                return "OOM" if "out of memory" in why else "failed"
            values = r.get(kind)
            return "-" if values is None or values.get(name) is None else format(values[name] / scale, spec)
        return get

    def ran(r):
        return "/".join(r["attention"].get(k) or "-" for k in configs if CONFIGS[k] is not None)

    cols = [("size", lambda r: r["size"])] + [(k, shape(k)) for k in ("layers", "d_model", "tokens")]
    cols.append(("weights MiB", lambda r: format(r["weights_bytes"] / 2**20, ".0f")))
    cols += [(f"{LABELS[k]} s", cell("time_s", k, ".3f")) for k in configs]
    cols += [(f"{LABELS[k]} MiB", cell("peak_bytes", k, ".1f", 2**20)) for k in configs]
    explained = [LABELS[k] for k in configs if CONFIGS[k] is not None]
    if explained:
        cols.append((f"attention ran ({'/'.join(explained)})", ran))
    return cols


def _line(cells: List[str], cols) -> str:
    return " ".join(c.ljust(14) if i == 0 else c.rjust(max(len(h), 6))
                    for i, (c, (h, _)) in enumerate(zip(cells, cols)))


def fit_lines(result: dict, configs: Sequence[str], markdown: bool) -> List[str]:
    """The fit as a table (markdown or plain text)."""
    counts, depths = result["token_counts"], result["depths"]
    heads = ["configuration"]
    if len(counts) >= 2:
        heads += [f"exponent {counts[-2]}->{counts[-1]}",
                  "exponents by neighbours (" + ", ".join(f"{a}->{b}" for a, b in zip(counts, counts[1:])) + ")",
                  f"MiB/token at {counts[-1]}", f"marginal MiB/token {counts[-2]}->{counts[-1]}"]
    if len(depths) >= 2:
        heads += [f"depth ratio {depths[-1]}L/{depths[0]}L", "MiB/layer"]
    body = []
    for name in configs:
        f = result["configs"][name]
        cells = [LABELS[name]]
        if len(counts) >= 2:
            cells += [_fmt(f["exponent"], ".2f"), ", ".join(_fmt(x, ".2f") for x in f["neighbours"]),
                      _fmt(f["mib_per_token"], ".4f"), _fmt(f["marginal_mib_per_token"], ".4f")]
        if len(depths) >= 2:
            cells += [_fmt(f["depth_ratio"], ".2f"), _fmt(f["mib_per_layer"], ".2f")]
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|---" + "|---:" * (len(heads) - 1) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in body]
    else:
        widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(heads)]
        lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                  for cells in body]
    if "residual_mib_per_layer" in result and len(depths) >= 2:
        lines += ["", f"The residual stream entering one block at the depth sweep's tokens: "
                      f"{result['residual_mib_per_layer']:.2f} MiB per layer."]
    return lines


def markdown_table(rows: List[dict], cols) -> List[str]:
    lines = ["| " + " | ".join(h for h, _ in cols) + " |",
             "|---" + "|---:" * (len(cols) - 1) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(get(row) for _, get in cols) + " |")
    return lines


def markdown(token_rows: List[dict], depth_rows: List[dict], result: dict, env: dict,
             configs: Sequence[str]) -> str:
    cols = columns(configs)
    machine = f"{env['gpu']}; CPU {env['cpu']}" if "gpu" in env else f"CPU {env['cpu']}"
    timing = f"median of {env['repeats']}" if env["repeats"] else "not timed"
    lines = [f"### {env['family']} on {env['device']}, {env['dtype']}, {env['threads']} threads ({env['date']})", "",
             f"{machine}; torch {env['torch']}, TransformerLens {env['transformer_lens']}, "
             f"transformers {env['transformers']}, Python {env['python']}; {timing}; peak memory above the "
             f"weights: {env['memory']}.", ""]
    if token_rows:
        lines += ["Tokens:", ""] + markdown_table(token_rows, cols) + [""]
    if depth_rows:
        lines += ["Depth:", ""] + markdown_table(depth_rows, cols) + [""]
    if len(result["token_counts"]) >= 2 or len(result["depths"]) >= 2:
        lines += ["Fit (peak memory):", ""] + fit_lines(result, configs, markdown=True) + [""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main
def _int_list(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _config_list(text: str) -> List[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"configurations are {', '.join(CONFIGS)}; got {text!r}")
    return [n for n in CONFIGS if n in names]


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("hooked", "bridge"), default=None,
                        help="HookedTransformer or TransformerBridge (default: hooked where TransformerLens 3.x has it)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=sorted(speed.DTYPES), default="float32")
    parser.add_argument("--shape", help="LxD, or a named GPU shape: 1b, 8b (default 4x256 on CPU, 8b on CUDA)")
    parser.add_argument("--tokens", type=_int_list, help="the token sweep's counts, comma-separated")
    parser.add_argument("--depths", type=_int_list, help="the depth sweep's layer counts ('' skips it)")
    parser.add_argument("--depth-tokens", type=int, help="tokens of the depth sweep")
    parser.add_argument("--configs", type=_config_list, default=list(CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)} (default all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of seconds), 1 repeat")
    parser.add_argument("--threads", type=speed._positive_int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--repeats", type=_non_negative, help="timed rounds (median reported; 0: not timed; default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", help="write the rows, the fit and the environment to this file")
    parser.add_argument("--markdown", help="append the tables, with the machine and versions, to this file")
    args = parser.parse_args(argv)

    import lens_palrp as lp

    family = args.family or lp.zoo.default_kind()
    device = speed.check_run(parser, family, args.device, args.threads)
    dtype = speed.DTYPES[args.dtype]
    defaults = QUICK if args.quick else GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    shape = args.shape or defaults["shape"]
    try:
        token_sizes, depth_sizes = sweeps(shape, args.tokens if args.tokens is not None else defaults["tokens"],
                                          args.depths if args.depths is not None else defaults["depths"],
                                          args.depth_tokens or defaults["depth_tokens"])
    except ValueError as err:
        parser.error(str(err))
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    memory = None if args.no_memory else peak_memory
    configs = args.configs

    env = speed.environment(device, dtype, family, repeats, memory is not None)
    print(f"{family} on {device} ({env.get('gpu', env['cpu'])}), {env['dtype']}, torch {env['torch']}, "
          f"TransformerLens {env['transformer_lens']}, {env['threads']} threads, "
          f"{'median of %d' % repeats if repeats else 'not timed'}; peak memory above the weights: {env['memory']}")
    cols = columns(configs)
    header = _line([h for h, _ in cols], cols)
    done: Dict[str, dict] = {}
    for title, sizes in (("tokens", token_sizes), ("depth", depth_sizes)):
        if not sizes:
            continue
        print(f"\n{title}:\n{header}\n{'-' * len(header)}")
        for size in sizes:
            if size.name not in done:
                done[size.name] = measure(size, family, device, dtype, repeats, memory, args.threads, configs)
            print(_line([get(done[size.name]) for _, get in cols], cols), flush=True)
    token_rows = [done[s.name] for s in token_sizes]
    depth_rows = [done[s.name] for s in depth_sizes]
    result = fit(token_rows, depth_rows, configs)
    if len(result["token_counts"]) >= 2 or len(result["depths"]) >= 2:
        print("\nfit (peak memory):")
        print("\n".join(fit_lines(result, configs, markdown=False)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, token_rows=token_rows, depth_rows=depth_rows, fit=result), f, indent=1)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(token_rows, depth_rows, result, env, configs))
    return dict(token_rows=token_rows, depth_rows=depth_rows, fit=result)


if __name__ == "__main__":
    main()
