"""Procedural images with exact foreground masks, and the tiny ViT the project trains on them.

Each 32x32 RGB image shows one shape (circle, square or triangle, random size and colour) on a
textured background (two random colour gratings plus noise). The label is the shape *and* the
half of the image it sits in (6 classes: ``circle-left`` ... ``triangle-right``), so both what
the object is and where it is decide the answer: a position-sensitive task for PA-LRP.

    python -m lens_palrp.zoo.shapes            # retrains lens_palrp/zoo/weights/shapes-vit (3000 steps, ~12 min on one core)

>>> images, labels, masks = lp.zoo.shapes.batch(8, seed=0)
>>> vit = lp.zoo.shapes.load()
"""

from __future__ import annotations

import math
import os
from typing import Tuple

import torch
from torch import Tensor

from lens_palrp.load_args import DeviceLike, DtypeLike
from lens_palrp.zoo import WEIGHTS_DIR

SIZE = 32
SHAPES = ("circle", "square", "triangle")
CLASSES = [f"{s}-{side}" for s in SHAPES for side in ("left", "right")]
FOLDER = os.path.join(WEIGHTS_DIR, "shapes-vit")
MEAN, STD = 0.5, 0.5  # images are normalized as (x - MEAN) / STD


def batch(n: int, seed: int = 0, generator: torch.Generator = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``n`` normalized images ``[n, 3, 32, 32]``, labels ``[n]`` and foreground masks ``[n, 32, 32]``."""
    g = generator or torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    # background: two oriented colour gratings plus pixel noise
    background = torch.zeros(n, 3, SIZE, SIZE)
    for _ in range(2):
        angle, freq, phase = u(n, 1, 1) * math.pi, 0.2 + 0.6 * u(n, 1, 1), u(n, 1, 1) * 2 * math.pi
        wave = torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
        background += 0.15 * wave[:, None] * (u(n, 3, 1, 1) - 0.5) * 2
    background = (0.5 + background + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    # the shape: kind, half, size, centre
    kind = torch.randint(0, len(SHAPES), (n,), generator=g)
    right = torch.randint(0, 2, (n,), generator=g)
    r = 5.5 + 2 * u(n)
    cx = torch.where(right.bool(), 16 + r + (15 - 2 * r) * u(n), r + (15 - 2 * r) * u(n))
    cy = r + (31 - 2 * r) * u(n)
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    rr = r[:, None, None]
    circle = dx**2 + dy**2 <= rr**2
    square = (dx.abs() <= rr * 0.85) & (dy.abs() <= rr * 0.85)
    triangle = (dy <= rr * 0.8) & (dy >= -rr) & (dx.abs() <= (dy + rr) * 0.55)
    masks = torch.where(kind[:, None, None] == 0, circle, torch.where(kind[:, None, None] == 1, square, triangle))
    # every channel dark or bright, so the shape always stands out from the mid-grey texture
    colour = torch.where(u(n, 3, 1, 1) < 0.5, 0.15 * u(n, 3, 1, 1), 0.85 + 0.15 * u(n, 3, 1, 1))
    images = torch.where(masks[:, None], colour.expand(-1, -1, SIZE, SIZE), background)
    labels = kind * 2 + right
    return (images - MEAN) / STD, labels, masks


def load(dtype: DtypeLike = torch.float32, device: DeviceLike = "cpu"):
    """The shipped tiny ViT as a ``HookedViT`` in ``dtype`` (a ``torch.dtype`` or its name) on
    ``device`` (default ``"cpu"``)."""
    from lens_palrp.hooks.vit import HookedViT

    return HookedViT.from_pretrained(FOLDER, dtype=dtype, device=device)


def train(steps: int = 3000, batch_size: int = 128, seed: int = 0, out: str = FOLDER) -> float:
    """Train a transformers ``ViTForImageClassification`` (4 layers, d 64, 4x4 patches) from a
    fixed seed, save it to ``out``; returns the held-out accuracy on 2000 fresh images."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, hidden_act="gelu", num_labels=len(CLASSES),
                       id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        images, labels, _ = batch(batch_size, generator=g)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=images).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    images, labels, _ = batch(2000, seed=seed + 12345)
    with torch.no_grad():
        accuracy = float((model(pixel_values=images).logits.argmax(-1) == labels).float().mean())
    model.save_pretrained(out)
    print(f"held-out accuracy {accuracy:.4f}; saved to {out}")
    return accuracy


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Retrain the shipped shapes ViT.")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=FOLDER)
    args = parser.parse_args()
    train(args.steps, out=args.out)
