"""``Attribution``: everything one relevance sweep produces, and the ways to aggregate it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor

AGGREGATIONS = ("relu", "abs", "signed")
PARTS = ("all", "semantic", "positional")


def check_index(index, batch: int, what: str = "index") -> int:
    """``index`` as a non-negative example number, or an ``IndexError`` that names the valid range
    (torch's own message names neither the argument nor the batch)."""
    if isinstance(index, bool) or not isinstance(index, int):
        if isinstance(index, Tensor) and index.numel() == 1 and not index.dtype.is_floating_point:
            index = int(index)
        else:
            raise TypeError(f"{what} must be an int (an example of the batch), got {index!r}")
    if batch == 0:
        raise IndexError(f"{what} {index}: the batch is empty")
    if not -batch <= index < batch:
        raise IndexError(
            f"{what} {index} is out of range for a batch of {batch} example{'s' if batch != 1 else ''} "
            f"(valid: 0..{batch - 1}, or -{batch}..-1 from the end)"
        )
    return index % batch


def _detached(value):
    """A tensor, or a dict of them, cut from any autograd graph: a result that keeps the graph
    holds the model's activations alive and refuses ``.numpy()``."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict) and any(isinstance(v, Tensor) for v in value.values()):
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in value.items()}
    return value


@dataclass
class Conservation:
    """Where the explained value went, per example (``[batch]``) and per layer (``[batch, layers]``).

    ``semantic + positional_input + positional + token_type + positional_leak + softmax_absorbed
    + other_absorbed == target_value`` holds by construction (``token_type``: BERT's segment
    embedding sink, 0 elsewhere). ``positional_leak`` is the relevance
    that flows into additive positional encodings (input PE, shortformer, ALiBi) under a method
    without PE rules: measured, but absent from its maps (PA-LRP turns it into sinks; RoPE under
    AttnLRP does not leak, the rotation passes all relevance to q and k). ``softmax_absorbed`` is
    measured at every softmax, so ``other_absorbed`` is what the remaining rules absorbed: biases
    (and, for plain gradient x input, the non-conservative gradients of non-linearities). On a
    bias-free model under an LRP method it is zero up to rounding.
    """

    target_value: Tensor
    semantic: Tensor
    positional_input: Tensor
    positional: Tensor
    positional_per_layer: Tensor
    token_type: Tensor
    positional_leak: Tensor
    positional_leak_per_layer: Tensor
    softmax_absorbed: Tensor
    softmax_absorbed_per_layer: Tensor
    other_absorbed: Tensor
    absorbed_per_layer: Tensor

    @property
    def positional_share(self) -> Tensor:
        """Positional relevance (input + attention level) over all explained relevance, signed."""
        pos = self.positional_input + self.positional
        return pos / (self.semantic + pos)

    def as_dict(self, index: int = 0) -> Dict[str, object]:
        """The numbers of example ``index`` as plain Python values."""
        index = check_index(index, self.target_value.shape[0])
        out: Dict[str, object] = {}
        for name in (
            "target_value", "semantic", "positional_input", "positional", "token_type", "positional_leak",
            "softmax_absorbed", "other_absorbed",
        ):
            out[name] = float(getattr(self, name)[index])
        out["positional_per_layer"] = self.positional_per_layer[index].tolist()
        out["softmax_absorbed_per_layer"] = self.softmax_absorbed_per_layer[index].tolist()
        out["absorbed_per_layer"] = self.absorbed_per_layer[index].tolist()
        return out

    def format(self, index: int = 0) -> str:
        """A printable table of one example."""
        b = check_index(index, self.target_value.shape[0])
        t = float(self.target_value[b])

        def row(label, value):
            v = float(value)
            share = f"{100 * v / t:9.2f}%" if t != 0 else ""
            return f"  {label:<32}{v:>12.6g}{share}"

        lines = [f"example {b}:"]
        lines.append(row("target value", self.target_value[b]))
        lines.append(row("semantic (token embeddings)", self.semantic[b]))
        lines.append(row("positional, input PE", self.positional_input[b]))
        lines.append(row("positional, attention level", self.positional[b]))
        if float(self.token_type.abs().max()) > 0:
            lines.append(row("token-type embedding", self.token_type[b]))
        lines.append(row("positional leak (no PE rule)", self.positional_leak[b]))
        lines.append(row("absorbed by softmax rules", self.softmax_absorbed[b]))
        lines.append(row("absorbed by biases / other", self.other_absorbed[b]))
        per_layer = ", ".join(f"{v:.3g}" for v in self.positional_per_layer[b].tolist())
        lines.append(f"  positional per layer: [{per_layer}]")
        return "\n".join(lines)

    def __str__(self) -> str:
        return "\n".join(self.format(b) for b in range(self.target_value.shape[0]))


@dataclass
class Attribution:
    """Relevance of one explained scalar per example. All tensors are ``[batch, ...]``.

    ``semantic`` and ``positional_input`` are summed over ``d_model``; ``positional`` is the
    attention-level positional sink per layer, head and position; ``heads`` / ``heads_by_pos`` the
    relevance each head writes into the residual stream (through ``W_O``, without ``b_O``);
    ``mlp`` the relevance of each layer's MLP neurons (without ``b_out``); ``residual`` the
    relevance of the residual stream entering each layer, and the final one.
    Padded positions (``attention_mask == 0``) hold zeros.
    """

    semantic: Tensor
    positional: Tensor
    positional_input: Tensor
    heads: Tensor
    heads_by_pos: Tensor
    mlp: Tensor
    residual: Tensor
    target_value: Tensor
    tokens: Tensor
    str_tokens: List[List[str]]
    method: str
    attention_mask: Tensor
    target_position: Tensor
    hooks: Dict[str, Tensor] = field(default_factory=dict)
    gradients: Dict[str, Tensor] = field(default_factory=dict)  # explain(record_gradients=...)
    # BERT-style token-type (segment) embedding: a third input sink, neither token nor position
    token_type: Optional[Tensor] = None
    # per-sink reductions needed by combined(): positive part and "abs" (authors' code) variants
    semantic_positive: Optional[Tensor] = None
    positional_input_positive: Optional[Tensor] = None
    positional_layer_positive: Optional[Tensor] = None
    positional_layer_abs: Optional[Tensor] = None
    softmax_absorbed_per_layer: Optional[Tensor] = None
    positional_leak_per_layer: Optional[Tensor] = None
    positional_leak_input: Optional[Tensor] = None
    model_name: str = ""
    metadata: Dict[str, object] = field(default_factory=dict)  # versions etc. of a loaded file
    # vision transformers: pixel relevance [batch, H, W] (patch rule on the patch embedding) and
    # the grid facts {"grid", "patch_size", "n_prefix", "image_size", "patch_rule", "gamma"}
    pixels: Optional[Tensor] = None
    vision: Optional[Dict[str, object]] = None

    def __setattr__(self, name, value):
        # every tensor is detached as it is stored (by __init__ and by later assignments such as
        # the engine's attr.pixels = ...), so no Attribution ever holds an autograd graph
        super().__setattr__(name, _detached(value))

    @property
    def batch_size(self) -> int:
        return self.semantic.shape[0]

    @property
    def positional_per_layer(self) -> Tensor:
        """``[batch, layers, pos]``: attention-level positional relevance summed over heads."""
        return self.positional.sum(2)

    def combined(
        self,
        aggregation: str = "relu",
        parts: str = "all",
        normalize: Optional[bool] = None,
    ) -> Tensor:
        """The multi-sink PA-LRP map ``[batch, pos]`` (REFERENCE.md section 2).

        ``aggregation="relu"`` is the paper's Eq. 11: the positive parts of every channel of the
        token sink and of every layer's positional sink, summed. ``"abs"`` follows the authors'
        published code: the token sink summed signed, each positional table (per layer; for RoPE
        the cos and the sin table separately) summed over channels and taken in absolute value,
        then the map divided by its max-abs (``normalize`` overrides that last step).
        ``"signed"`` adds the signed sums. ``parts="positional"`` is the paper's PE-only map.
        """
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if parts not in PARTS:
            raise ValueError(f"parts must be one of {PARTS}, got {parts!r}")
        use_sem = parts in ("all", "semantic")
        use_pos = parts in ("all", "positional")
        out = torch.zeros_like(self.semantic)
        if aggregation == "relu":
            if use_sem:
                out = out + self.semantic_positive
            if use_pos:
                out = out + self.positional_input_positive + self.positional_layer_positive.sum(1)
        elif aggregation == "abs":
            if use_sem:
                out = out + self.semantic
            if use_pos:
                out = out + self.positional_input.abs() + self.positional_layer_abs.sum(1)
        else:
            if use_sem:
                out = out + self.semantic
            if use_pos:
                out = out + self.positional_input + self.positional.sum((1, 2))
        if normalize is None:
            normalize = aggregation == "abs"
        if normalize:
            scale = out.abs().amax(dim=-1, keepdim=True)
            out = out / torch.where(scale == 0, torch.ones_like(scale), scale)
        return out

    # ------------------------------------------------------------------ vision
    def _require_vision(self) -> Dict[str, object]:
        if self.vision is None:
            raise ValueError("patch and pixel maps exist for vision transformers (HookedViT) only")
        return self.vision

    def patch_map(self, which: str = "combined", aggregation: str = "relu") -> Tensor:
        """``[batch, grid_h, grid_w]`` map over the patches, [CLS] / [DIST] left out (as the paper).

        ``which``: ``"semantic"`` (the patch embeddings' relevance), ``"positional"`` (the
        position embedding's, plus any attention-level positional sink) or ``"combined"``
        (``combined(aggregation)``, the PA-LRP map; ``"pe_only"`` its positional part).
        """
        v = self._require_vision()
        if which == "semantic":
            per_pos = self.semantic
        elif which == "positional":
            per_pos = self.combined("signed", parts="positional")
        elif which == "combined":
            per_pos = self.combined(aggregation)
        elif which == "pe_only":
            per_pos = self.combined(aggregation, parts="positional")
        else:
            raise ValueError(f"which must be semantic, positional, combined or pe_only, got {which!r}")
        gh, gw = v["grid"]
        return per_pos[:, int(v["n_prefix"]):].reshape(self.batch_size, gh, gw)

    def pixel_map(self, which: str = "combined", aggregation: str = "relu", mode: str = "bilinear") -> Tensor:
        """``[batch, H, W]`` map over the image's pixels.

        ``which="pixels"`` is the patch rule's own pixel relevance (``attr.pixels``: gamma or
        epsilon on the patch embedding, conservative up to its bias share). Any ``patch_map``
        (``which`` as there) is upsampled with ``mode`` (``"bilinear"``, or ``"nearest"`` to keep
        the patches' blocks; nearest spreads each patch's value over its pixels unnormalized).
        """
        v = self._require_vision()
        if which == "pixels":
            if self.pixels is None:
                raise ValueError("no pixel relevance: the model's patch-embedding weights are unknown")
            return self.pixels
        grid = self.patch_map(which, aggregation)[:, None]
        size = tuple(int(s) for s in v["image_size"])
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        return torch.nn.functional.interpolate(grid, size=size, mode=mode, **kwargs)[:, 0]

    def conservation(self) -> Conservation:
        """Target value, totals of every sink, and what the rules absorbed, as numbers."""
        semantic = self.semantic.sum(-1)
        positional_input = self.positional_input.sum(-1)
        per_layer = self.positional.sum((2, 3))
        positional = per_layer.sum(-1)
        softmax_layers = self.softmax_absorbed_per_layer
        softmax = softmax_layers.sum(-1)
        leak_layers = self.positional_leak_per_layer
        leak = leak_layers.sum(-1) + self.positional_leak_input
        token_type = self.token_type.sum(-1) if self.token_type is not None else torch.zeros_like(semantic)
        other = self.target_value - semantic - positional_input - positional - token_type - leak - softmax
        resid = self.residual.sum(-1)
        absorbed_layers = resid[:, 1:] - resid[:, :-1] - per_layer
        return Conservation(
            target_value=self.target_value,
            semantic=semantic,
            positional_input=positional_input,
            positional=positional,
            positional_per_layer=per_layer,
            token_type=token_type,
            positional_leak=leak,
            positional_leak_per_layer=leak_layers,
            softmax_absorbed=softmax,
            softmax_absorbed_per_layer=softmax_layers,
            other_absorbed=other,
            absorbed_per_layer=absorbed_layers,
        )

    def top_tokens(self, index: int = 0, k: int = 5, which: str = "semantic"):
        """The ``k`` most relevant ``(position, token, value)`` of one example.

        ``which`` is ``"semantic"``, ``"positional"`` (input + attention level, signed) or
        ``"combined"`` (the default ``combined()`` map).
        """
        index = check_index(index, self.batch_size)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0 (how many tokens to list), got {k!r}")
        if which == "semantic":
            scores = self.semantic[index]
        elif which == "positional":
            scores = self.positional_input[index] + self.positional[index].sum((0, 1))
        elif which == "combined":
            scores = self.combined()[index]
        else:
            raise ValueError(f"which must be 'semantic', 'positional' or 'combined', got {which!r}")
        n = int(self.attention_mask[index].sum())
        k = min(k, n)
        values, positions = scores[:n].topk(k)
        toks = self.str_tokens[index]
        return [(int(p), toks[int(p)], float(v)) for v, p in zip(values, positions)]

    def report(self, path: str, index: int = 0, title: Optional[str] = None) -> str:
        """One standalone HTML page with every view of example ``index`` (token maps, per-head
        positional and semantic heatmaps, per-layer shares, residual stream, conservation)."""
        from lens_palrp.analyses.plots import write_report

        return write_report(self, path, check_index(index, self.batch_size), title)

    def save(self, path: str, model_config=None) -> str:
        """Tensors to ``path`` (safetensors), metadata (method, tokens and their strings, model
        name and config, format and package versions) to ``path + '.json'``."""
        from lens_palrp.io import save_attribution

        return save_attribution(self, path, model_config)

    @classmethod
    def load(cls, path: str) -> "Attribution":
        """Read what ``save`` wrote; a file from a newer format version raises ``ValueError``."""
        from lens_palrp.io import load_attribution

        return load_attribution(path)

    def to(self, device) -> "Attribution":
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for name, value in self.__dict__.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
            elif name in ("hooks", "gradients"):
                moved[name] = {k: v.to(device) for k, v in value.items()}
            else:
                moved[name] = value
        return Attribution(**moved)

    def __repr__(self) -> str:
        b, layers, heads, pos = self.positional.shape
        return (
            f"Attribution(method={self.method!r}, batch={b}, pos={pos}, layers={layers}, "
            f"heads={heads}, target_value={[round(float(v), 4) for v in self.target_value]})"
        )
