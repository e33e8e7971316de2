"""Retrain a zoo model from scratch on the CPU, reproducibly.

    python -m lens_palrp.zoo.train rope-repeat
    python -m lens_palrp.zoo.train learned-absolute
    python -m lens_palrp.zoo.train alibi-repeat

Trains the Hugging Face model (``lens_palrp.zoo.build_model``) and writes the folder
``lens_palrp/zoo/weights/<name>/``: ``config.json`` and ``model.safetensors`` (save_pretrained),
the zoo tokenizer's files and ``training.json`` (task, architecture and the training record).
Fixed seeds, single-threaded math: the same command gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from lens_palrp.zoo import MODELS, RECORD_FILE, TOKENIZER_DIR, WEIGHTS_DIR, build_model
from lens_palrp.zoo.tasks import make_task

# per model, where the shared defaults (below) needed tuning; recorded in training.json
SCHEDULES = {name: {} for name in MODELS}
DEFAULTS = dict(steps=1500, batch=128, lr=3e-3, seed=0)


def train(
    name: str, steps: int | None = None, batch: int | None = None, lr: float | None = None,
    seed: int | None = None, out_dir: str = WEIGHTS_DIR, verbose: bool = True,
) -> dict:
    """Train ``name`` and save its folder to ``out_dir/name``; returns the training record."""
    given = dict(steps=steps, batch=batch, lr=lr, seed=seed)
    hp = {**DEFAULTS, **SCHEDULES[name], **{k: v for k, v in given.items() if v is not None}}
    spec = MODELS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order: the same weights on every machine run
    try:
        torch.manual_seed(hp["seed"])
        model = build_model(name)
        record, model = _fit(model, make_task(spec["task"]), hp, verbose)
    finally:
        torch.set_num_threads(threads)
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    for f in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), os.path.join(path, f))
    with open(os.path.join(path, RECORD_FILE), "w") as f:
        json.dump({"architecture": spec["architecture"], "task": spec["task"], "training": record}, f, indent=1)
        f.write("\n")
    if verbose:
        print(json.dumps(record))
    return record


def _fit(model, task, hp: dict, verbose: bool):
    steps, lr, seed = hp["steps"], hp["lr"], hp["seed"]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.time()
    model.train()
    for step in range(steps):
        tokens, labels = task.batch(hp["batch"], gen)
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if verbose and (step % 250 == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}")
    seconds = round(time.time() - start, 1)
    model.eval()
    tokens, labels = task.batch(1024, torch.Generator().manual_seed(seed + 1))  # held out: another seed
    with torch.no_grad():
        pred = model(tokens).logits.argmax(-1)
    keep = labels != -100
    accuracy = float((pred[keep] == labels[keep]).float().mean())
    record = {**hp, "final_loss": loss.item(), "heldout_accuracy": accuracy, "train_seconds": seconds}
    return record, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, help="default: the model's schedule (training.json)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--out-dir", default=WEIGHTS_DIR, help="writes OUT_DIR/NAME/")
    args = parser.parse_args()
    train(args.name, steps=args.steps, lr=args.lr, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
