"""Vision evaluation: pixel perturbation, segmentation, overlays (docs/evaluation.md, "Vision").

* **Perturbation** (the loop shared with the text protocols, ``faithfulness.perturbation_curves``):
  pixels are removed (set to 0, the normalized mean colour, in every channel) in order of a map
  at fractions 0.1..0.9; **positive** removes the most relevant first (a faithful map makes the
  accuracy drop fast: lower area is better), **negative** the least relevant first (higher is
  better). The area is the trapezoid over f in [0, 0.9] including the
  unperturbed image at f = 0, divided by 0.9: the mean accuracy (or target probability) in percent.
* **Segmentation**: each map thresholded at its own mean gives a foreground; pixel accuracy and
  mIoU (mean of foreground and background IoU) against the true mask, and mAP (average precision
  of the continuous map ranking the pixels, averaged over images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence

import torch
from torch import Tensor

from lens_palrp.analyses.common import in_eval_mode
from lens_palrp.analyses.faithfulness import (Perturbation, Unit, _explained_methods, perturbation_curves,
                                              removal_ranks, removed_at, trapezoid)
from lens_palrp.engine import explain

VISION_FRACTIONS = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], dtype=torch.float64)
VISION_METHODS = ("random", "grad_x_input", "attn_lrp", "pe_only", "pa_lrp", "pa_lrp_abs")


@in_eval_mode
def vision_maps(model, images: Tensor, targets: Tensor, methods: Sequence[str] = VISION_METHODS,
                seed: int = 0, mode: str = "bilinear") -> Dict[str, Tensor]:
    """``{method: [batch, H, W]}`` pixel maps, patch maps upsampled (the [CLS] row left out).

    Baselines use their signed patch relevance; ``pe_only`` PA-LRP's positional part;
    ``pa_lrp`` / ``pa_lrp_abs`` the combined map with the paper's / the authors' aggregation.
    """
    sweeps = {m: explain(model, images, targets, method=m) for m in _explained_methods(methods)}
    out = {}
    for m in methods:
        if m == "random":  # one random value per pixel
            g = torch.Generator().manual_seed(seed)
            shape = (images.shape[0], images.shape[-2], images.shape[-1])
            out[m] = torch.rand(shape, generator=g, dtype=torch.float64)
        elif m == "pe_only":
            out[m] = sweeps["pa_lrp"].pixel_map("pe_only", mode=mode)
        elif m == "pa_lrp":
            out[m] = sweeps["pa_lrp"].pixel_map("combined", "relu", mode=mode)
        elif m == "pa_lrp_abs":
            out[m] = sweeps["pa_lrp"].pixel_map("combined", "abs", mode=mode)
        else:
            out[m] = sweeps[m].pixel_map("semantic", mode=mode)
    return {m: v.detach().double().cpu() for m, v in out.items()}


# positive: the most relevant pixels go first (= the language protocols' morf); negative: the
# least relevant first (= pruning)
ORDERS = {"positive": "morf", "negative": "pruning"}


def round_steps(fraction: float, n: Tensor) -> Tensor:
    """``round(f N)`` pixels per image at step ``f`` (half to even, as Python's ``round``)."""
    return torch.round(fraction * n.double()).long()


def removal_masks(pixel_map: Tensor, fraction: float, most_relevant_first: bool) -> Tensor:
    """``[batch, H, W]`` booleans: the ``round(fraction * H * W)`` pixels to remove per image."""
    flat = pixel_map.reshape(pixel_map.shape[0], -1)
    everywhere = torch.ones_like(flat, dtype=torch.bool)
    order = ORDERS["positive" if most_relevant_first else "negative"]
    removed = removed_at(removal_ranks(flat, everywhere, order), everywhere, order,
                         round_steps(fraction, everywhere.sum(-1)))
    return removed.reshape(pixel_map.shape)


@dataclass
class VisionPerturbationResult:
    """``curves[method][positive|negative][accuracy|prob]``: ``[images, steps]``."""

    curves: Dict[str, Dict[str, Dict[str, Tensor]]]
    fractions: Tensor = field(default_factory=lambda: VISION_FRACTIONS.clone())

    def metrics(self) -> Dict[str, Dict[str, Tensor]]:
        """Per-image areas in percent: ``{positive,negative}_{accuracy,prob}_auc``."""
        out = {}
        x = self.fractions
        for method, orders in self.curves.items():
            out[method] = {}
            for order, quantities in orders.items():
                for q, curve in quantities.items():
                    out[method][f"{order}_{q}_auc"] = 100 * (trapezoid(curve, x) / (x[-1] - x[0]))
        return out


@in_eval_mode
def vision_perturbation_test(model, images: Tensor, labels: Tensor, maps: Dict[str, Tensor],
                             fill: float = 0.0) -> VisionPerturbationResult:
    """Remove pixels by each map (positive and negative order) and track the accuracy on
    ``labels`` and the probability of the label, at every fraction of ``VISION_FRACTIONS``."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    images = images.to(device, dtype)
    labels = labels.to(device)

    def remove(unit: Unit, removed: Tensor) -> Tensor:
        removed = removed.reshape(images.shape[0], *images.shape[-2:]).to(device)
        return torch.where(removed[:, None], torch.full_like(images, fill), images)

    def score(unit: Unit, perturbed: Tensor) -> Dict[str, Tensor]:
        with torch.no_grad():
            logits = model(perturbed).double()
        return {"accuracy": (logits.argmax(-1) == labels).double().cpu()[None],
                "prob": logits.softmax(-1).gather(-1, labels[:, None])[:, 0].cpu()[None]}

    flat = {m: pixel_map.reshape(pixel_map.shape[0], -1).cpu() for m, pixel_map in maps.items()}
    everywhere = torch.ones(images.shape[0], images.shape[-2] * images.shape[-1], dtype=torch.bool)
    # one unit, the whole batch; one forward per step
    protocol = Perturbation(ORDERS, VISION_FRACTIONS, round_steps, remove, score, ("accuracy", "prob"),
                            steps_per_forward=1)
    curves = perturbation_curves(protocol, [Unit(slice(None), flat, everywhere)], list(maps), images.shape[0])
    return VisionPerturbationResult(curves)


def average_precision(scores: Tensor, positives: Tensor) -> Tensor:
    """Average precision of ranking ``scores [n]`` against boolean ``positives [n]``."""
    order = scores.argsort(dim=0, descending=True, stable=True)
    hits = positives[order].double()
    if hits.sum() == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return (precision * hits).sum() / hits.sum()


def segmentation_scores(pixel_map: Tensor, masks: Tensor) -> Dict[str, Tensor]:
    """Per image: ``pixel_accuracy``, ``miou`` (foreground and background IoU averaged) and
    ``ap``, with the map thresholded at its own mean (AP uses the raw map)."""
    b = pixel_map.shape[0]
    flat, truth = pixel_map.reshape(b, -1).double(), masks.reshape(b, -1).bool()
    predicted = flat > flat.mean(-1, keepdim=True)
    accuracy = (predicted == truth).double().mean(-1)

    def iou(p, t):
        union = (p | t).double().sum(-1)
        return torch.where(union == 0, torch.ones_like(union), (p & t).double().sum(-1) / union.clamp(min=1))

    miou = (iou(predicted, truth) + iou(~predicted, ~truth)) / 2
    ap = torch.stack([average_precision(flat[i], truth[i]) for i in range(b)])
    return {"pixel_accuracy": accuracy, "miou": miou, "ap": ap}


def overlay_figure(image: Tensor, maps: Dict[str, Tensor], mean: float = 0.5, std: float = 0.5,
                   title: str = "", opacity: float = 0.55):
    """The image and each map ``[H, W]`` laid over it (diverging colours centred at 0), side by side."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rgb = (image.detach().double().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0) * 255
    names = list(maps)
    fig = make_subplots(rows=1, cols=len(names) + 1, subplot_titles=["image"] + names,
                        horizontal_spacing=0.02)
    fig.add_trace(go.Image(z=rgb.tolist()), row=1, col=1)
    for i, name in enumerate(names, start=2):
        m = maps[name].detach().double().cpu()
        bound = float(m.abs().max()) or 1.0
        fig.add_trace(go.Image(z=rgb.tolist(), opacity=1.0), row=1, col=i)
        fig.add_trace(go.Heatmap(z=m.tolist(), zmin=-bound, zmax=bound, colorscale="RdBu_r", opacity=opacity,
                                 showscale=False, hovertemplate=f"{name}<br>x %{{x}}, y %{{y}}: %{{z:.3g}}<extra></extra>"),
                      row=1, col=i)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(title=title, height=320, width=260 * (len(names) + 1), margin=dict(l=10, r=10, t=60, b=10))
    return fig
