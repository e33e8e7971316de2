"""End to end on real (trained, shipped) weights: the zoo models, the demo and the figures.

The zoo ships Hugging Face folders, so this runs under TransformerLens 3.9 (HookedTransformer by
default, and the bridge) and 4.x (TransformerBridge only).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import lens_palrp as lp

if not lp.zoo.available():
    pytest.skip("neither HookedTransformer nor TransformerBridge imports", allow_module_level=True)
from lens_palrp.analyses import positional_heads_data, positional_heads_figure, token_relevance_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKED = lp.zoo.hooked_available()
needs_hooked = pytest.mark.skipif(not HOOKED, reason="HookedTransformer is TransformerLens 3.x only")
ARCHITECTURES = {"rope-repeat": "LlamaForCausalLM", "learned-absolute": "GPT2LMHeadModel",
                 "alibi-repeat": "BloomForCausalLM"}


def every_model_and_kind():
    """(name, kind) for every zoo model, as HookedTransformer (3.x only) and as bridge."""
    params = []
    for name in sorted(ARCHITECTURES):
        params.append(pytest.param(name, "hooked", marks=needs_hooked, id=f"{name}-hooked"))
        params.append(pytest.param(name, "bridge", id=f"{name}-bridge"))
    return params


@pytest.fixture(scope="module")
def zoo_model():
    return lp.zoo.load("rope-repeat")[0]


def test_zoo_lists_and_loads_offline(zoo_model):
    assert lp.zoo.names() == sorted(ARCHITECTURES)
    total = 0
    for name in lp.zoo.names():
        folder = lp.zoo.folder(name)
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "training.json"} <= set(os.listdir(folder))
        with open(os.path.join(folder, "config.json")) as f:
            assert json.load(f)["architectures"] == [ARCHITECTURES[name]]  # the bridge picks its adapter by it
        record = lp.zoo.training_record(name)
        assert record["architecture"] == ARCHITECTURES[name] and record["task"] == lp.zoo.MODELS[name]["task"]
        assert record["training"]["heldout_accuracy"] == 1.0
        total += os.path.getsize(os.path.join(folder, "model.safetensors"))
    assert total < 2 * 2**20
    assert type(zoo_model).__name__ == ("HookedTransformer" if HOOKED else "TransformerBridge")
    assert zoo_model.cfg.n_ctx == 32 and zoo_model.to_tokens("a b").tolist() == [[0, 2, 3]]
    with pytest.raises(ValueError, match="unknown zoo model"):
        lp.zoo.load("gpt-5")
    with pytest.raises(ValueError, match="kind must be one of"):
        lp.zoo.load("rope-repeat", kind="hf")


@pytest.mark.skipif(HOOKED, reason="TransformerLens 3.x has HookedTransformer")
def test_hooked_kind_on_transformer_lens_4_says_what_to_do():
    with pytest.raises(ImportError, match="kind='bridge'"):
        lp.zoo.load("rope-repeat", kind="hooked")


@needs_hooked
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_hooked_transformer_and_bridge_give_the_same_logits(name, dtype):
    """One folder, two TransformerLens models: the same logits on a task batch. GPT-2 agrees
    exactly. Hugging Face computes parts in float32 whatever the dtype (Llama: RMSNorm and the RoPE
    tables; BLOOM: the attention softmax); the bridge runs that code, HookedTransformer computes in
    its dtype, so there float64 agrees only to float32 rounding (about 2e-5 on logits near 10)."""
    hooked, _ = lp.zoo.load(name, "hooked", dtype=dtype)
    bridge, _ = lp.zoo.load(name, "bridge", dtype=dtype)
    tokens, _ = lp.zoo.task(name).batch(64, torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = hooked(tokens), bridge(tokens)
    assert a.dtype == b.dtype == dtype
    exact = name == "learned-absolute" and dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10 if exact else 5e-5)
    # the predictions agree wherever the top two logits are further apart than that rounding
    # (a near-tie could flip on another CPU's kernels); the trained models leave few such places
    top2 = a.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2e-4
    assert float(clear.double().mean()) > 0.9
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
    assert hooked.to_tokens("a b").tolist() == bridge.to_tokens("a b").tolist() == [[0, 2, 3]]


@pytest.mark.parametrize("name,kind", every_model_and_kind())
def test_every_zoo_model_solves_its_task(name, kind):
    model, _ = lp.zoo.load(name, kind)
    tokens, labels = lp.zoo.task(name).batch(256, torch.Generator().manual_seed(11))
    with torch.no_grad():
        pred = model(tokens).argmax(-1)
    keep = labels != -100
    assert torch.equal(pred[keep], labels[keep])


@pytest.mark.parametrize("name,kind", every_model_and_kind())
def test_every_zoo_model_pa_lrp_points_at_the_answer(name, kind):
    """Real trained weights of each PE family: the prediction is right, and PA-LRP's maps peak
    at the known relevant position for every example."""
    from lens_palrp.analyses.faithfulness import ground_truth_scores

    model, _ = lp.zoo.load(name, kind)
    task = lp.zoo.task(name)
    tokens, labels = task.batch(16, torch.Generator().manual_seed(11))
    t = 12
    answer = labels[:, t]
    attr = lp.explain(model, tokens[:, : t + 1], answer)
    with torch.no_grad():
        assert (model(tokens[:, : t + 1])[:, -1].argmax(-1) == answer).all()
    relevant = torch.zeros(16, t + 1)
    relevant[:, task.relevant_position(t)] = 1
    semantic = ground_truth_scores(attr.semantic, relevant)
    assert float(semantic["pointing"].mean()) == 1.0  # the token map always finds the answer
    combined = ground_truth_scores(attr.combined(), relevant)
    # the combined map adds the positional sinks; with ALiBi (k = 1) Eq. 16 also credits the
    # query position next to the answer, which may win for a few examples
    assert float(combined["pointing"].mean()) >= 0.85
    assert float(combined["mass_share"].mean()) > 0.3
    c = attr.conservation()
    torch.testing.assert_close(c.semantic + c.positional_input + c.positional + c.softmax_absorbed + c.other_absorbed,
                               c.target_value, rtol=1e-4, atol=1e-4)
    if name == "learned-absolute":
        assert float(attr.positional_input.abs().sum()) > 0
    else:
        assert float(c.positional.abs().min()) > 0


def test_trained_model_answers_and_the_explanation_points_k_back(zoo_model):
    """The answer at position t is the token at t - 3: PA-LRP's token map must peak there, for
    every position of a batch of random prompts (strongest check on real weights)."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.cat([torch.zeros(8, 1, dtype=torch.long), torch.randint(2, 18, (8, 12), generator=g)], 1)
    hits = 0
    total = 0
    for t in range(4, 13):
        answer = tokens[:, t - 3]
        attr = lp.explain(zoo_model, tokens[:, : t + 1], answer)
        with torch.no_grad():
            assert (zoo_model(tokens[:, : t + 1])[:, -1].argmax(-1) == answer).all()
        hits += int((attr.semantic.argmax(-1) == t - 3).sum())
        total += tokens.shape[0]
        c = attr.conservation()
        assert (c.positional.abs() > 0).all()
    assert hits == total


def test_trained_model_has_a_substantial_positional_share(zoo_model):
    """Identity 10 (trained side): the positional sinks hold a non-trivial share of the
    relevance mass once the model has learned to use position (init side: test_llama_reference)."""
    attr = lp.explain(zoo_model, ["c h a p k b e g", "a b c d e f g h i j k l"], "k")
    pos = attr.positional.abs().sum((1, 2, 3))
    share = pos / (pos + attr.semantic.abs().sum(-1))
    assert (share > 0.05).all() and (share < 0.5).all()


def test_figures_hold_the_attribution_data(zoo_model):
    attr = lp.explain(zoo_model, "c h a p k b e g", "k")
    fig = positional_heads_figure(attr)
    z = torch.tensor(fig.data[0].z, dtype=torch.float64)
    torch.testing.assert_close(z, attr.positional[0].sum(-1).double(), rtol=1e-6, atol=1e-8)
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    at = positional_heads_data(attr, position=5)
    torch.testing.assert_close(at, attr.positional[0, :, :, 5].detach())
    tok = token_relevance_figure(attr)
    assert len(tok.data) == 3 and list(tok.data[0].x)[5] == "5:k"
    torch.testing.assert_close(torch.tensor(tok.data[0].z[0], dtype=torch.float64), attr.semantic[0].double(), rtol=1e-6, atol=1e-8)


def test_quickstart_demo_runs(tmp_path):
    out = tmp_path / "q.html"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "demos", "quickstart.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "answer 'k' (predicted 'k')" in run.stdout
    assert ("HookedTransformer" if HOOKED else "TransformerBridge") in run.stdout
    html = out.read_text()
    assert "Positional relevance per head" in html and "plotly" in html.lower()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_training_is_reproducible_and_writes_a_loadable_folder(name, tmp_path):
    """The retraining command is deterministic: two short runs give identical weights, in a
    folder that boots as a TransformerBridge."""
    from safetensors.torch import load_file

    from lens_palrp.zoo.train import train

    threads = torch.get_num_threads()
    for run in ("a", "b"):
        train(name, steps=5, batch=16, out_dir=str(tmp_path / run), verbose=False)
    assert torch.get_num_threads() == threads  # restored
    a = load_file(tmp_path / "a" / name / "model.safetensors")
    b = load_file(tmp_path / "b" / name / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(os.listdir(tmp_path / "a" / name)) >= set(os.listdir(lp.zoo.folder(name)))
    bridge = lp.models.bridge_from_folder(str(tmp_path / "a" / name))
    assert bridge.cfg.n_ctx == 32
