"""Time and peak memory of ``lp.explain`` against a plain forward + backward (gradient x input).

    python benchmarks/speed.py                 # default sizes, CPU
    python benchmarks/speed.py --quick         # one small size (CI smoke run)
    python benchmarks/speed.py --device cuda   # on a GPU, if there is one
    python benchmarks/speed.py --family bridge # a TransformerBridge of the same Llama-style model

``--family`` defaults to ``hooked`` (HookedTransformer) where TransformerLens 3.x provides it and to
``bridge`` on TransformerLens 4 (which has only the bridge).

The baseline is what any gradient attribution costs: one forward with the token embeddings as the
autograd leaf and one backward to them (parameters frozen, like the sweep). Times are interleaved
(baseline, pa_lrp, attn_lrp, baseline, ...) in one process and the median of the repeats is
reported. Peak memory is measured in a fresh subprocess per method and size: on CUDA
``max_memory_allocated``; on CPU the growth of the peak resident set size during the call (Linux
``VmHWM``, reset through ``/proc/self/clear_refs`` just before it), which includes allocator
slack (the child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks leave the
resident set at once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

SIZES = [  # (layers, d_model, heads, tokens)
    (4, 256, 4, 128),
    (8, 512, 8, 512),
    (12, 768, 12, 1024),
]
QUICK = [(2, 128, 4, 64)]
METHODS = ["plain", "pa_lrp", "attn_lrp"]


def build(layers: int, d_model: int, heads: int, n_ctx: int, device: str, family: str = "hooked"):
    """A random Llama-style model (RoPE, RMSNorm, gated SiLU MLP) of the given size."""
    torch.manual_seed(0)
    if family == "bridge":
        from transformers import LlamaConfig, LlamaForCausalLM

        import lens_palrp as lp

        hf_cfg = LlamaConfig(vocab_size=1000, hidden_size=d_model, intermediate_size=4 * d_model,
                             num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=n_ctx)
        hf_cfg.architectures = ["LlamaForCausalLM"]
        return lp.models.bridge_from_hf(LlamaForCausalLM(hf_cfg).eval(), lp.zoo.tokenizer(),
                                        dtype=torch.float32, device=device)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=layers, d_model=d_model, n_heads=heads, d_head=d_model // heads, d_mlp=4 * d_model,
        n_ctx=n_ctx, d_vocab=1000, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", gated_mlp=True, device=device, dtype=torch.float32,
    )
    return HookedTransformer(cfg).eval()


def plain_grad_x_input(model, tokens, target: int):
    """Forward + backward to the embeddings, parameters frozen: the reference cost."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    leaf = {}

    def make_leaf(act, hook):
        leaf["x"] = act.detach().requires_grad_(True)
        return leaf["x"]

    try:
        for p in params:
            p.requires_grad_(False)
        with model.hooks(fwd_hooks=[("hook_embed", make_leaf)]):
            logits = model(tokens)
        y = logits[:, -1, target]
        (g,) = torch.autograd.grad(y.sum(), leaf["x"])
        return (leaf["x"] * g).sum(-1)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def run_method(method: str, model, tokens):
    import lens_palrp as lp

    if method == "plain":
        return plain_grad_x_input(model, tokens, 3)
    return lp.explain(model, tokens, 3, method=method)


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_size(size, device: str, repeats: int, family: str):
    layers, d_model, heads, n_tok = size
    model = build(layers, d_model, heads, n_tok, device, family)
    tokens = torch.randint(0, 1000, (1, n_tok), device=device)
    for m in METHODS:  # warm-up
        run_method(m, model, tokens)
    times = {m: [] for m in METHODS}
    for _ in range(repeats):
        for m in METHODS:
            sync(device)
            t0 = time.perf_counter()
            run_method(m, model, tokens)
            sync(device)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def peak_memory_child(size, method: str, device: str, family: str) -> float:
    """Runs in a subprocess: bytes of peak memory one call of ``method`` needs."""
    layers, d_model, heads, n_tok = size
    model = build(layers, d_model, heads, n_tok, device, family)
    tokens = torch.randint(0, 1000, (1, n_tok), device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_method(method, model, tokens)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = _status_kb("VmRSS")
    run_method(method, model, tokens)
    return (_status_kb("VmHWM") - base) * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(size, method: str, device: str, family: str) -> float:
    code = (
        "import sys, json; sys.path.insert(0, %r); import speed; "
        "print(json.dumps(speed.peak_memory_child(%r, %r, %r, %r)))"
        % (os.path.dirname(os.path.abspath(__file__)), tuple(size), method, device, family)
    )
    # large blocks through mmap: freed memory leaves the resident set at once, so the peak
    # resident set tracks the live tensors instead of the allocator's cache
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one small size, 3 repeats")
    parser.add_argument("--family", choices=("hooked", "bridge"), default=None,
                        help="HookedTransformer or TransformerBridge (default: hooked where TransformerLens 3.x has it)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    import lens_palrp as lp

    family = args.family or lp.zoo.default_kind()
    sizes = QUICK if args.quick else SIZES
    repeats = 3 if args.quick else args.repeats
    print(f"{family} on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {repeats}")
    header = (f"{'layers':>6} {'d_model':>7} {'tokens':>6} | {'plain s':>8} {'pa_lrp s':>8} "
              f"{'attn s':>8} | {'pa/plain':>8} {'attn/plain':>10} | {'mem pa/plain':>12} {'mem attn/plain':>14}")
    print(header)
    print("-" * len(header))
    rows = []
    for size in sizes:
        t = time_size(size, args.device, repeats, family)
        mem = {m: peak_memory(size, m, args.device, family) for m in METHODS}
        row = dict(family=family, size=size, time=t, memory=mem)
        rows.append(row)
        print(f"{size[0]:>6} {size[1]:>7} {size[3]:>6} | {t['plain']:>8.3f} {t['pa_lrp']:>8.3f} "
              f"{t['attn_lrp']:>8.3f} | {t['pa_lrp'] / t['plain']:>8.2f} {t['attn_lrp'] / t['plain']:>10.2f} | "
              f"{mem['pa_lrp'] / mem['plain']:>12.2f} {mem['attn_lrp'] / mem['plain']:>14.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
