"""End to end on real (trained, shipped) weights: the zoo model, the demo and the figures."""

import os
import subprocess
import sys

import pytest
import torch

import lens_palrp as lp

if not lp.zoo.available():
    pytest.skip("the zoo's models are HookedTransformers (TransformerLens 3.x)", allow_module_level=True)
from lens_palrp.analyses import positional_heads_data, positional_heads_figure, token_relevance_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def zoo_model():
    return lp.zoo.load("rope-repeat")[0]


def test_zoo_lists_and_loads_offline(zoo_model):
    assert lp.zoo.names() == ["alibi-repeat", "learned-absolute", "rope-repeat"]
    total = 0
    for name in lp.zoo.names():
        assert lp.zoo.training_record(name)["training"]["heldout_accuracy"] > 0.99
        total += os.path.getsize(os.path.join(lp.zoo.WEIGHTS_DIR, f"{name}.pt"))
    assert total < 5 * 2**20
    with pytest.raises(ValueError, match="unknown zoo model"):
        lp.zoo.load("gpt-5")


@pytest.mark.parametrize("name", ["rope-repeat", "learned-absolute", "alibi-repeat"])
def test_every_zoo_model_solves_its_task_and_pa_lrp_points_at_the_answer(name):
    """Real trained weights of each PE family: the prediction is right, and PA-LRP's combined map
    peaks at the known relevant position for every example."""
    from lens_palrp.analyses.faithfulness import ground_truth_scores

    model, _ = lp.zoo.load(name)
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
    # query position next to the answer, which wins for 1 in 16 examples here
    assert float(combined["pointing"].mean()) >= 0.85
    assert float(combined["mass_share"].mean()) > 0.3
    assert float(attr.conservation().positional.abs().min()) > 0 or name == "learned-absolute"
    if name == "learned-absolute":
        assert float(attr.positional_input.abs().sum()) > 0


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
    html = out.read_text()
    assert "Positional relevance per head" in html and "plotly" in html.lower()


def test_training_is_reproducible(tmp_path):
    """The retraining command is deterministic: two short runs give identical weights."""
    from lens_palrp.zoo.train import train

    threads = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            train("rope-repeat", steps=5, batch=16, out_dir=str(tmp_path / run), verbose=False)
    finally:
        torch.set_num_threads(threads)
    a = torch.load(tmp_path / "a" / "rope-repeat.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "rope-repeat.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
