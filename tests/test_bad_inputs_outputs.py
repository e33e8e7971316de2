"""Bad inputs and damaged outputs get one clear error that names the problem: graph-free results,
a vision Attribution file whose header disagrees with its pixels, CLI misuse, dtype requests,
out-of-range indices and options. Everything here runs on the shipped shapes ViT and tiny random
models, so it runs under TransformerLens 3 and 4 alike."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lens_palrp as lp
from lens_palrp.io import HEADER_KEY
from lens_palrp.zoo import shapes

transformers = pytest.importorskip("transformers")

EXE = shutil.which("lens-palrp") or os.path.join(os.path.dirname(sys.executable), "lens-palrp")
RECORD = ["blocks.0.attn.hook_pattern"]
RECORD_GRADIENTS = ["blocks.1.hook_resid_pre"]


@pytest.fixture(scope="module")
def vit():
    return shapes.load()


@pytest.fixture(scope="module")
def images():
    return shapes.batch(2, seed=3)[0]


@pytest.fixture(scope="module")
def attr(vit, images):
    return lp.explain(vit, images, torch.tensor([0, 1]), record=RECORD, record_gradients=RECORD_GRADIENTS)


# ------------------------------------------------------------------------- 1. no autograd graph
def _tensors(attr):
    for name, value in attr.__dict__.items():
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, dict):
            for key, inner in value.items():
                if isinstance(inner, torch.Tensor):
                    yield f"{name}[{key!r}]", inner


def test_vit_attribution_holds_no_graph(attr):
    names = dict(_tensors(attr))
    assert {"pixels", f"hooks[{RECORD[0]!r}]", f"gradients[{RECORD_GRADIENTS[0]!r}]"} <= set(names)
    for name, value in names.items():
        assert not value.requires_grad and value.grad_fn is None, name
        value.numpy()  # raises on a tensor that requires grad


def test_tensors_assigned_later_are_detached_too(attr):
    copy = attr.to("cpu")
    w = torch.ones(1, requires_grad=True)
    copy.pixels = attr.pixels * w
    copy.hooks = {"extra": attr.semantic * w}
    assert copy.pixels.grad_fn is None and copy.hooks["extra"].grad_fn is None
    copy.pixels.numpy()


# ------------------------------------------------------------------------- 2. save / load
@pytest.fixture()
def saved(attr, vit, tmp_path):
    return attr.save(str(tmp_path / "vit.safetensors"), model_config=vit.cfg)


def _edit_vision(path, change):
    """Edit the ``vision`` facts in the file's header (format 2: the metadata JSON under the
    safetensors header key ``lens_palrp``) and write the file again, header and all."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[HEADER_KEY])
    change(meta["fields"]["vision"])
    save_file(load_file(path), path, metadata={HEADER_KEY: json.dumps(meta)})


def _raises(kind, path, fragment, fn=None):
    with pytest.raises(kind) as info:
        (fn or (lambda: lp.Attribution.load(path)))()
    message = str(info.value)
    assert fragment in message and os.path.basename(path) in message, message


def test_saved_vision_attribution_round_trips(saved, attr):
    back = lp.Attribution.load(saved)
    for name, value in _tensors(attr):
        assert torch.equal(dict(_tensors(back))[name], value), name


# Damaged files (truncated or foreign, a corrupt header, impossible format versions, shapes that
# disagree, pixels included, a missing file or format-1 half) are tests/test_io.py's; here only
# what a vision file adds: the image size the shape check reads from the header.
def test_load_checks_pixels_against_the_header_image_size(saved):
    _edit_vision(saved, lambda v: v.update(image_size=[16, 32]))
    _raises(ValueError, saved, "'pixels' has shape (2, 32, 32), expected (2, 16, 32)")
    _edit_vision(saved, lambda v: v.update(image_size=32))
    _raises(ValueError, saved, "vision must hold image_size [height, width], got")
    _edit_vision(saved, lambda v: v.update(image_size=[32, 32]))
    lp.Attribution.load(saved)  # undamaged again


def test_save_into_a_missing_folder_names_it(attr, tmp_path):
    path = str(tmp_path / "no-such-folder" / "a.safetensors")
    _raises(FileNotFoundError, path, "no-such-folder", lambda: attr.save(path))


# ------------------------------------------------------------------------- 3. command line
def run_cli(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300)


def _one_line_error(result, fragment):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lens-palrp: error:") and fragment in lines[0], result.stderr


def test_cli_model_folder_with_broken_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    result = run_cli("explain", "--model", str(tmp_path), "--prompt", "a b", "--target", "a",
                     "--out", str(tmp_path / "r.html"))
    _one_line_error(result, "config.json is not valid JSON")


def test_cli_refuses_a_negative_top(tmp_path):
    result = run_cli("explain", "--model", "rope-repeat", "--prompt", "a b", "--target", "a", "--top", "-3",
                     "--out", str(tmp_path / "r.html"))
    _one_line_error(result, "--top: must be a positive integer")


# ------------------------------------------------------------------------- 4. dtype of a bridge
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bridge_from_hf_converts_the_weights_to_the_requested_dtype(arch):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        hf = transformers.LlamaForCausalLM(cfg).eval()
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
        hf = transformers.GPT2LMHeadModel(cfg).eval()
    bridge = lp.models.bridge_from_hf(hf, lp.zoo.tokenizer(), dtype=torch.float16)
    assert bridge.cfg.dtype == torch.float16
    assert {p.dtype for p in bridge.parameters()} == {torch.float16}
    # a dtype's name is taken too (lens_palrp.load_args); an unknown one is refused by name
    assert lp.models.bridge_from_hf(hf, lp.zoo.tokenizer(), dtype="bfloat16").cfg.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='float17' is not a dtype name"):
        lp.models.bridge_from_hf(hf, lp.zoo.tokenizer(), dtype="float17")
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        lp.models.bridge_from_hf(hf, lp.zoo.tokenizer(), dtype=torch.int8)


# ------------------------------------------------------------------------- 5. indices and options
def test_top_tokens_checks_k_and_the_index(attr):
    assert len(attr.top_tokens(-1, 3)) == 3 and attr.top_tokens(0, 0) == []
    with pytest.raises(ValueError, match=r"k must be an int >= 0.*got -3"):
        attr.top_tokens(0, -3)
    with pytest.raises(IndexError, match=r"index 5 is out of range for a batch of 2 examples \(valid: 0\.\.1"):
        attr.top_tokens(5, 3)
    with pytest.raises(IndexError, match="index -3 is out of range for a batch of 2"):
        attr.top_tokens(-3)


def test_conservation_as_dict_checks_the_index(attr):
    c = attr.conservation()
    assert c.as_dict(-1) == c.as_dict(1)
    with pytest.raises(IndexError, match="index 2 is out of range for a batch of 2 examples"):
        c.as_dict(2)
    with pytest.raises(IndexError, match="out of range for a batch of 2"):
        c.format(9)


def test_empty_image_batch_is_refused(vit, images):
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3, 32, 32\)\)"):
        lp.explain(vit, images[:0], torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("gamma", [-1, float("nan")])
def test_negative_gamma_is_refused(vit, images, gamma):
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0 .*got"):
        lp.explain(vit, images, 0, patch_rule="gamma", gamma=gamma)
