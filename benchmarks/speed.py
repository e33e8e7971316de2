"""Time and peak memory of ``lp.explain`` against the plain forward + backward it is built on.

    python benchmarks/speed.py --quick                      # one tiny size (the CI smoke run)
    python benchmarks/speed.py --threads 1                  # the CPU sizes, single-threaded
    python benchmarks/speed.py --family bridge --sizes 4x256-128,8x512-512 --repeats 3
    python benchmarks/speed.py --device cuda --dtype bfloat16 --sizes 1b-512,1b-2048,8b-512
    python benchmarks/speed.py --markdown benchmarks/out/speed.md --json benchmarks/out/speed.json

What is measured (issue 13's targets are ratios to these baselines, taken in one run on the same
weights, dtype, device and thread count):

* ``--family bridge`` (a ``TransformerBridge`` around a Hugging Face ``LlamaForCausalLM``):
  "bridge plain", the bridge's own forward + backward with one hook at ``hook_embed`` making the
  token embeddings the autograd leaf, and "HF plain", the Hugging Face forward + backward on the
  wrapped model (``bridge.original_model(inputs_embeds=leaf)``, the leaf looked up inside the timed
  call, ``use_cache=False``, all logits as the bridge computes them). Targets: ``explain(pa_lrp)``
  within 1.10x of bridge plain and 1.15x of HF plain. Note that the bridge installs its own
  components inside the wrapped model (the embedding, the blocks, their attention computed
  eagerly so that ``hook_pattern`` is in the path; TransformerLens 4 also sets the wrapped
  config to eager attention), so "HF plain" is Hugging Face's top-level forward running through
  the bridge's components with their hooks idle: the two baselines differ by the bridge's outer
  wrapper, and neither is an unwrapped Hugging Face model with SDPA attention.
* ``--family hooked`` (``HookedTransformer``, TransformerLens 3.x only): "TL plain", its forward
  with one hook at ``hook_embed`` making the leaf, and the backward. Target: within 1.10x.
* The methods: ``pa_lrp`` (what the targets are about), ``attn_lrp``, and ``grad_x_input``, which
  runs through all of lens_palrp's machinery with no rules: its excess over plain is
  lens_palrp's own overhead (hooks, records, bookkeeping), the rest of ``pa_lrp``'s is the rules.

Every call explains (or differentiates) the logit of token 3 at the last position of one random
sequence. The baselines run with the parameters frozen (set outside the clock), so they compute
only the input gradient, the least any gradient attribution needs; ``explain`` gets the model as
built, its parameters requiring gradients as a loaded model's do, and its own freezing and
restoring is part of what it costs.

How: the model is a randomly initialized Llama-style model (RoPE, RMSNorm, gated SiLU MLP) built
directly on ``--device`` in ``--dtype`` (a ``torch.device`` context; Hugging Face weights under a
temporary default dtype), so an 8B model is never materialized in float32 on the CPU. The
callables are warmed up once each, then timed interleaved (bridge plain, HF plain, pa_lrp, ...;
each repeat starts one further along the list, so no call always follows the same one) with a
device synchronize around each, and the median of ``--repeats`` is reported. Peak memory is
measured in a fresh subprocess per size (``--no-memory`` skips it): every callable is warmed up
there first, so one-time allocations (allocator and library workspaces, lazily built tables) are
charged to none of them, then each call is measured in turn. On CUDA: ``max_memory_allocated``
above what was allocated before the call (the weights and what persists); on CPU (Linux only):
the growth of the peak resident set size during the call (``VmHWM``, reset through
``/proc/self/clear_refs`` just before it), which includes allocator slack; the child runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks leave the resident set at once. Memory
ratios are left out ("-") where the baseline's peak is under 1 MiB (the quick size on CPU): there
they are page granularity and noise.

Sizes (``--sizes``, comma-separated names; ``LxD-T`` is L layers, d_model D, T tokens, d_head 64,
d_mlp 4D, vocabulary 1000, multi-head attention). The CPU defaults, chosen to take about 10
minutes with ``--threads 1`` on a small machine while spanning 4-16 layers, d_model 256-1024 and
128-2048 tokens, each isolating one way the overhead can scale (the hooked family's default run
took 9 minutes with ``--threads 1`` on 2 shared cores, memory included):

* ``4x256-128``: small and short: fixed per-call costs (hook installation, Python) dominate;
* ``16x256-128``: the same width four times as deep: the per-layer part of those costs;
* ``8x512-512``: a middle size, where matrix products start to dominate;
* ``4x256-2048``: long context on a narrow model: the attention maps' O(tokens^2) work dominates,
  which is where PA-LRP's positional rules and the attention rules do theirs;
* ``4x1024-512``: wide: the weight matrix products dominate, overheads should vanish;
* ``12x768-512``: GPT-2-small's depth and width at 512 tokens, the realistic middle. (At 1024
  tokens, or ``4x1024-2048``, one size alone would take the default run's ten minutes.)

``--quick`` is ``2x128-64`` (3 repeats unless ``--repeats`` says otherwise). Named GPU shapes, with
random weights and vocabulary 128256 (the default sizes on a CUDA device): ``1b-512``,
``1b-2048`` (Llama-3.2-1B: 16 layers, d_model 2048, 32 heads, 8 kv heads, d_mlp 8192, RoPE theta
500000, tied embeddings) and ``8b-512``, ``8b-2048`` (Llama-3-8B: 32 layers, d_model 4096, 32
heads, 8 kv heads, d_mlp 14336, untied). HookedTransformer cannot tie its unembedding, so its
1b has 1.50B parameters to the bridge's 1.24B. A size that runs out of GPU memory is reported as
such and the run goes on.

``--family`` defaults to ``hooked`` where TransformerLens 3.x provides it and to ``bridge`` on
TransformerLens 4 (which has only the bridge). ``--threads`` calls ``torch.set_num_threads`` (here
and in the memory subprocesses); without it torch's default is kept. Either way the number used is
reported. ``--markdown FILE`` appends a table (with the machine, versions, device, dtype and
threads) to FILE; ``--json FILE`` writes the rows. Speed is never asserted in unit tests:
``tests/test_benchmark_speed.py`` only checks that a row is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from lens_palrp import load_args

warnings.filterwarnings("ignore")

TARGET = 3  # the explained token id (every vocabulary here has it)
METHODS = ("pa_lrp", "attn_lrp", "grad_x_input")
BASELINES = {"bridge": ("bridge_plain", "hf_plain"), "hooked": ("tl_plain",)}
LABELS = {"bridge_plain": "bridge", "hf_plain": "HF", "tl_plain": "TL", "pa_lrp": "pa_lrp",
          "attn_lrp": "attn", "grad_x_input": "gxi"}
DTYPES = {str(dtype).replace("torch.", ""): dtype for dtype in load_args.DTYPES}  # what the loaders take


@dataclass(frozen=True)
class Size:
    """One benchmarked shape: a Llama-style decoder and the length of the explained sequence."""

    name: str
    layers: int
    d_model: int
    heads: int
    tokens: int
    kv_heads: Optional[int] = None  # None: multi-head attention
    d_mlp: Optional[int] = None  # None: 4 * d_model
    vocab: int = 1000
    rope_theta: float = 10000.0
    tied: bool = False


def _llama3(name: str, tokens: int, layers: int, d_model: int, d_mlp: int, tied: bool) -> Size:
    return Size(name, layers, d_model, 32, tokens, kv_heads=8, d_mlp=d_mlp, vocab=128256,
                rope_theta=500000.0, tied=tied)


NAMED = {s.name: s for s in (
    _llama3("1b-512", 512, 16, 2048, 8192, tied=True),  # Llama-3.2-1B
    _llama3("1b-2048", 2048, 16, 2048, 8192, tied=True),
    _llama3("8b-512", 512, 32, 4096, 14336, tied=False),  # Llama-3-8B
    _llama3("8b-2048", 2048, 32, 4096, 14336, tied=False),
)}
CPU_SIZES = ("4x256-128", "16x256-128", "8x512-512", "4x256-2048", "4x1024-512", "12x768-512")
GPU_SIZES = ("1b-512", "1b-2048", "8b-512", "8b-2048")
QUICK = "2x128-64"


def parse_size(name: str) -> Size:
    """A named GPU shape, or ``LxD-T``: L layers, d_model D (d_head 64), T tokens."""
    if name in NAMED:
        return NAMED[name]
    m = re.fullmatch(r"(\d+)x(\d+)-(\d+)", name)
    if not m or int(m[2]) % 64 or min(int(m[1]), int(m[3])) < 1:
        raise ValueError(f"unknown size {name!r}: one of {', '.join(NAMED)} or LxD-T "
                         "(layers x d_model - tokens, d_model a multiple of 64), e.g. 4x256-128")
    layers, d_model, tokens = int(m[1]), int(m[2]), int(m[3])
    return Size(name, layers, d_model, d_model // 64, tokens)


# ------------------------------------------------------------------------------------ models
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(size: Size, family: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The random model (seed 0) and its tokens ``[1, size.tokens]``, built on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    if family == "bridge":
        model = _build_bridge(size, device, dtype)
    elif family == "hooked":
        model = _build_hooked(size, device, dtype)
    else:
        raise ValueError(f"unknown family {family!r}")
    tokens = torch.randint(0, size.vocab, (1, size.tokens), generator=torch.Generator().manual_seed(1))
    return model, tokens.to(device)


def _build_bridge(size: Size, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lens_palrp as lp

    cfg = LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.d_model, intermediate_size=size.d_mlp or 4 * size.d_model,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads or size.heads, max_position_embeddings=size.tokens,
        rope_theta=size.rope_theta, tie_word_embeddings=size.tied,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device(device), _default_dtype(dtype):
        hf = LlamaForCausalLM(cfg).eval()
    return lp.models.bridge_from_hf(hf, lp.zoo.tokenizer(), dtype=dtype, device=device)


def _build_hooked(size: Size, device: str, dtype: torch.dtype):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=size.layers, d_model=size.d_model, n_heads=size.heads, d_head=size.d_model // size.heads,
        d_mlp=size.d_mlp or 4 * size.d_model, n_key_value_heads=size.kv_heads, n_ctx=size.tokens,
        d_vocab=size.vocab, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_base=size.rope_theta, rotary_adjacent_pairs=False, gated_mlp=True, final_rms=True,
        device=device, dtype=dtype,
    )
    with torch.device(device):
        return HookedTransformer(cfg).eval()


def family_available(family: str) -> bool:
    import lens_palrp as lp

    return lp.zoo.hooked_available() if family == "hooked" else lp.zoo.bridge_available()


# ------------------------------------------------------------------------------------ the calls
def _leaf_hook(store: dict):
    def make_leaf(act, hook):
        store["x"] = act.detach().requires_grad_(True)
        return store["x"]

    return make_leaf


def lens_plain(model, tokens):
    """TransformerLens forward (HookedTransformer or bridge) with the token embeddings as the leaf,
    and the backward to them: gradient x input of the target logit."""
    store: dict = {}
    with model.hooks(fwd_hooks=[("hook_embed", _leaf_hook(store))]):
        logits = model(tokens)
    (g,) = torch.autograd.grad(logits[:, -1, TARGET].sum(), store["x"])
    return store["x"].detach() * g


def hf_plain(model, tokens):
    """Hugging Face forward on the bridge's wrapped model from ``inputs_embeds`` (the leaf), and
    the backward to them."""
    hf = model.original_model
    x = hf.get_input_embeddings()(tokens).detach().requires_grad_(True)
    logits = hf(inputs_embeds=x, use_cache=False).logits
    (g,) = torch.autograd.grad(logits[:, -1, TARGET].sum(), x)
    return x.detach() * g


@dataclass(frozen=True)
class Call:
    """One measured call and what must hold before it (set outside the clock)."""

    run: Callable[[], object]
    setup: Callable[[], object]


def calls(model, tokens, family: str) -> Dict[str, Call]:
    """Name -> call, baselines first, in the order they are interleaved. The baselines run with the
    parameters frozen (they compute only the input gradient); ``explain`` gets the model as it was
    built, parameters requiring gradients as any loaded model's do, and freezes (and restores)
    them itself, which is part of its cost."""
    import lens_palrp as lp

    plain = {"bridge_plain": lens_plain, "hf_plain": hf_plain, "tl_plain": lens_plain}
    frozen, as_built = (lambda: model.requires_grad_(False)), (lambda: model.requires_grad_(True))
    out = {b: Call(lambda f=plain[b]: f(model, tokens), frozen) for b in BASELINES[family]}
    for m in METHODS:
        out[m] = Call(lambda m=m: lp.explain(model, tokens, TARGET, method=m), as_built)
    return out


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def warm_up(fns: Dict[str, Call]) -> None:
    for call in fns.values():
        call.setup()
        call.run()


def time_calls(fns: Dict[str, Call], repeats: int, device: str) -> Dict[str, float]:
    """Median seconds per call: one warm-up each, then ``repeats`` interleaved rounds."""
    warm_up(fns)
    names = list(fns)
    times: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(repeats):
        shift = r % len(names)
        for k in names[shift:] + names[:shift]:
            fns[k].setup()
            sync(device)
            t0 = time.perf_counter()
            fns[k].run()  # the result is freed before the clock stops: part of the call's cost
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(call: Call, device: str) -> float:
    """Peak memory one call needs above what was allocated before it (see the module docstring)."""
    call.setup()
    gc.collect()
    if str(device).startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call.run()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = _status_kb("VmRSS")
    call.run()
    return float(max(0, _status_kb("VmHWM") - base) * 1024)  # lazily synced counters: tiny calls can read < 0


def peak_memory_child(size: Size, family: str, device: str, dtype: torch.dtype,
                      threads: Optional[int] = None) -> Dict[str, float]:
    """Bytes of peak memory of each call on one freshly built model (run in a subprocess)."""
    if threads:
        torch.set_num_threads(threads)
    model, tokens = build(size, family, device, dtype)
    fns = calls(model, tokens, family)
    warm_up(fns)  # one-time allocations are charged to none of the calls
    return {k: peak_bytes(call, device) for k, call in fns.items()}


def peak_memory(size: Size, family: str, device: str, dtype: torch.dtype,
                threads: Optional[int] = None) -> Dict[str, float]:
    """``peak_memory_child`` in a fresh Python process."""
    spec = json.dumps([asdict(size), family, device, str(dtype).replace("torch.", ""), threads])
    code = (
        "import sys, json; sys.path.insert(0, %r); import speed; s, f, d, t, n = json.loads(%r); "
        "print(json.dumps(speed.peak_memory_child(speed.Size(**s), f, d, speed.DTYPES[t], n)))"
        % (os.path.dirname(os.path.abspath(__file__)), spec)
    )
    # large blocks through mmap: freed memory leaves the resident set at once, so the peak
    # resident set tracks the live tensors instead of the allocator's cache
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"the memory subprocess for {size.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ rows
MIN_PEAK_BYTES = 2**20  # a smaller baseline peak is page granularity and allocator noise: no ratio


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b and b > 0 else None


def ratio_keys(family: str) -> List[str]:
    """``method/baseline`` pairs: every method against every baseline."""
    return [f"{m}/{b}" for m in METHODS for b in BASELINES[family]]


def measure(size: Size, family: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
            repeats: int = 5, memory: Optional[Callable[..., Dict[str, float]]] = peak_memory,
            threads: Optional[int] = None) -> dict:
    """One row: median seconds and peak bytes of each call, and the methods' ratios to the
    baselines. ``memory``: ``peak_memory`` (a subprocess), ``peak_memory_child`` (in this
    process) or None (not measured)."""
    model, tokens = build(size, family, device, dtype)
    t = time_calls(calls(model, tokens, family), repeats, device)
    del model, tokens
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()  # the memory subprocess needs the room
    mem = memory(size, family, device, dtype, threads) if memory else None
    row = dict(size=size.name, shape=asdict(size), family=family, device=str(device),
               dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(), repeats=repeats,
               time_s=t, peak_bytes=mem)
    row["time_ratio"] = {k: _ratio(t[k.split("/")[0]], t[k.split("/")[1]]) for k in ratio_keys(family)}
    row["memory_ratio"] = {k: _ratio(mem[k.split("/")[0]], mem[k.split("/")[1]])
                           if mem and mem[k.split("/")[1]] >= MIN_PEAK_BYTES else None for k in ratio_keys(family)}
    return row


# ------------------------------------------------------------------------------------ tables
def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def columns(family: str):
    """``(header, row -> text)``: the printed and the markdown table's columns."""
    base, first = BASELINES[family], BASELINES[family][0]

    def shape(key):
        return lambda r: str(r["shape"][key])

    def seconds(key):
        return lambda r: _fmt(r["time_s"][key], ".3f")

    def ratio(kind, key):
        return lambda r: _fmt(r[kind][key], ".2f")

    def mib(key):
        return lambda r: "-" if r["peak_bytes"] is None else _fmt(r["peak_bytes"][key] / 2**20, ".0f")

    cols = [("size", lambda r: r["size"])] + [(k, shape(k)) for k in ("layers", "d_model", "tokens")]
    cols += [(f"{LABELS[k]} s", seconds(k)) for k in base + METHODS]
    pairs = [("pa_lrp", b) for b in base] + [("attn_lrp", first), ("grad_x_input", first)]
    cols += [(f"{LABELS[m]}/{LABELS[b]}", ratio("time_ratio", f"{m}/{b}")) for m, b in pairs]
    cols += [(f"{LABELS[k]} MiB", mib(k)) for k in (first, "pa_lrp")]
    pairs = [("pa_lrp", b) for b in base] + [("attn_lrp", first)]
    cols += [(f"mem {LABELS[m]}/{LABELS[b]}", ratio("memory_ratio", f"{m}/{b}")) for m, b in pairs]
    return cols


N_SHAPE_COLUMNS = 4  # size, layers, d_model, tokens: all an error row has


def _cells(row: dict, cols) -> List[str]:
    if "error" in row:
        return [get(row) for _, get in cols[:N_SHAPE_COLUMNS]] + [row["error"]]
    return [get(row) for _, get in cols]


def _justify(cells: List[str], cols) -> str:
    """The size name left-aligned in 10 characters, the rest right-aligned under their headers."""
    return " ".join(c.ljust(10) if i == 0 else c.rjust(max(len(h), 6))
                    for i, (c, (h, _)) in enumerate(zip(cells, cols)))


def console_header(cols) -> str:
    return _justify([h for h, _ in cols], cols)


def console_line(row: dict, cols) -> str:
    return _justify(_cells(row, cols), cols)


def environment(device: str, dtype: torch.dtype, family: str, repeats: int, memory: bool) -> dict:
    from importlib import metadata

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = dict(family=family, device=str(device), dtype=str(dtype).replace("torch.", ""),
               threads=torch.get_num_threads(), repeats=repeats, cpu=f"{cpu}, {os.cpu_count()} cores",
               torch=torch.__version__, transformer_lens=version("transformer-lens"),
               transformers=version("transformers"), python=platform.python_version(),
               date=datetime.datetime.now().isoformat(timespec="seconds"),
               memory=("CUDA max_memory_allocated" if str(device).startswith("cuda") else "CPU VmHWM growth")
               if memory else "not measured")
    if str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def markdown(rows: List[dict], env: dict) -> str:
    cols = columns(env["family"])
    machine = f"{env['gpu']}; CPU {env['cpu']}" if "gpu" in env else f"CPU {env['cpu']}"
    lines = [
        f"### {env['family']} on {env['device']}, {env['dtype']}, {env['threads']} threads ({env['date']})",
        "",
        f"{machine}; torch {env['torch']}, TransformerLens {env['transformer_lens']}, "
        f"transformers {env['transformers']}, Python {env['python']}; median of {env['repeats']}; "
        f"peak memory: {env['memory']}.",
        "",
        "| " + " | ".join(h for h, _ in cols) + " |",
        "|" + "|".join("---" if i < 1 else "---:" for i in range(len(cols))) + "|",
    ]
    for row in rows:
        cells = _cells(row, cols)
        lines.append("| " + " | ".join(cells + ["-"] * (len(cols) - len(cells))) + " |")
    return "\n".join(lines) + "\n\n"


# ------------------------------------------------------------------------------------ main
def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def check_run(parser, family: str, device: str, threads) -> str:
    """The family and device exist here (else a usage error); the thread count is applied."""
    if not family_available(family):
        parser.error(f"--family {family}: not available with this TransformerLens")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available")
    if threads:
        torch.set_num_threads(threads)
    return device


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("hooked", "bridge"), default=None,
                        help="HookedTransformer or TransformerBridge (default: hooked where TransformerLens 3.x has it)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the model is built in this dtype (default float32)")
    parser.add_argument("--sizes", help="comma-separated size names (default: the CPU sizes, or the GPU "
                        f"shapes on CUDA): {', '.join(CPU_SIZES + GPU_SIZES)}, or any LxD-T")
    parser.add_argument("--quick", action="store_true", help=f"the one tiny size {QUICK} (unless --sizes), 3 repeats (unless --repeats)")
    parser.add_argument("--threads", type=_positive_int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--repeats", type=_positive_int, help="timed rounds, the median is reported (default 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", help="write the rows (and the environment) to this file")
    parser.add_argument("--markdown", help="append the table, with the machine and versions, to this file")
    args = parser.parse_args(argv)

    import lens_palrp as lp

    family = args.family or lp.zoo.default_kind()
    device = check_run(parser, family, args.device, args.threads)
    dtype = DTYPES[args.dtype]
    if args.quick:
        names = [QUICK] if args.sizes is None else args.sizes.split(",")
    else:
        names = args.sizes.split(",") if args.sizes else list(GPU_SIZES if device.startswith("cuda") else CPU_SIZES)
    try:
        sizes = [parse_size(n.strip()) for n in names if n.strip()]
    except ValueError as err:
        parser.error(str(err))
    repeats = args.repeats or (3 if args.quick else 5)
    memory = None if args.no_memory else peak_memory

    env = environment(device, dtype, family, repeats, memory is not None)
    print(f"{family} on {device} ({env.get('gpu', env['cpu'])}), {env['dtype']}, torch {env['torch']}, "
          f"TransformerLens {env['transformer_lens']}, {env['threads']} threads, median of {repeats}; "
          f"peak memory: {env['memory']}")
    cols = columns(family)
    header = console_header(cols)
    print(header)
    print("-" * len(header))
    rows = []
    for size in sizes:
        try:
            row = measure(size, family, device, dtype, repeats, memory, args.threads)
        except RuntimeError as err:  # torch.OutOfMemoryError is one; so is a failed memory subprocess
            if "out of memory" not in str(err).lower():
                raise
            where = "memory subprocess" if "subprocess" in str(err) else "timing"
            row = dict(size=size.name, shape=asdict(size), family=family, error=f"out of memory ({where})")
        if "error" in row and device.startswith("cuda"):  # the failed size's tensors are unreachable now
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(console_line(row, cols), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(rows, env))


if __name__ == "__main__":
    main()
