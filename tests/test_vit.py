"""HookedViT: loading (HF ViT / DeiT folders, timm state dicts) against the source models, the
rules on a ViT (conservation, the patch rule against a slow closed form), errors, and the vision
metrics on hand-made cases."""

import math
import os

import pytest
import torch

import lens_palrp as lp
from lens_palrp import rules
from lens_palrp.analyses import vision
from lens_palrp.hooks.vit import HookedViT

transformers = pytest.importorskip("transformers")

MIN_SHAPES_ACCURACY = 0.93  # measured 0.9565 on 2000 held-out images at training

TINY = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=5)


def _randomize(model, seed=0):
    """HF initializes biases, LayerNorms and (DeiT) position embeddings to constants: make every
    parameter random so that loading mistakes cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


@pytest.fixture(scope="module")
def hf_vit():
    cfg = transformers.ViTConfig(**TINY)
    return _randomize(transformers.ViTForImageClassification(cfg)).eval()


@pytest.fixture(scope="module")
def hf_deit_cls_head():
    cfg = transformers.DeiTConfig(**TINY)
    return _randomize(transformers.DeiTForImageClassification(cfg), seed=2).eval()


@pytest.fixture(scope="module")
def hf_deit():
    cfg = transformers.DeiTConfig(**TINY)
    return _randomize(transformers.DeiTForImageClassificationWithTeacher(cfg), seed=1).eval()


def _images(n=3, seed=0, dtype=torch.float32):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("which", ["hf_vit", "hf_deit", "hf_deit_cls_head"])
def test_folder_load_matches_source_logits(which, request, tmp_path):
    hf = request.getfixturevalue(which)
    hf.save_pretrained(tmp_path)
    vit = HookedViT.from_pretrained(str(tmp_path))
    x = _images()
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        got = vit(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert vit.cfg.distillation_token == (which != "hf_vit")
    assert vit.cfg.distillation_head == (which == "hf_deit")
    assert vit.cfg.n_prefix == (1 if which == "hf_vit" else 2)


def _timm_forward(sd, x, n_heads, eps=1e-6, distilled=False):
    """An independent timm-layout ViT forward written directly on the state dict."""
    F = torch.nn.functional
    w = sd["patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    prefix = [sd["cls_token"]] + ([sd["dist_token"]] if distilled else [])
    t = torch.cat([p.expand(x.shape[0], -1, -1) for p in prefix] + [t], 1) + sd["pos_embed"]
    d = t.shape[-1]
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(n_layers):
        b = f"blocks.{i}."
        h = F.layer_norm(t, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        qkv = qkv.reshape(x.shape[0], -1, 3, n_heads, d // n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        t = t + F.linear(a.transpose(1, 2).reshape(x.shape[0], -1, d), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(t, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        t = t + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], eps)
    logits = F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])
    if distilled:
        logits = (logits + F.linear(t[:, 1], sd["head_dist.weight"], sd["head_dist.bias"])) / 2
    return logits


@pytest.mark.parametrize("distilled", [False, True])
def test_timm_state_dict_matches_an_independent_forward(distilled):
    g = torch.Generator().manual_seed(3)
    d, layers, patch, grid, classes = 24, 2, 4, 4, 7
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    sd = {"patch_embed.proj.weight": r(d, 3, patch, patch), "patch_embed.proj.bias": r(d),
          "cls_token": r(1, 1, d), "pos_embed": r(1, grid * grid + 1 + distilled, d),
          "norm.weight": 1 + r(d), "norm.bias": r(d), "head.weight": r(classes, d), "head.bias": r(classes)}
    if distilled:
        sd.update({"dist_token": r(1, 1, d), "head_dist.weight": r(classes, d), "head_dist.bias": r(classes)})
    for i in range(layers):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                   b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                   b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(4 * d, d),
                   b + "mlp.fc1.bias": r(4 * d), b + "mlp.fc2.weight": r(d, 4 * d), b + "mlp.fc2.bias": r(d)})
    vit = HookedViT.from_timm_state_dict(sd, n_heads=3)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(vit(x), _timm_forward(sd, x, 3, distilled=distilled), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="fc_norm"):
        HookedViT.from_timm_state_dict({**sd, "fc_norm.weight": r(d)}, n_heads=3)


def test_hook_names_follow_transformer_lens():
    vit = HookedViT.from_hf(transformers.ViTForImageClassification(transformers.ViTConfig(**TINY)))
    names = set(vit.hook_dict)
    for name in ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern",
                 "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post", "blocks.0.ln1.hook_scale", "ln_final.hook_scale",
                 "blocks.1.hook_resid_post"):
        assert name in names
    _, cache = vit.run_with_cache(_images(1))
    assert cache["hook_embed"].shape == (1, 17, 32) and cache["blocks.0.attn.hook_pattern"].shape == (1, 4, 17, 17)


@pytest.mark.parametrize("which", ["hf_vit", "hf_deit"])
@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp", "cp_lrp"])
def test_conservation_float64(which, method, request):
    vit = HookedViT.from_hf(request.getfixturevalue(which), dtype=torch.float64)
    with torch.no_grad():  # zero the biases: then every LRP rule conserves exactly
        for name, p in vit.named_parameters():
            if name.split(".")[-1].startswith("b") or name.endswith("b_patch"):
                p.zero_()
    attr = lp.explain(vit, _images(dtype=torch.float64), torch.tensor([0, 3, 4]), method=method)
    c = attr.conservation()
    explained = c.semantic + c.positional_input + c.positional + c.positional_leak + c.softmax_absorbed
    torch.testing.assert_close(explained, c.target_value, rtol=1e-9, atol=1e-10)
    if method == "pa_lrp":  # learned 2D PE is an input sink: it carries relevance, nothing leaks
        assert float(c.positional_input.abs().min()) > 0
        assert float(c.positional_leak.abs().max()) == 0
    else:
        assert float(c.positional_input.abs().max()) == 0 and float(c.positional_leak.abs().min()) > 0
    # the pixel map under epsilon (no bias) carries exactly the patches' semantic relevance
    eps_attr = lp.explain(vit, _images(dtype=torch.float64), torch.tensor([0, 3, 4]), method=method,
                          patch_rule="epsilon")
    torch.testing.assert_close(eps_attr.pixels.sum((1, 2)), eps_attr.semantic[:, vit.cfg.n_prefix:].sum(-1),
                               rtol=1e-7, atol=1e-9)


def test_grad_x_input_equals_autograd(hf_vit):
    vit = HookedViT.from_hf(hf_vit, dtype=torch.float64)
    x = _images(dtype=torch.float64)
    attr = lp.explain(vit, x, 2, method="grad_x_input")
    # reference: gradient x input of the token and position embeddings with plain autograd
    store = {}

    def leaf(act, hook):
        store[hook.name] = act.detach().requires_grad_(True)
        return store[hook.name]

    logits = vit.run_with_hooks(x, fwd_hooks=[("hook_embed", leaf), ("hook_pos_embed", leaf)])
    logits[:, 2].sum().backward()
    semantic = (store["hook_embed"] * store["hook_embed"].grad).sum(-1)
    torch.testing.assert_close(attr.semantic, semantic, rtol=1e-10, atol=1e-12)
    pos = (store["hook_pos_embed"] * store["hook_pos_embed"].grad).sum(-1)
    # no PE rule: the position embedding's relevance is not mapped, it is reported as the leak
    assert float(attr.positional_input.abs().max()) == 0.0
    torch.testing.assert_close(attr.conservation().positional_leak, pos.sum(-1), rtol=1e-10, atol=1e-12)


def _gamma_reference(x, w, b, r, gamma, eps):
    """Slow closed form: explicit contributions c_ij = x_i w_ji, enhanced where positive."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(w.shape[0]):
            c = x[n] * w[j]
            c = c + gamma * c.clamp(min=0)
            z = c.sum() + b[j] + gamma * b[j].clamp(min=0)
            z = z + eps * (1 if z >= 0 else -1)
            out[n] += c / z * r[n, j]
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.25, 1.0])
def test_patch_rule_against_closed_form(gamma):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(7, 12, generator=g, dtype=torch.float64),
               torch.randn(7, generator=g, dtype=torch.float64))
    r = torch.randn(5, 7, generator=g, dtype=torch.float64)
    got = rules.linear_gamma_relevance(x, w, b, r, gamma=gamma, eps=1e-9)
    torch.testing.assert_close(got, _gamma_reference(x, w, b, r, gamma, 1e-9), rtol=1e-10, atol=1e-12)
    # without bias the rule conserves per output
    no_bias = rules.linear_gamma_relevance(x, w, None, r, gamma=gamma, eps=0.0)
    torch.testing.assert_close(no_bias.sum(-1), r.sum(-1), rtol=1e-10, atol=1e-12)


def test_patch_and_pixel_maps(hf_deit):
    vit = HookedViT.from_hf(hf_deit)
    attr = lp.explain(vit, _images(2), 1)
    assert attr.str_tokens[0][:3] == ["[CLS]", "[DIST]", "r0c0"]
    for which in ("semantic", "positional", "combined", "pe_only"):
        grid = attr.patch_map(which)
        assert grid.shape == (2, 4, 4)
    # the grid leaves the prefix tokens out and keeps row-major patch order
    torch.testing.assert_close(attr.patch_map("semantic")[:, 1, 2], attr.semantic[:, 2 + 1 * 4 + 2])
    assert attr.pixel_map().shape == (2, 16, 16) and attr.pixel_map("pixels").shape == (2, 16, 16)
    near = attr.pixel_map("semantic", mode="nearest")
    torch.testing.assert_close(near[:, 4:8, 8:12], attr.patch_map("semantic")[:, 1:2, 2:3].expand(-1, 4, 4))


def test_bad_images_and_options_raise(hf_vit):
    vit = HookedViT.from_hf(hf_vit)
    with pytest.raises(ValueError, match="channels"):
        lp.explain(vit, torch.randn(1, 1, 16, 16), 0)
    with pytest.raises(ValueError, match="pixels"):
        lp.explain(vit, torch.randn(1, 3, 32, 32), 0)
    with pytest.raises(TypeError, match="floating point"):
        lp.explain(vit, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        lp.explain(vit, _images(1), 5)
    with pytest.raises(ValueError, match="patch_rule"):
        lp.explain(vit, _images(1), 0, patch_rule="alpha")
    with pytest.raises(ValueError, match="position"):
        lp.explain(vit, _images(1), 0, position=3)
    with pytest.raises(FileNotFoundError):
        HookedViT.from_pretrained("/nonexistent/vit")
    # the model is left as it was, even after errors
    assert all(p.requires_grad for p in vit.parameters())
    assert not any(hp._forward_hooks for hp in vit.hook_dict.values())


def test_duck_typed_vision_model_with_the_layout_is_explained(hf_vit):
    """Another HookedRootModule (not HookedViT) with the same hook names and config fields, as a
    vit-prisma model would be, gets the same attribution."""
    from lens_palrp.hooks.vit import HookedRootModule

    vit = HookedViT.from_hf(hf_vit, dtype=torch.float64)

    class PrismaLike(HookedRootModule):
        def __init__(self, source):
            super().__init__()
            for name, child in source.named_children():
                self.add_module(name, child)
            for name, param in source.named_parameters(recurse=False):
                self.register_parameter(name, param)
            self.dist_token = None
            self.cfg = source.cfg
            self.setup()

        def forward(self, images):
            return HookedViT.forward(self, images)

    other = PrismaLike(vit)
    assert not isinstance(other, HookedViT)
    x = _images(2, dtype=torch.float64)
    a, b = lp.explain(other, x, 1), lp.explain(vit, x, 1)
    for name in ("semantic", "positional_input", "heads", "pixels"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-14)


def test_duck_typed_vision_models_need_the_layout(hf_vit):
    """A vit-prisma-like model (another class) is accepted by its hook names; missing ones are named."""
    vit = HookedViT.from_hf(hf_vit)

    class Other(torch.nn.Module):
        pass

    other = Other()
    other.cfg, other.hook_dict = vit.cfg, {k: v for k, v in vit.hook_dict.items() if k != "hook_pos_embed"}
    with pytest.raises(TypeError, match="cannot explain"):
        lp.explain(other, _images(1), 0)


def test_segmentation_and_perturbation_metrics_on_known_cases():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    perfect = masks.double()
    s = vision.segmentation_scores(perfect, masks)
    assert float(s["pixel_accuracy"]) == 1 and float(s["miou"]) == 1 and float(s["ap"]) == 1
    inverted = vision.segmentation_scores(1 - perfect, masks)
    assert float(inverted["pixel_accuracy"]) == 0 and float(inverted["miou"]) == 0
    # AP of a ranking [pos, neg, pos]: (1/1 + 2/3) / 2
    ap = vision.average_precision(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, True]))
    assert math.isclose(float(ap), (1 + 2 / 3) / 2)
    removed = vision.removal_masks(torch.arange(16.0).reshape(1, 4, 4), 0.25, most_relevant_first=True)
    assert removed.sum() == 4 and bool(removed[0, 3].all())


def test_perturbation_curves_against_a_hand_run(hf_vit):
    """Each point of each curve is the model on the image with the ``round(f * H * W)`` pixels
    ranked first by the map set to 0 in every channel (positive: most relevant first, negative:
    least relevant first); each area is the trapezoid over f in [0, 0.9] divided by 0.9, in percent."""
    vit = HookedViT.from_hf(hf_vit)
    x = _images(4)
    with torch.no_grad():
        labels = vit(x).argmax(-1)
    maps = vision.vision_maps(vit, x, labels, methods=("random", "pa_lrp"))
    result = vision.vision_perturbation_test(vit, x, labels, maps)
    f = result.fractions
    assert f[0] == 0 and abs(float(f[-1]) - 0.9) < 1e-12 and len(f) == 10
    metrics = result.metrics()
    changed = False
    for method, pixel_map in maps.items():
        assert pixel_map.shape == (4, 16, 16)
        flat = pixel_map.reshape(4, -1)
        for order in ("positive", "negative"):
            curves = result.curves[method][order]
            for j, frac in enumerate(f.tolist()):
                k = int(round(frac * 256))
                keep = torch.ones(4, 256)
                for i in range(4):  # rank by the map's value; no ties in these maps
                    ranked = sorted(range(256), key=lambda p: float(flat[i, p]), reverse=order == "positive")
                    keep[i, ranked[:k]] = 0
                with torch.no_grad():
                    probs = vit(x * keep.reshape(4, 1, 16, 16)).double().softmax(-1)
                torch.testing.assert_close(curves["accuracy"][:, j], (probs.argmax(-1) == labels).double())
                torch.testing.assert_close(curves["prob"][:, j], probs[torch.arange(4), labels], rtol=1e-5, atol=1e-6)
            for q in ("accuracy", "prob"):
                area = 100 * torch.trapezoid(curves[q], f, dim=-1) / 0.9
                torch.testing.assert_close(metrics[method][f"{order}_{q}_auc"], area, rtol=1e-10, atol=1e-10)
            changed |= bool((curves["prob"][:, 1:] != curves["prob"][:, :1]).any())
    assert changed  # the removal changes the model's output, so the order of removal matters
    fig = vision.overlay_figure(x[0], {m: v[0] for m, v in maps.items()})
    assert len(fig.data) == 1 + 2 * len(maps)


def test_shapes_dataset_is_deterministic_and_labels_match_masks():
    from lens_palrp.zoo import shapes

    images, labels, masks = shapes.batch(64, seed=5)
    again = shapes.batch(64, seed=5)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1]) and torch.equal(masks, again[2])
    assert images.shape == (64, 3, 32, 32) and float(images.min()) >= -1 and float(images.max()) <= 1
    assert bool((masks.sum((1, 2)) > 10).all())
    xs = torch.arange(32.0)
    centroid_x = (masks.double() * xs).sum((1, 2)) / masks.double().sum((1, 2))
    assert torch.equal((centroid_x >= 16).long(), labels % 2)  # the label's half is where the object is


def test_shipped_shapes_vit():
    from lens_palrp.zoo import shapes

    vit = shapes.load()
    images, labels, _ = shapes.batch(300, seed=99)
    with torch.no_grad():
        accuracy = float((vit(images).argmax(-1) == labels).double().mean())
    assert accuracy >= MIN_SHAPES_ACCURACY
    attr = lp.explain(vit, images[:4], labels[:4])
    assert attr.patch_map().shape == (4, 8, 8)
    assert float(attr.positional_input.abs().sum()) > 0


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 0.02), (torch.bfloat16, 0.05)])
def test_a_half_vit_is_explained_in_float32_records(dtype, bound):
    """A float16 / bfloat16 HookedViT is explained as the text models are: records (token and pixel
    maps) in float32, close to the float64 explanation of the same rounded weights and images.
    The bounds are the half dtype's forward rounding carried through 2 layers (measured: pixels
    0.3% / 1.3%, tokens 0.3% / 0.5%); a pixel rule run in the half dtype, or a map left in it,
    fails them or the dtype check."""
    model = lp.zoo.shapes.load(dtype=dtype)
    size = model.cfg.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4)).to(dtype)
    attr = lp.explain(model, images, 1)
    ref = lp.explain(lp.zoo.shapes.load(dtype=dtype).double(), images.double(), 1)
    assert attr.semantic.dtype == attr.pixels.dtype == torch.float32
    for field in ("pixels", "semantic", "target_value"):
        got, want = getattr(attr, field).double(), getattr(ref, field)
        assert float((got - want).abs().max() / want.abs().max()) < bound, field


def test_vision_only_options_refused_on_text_models():
    try:
        model, _ = lp.zoo.load("rope-repeat")
    except ImportError as err:  # TransformerLens 4.x: the zoo's HookedTransformers do not exist
        pytest.skip(str(err))
    with pytest.raises(ValueError, match="vision"):
        lp.explain(model, torch.tensor([[1, 2, 3]]), 2).patch_map()
    with pytest.raises(ValueError, match="vision"):
        lp.explain(model, torch.tensor([[1, 2, 3]]), 2).pixel_map()
    with pytest.raises(ValueError, match="vision"):
        lp.explain(model, torch.tensor([[1, 2, 3]]), 2, patch_rule="gamma")


def test_vision_attribution_saves_and_loads(hf_deit, tmp_path):
    vit = HookedViT.from_hf(hf_deit)
    attr = lp.explain(vit, _images(2), 1)
    path = attr.save(str(tmp_path / "vit.safetensors"), model_config=vit.cfg)
    back = lp.Attribution.load(path)
    assert back.vision == attr.vision
    torch.testing.assert_close(back.pixels, attr.pixels)
    torch.testing.assert_close(back.patch_map("combined"), attr.patch_map("combined"))


def test_vision_quick_benchmark_leaves_the_published_table_alone():
    """CI runs it: a quick run writes to the git-ignored benchmarks/out/, never results/vision.md."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    published = os.path.join(root, "benchmarks", "results", "vision.md")
    with open(published, encoding="utf-8") as f:
        before = f.read()
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "vision.py"), "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(published, encoding="utf-8") as f:
        assert f.read() == before
    assert os.path.exists(os.path.join(root, "benchmarks", "out", "vision_quick.md"))
