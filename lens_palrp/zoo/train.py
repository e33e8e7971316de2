"""Retrain a zoo model from scratch on the CPU, reproducibly.

    python -m lens_palrp.zoo.train rope-repeat        # about 80 s on 2 cores
    python -m lens_palrp.zoo.train learned-absolute
    python -m lens_palrp.zoo.train alibi-repeat

Writes ``lens_palrp/zoo/weights/<name>.pt`` (the state dict) and ``<name>.json`` (config and the
training record). Fixed seeds, single-threaded math: the same command gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from lens_palrp.zoo import MODELS, WEIGHTS_DIR, build_model
from lens_palrp.zoo.tasks import make_task


def train(
    name: str, steps: int = 1500, batch: int = 128, lr: float = 3e-3, seed: int = 0,
    out_dir: str = WEIGHTS_DIR, verbose: bool = True,
) -> dict:
    spec = MODELS[name]
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = build_model(name, with_tokenizer=False)
    task = make_task(spec["task"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.time()
    model.train()
    for step in range(steps):
        tokens, labels = task.batch(batch, gen)
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if verbose and (step % 250 == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}")
    model.eval()
    tokens, labels = task.batch(1024, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        pred = model(tokens).argmax(-1)
    keep = labels != -100
    accuracy = float((pred[keep] == labels[keep]).float().mean())
    record = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "final_loss": loss.item(),
              "heldout_accuracy": accuracy, "train_seconds": round(time.time() - start, 1)}
    os.makedirs(out_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out_dir, f"{name}.pt"))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"config": spec["config"], "task": spec["task"], "training": record}, f, indent=1)
    if verbose:
        print(json.dumps(record))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out-dir", default=WEIGHTS_DIR, help="where to write the weights")
    args = parser.parse_args()
    train(args.name, steps=args.steps, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
