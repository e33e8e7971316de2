"""``HookedViT``: a vision transformer on TransformerLens' ``HookedRootModule`` / ``HookPoint``, and
the family that tells the engine which of its hooks gets which rule.

TransformerLens has no vision model (vit-prisma's needs a CUDA torchvision to import), so this
module provides one with the TransformerLens hook names: ``hook_embed`` holds the token embeddings
of every position (the [CLS] and, for distilled DeiT, [DIST] tokens followed by the patch
embeddings), ``hook_pos_embed`` the learned position embedding, ``blocks.N.*`` exactly as in
``HookedTransformer`` (LayerNorm ``hook_scale``, ``attn.hook_q/k/v/attn_scores/pattern/z``,
``mlp.hook_pre/post``, residual hooks), then ``ln_final`` and the classification head on [CLS]
(averaged with the distillation head on [DIST] for distilled DeiT). Because the block layout is
HookedTransformer's, the family reuses its rule map unchanged; what is vision-specific is the
input (images), the patch grid and the rule at the patch embedding (pixels).

Weights load from a local transformers ViT / DeiT folder (``HookedViT.from_pretrained``) or from
a timm-style state dict (``HookedViT.from_timm_state_dict``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lens_palrp import rules
from lens_palrp.hooks.base import ModelFamily, PreparedInput
from lens_palrp.hooks.hooked_transformer import hooked_transformer_roles
from lens_palrp.load_args import DeviceLike, DtypeLike, as_device, as_dtype
from lens_palrp.roles import HookRole, Role

try:  # TransformerLens 4.x exports it at the top level; 3.x from hook_points
    from transformer_lens import HookedRootModule
except ImportError:  # pragma: no cover - 3.x layout
    from transformer_lens.hook_points import HookedRootModule  # type: ignore[no-redef]
from transformer_lens.hook_points import HookPoint

PATCH_RULES = ("gamma", "epsilon")


@dataclass
class ViTConfig:
    """Sizes of a ViT / DeiT classifier (square images and patches)."""

    image_size: int = 224
    patch_size: int = 16
    n_channels: int = 3
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_mlp: int = 3072
    n_classes: int = 1000
    distillation_token: bool = False  # DeiT's [DIST] token after [CLS]
    distillation_head: bool = False  # logits = mean of the [CLS] and [DIST] heads (distilled DeiT)
    eps: float = 1e-12
    act_fn: str = "gelu"
    model_name: str = "vit"
    id2label: Dict[int, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.distillation_head and not self.distillation_token:
            raise ValueError("distillation_head needs distillation_token")
        if self.act_fn not in ("gelu", "gelu_new", "relu"):
            raise NotImplementedError(f"act_fn {self.act_fn!r}: HookedViT supports gelu, gelu_new, relu")
        self.id2label = {int(k): v for k, v in self.id2label.items()}

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_prefix(self) -> int:
        """Tokens before the patches: [CLS], and [DIST] for distilled DeiT."""
        return 2 if self.distillation_token else 1

    @property
    def n_ctx(self) -> int:
        return self.n_prefix + self.grid**2

    def to_dict(self) -> dict:
        return asdict(self)


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class LayerNorm(nn.Module):
    """TransformerLens' LayerNorm: the scale passes ``hook_scale`` (the LRP rule detaches it)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.w + self.b)


class Attention(nn.Module):
    """Bidirectional multi-head attention with TransformerLens' weight layout and hooks."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q, self.W_K, self.W_V = (nn.Parameter(torch.zeros(h, d, dh)) for _ in range(3))
        self.b_Q, self.b_K, self.b_V = (nn.Parameter(torch.zeros(h, dh)) for _ in range(3))
        self.W_O = nn.Parameter(torch.zeros(h, dh, d))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.attn_scale = math.sqrt(dh)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        q = self.hook_q(torch.einsum("bpd,hde->bphe", x, self.W_Q) + self.b_Q)
        k = self.hook_k(torch.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K)
        v = self.hook_v(torch.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V)
        scores = self.hook_attn_scores(torch.einsum("bqhe,bkhe->bhqk", q, k) / self.attn_scale)
        pattern = self.hook_pattern(scores.softmax(-1))
        z = self.hook_z(torch.einsum("bkhe,bhqk->bqhe", v, pattern))
        return torch.einsum("bqhe,hed->bqd", z, self.W_O) + self.b_O


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.zeros(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act_fn = _ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        return self.hook_post(self.act_fn(pre)) @ self.W_out + self.b_out


class Block(nn.Module):
    """Pre-norm block; hook names as ``HookedTransformer``'s ``TransformerBlock``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, resid: Tensor) -> Tensor:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid))))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


class HookedViT(HookedRootModule):
    """A ViT / DeiT image classifier with TransformerLens hook points.

    ``model(images)`` takes ``[batch, channels, height, width]`` float images (already normalized
    as the source model expects) and returns class logits ``[batch, n_classes]``.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.W_patch = nn.Parameter(torch.zeros(d, cfg.n_channels, cfg.patch_size, cfg.patch_size))
        self.b_patch = nn.Parameter(torch.zeros(d))
        self.cls_token = nn.Parameter(torch.zeros(d))
        self.dist_token = nn.Parameter(torch.zeros(d)) if cfg.distillation_token else None
        self.W_pos = nn.Parameter(torch.zeros(cfg.n_ctx, d))
        self.hook_patch_embed = HookPoint()  # the patch embeddings alone (observed)
        self.hook_embed = HookPoint()  # [CLS] ([DIST]) and patch embeddings: the semantic sink
        self.hook_pos_embed = HookPoint()  # learned position embedding: the positional sink
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = LayerNorm(d, cfg.eps)
        self.W_head = nn.Parameter(torch.zeros(d, cfg.n_classes))
        self.b_head = nn.Parameter(torch.zeros(cfg.n_classes))
        if cfg.distillation_head:
            self.W_head_dist = nn.Parameter(torch.zeros(d, cfg.n_classes))
            self.b_head_dist = nn.Parameter(torch.zeros(cfg.n_classes))
        self.setup()

    # ------------------------------------------------------------------ forward
    def patchify(self, images: Tensor) -> Tensor:
        """``[batch, patches, channels * patch * patch]`` in the patch-embedding weight's order."""
        return patchify(images, self.cfg.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        check_images(self.cfg, images, self.W_patch.dtype)
        b = images.shape[0]
        patches = F.conv2d(images, self.W_patch, self.b_patch, stride=self.cfg.patch_size)
        patches = self.hook_patch_embed(patches.flatten(2).transpose(1, 2))
        prefix_tokens: List[Tensor] = [self.cls_token]
        if self.dist_token is not None:
            prefix_tokens.append(self.dist_token)
        prefix = torch.stack(prefix_tokens)[None].expand(b, -1, -1)
        embed = self.hook_embed(torch.cat([prefix, patches], 1))
        pos = self.hook_pos_embed(self.W_pos[None].repeat(b, 1, 1))
        resid = embed + pos
        for block in self.blocks:
            resid = block(resid)
        resid = self.ln_final(resid)
        logits = resid[:, 0] @ self.W_head + self.b_head
        if self.cfg.distillation_head:
            logits = (logits + resid[:, 1] @ self.W_head_dist + self.b_head_dist) / 2
        return logits

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, local_dir: str, dtype: DtypeLike = torch.float32,
                        device: DeviceLike = "cpu") -> "HookedViT":
        """Load a local transformers ``ViTForImageClassification``, ``DeiTForImageClassification``
        (head on [CLS]) or ``DeiTForImageClassificationWithTeacher`` (mean of the [CLS] and [DIST]
        heads) folder. No network: the folder must exist. ``dtype`` (a ``torch.dtype`` or its name)
        and ``device`` (default ``"cpu"``) are checked before anything is read (``lens_palrp.load_args``)."""
        import os

        from transformers import AutoModelForImageClassification

        dtype, device = as_dtype(dtype), as_device(device)
        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"{local_dir!r} is not a folder (HookedViT loads local folders only)")
        hf = AutoModelForImageClassification.from_pretrained(local_dir, local_files_only=True)
        return cls.from_hf(hf, dtype=dtype, device=device)

    @classmethod
    def from_hf(cls, hf, dtype: DtypeLike = torch.float32, device: DeviceLike = "cpu") -> "HookedViT":
        """Convert an in-memory transformers ViT / DeiT image classifier into a ``HookedViT`` in
        ``dtype`` on ``device`` (wherever ``hf`` is)."""
        dtype, device = as_dtype(dtype), as_device(device)
        c = hf.config
        if c.model_type not in ("vit", "deit"):
            raise NotImplementedError(f"HookedViT converts ViT and DeiT classifiers, not model_type={c.model_type!r}")
        state = hf.state_dict()
        prefix = hf.base_model_prefix + "."
        distilled = prefix + "embeddings.distillation_token" in state
        two_heads = "distillation_classifier.weight" in state  # DeiTForImageClassificationWithTeacher
        image_size = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
        patch_size = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
        cfg = ViTConfig(image_size=image_size, patch_size=patch_size, n_channels=c.num_channels,
                        d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                        d_mlp=c.intermediate_size, n_classes=c.num_labels, distillation_token=distilled,
                        distillation_head=two_heads, eps=c.layer_norm_eps, act_fn=c.hidden_act,
                        model_name=getattr(c, "_name_or_path", "") or c.model_type, id2label=dict(c.id2label or {}))
        e = prefix + "embeddings."
        sd = {"W_patch": state[e + "patch_embeddings.projection.weight"],
              "b_patch": state[e + "patch_embeddings.projection.bias"],
              "cls_token": state[e + "cls_token"].reshape(-1),
              "W_pos": state[e + "position_embeddings"].reshape(cfg.n_ctx, -1)}
        if distilled:
            sd["dist_token"] = state[e + "distillation_token"].reshape(-1)
        for i in range(cfg.n_layers):
            layer = _hf_layer_keys(state, prefix, i)
            pair = lambda name: (state[layer[name] + ".weight"], state.get(layer[name] + ".bias"))  # noqa: E731
            _put_block(sd, i, cfg, q=pair("q"), k=pair("k"), v=pair("v"), o=pair("o"), ln1=pair("ln1"),
                       ln2=pair("ln2"), fc1=pair("fc1"), fc2=pair("fc2"))
        sd["ln_final.w"], sd["ln_final.b"] = state[prefix + "layernorm.weight"], state[prefix + "layernorm.bias"]
        head = "cls_classifier" if two_heads else "classifier"
        sd["W_head"], sd["b_head"] = state[head + ".weight"].T, state[head + ".bias"]
        if two_heads:
            sd["W_head_dist"] = state["distillation_classifier.weight"].T
            sd["b_head_dist"] = state["distillation_classifier.bias"]
        return cls._from_state(cfg, sd, dtype, device)

    @classmethod
    def from_timm_state_dict(cls, state_dict: Dict[str, Tensor], n_heads: int, eps: float = 1e-6,
                             act_fn: str = "gelu", model_name: str = "timm-vit",
                             dtype: DtypeLike = torch.float32, device: DeviceLike = "cpu") -> "HookedViT":
        """Convert a timm ``VisionTransformer`` / distilled DeiT state dict (``patch_embed.proj``,
        ``cls_token``, ``dist_token``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,
        mlp.fc1,mlp.fc2}``, ``norm``, ``head``, ``head_dist``). ``n_heads`` is not in the weights.
        The model is built in ``dtype`` on ``device``."""
        dtype, device = as_dtype(dtype), as_device(device)
        sd_in = dict(state_dict)
        known = ("patch_embed.proj.", "cls_token", "dist_token", "pos_embed", "blocks.", "norm.", "head.", "head_dist.")
        unknown = sorted(k for k in sd_in if not k.startswith(known))
        if unknown:
            raise NotImplementedError(f"timm state dict has keys HookedViT does not convert: {unknown[:5]}")
        proj = sd_in["patch_embed.proj.weight"]
        d, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        distilled = "dist_token" in sd_in
        n_ctx = sd_in["pos_embed"].shape[1]
        grid = math.isqrt(n_ctx - (2 if distilled else 1))
        n_layers = 1 + max(int(k.split(".")[1]) for k in sd_in if k.startswith("blocks."))
        head = sd_in["head.weight"]
        cfg = ViTConfig(image_size=grid * patch, patch_size=patch, n_channels=channels, d_model=d,
                        n_layers=n_layers, n_heads=n_heads, d_mlp=sd_in["blocks.0.mlp.fc1.weight"].shape[0],
                        n_classes=head.shape[0], distillation_token=distilled,
                        distillation_head=distilled and "head_dist.weight" in sd_in, eps=eps, act_fn=act_fn,
                        model_name=model_name)
        if cfg.n_ctx != n_ctx:
            raise ValueError(f"pos_embed has {n_ctx} positions, expected {cfg.n_ctx} for a {grid}x{grid} grid")
        sd = {"W_patch": proj, "b_patch": sd_in["patch_embed.proj.bias"], "cls_token": sd_in["cls_token"].reshape(-1),
              "W_pos": sd_in["pos_embed"].reshape(n_ctx, d)}
        if distilled:
            sd["dist_token"] = sd_in["dist_token"].reshape(-1)
        for i in range(n_layers):
            b = f"blocks.{i}."
            qkv_w, qkv_b = sd_in[b + "attn.qkv.weight"], sd_in.get(b + "attn.qkv.bias", torch.zeros(3 * d))
            _put_block(sd, i, cfg, q=(qkv_w[:d], qkv_b[:d]), k=(qkv_w[d : 2 * d], qkv_b[d : 2 * d]),
                       v=(qkv_w[2 * d :], qkv_b[2 * d :]),
                       o=(sd_in[b + "attn.proj.weight"], sd_in[b + "attn.proj.bias"]),
                       ln1=(sd_in[b + "norm1.weight"], sd_in[b + "norm1.bias"]),
                       ln2=(sd_in[b + "norm2.weight"], sd_in[b + "norm2.bias"]),
                       fc1=(sd_in[b + "mlp.fc1.weight"], sd_in[b + "mlp.fc1.bias"]),
                       fc2=(sd_in[b + "mlp.fc2.weight"], sd_in[b + "mlp.fc2.bias"]))
        sd["ln_final.w"], sd["ln_final.b"] = sd_in["norm.weight"], sd_in["norm.bias"]
        sd["W_head"], sd["b_head"] = head.T, sd_in["head.bias"]
        if cfg.distillation_head:
            sd["W_head_dist"], sd["b_head_dist"] = sd_in["head_dist.weight"].T, sd_in["head_dist.bias"]
        return cls._from_state(cfg, sd, dtype, device)

    @classmethod
    def _from_state(cls, cfg: ViTConfig, sd: Dict[str, Tensor], dtype: torch.dtype,
                    device: torch.device) -> "HookedViT":
        model = cls(cfg)
        model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
        return model.to(device=device, dtype=dtype).eval()


# transformers 5.x names first, then the 4.x ones (checkpoints on disk may still use them)
_HF_LAYER_NAMES = {
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "o": ("attention.o_proj", "attention.output.dense"),
    "ln1": ("layernorm_before",), "ln2": ("layernorm_after",),
    "fc1": ("mlp.fc1", "intermediate.dense"), "fc2": ("mlp.fc2", "output.dense"),
}


def _hf_layer_keys(state: Dict[str, Tensor], prefix: str, i: int) -> Dict[str, str]:
    """The module path of each part of HF layer ``i``, in whichever naming the weights use."""
    out = {}
    for part, names in _HF_LAYER_NAMES.items():
        for layer_prefix in (f"{prefix}layers.{i}.", f"{prefix}encoder.layer.{i}."):
            hit = next((layer_prefix + n for n in names if layer_prefix + n + ".weight" in state), None)
            if hit:
                out[part] = hit
                break
        else:
            raise NotImplementedError(f"HF ViT layer {i}: no weights for {part} ({' / '.join(names)})")
    return out


def _put_block(sd: Dict[str, Tensor], i: int, cfg: ViTConfig, q, k, v, o, ln1, ln2, fc1, fc2) -> None:
    """Write one block from ``nn.Linear``-layout weights ``[out, in]`` into HookedViT's layout."""
    h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
    p = f"blocks.{i}."
    for name, (w, b) in (("Q", q), ("K", k), ("V", v)):
        sd[p + f"attn.W_{name}"] = w.T.reshape(d, h, dh).permute(1, 0, 2)
        sd[p + f"attn.b_{name}"] = (b if b is not None else torch.zeros(d)).reshape(h, dh)
    sd[p + "attn.W_O"], sd[p + "attn.b_O"] = o[0].T.reshape(h, dh, d), o[1]
    sd[p + "ln1.w"], sd[p + "ln1.b"] = ln1
    sd[p + "ln2.w"], sd[p + "ln2.b"] = ln2
    sd[p + "mlp.W_in"], sd[p + "mlp.b_in"] = fc1[0].T, fc1[1]
    sd[p + "mlp.W_out"], sd[p + "mlp.b_out"] = fc2[0].T, fc2[1]


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[batch, patches, channels * patch * patch]``: row-major patches, each flattened in the
    order of a ``Conv2d`` patch-embedding weight ``[d_model, channels, patch, patch]``."""
    return F.unfold(images, kernel_size=patch_size, stride=patch_size).transpose(1, 2)


def check_images(cfg, images, dtype: Optional[torch.dtype] = None) -> None:
    """Raise a clear error for images the model cannot take."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a float tensor [batch, channels, height, width], got {type(images).__name__}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be floating point (normalized as the model expects), got dtype {images.dtype}; "
                        "convert e.g. uint8 pixels with (x / 255 - mean) / std")
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, channels, height, width], got shape {tuple(images.shape)}")
    if images.shape[1] != cfg.n_channels:
        raise ValueError(f"images have {images.shape[1]} channels, the model takes {cfg.n_channels}")
    if tuple(images.shape[2:]) != (cfg.image_size, cfg.image_size):
        raise ValueError(f"images are {tuple(images.shape[2:])} pixels, the model takes "
                         f"({cfg.image_size}, {cfg.image_size}); resize them first")
    if dtype is not None and images.dtype != dtype:
        raise TypeError(f"images are {images.dtype}, the model's weights {dtype}: convert with images.to({dtype})")


def check_gamma(gamma) -> None:
    """LRP-gamma enhances positive contributions by ``gamma >= 0``; a negative one weakens them
    and can flip or blow up the denominators, so it is refused (0 is the epsilon rule)."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0 (0 is the epsilon rule), got {gamma!r}")


# ---------------------------------------------------------------------------------------- family
VIT_HOOKS = ("hook_embed", "hook_pos_embed", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z",
             "blocks.0.mlp.hook_post", "blocks.0.ln1.hook_scale")


def is_hooked_vit(model) -> bool:
    """HookedViT, or a duck-typed vision model (e.g. vit-prisma's) with the same hook layout."""
    if isinstance(model, HookedViT):
        return True
    cfg = getattr(model, "cfg", None)
    hooks = getattr(model, "hook_dict", None)
    return cfg is not None and hooks is not None and hasattr(cfg, "patch_size") and all(h in hooks for h in VIT_HOOKS)


class ViTFamily(ModelFamily):
    """Adapter between the engine and a ``HookedViT``: HookedTransformer's role map on the blocks,
    images in, class logits (on [CLS]) out, patch-grid and pixel maps on top. Its own ``explain``
    options: ``patch_rule`` (``"gamma"``, the default, or ``"epsilon"``) and ``gamma`` (0.25)."""

    name = "HookedViT"
    options = ("patch_rule", "gamma")

    def __init__(self, model):
        self.model = model
        cfg = self.cfg = model.cfg
        if not isinstance(model, HookedViT):
            missing = [h for h in VIT_HOOKS if h not in model.hook_dict]
            if missing:
                raise NotImplementedError(f"vision model without the HookedViT hook layout: missing {missing}")
        self.n_layers, self.n_heads = cfg.n_layers, cfg.n_heads
        self.d_head = cfg.d_model // cfg.n_heads
        self.n_ctx = cfg.n_ctx if hasattr(cfg, "n_ctx") else (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.d_vocab = self.n_ctx  # position ids stand in for tokens
        self.d_vocab_out = cfg.n_classes
        self.pe_type = "standard"
        self.rotary_dim, self.rotary_adjacent_pairs, self.n_kv_heads = None, False, None
        self.gated_mlp = self.activation_has_norm = self.attn_only = False
        self.attn_softcap = self.output_softcap = None
        self.causal = False
        self.logits_supported = True
        self.score_roles = (Role.Q, Role.K)
        self.n_prefix = getattr(cfg, "n_prefix", 1)
        self.grid = cfg.image_size // cfg.patch_size

    # ------------------------------------------------------------------ hooks and forward
    def hook_roles(self) -> Dict[str, HookRole]:
        return hooked_transformer_roles(self)

    @property
    def final_hidden_hook(self) -> str:
        return f"blocks.{self.n_layers - 1}.hook_resid_post"

    def forward(self, images: Tensor, attention_mask: Optional[Tensor], fwd_hooks) -> Tensor:
        with self.hooks_attached(fwd_hooks):
            return self.model(images)

    def attn_scale(self, layer: int) -> float:
        return float(self.model.blocks[layer].attn.attn_scale)

    def activation(self, layer: int):
        return self.model.blocks[layer].mlp.act_fn

    # ------------------------------------------------------------------ inputs
    @property
    def tokenizer(self):
        return None

    def to_single_token(self, text: str) -> int:
        labels = {v: k for k, v in getattr(self.cfg, "id2label", {}).items()}
        if text not in labels:
            raise ValueError(f"no class named {text!r}; classes: {sorted(labels)[:10]}")
        return int(labels[text])

    def position_names(self) -> List[str]:
        prefix = ["[CLS]", "[DIST]"][: self.n_prefix]
        return prefix + [f"r{r}c{c}" for r in range(self.grid) for c in range(self.grid)]

    def prepare(self, images, attention_mask, prepend_bos, position, device) -> PreparedInput:
        """Images checked and moved; position ids standing in for tokens; the logits on [CLS]."""
        if attention_mask is not None:
            raise ValueError("attention_mask does not apply to images")
        if isinstance(position, bool) or not (isinstance(position, numbers.Integral) and int(position) in (-1, 0)):
            raise ValueError("position does not apply to image classifiers: the logits sit on [CLS]")
        dtype = next(self.model.parameters()).dtype
        if isinstance(images, Tensor) and images.ndim == 3:
            images = images[None]
        check_images(self.cfg, images)
        if images.shape[0] == 0:  # would "explain" nothing and return an empty Attribution
            raise ValueError(f"images has an empty batch (shape {tuple(images.shape)}): pass at least one image")
        # a NaN / inf pixel would surface only as "the target value is not finite", naming no image
        bad = ~torch.isfinite(images).flatten(1).all(-1)
        if bool(bad.any()):
            raise ValueError(f"image {int(bad.nonzero()[0])} holds NaN or inf pixel values: explain finite, "
                             "normalized images")
        if images.dtype != dtype:  # float precision differs: harmless to convert
            images = images.to(dtype)
        images = images.to(device)
        batch = images.shape[0]
        positions = torch.arange(self.n_ctx, device=device)[None].expand(batch, -1).clone()
        return PreparedInput(images, positions, None, [self.position_names() for _ in range(batch)],
                             torch.zeros(batch, dtype=torch.long))

    def resolve_options(self, options):
        """``patch_rule`` and ``gamma`` checked before the sweep, defaults filled in."""
        patch_rule = options.get("patch_rule") or "gamma"
        gamma = options.get("gamma")
        gamma = 0.25 if gamma is None else gamma
        if patch_rule not in PATCH_RULES:
            raise ValueError(f"patch_rule must be 'gamma' or 'epsilon', got {patch_rule!r}")
        if patch_rule == "gamma":
            check_gamma(gamma)
        return {"patch_rule": patch_rule, "gamma": gamma}

    def finish(self, attr, prepared: PreparedInput, sink_relevance, options):
        """The grid facts (``attr.vision``) and the patch rule's pixel relevance (``attr.pixels``)."""
        attr.vision, attr.pixels = self.vision_outputs(prepared.inputs.detach(), sink_relevance[Role.EMBED],
                                                       options["patch_rule"], options["gamma"])
        return attr

    # ------------------------------------------------------------------ pixels
    def vision_outputs(self, images: Tensor, embed_relevance: Tensor, rule: str,
                       gamma: float) -> Tuple[Dict[str, object], Optional[Tensor]]:
        """The grid facts for ``attr.vision`` and the pixel relevance for ``attr.pixels``, from the
        relevance of ``hook_embed`` ``[batch, positions, d_model]``. No graph is built: the patch
        weights require grad again once the sweep has restored them."""
        gamma = float(gamma) if rule == "gamma" else 0.0  # checked by resolve_options before the sweep
        facts = {"grid": [self.grid, self.grid], "patch_size": self.cfg.patch_size, "n_prefix": self.n_prefix,
                 "image_size": [self.cfg.image_size] * 2, "patch_rule": rule, "gamma": gamma}
        with torch.no_grad():
            pixels = self.pixel_relevance(images, embed_relevance[:, self.n_prefix:], gamma)
        return facts, pixels

    def pixel_relevance(self, images: Tensor, patch_relevance: Tensor, gamma: float) -> Optional[Tensor]:
        """Relevance ``[batch, height, width]`` of the pixels (summed over channels), by LRP-gamma
        (``gamma = 0``: epsilon) on the patch embedding, from the relevance of its outputs
        ``[batch, patches, d_model]``; None for a duck-typed model without ``W_patch`` / ``b_patch``."""
        if not hasattr(self.model, "W_patch"):  # duck-typed models: their patch weights are unknown
            return None
        cfg, p = self.cfg, self.cfg.patch_size
        dtype = patch_relevance.dtype  # the records' dtype: float32 for a float16 / bfloat16 model, as every map
        weight = self.model.W_patch.reshape(cfg.d_model, -1).to(dtype)
        bias = None if self.model.b_patch is None else self.model.b_patch.to(dtype)
        r = rules.linear_gamma_relevance(patchify(images, p).to(dtype), weight, bias, patch_relevance, gamma=gamma)
        pixels = F.fold(r.transpose(1, 2), output_size=(cfg.image_size, cfg.image_size), kernel_size=p, stride=p)
        return pixels.sum(1)
