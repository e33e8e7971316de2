"""PA-LRP on a vision transformer: the shipped shapes ViT (lens_palrp.zoo.shapes).

    python demos/vit_shapes.py [--out demos/out/vit_shapes.html]

The label is the shape *and* the half of the image it sits in, so where the object is matters.
For a few held-out images the demo prints the prediction, where the relevance went (patches,
position embedding, softmax, biases) and how much of the patch map falls on the object, then
writes the AttnLRP, PE-only and PA-LRP maps laid over each image, side by side.
"""

import argparse
import os

import torch

import lens_palrp as lp
from lens_palrp.analyses import vision, write_html
from lens_palrp.zoo import shapes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join("demos", "out", "vit_shapes.html"))
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    vit = shapes.load()
    images, labels, masks = shapes.batch(args.images, seed=123)
    with torch.no_grad():
        predicted = vit(images).argmax(-1)
    pa = lp.explain(vit, images, predicted, method="pa_lrp")
    attn = lp.explain(vit, images, predicted, method="attn_lrp")
    c = pa.conservation()
    figures = []
    for i in range(args.images):
        truth, guess = shapes.CLASSES[int(labels[i])], shapes.CLASSES[int(predicted[i])]
        print(f"image {i}: label {truth}, predicted {guess}, logit {float(c.target_value[i]):.3f}")
        print(f"  patches (semantic) {float(c.semantic[i]):.3f}, position embedding {float(c.positional_input[i]):.3f}, "
              f"softmax {float(c.softmax_absorbed[i]):.3f}, biases {float(c.other_absorbed[i]):.3f}")
        on_object = {}
        for name, grid in (("attn_lrp", attn.pixel_map("semantic")), ("pe_only", pa.pixel_map("pe_only")),
                           ("pa_lrp", pa.pixel_map("combined"))):
            positive = grid[i].clamp(min=0)
            on_object[name] = float((positive * masks[i]).sum() / positive.sum().clamp(min=1e-12))
        print("  share of the positive map on the object: "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in on_object.items())
              + f" (the object covers {100 * float(masks[i].double().mean()):.0f}% of the image)")
        maps = {"AttnLRP": attn.pixel_map("semantic")[i], "PE-only": pa.pixel_map("pe_only")[i],
                "PA-LRP": pa.pixel_map("combined")[i], "true mask": masks[i].double()}
        figures.append(vision.overlay_figure(images[i], maps, title=f"label {truth}, predicted {guess}"))
    mass = pa.positional_input.abs().sum(-1) / (pa.semantic.abs().sum(-1) + pa.positional_input.abs().sum(-1))
    print(f"\npositional share of PA-LRP's relevance mass: {[round(100 * float(v), 1) for v in mass]} %")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_html(figures, args.out, title="lens_palrp: PA-LRP on the shapes ViT")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
