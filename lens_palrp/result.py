"""``Attribution``: everything one relevance sweep produces, and the ways to aggregate it."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from lens_palrp.records import Records

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


# ------------------------------------------------------------------------------------ field table
# Every field of ``Attribution`` and of its internal ``Reductions`` declares here, beside its type,
# what kind of value it holds and its shape in the symbols below. The engine's finiteness check,
# the file format (io.py), ``to``, ``attr[i]`` and the tests read this table; nothing spells the
# field list out a second time.
TENSOR = "tensor"          # a public tensor; an Optional one may be None
RECORDS = "records"        # a Records (dict of [batch, ...] tensors by hook name)
VALUE = "value"            # plain Python data (JSON in a file); per example when its shape is (batch,)
FILE = "file"              # what ``load`` read from a file's header (format and package versions)
REDUCTIONS = "reductions"  # the internal Reductions of combined() and conservation()
REDUCTION = "reduction"    # one tensor of Reductions

SYMBOLS = ("batch", "pos", "layers", "layers+1", "heads", "height", "width", "...")


@dataclass(frozen=True)
class FieldSpec:
    """One row of the field table: ``shape`` in ``SYMBOLS`` (``()``: no batch dimension, the value
    is shared by the examples; ``"..."``: any trailing dimensions); ``finite``: the engine refuses
    a result where this tensor holds NaN or inf; ``required``: it has no default."""

    name: str
    kind: str
    shape: Tuple[str, ...]
    finite: bool = False
    required: bool = True  # the constructor needs it (no default)

    @property
    def per_example(self) -> bool:
        """Its first dimension is the batch: ``attr[i]`` indexes it."""
        return self.shape[:1] == ("batch",)

    def expected_shape(self, sizes: Dict[str, int]) -> Optional[Tuple[int, ...]]:
        """The full shape from the sizes of the symbols, None where it has free dimensions or a
        symbol has no size (``height`` and ``width`` without the vision facts)."""
        if self.kind not in (TENSOR, REDUCTION) or not all(s in sizes for s in self.shape):
            return None
        return tuple(sizes[s] for s in self.shape)


def _spec(kind: str, shape: str = "", finite: bool = False, **kwargs):
    """A dataclass field carrying its row of the field table (read by ``_table``)."""
    return field(metadata={"lens_palrp": (kind, tuple(shape.split()), finite)}, **kwargs)


def _table(cls) -> Tuple[FieldSpec, ...]:
    out = []
    for f in fields(cls):
        kind, shape, finite = f.metadata["lens_palrp"]
        assert all(s in SYMBOLS for s in shape), (f.name, shape)
        assert kind not in (TENSOR, RECORDS, REDUCTION) or shape[:1] == ("batch",), (f.name, shape)
        required = f.default is MISSING and f.default_factory is MISSING
        out.append(FieldSpec(f.name, kind, shape, finite, required))
    return tuple(out)


def shape_sizes(batch: int, pos: int, layers: int, heads: int, image_size=None) -> Dict[str, int]:
    """The size of every shape symbol (``image_size``: ``[height, width]`` of a vision model)."""
    sizes = {"batch": batch, "pos": pos, "layers": layers, "layers+1": layers + 1, "heads": heads}
    if image_size is not None:
        sizes["height"], sizes["width"] = int(image_size[0]), int(image_size[1])
    return sizes


def _batch_slice(index, batch: int) -> slice:
    """``attr[index]``'s rows as a slice: an int keeps its example as a batch of one."""
    if isinstance(index, slice):
        return index
    if isinstance(index, bool) or not isinstance(index, int):
        if not (isinstance(index, Tensor) and index.numel() == 1 and not index.dtype.is_floating_point):
            raise TypeError(f"an Attribution is indexed by an int or a slice of its examples, got {index!r}")
    i = check_index(index, batch)
    return slice(i, i + 1)


@dataclass
class Reductions:
    """Internal: the per-sink reductions ``combined()`` and ``conservation()`` read, which the
    public fields (sums over channels, heads or layers) no longer hold. Not part of the API: the
    engine fills them, ``save``/``load`` keep them, ``attr[i]`` and ``to`` carry them along.

    ``semantic_positive`` / ``positional_input_positive``: the positive parts of every channel of
    the token and the input-PE sinks, summed over channels (Eq. 11's "relu"); per layer,
    ``positional_layer_positive`` and ``positional_layer_abs`` the same for the attention-level
    positional tables (relu of each channel, and the authors' abs of each table's channel sum);
    ``softmax_absorbed_per_layer`` what the softmax rules absorbed (``router_absorbed_per_layer``:
    those of mixture-of-experts routers); ``positional_leak_per_layer``
    and ``positional_leak_input`` the positional relevance of a method without PE rules.
    """

    semantic_positive: Tensor = _spec(REDUCTION, "batch pos")
    positional_input_positive: Tensor = _spec(REDUCTION, "batch pos")
    positional_layer_positive: Tensor = _spec(REDUCTION, "batch layers pos")
    positional_layer_abs: Tensor = _spec(REDUCTION, "batch layers pos")
    softmax_absorbed_per_layer: Tensor = _spec(REDUCTION, "batch layers")
    positional_leak_per_layer: Tensor = _spec(REDUCTION, "batch layers")
    positional_leak_input: Tensor = _spec(REDUCTION, "batch")
    router_absorbed_per_layer: Tensor = _spec(REDUCTION, "batch layers")

    def __setattr__(self, name, value):
        super().__setattr__(name, _detached(value))

    def _map(self, fn) -> "Reductions":
        return Reductions(**{s.name: fn(getattr(self, s.name)) for s in REDUCTION_FIELDS})

    def to(self, device) -> "Reductions":
        return self._map(lambda t: t.to(device))

    def select(self, rows: slice) -> "Reductions":
        return self._map(lambda t: t[rows])


REDUCTION_FIELDS: Tuple[FieldSpec, ...] = _table(Reductions)


@dataclass
class Conservation:
    """Where the explained value went, per example (``[batch]``) and per layer (``[batch, layers]``).

    ``semantic + positional_input + positional + token_type + positional_leak + softmax_absorbed
    + router_absorbed + other_absorbed == target_value`` holds by construction (``token_type``: BERT's segment
    embedding sink, 0 elsewhere). ``positional_leak`` is the relevance
    that flows into additive positional encodings (input PE, shortformer, ALiBi) under a method
    without PE rules: measured, but absent from its maps (PA-LRP turns it into sinks; RoPE under
    AttnLRP does not leak, the rotation passes all relevance to q and k). ``softmax_absorbed`` is
    measured at every softmax, ``router_absorbed`` at the softmax of every mixture-of-experts
    router (0 without experts, and where the routing weights are held constant), so ``other_absorbed`` is what the remaining rules absorbed: biases
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
    router_absorbed: Tensor
    router_absorbed_per_layer: Tensor
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
            "softmax_absorbed", "router_absorbed", "other_absorbed",
        ):
            out[name] = float(getattr(self, name)[index])
        out["positional_per_layer"] = self.positional_per_layer[index].tolist()
        out["softmax_absorbed_per_layer"] = self.softmax_absorbed_per_layer[index].tolist()
        out["router_absorbed_per_layer"] = self.router_absorbed_per_layer[index].tolist()
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
        if float(self.router_absorbed.abs().max()) > 0:
            lines.append(row("absorbed by expert routers", self.router_absorbed[b]))
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

    ``hooks`` and ``gradients`` are ``Records``: dicts by hook name that also take TransformerLens'
    ``(name, layer)`` shorthand (``attr.hooks["pattern", 0]``, ``attr.hooks["rot_k", -1]``).
    ``attr[i]`` is example ``i`` as a batch of one (``attr[1:3]`` a sub-batch), every field cut
    alike. Each field's kind and shape is declared with it (``FIELDS`` lists them); ``_reductions``
    is internal (see ``Reductions``).
    """

    semantic: Tensor = _spec(TENSOR, "batch pos", finite=True)
    positional: Tensor = _spec(TENSOR, "batch layers heads pos", finite=True)
    positional_input: Tensor = _spec(TENSOR, "batch pos", finite=True)
    heads: Tensor = _spec(TENSOR, "batch layers heads")
    heads_by_pos: Tensor = _spec(TENSOR, "batch layers heads pos", finite=True)
    mlp: Tensor = _spec(TENSOR, "batch layers pos", finite=True)
    residual: Tensor = _spec(TENSOR, "batch layers+1 pos", finite=True)
    target_value: Tensor = _spec(TENSOR, "batch")
    tokens: Tensor = _spec(TENSOR, "batch pos")
    str_tokens: List[List[str]] = _spec(VALUE, "batch")
    method: str = _spec(VALUE)
    attention_mask: Tensor = _spec(TENSOR, "batch pos")
    target_position: Tensor = _spec(TENSOR, "batch")
    # relevance (and, with explain(record_gradients=...), gradients) at hook points, by hook name
    hooks: Records = _spec(RECORDS, "batch ...", default_factory=dict)
    gradients: Records = _spec(RECORDS, "batch ...", default_factory=dict)
    # BERT-style token-type (segment) embedding: a third input sink, neither token nor position
    token_type: Optional[Tensor] = _spec(TENSOR, "batch pos", finite=True, default=None)
    model_name: str = _spec(VALUE, default="")
    # for reports: each prompt as the tokenizer decodes it, and what was explained, in words
    prompt_text: Optional[List[str]] = _spec(VALUE, "batch", default=None)
    target_label: Optional[List[str]] = _spec(VALUE, "batch", default=None)
    # how the sweep ran: {"attention": "fused" | "eager" | "mixed", "eager_reason": str | None,
    # "eager_layers": [int], "checkpoint": bool, "logits": str}
    computation: Optional[Dict[str, object]] = _spec(VALUE, default=None)
    metadata: Dict[str, object] = _spec(FILE, default_factory=dict)  # versions etc. of a loaded file
    # vision transformers: pixel relevance [batch, H, W] (patch rule on the patch embedding) and
    # the grid facts {"grid", "patch_size", "n_prefix", "image_size", "patch_rule", "gamma"}
    pixels: Optional[Tensor] = _spec(TENSOR, "batch height width", default=None)
    vision: Optional[Dict[str, object]] = _spec(VALUE, default=None)
    # internal: what combined() and conservation() read besides the public fields (see Reductions)
    _reductions: Optional[Reductions] = _spec(REDUCTIONS, default=None)

    def __setattr__(self, name, value):
        # every tensor is detached as it is stored (by __init__ and by later assignments such as
        # the engine's attr.pixels = ...), so no Attribution ever holds an autograd graph
        value = _detached(value)
        if name in ("hooks", "gradients") and (value is None or isinstance(value, dict)):
            positional = self.__dict__.get("positional")
            n_layers = int(positional.shape[1]) if isinstance(positional, Tensor) and positional.ndim == 4 else None
            value = Records(value, n_layers=n_layers, what="relevance" if name == "hooks" else "gradient")
        super().__setattr__(name, value)

    @property
    def batch_size(self) -> int:
        return self.semantic.shape[0]

    @property
    def positional_per_layer(self) -> Tensor:
        """``[batch, layers, pos]``: attention-level positional relevance summed over heads."""
        return self.positional.sum(2)

    @property
    def positional_per_position(self) -> Tensor:
        """``[batch, pos]``: each position's positional relevance, input level plus attention level
        summed over layers and heads, signed (``combined("signed", "positional")``)."""
        return self.positional_input + self.positional.sum((1, 2))

    def combined(
        self,
        aggregation: str = "relu",
        parts: str = "all",
        normalize: Optional[bool] = None,
    ) -> Tensor:
        """The multi-sink PA-LRP map ``[batch, pos]`` (docs/rules.md, "The combined map").

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
            r = self._require_reductions("combined('relu')")
            if use_sem:
                out = out + r.semantic_positive
            if use_pos:
                out = out + r.positional_input_positive + r.positional_layer_positive.sum(1)
        elif aggregation == "abs":
            r = self._require_reductions("combined('abs')")
            if use_sem:
                out = out + self.semantic
            if use_pos:
                out = out + self.positional_input.abs() + r.positional_layer_abs.sum(1)
        else:
            if use_sem:
                out = out + self.semantic
            if use_pos:
                out = out + self.positional_per_position
        if normalize is None:
            normalize = aggregation == "abs"
        if normalize:
            scale = out.abs().amax(dim=-1, keepdim=True)
            out = out / torch.where(scale == 0, torch.ones_like(scale), scale)
        return out

    def _require_reductions(self, what: str) -> Reductions:
        if self._reductions is None:
            raise ValueError(f"{what} needs the internal reductions that lp.explain and Attribution.load "
                             "provide; this Attribution was built without them (_reductions=None)")
        return self._reductions

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
        r = self._require_reductions("conservation()")
        semantic = self.semantic.sum(-1)
        positional_input = self.positional_input.sum(-1)
        per_layer = self.positional.sum((2, 3))
        positional = per_layer.sum(-1)
        softmax_layers = r.softmax_absorbed_per_layer
        softmax = softmax_layers.sum(-1)
        leak_layers = r.positional_leak_per_layer
        leak = leak_layers.sum(-1) + r.positional_leak_input
        router_layers = r.router_absorbed_per_layer
        router = router_layers.sum(-1)
        token_type = self.token_type.sum(-1) if self.token_type is not None else torch.zeros_like(semantic)
        other = self.target_value - semantic - positional_input - positional - token_type - leak - softmax - router
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
            router_absorbed=router,
            router_absorbed_per_layer=router_layers,
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
            scores = self.positional_per_position[index]
        elif which == "combined":
            scores = self.combined()[index]
        else:
            raise ValueError(f"which must be 'semantic', 'positional' or 'combined', got {which!r}")
        n = int(self.attention_mask[index].sum())
        k = min(k, n)
        values, positions = scores[:n].topk(k)
        toks = self.str_tokens[index]
        return [(int(p), toks[int(p)], float(v)) for v, p in zip(values, positions)]

    def report(self, path: str, index: int = 0, title: Optional[str] = None, plotlyjs: str = "inline") -> str:
        """One HTML page with every view of example ``index`` (what was explained, token maps,
        per-head positional and semantic heatmaps, per-layer shares, residual stream,
        conservation). ``plotlyjs="inline"`` makes it standalone (works offline); ``"beside"``
        writes ``plotly.min.js`` once next to it and keeps the page small."""
        from lens_palrp.analyses.plots import write_report

        return write_report(self, path, check_index(index, self.batch_size), title, plotlyjs=plotlyjs)

    def _repr_html_(self) -> str:
        """The notebook view: the first few examples' tokens coloured by semantic, positional and
        combined relevance (numbers on hover) and their conservation tables; plain HTML."""
        from lens_palrp.html_view import notebook_view

        return notebook_view(self)

    def to_frame(self, kind: str = "tokens", aggregation: str = "relu"):
        """A tidy ``pandas.DataFrame`` (one row per observation) of the whole batch, padding left out.

        ``"tokens"``: example x position, with ``token``, ``semantic``, ``positional`` (input PE
        plus attention level), ``combined`` (``combined(aggregation)``) and ``explained`` (the
        target's position). ``"heads"``: example x layer x head, with ``relevance`` (what the head
        writes into the residual stream, ``heads``) and ``positional`` (its positional sink,
        summed over positions). ``"layers"``: example x layer, with ``positional_sink``,
        ``residual_in`` (relevance of the residual stream entering the layer) and ``mlp``.
        """
        import pandas as pd

        kinds = ("tokens", "heads", "layers")
        if kind not in kinds:
            raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
        if kind == "tokens":
            if aggregation != "signed":
                self._require_reductions(f"to_frame('tokens', aggregation={aggregation!r})")
            b, p = self.attention_mask.cpu().nonzero(as_tuple=True)  # real positions, example-major
            positional = self.positional_per_position.cpu()
            return pd.DataFrame({
                "example": b.numpy(), "position": p.numpy(),
                "token": [self.str_tokens[i][j] for i, j in zip(b.tolist(), p.tolist())],
                "semantic": self.semantic.cpu()[b, p].double().numpy(),
                "positional": positional[b, p].double().numpy(),
                "combined": self.combined(aggregation).cpu()[b, p].double().numpy(),
                "explained": (p == self.target_position.cpu()[b]).numpy(),
            })
        batch, layers, heads, _ = self.positional.shape
        if kind == "heads":
            b, l, h = (g.reshape(-1) for g in torch.meshgrid(
                torch.arange(batch), torch.arange(layers), torch.arange(heads), indexing="ij"))
            return pd.DataFrame({
                "example": b.numpy(), "layer": l.numpy(), "head": h.numpy(),
                "relevance": self.heads.cpu()[b, l, h].double().numpy(),
                "positional": self.positional.sum(-1).cpu()[b, l, h].double().numpy(),
            })
        b, l = (g.reshape(-1) for g in torch.meshgrid(torch.arange(batch), torch.arange(layers), indexing="ij"))
        return pd.DataFrame({
            "example": b.numpy(), "layer": l.numpy(),
            "positional_sink": self.positional.sum((2, 3)).cpu()[b, l].double().numpy(),
            "residual_in": self.residual.sum(-1).cpu()[b, l].double().numpy(),
            "mlp": self.mlp.sum(-1).cpu()[b, l].double().numpy(),
        })

    def save(self, path: str, model_config=None) -> str:
        """Write one safetensors file at ``path`` (save format 2) and return ``path``.

        The tensors are named ``field.<name>``, ``hook.<hook>``, ``grad.<hook>`` and
        ``reduction.<name>``; the rest (method, tokens' strings, model name, vision facts, the
        format and package versions and ``model_config``'s fields when given) is JSON in the file's
        header under the key ``"lens_palrp"``. docs/results.md describes the format."""
        from lens_palrp.io import save_attribution

        return save_attribution(self, path, model_config)

    @classmethod
    def load(cls, path: str) -> "Attribution":
        """Read a file ``save`` wrote: format 2 (one file), or format 1 (``path`` and the metadata
        beside it in ``path + '.json'``). A file from a newer format raises ``ValueError``; so do a
        corrupt file and tensors whose shapes disagree (naming the field); a missing file raises
        ``FileNotFoundError``. ``attr.metadata`` is the file's header (versions, model config)."""
        from lens_palrp.io import load_attribution

        return load_attribution(path)

    def _map(self, tensor, records, reductions, per_example) -> "Attribution":
        """A copy with every field transformed by kind, as the field table declares it."""
        out = {}
        for spec in FIELDS:
            value = getattr(self, spec.name)
            if value is None:
                out[spec.name] = None
            elif spec.kind == TENSOR:
                out[spec.name] = tensor(value)
            elif spec.kind == RECORDS:
                out[spec.name] = records(value) if isinstance(value, Records) else value
            elif spec.kind == REDUCTIONS:
                out[spec.name] = reductions(value)
            elif spec.per_example:
                out[spec.name] = per_example(value)
            else:
                out[spec.name] = value
        return Attribution(**out)

    def to(self, device) -> "Attribution":
        """A copy with every tensor (records and internal reductions too) moved to ``device``."""
        return self._map(lambda t: t.to(device), lambda r: r.to(device), lambda r: r.to(device), lambda v: v)

    def __getitem__(self, index: Union[int, slice]) -> "Attribution":
        """Example ``index`` as an ``Attribution`` of batch one (the batch dimension is kept), or
        the examples of a slice: every per-example field is cut alike, tensors as views."""
        rows = _batch_slice(index, self.batch_size)
        return self._map(lambda t: t[rows], lambda r: r.select(rows), lambda r: r.select(rows),
                         lambda v: v[rows])

    def __repr__(self) -> str:
        b, layers, heads, pos = self.positional.shape
        return (
            f"Attribution(method={self.method!r}, batch={b}, pos={pos}, layers={layers}, "
            f"heads={heads}, target_value={[round(float(v), 4) for v in self.target_value]})"
        )


FIELDS: Tuple[FieldSpec, ...] = _table(Attribution)
FIELDS_BY_NAME: Dict[str, FieldSpec] = {s.name: s for s in FIELDS}


def check_finite(attr: Attribution, describe: Optional[Callable[[str], str]] = None) -> None:
    """Refuse (``FloatingPointError``, naming the field) a result where a relevance the table
    marks ``finite`` holds NaN or inf; ``describe(what)`` words the message (the engine's says
    which dtype the model ran in)."""
    for spec in FIELDS:
        value = getattr(attr, spec.name)
        if spec.finite and value is not None and not bool(torch.isfinite(value).all()):
            what = f"the relevance '{spec.name}'"
            raise FloatingPointError(
                describe(what) if describe else f"{what} contains NaN or inf; check the model's weights and inputs"
            )
