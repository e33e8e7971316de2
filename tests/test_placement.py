"""Model placement (issue 13): every loader honours ``device`` and ``dtype``, refuses bad values
by name, and a TransformerBridge split by an accelerate device map explains what the unsplit
model explains.

On the CPU alone a device map can only say "cpu" everywhere; that still runs the device-map
path (the map reaches ``from_pretrained``, TransformerLens reads the placement back). The real
splits are ``gpu``-marked: skipped without CUDA, and the two-GPU ones without two GPUs.
"""

import dataclasses

import pytest
import torch

import lens_palrp as lp
from devices import assert_on_device

HAS_BRIDGE = lp.zoo.bridge_available()
needs_bridge = pytest.mark.skipif(not HAS_BRIDGE, reason="TransformerBridge needs TransformerLens 3.9 or 4.x")
needs_hooked = pytest.mark.skipif(not lp.zoo.hooked_available(), reason="HookedTransformer is TransformerLens 3.x only")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
PROMPTS = ["c h a p k b e g", "c h a p k"]


def placed(model):
    """``{(device type, dtype)}`` over the model's parameters."""
    return {(p.device.type, p.dtype) for p in model.parameters()}


def rel(a, b) -> float:
    scale = float(b.abs().max())
    diff = float((a.double() - b.double()).abs().max())
    return diff / scale if scale > 0 else diff


# ------------------------------------------------------------------ device and dtype land
DTYPES = [torch.float64, "float64", torch.bfloat16, "bfloat16", "torch.float16", "fp32"]


@needs_bridge
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bridge_from_folder_puts_the_weights_where_asked(dtype, device):
    expected = lp.load_args.as_dtype(dtype)
    for where in (device, torch.device(device)):
        bridge = lp.models.bridge_from_folder(lp.zoo.folder("rope-repeat"), dtype=dtype, device=where)
        assert placed(bridge) == {(device, expected)}
        assert bridge.cfg.dtype == expected and torch.device(bridge.cfg.device).type == device


@needs_hooked
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hooked_transformer_from_folder_puts_the_weights_where_asked(dtype, device):
    expected = lp.load_args.as_dtype(dtype)
    model = lp.models.hooked_transformer_from_folder(lp.zoo.folder("learned-absolute"), dtype=dtype,
                                                     device=torch.device(device))
    assert placed(model) == {(device, expected)}
    assert model.cfg.dtype == expected and torch.device(model.cfg.device).type == device


@pytest.mark.parametrize("kind", [pytest.param("hooked", marks=needs_hooked), pytest.param("bridge", marks=needs_bridge)])
def test_zoo_load_and_explain_on_the_device(kind, device):
    """The zoo's models in bfloat16 and float64 on ``device``; explained there, results there."""
    for dtype in ("bfloat16", torch.float64):
        model, _ = lp.zoo.load("alibi-repeat", kind=kind, dtype=dtype, device=device)
        assert placed(model) == {(device, lp.load_args.as_dtype(dtype))}
    attr = lp.explain(model, PROMPTS, " k")
    assert_on_device(attr, device)
    cpu = lp.explain(lp.zoo.load("alibi-repeat", kind=kind, dtype=torch.float64)[0], PROMPTS, " k")
    assert rel(attr.semantic.cpu(), cpu.semantic) < 1e-9


def test_build_model_and_the_shapes_vit_put_the_weights_where_asked(device):
    hf = lp.zoo.build_model("rope-repeat", dtype="float16", device=device)
    assert placed(hf) == {(device, torch.float16)}
    vit = lp.zoo.shapes.load(dtype=torch.bfloat16, device=torch.device(device))
    assert placed(vit) == {(device, torch.bfloat16)}
    images, _, _ = lp.zoo.shapes.batch(2)
    assert_on_device(lp.explain(lp.zoo.shapes.load(device=device), images.to(device), 0), device)


@needs_bridge
def test_bridge_from_hf_keeps_or_moves_the_model(device):
    """``device=None`` keeps the Hugging Face model where it is (``cfg.device`` follows it); a
    device moves it there; a model a device map placed is not gathered onto one device."""
    hf = lp.zoo.build_model("rope-repeat", device=device)
    bridge = lp.models.bridge_from_hf(hf, lp.zoo.tokenizer())
    assert torch.device(bridge.cfg.device).type == device and placed(bridge) == {(device, torch.float32)}
    moved = lp.models.bridge_from_hf(lp.zoo.build_model("rope-repeat"), lp.zoo.tokenizer(), dtype="float64",
                                     device=device)
    assert torch.device(moved.cfg.device).type == device and placed(moved) == {(device, torch.float64)}
    dispatched = lp.zoo.build_model("rope-repeat")
    dispatched.hf_device_map = {"model": 0, "lm_head": 1}  # as from_pretrained(device_map=...) leaves it
    with pytest.raises(ValueError, match="placed by a device map"):
        lp.models.bridge_from_hf(dispatched, lp.zoo.tokenizer(), device="cpu")


# ------------------------------------------------------------------ bad values, by name
BAD = [
    (dict(dtype="float17"), ValueError, "dtype='float17' is not a dtype name"),
    (dict(dtype=torch.int64), ValueError, r"dtype=torch.int64: lens_palrp loads models in"),
    (dict(dtype=torch.float8_e4m3fn), ValueError, "dtype=torch.float8_e4m3fn"),
    (dict(dtype=32), TypeError, "dtype must be a torch.dtype or its name"),
    (dict(device="gpu"), ValueError, "device='gpu' is not a device torch knows"),
    (dict(device=None), TypeError, "device must be a torch.device"),
    (dict(device=-1), ValueError, "device=-1"),
    (dict(device="meta"), ValueError, "meta device holds no weights"),
    (dict(device=f"cuda:{torch.cuda.device_count() + 3}"), ValueError, "device='cuda:"),  # no such GPU
]


@pytest.mark.parametrize("bad, error, message", BAD, ids=[f"{k}={v}" for bad, _, _ in BAD for k, v in bad.items()])
def test_every_loader_refuses_a_bad_device_or_dtype_by_name(bad, error, message):
    loaders = [
        lambda **kw: lp.zoo.build_model("rope-repeat", **kw),
        lambda **kw: lp.zoo.shapes.load(**kw),
    ]
    if HAS_BRIDGE:
        loaders += [
            lambda **kw: lp.models.bridge_from_folder(lp.zoo.folder("rope-repeat"), **kw),
            lambda **kw: lp.zoo.load("rope-repeat", kind="bridge", **kw),
        ]
        if "device" not in bad or bad["device"] is not None:  # bridge_from_hf: device=None keeps the model
            loaders.append(lambda **kw: lp.models.bridge_from_hf(lp.zoo.build_model("rope-repeat"),
                                                                  lp.zoo.tokenizer(), **kw))
    if lp.zoo.hooked_available():
        loaders += [
            lambda **kw: lp.models.hooked_transformer_from_folder(lp.zoo.folder("rope-repeat"), **kw),
            lambda **kw: lp.zoo.load("rope-repeat", kind="hooked", **kw),
        ]
    for load in loaders:
        with pytest.raises(error, match=message):
            load(**bad)


@needs_bridge
@pytest.mark.parametrize("device_map, error, message", [
    ("everywhere", ValueError, "device_map='everywhere': as a string, one of"),
    ({}, ValueError, "device_map is empty"),
    (["cpu"], TypeError, "device_map must be a dict"),
    ({"model.layers.0": "gpu"}, ValueError, r"device_map\['model.layers.0'\]='gpu' is not a device"),
    ({0: "cpu"}, TypeError, "device_map keys are module names"),
])
def test_bad_device_maps_are_refused_by_name(device_map, error, message):
    with pytest.raises(error, match=message):
        lp.models.bridge_from_folder(lp.zoo.folder("rope-repeat"), device_map=device_map)


def test_n_devices_is_checked_before_loading():
    with pytest.raises(ValueError, match="n_devices=2 spreads layers over CUDA devices; device='cpu'"):
        lp.models.hooked_transformer_from_folder(lp.zoo.folder("rope-repeat"), n_devices=2)
    with pytest.raises(ValueError, match="n_devices=0: at least 1"):
        lp.models.hooked_transformer_from_folder(lp.zoo.folder("rope-repeat"), n_devices=0)
    if lp.zoo.hooked_available():
        with pytest.raises(ValueError, match="device_map splits a TransformerBridge"):
            lp.zoo.load("rope-repeat", kind="hooked", device_map="auto")


# ------------------------------------------------------------------ device maps
def per_module_map(name, where):
    """An explicit accelerate map for zoo model ``name``, built from its folder's config: each
    child of the base model (embeddings, norms) and each layer of its layer list, and the LM head;
    ``where(i)`` places layer ``i``, the modules before the layers go where layer 0 goes and the
    ones after where the last layer goes."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(lp.zoo.folder(name))
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    n = config.num_hidden_layers
    device_map, seen_layers = {}, False
    for child, module in base.named_children():
        if isinstance(module, torch.nn.ModuleList):
            device_map.update({f"{prefix}.{child}.{i}": where(i) for i in range(len(module))})
            seen_layers = True
        elif any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            device_map[f"{prefix}.{child}"] = where(n - 1 if seen_layers else 0)
    device_map["lm_head"] = where(n - 1)
    return device_map


def assert_same_explanation(split, whole, rtol):
    """Token map, positional map and every conservation field of two explanations, to ``rtol``
    relative (0: bit for bit)."""
    split, whole = split.to("cpu"), whole.to("cpu")
    for field in ("semantic", "positional", "positional_input", "target_value"):
        a, b = getattr(split, field), getattr(whole, field)
        assert torch.equal(a, b) if rtol == 0 else rel(a, b) <= rtol, field
    assert torch.equal(split.combined(), whole.combined()) if rtol == 0 else rel(split.combined(), whole.combined()) <= rtol
    cs, cw = split.conservation(), whole.conservation()
    for field in dataclasses.fields(cs):
        a, b = getattr(cs, field.name), getattr(cw, field.name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) if rtol == 0 else rel(a, b) <= max(rtol, 1e-12), field.name


@needs_bridge
@pytest.mark.parametrize("name", lp.zoo.names())
def test_an_all_cpu_device_map_explains_exactly_what_the_unsplit_model_does(name, monkeypatch):
    from transformers import PreTrainedModel

    device_map = per_module_map(name, lambda i: "cpu")
    n_layers = lp.zoo.hf_config(name).num_hidden_layers
    assert "lm_head" in device_map and sum(k.split(".")[-1].isdigit() for k in device_map) == n_layers
    original = PreTrainedModel.from_pretrained.__func__
    maps_seen = []

    def spy(cls, *args, **kwargs):
        maps_seen.append(kwargs.get("device_map"))
        return original(cls, *args, **kwargs)

    whole, _ = lp.zoo.load(name, kind="bridge")
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    split, _ = lp.zoo.load(name, kind="bridge", device_map=device_map)
    monkeypatch.undo()
    assert maps_seen == [device_map]  # the map reached from_pretrained, as given
    assert placed(split) == placed(whole) == {("cpu", torch.float32)}
    a, b = lp.explain(split, PROMPTS, " k"), lp.explain(whole, PROMPTS, " k")
    assert_same_explanation(a, b, rtol=0)


def _split_or_xfail(name, device_map):
    """The bridge split by ``device_map``, or an expected failure where TransformerLens refuses
    the map: both 3.9 and 4.3 refuse maps that mix CPU and GPU targets (accelerate turns such CPU
    entries into offload: the weights are streamed to the GPU per call, not computed on the CPU)."""
    try:
        return lp.zoo.load(name, kind="bridge", dtype=torch.float64, device_map=device_map)[0]
    except ValueError as err:
        if "mixes CPU" in str(err):
            import transformer_lens

            pytest.xfail(f"TransformerLens {getattr(transformer_lens, '__version__', '?')} refuses it: {err}")
        raise


def _check_split(name, device_map, rtol=1e-5):
    whole = lp.zoo.load(name, kind="bridge", dtype=torch.float64)[0]
    split = _split_or_xfail(name, device_map)
    assert_placed_as_mapped(split, device_map)  # the bridge did not gather the model onto one device
    attr = lp.explain(split, PROMPTS, " k")
    assert_on_device(attr, torch.device(split.cfg.device).type)
    assert_same_explanation(attr, lp.explain(whole, PROMPTS, " k"), rtol=rtol)
    assert_placed_as_mapped(split, device_map)  # nor did the explanation


def assert_placed_as_mapped(bridge, device_map):
    for module, where in device_map.items():
        param = next(bridge.original_model.get_submodule(module).parameters(), None)
        if param is not None and param.device.type != "meta":  # meta: offloaded, streamed in per call
            assert param.device == torch.device(where), module


@pytest.mark.gpu
@needs_bridge
@pytest.mark.parametrize("name", lp.zoo.names())
def test_layers_split_between_cpu_and_cuda_match_the_cpu_result(name):
    _check_split(name, per_module_map(name, lambda i: "cpu" if i == 0 else "cuda:0"))


@pytest.mark.gpu
@needs_bridge
@pytest.mark.parametrize("name", lp.zoo.names())
def test_an_explicit_map_onto_one_gpu_matches_the_cpu_result(name):
    _check_split(name, per_module_map(name, lambda i: "cuda:0"))


@pytest.mark.gpu
@two_gpus
@needs_bridge
@pytest.mark.parametrize("name", lp.zoo.names())
def test_layers_split_over_two_gpus_match_the_cpu_result(name):
    _check_split(name, per_module_map(name, lambda i: f"cuda:{min(i, 1)}"))


@pytest.mark.gpu
@two_gpus
@needs_hooked
def test_hooked_transformer_over_two_gpus_matches_the_cpu_result():
    folder = lp.zoo.folder("rope-repeat")
    whole = lp.models.hooked_transformer_from_folder(folder, dtype=torch.float64)
    split = lp.models.hooked_transformer_from_folder(folder, dtype=torch.float64, device="cuda", n_devices=2)
    assert len({p.device for p in split.parameters()}) == 2
    tokens = whole.to_tokens(PROMPTS[0])
    assert_same_explanation(lp.explain(split, tokens, 7), lp.explain(whole, tokens, 7), rtol=1e-5)


@pytest.mark.gpu
@needs_bridge
def test_device_and_device_map_together_are_refused():
    with pytest.raises(ValueError, match="device='cuda' and device_map both place the model"):
        lp.models.bridge_from_folder(lp.zoo.folder("rope-repeat"), device="cuda", device_map="auto")
