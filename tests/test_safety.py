"""The model is never left changed, concurrent calls are safe, and unverified cases are refused.

Each test names the wrong code it catches: a sweep that shares state between threads, a restore
that stops half-way, dropout left on, a bridge architecture explained without being verified.
"""

import threading
import warnings

import pytest
import torch

import lens_palrp as lp
from bridges import tiny_gpt2, tiny_gpt_neox, tiny_llama

D = dict(rtol=0, atol=0)  # the same computation must give the same bits


def state(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        # a bridge keeps its Hugging Face model outside model.modules(): its flags count too
        "modes": [m.training for m in model.modules()]
        + [m.training for m in getattr(model, "original_model", torch.nn.Module()).modules()],
        "hooks": sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values()),
        "cfg": repr(model.cfg),
    }


def assert_unchanged(model, before):
    after = state(model)
    assert all(torch.equal(a, b) for a, b in zip(after["params"], before["params"]))
    for key in ("requires_grad", "modes", "hooks", "cfg"):
        assert after[key] == before[key], key
    assert all(a is b for a, b in zip(after["grads"], before["grads"]))


@pytest.fixture(scope="module")
def gqa_model():
    models = pytest.importorskip("models", reason="needs HookedTransformer (TransformerLens 3.x)")
    return models.make_model("llama_like")


@pytest.fixture(scope="module")
def gpt2_bridge(tmp_path_factory):
    pytest.importorskip("transformer_lens.model_bridge")
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2"))[1]


# --------------------------------------------------------------------------------- threads
def explain_in_threads(model, jobs):
    results, errors = [None] * len(jobs), []

    def work(i, tokens, target):
        try:
            results[i] = lp.explain(model, tokens, target)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_threads_on_one_model_give_the_serial_maps_and_restore_it(gqa_model):
    """Without a per-model lock the two sweeps' hooks and frozen flags interleave (maps 0.3 off,
    every parameter left requires_grad=False, GQA left ungrouped)."""
    model = gqa_model
    before = state(model)
    assert model.cfg.ungroup_grouped_query_attention is False
    gen = torch.Generator().manual_seed(3)
    jobs = [(torch.randint(0, 40, (2, 12), generator=gen), int(t)) for t in range(6)]
    serial = [lp.explain(model, tokens, target) for tokens, target in jobs]
    threaded = explain_in_threads(model, jobs)
    for a, b in zip(threaded, serial):
        for field in ("semantic", "positional", "heads_by_pos", "target_value"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), **D)
    assert_unchanged(model, before)
    assert model.cfg.ungroup_grouped_query_attention is False


def test_a_record_filter_skips_the_hooks_a_bridge_gates(gpt2_bridge):
    """``hook_result`` and the split q/k/v inputs refuse hooks while their flag is off: a filter
    over the whole attention block must record the rest, not fail on those."""
    attr = lp.explain(gpt2_bridge, torch.tensor([[2, 5, 7, 3]]), 5, record=lambda n: n.startswith("blocks.0.attn."))
    assert "blocks.0.attn.hook_pattern" in attr.hooks and "blocks.0.attn.hook_result" not in attr.hooks


def test_threads_on_a_bridge(gpt2_bridge):
    tokens = torch.randint(2, 18, (1, 9), generator=torch.Generator().manual_seed(4))
    serial = lp.explain(gpt2_bridge, tokens, 5)
    for attr in explain_in_threads(gpt2_bridge, [(tokens, 5)] * 4):
        torch.testing.assert_close(attr.semantic, serial.semantic, **D)


def test_explain_from_inside_its_own_sweep_is_refused(gqa_model):
    before = state(gqa_model)

    def nested(logits):
        lp.explain(gqa_model, torch.tensor([[1, 2, 3]]), 5)
        return logits[:, -1, 5]

    with pytest.raises(RuntimeError, match="already explaining"):
        lp.explain(gqa_model, torch.tensor([[1, 2, 3]]), nested)
    assert_unchanged(gqa_model, before)
    lp.explain(gqa_model, torch.tensor([[1, 2, 3]]), 5)  # the lock was released


# --------------------------------------------------------------------------------- inference mode
def test_a_model_built_under_inference_mode_is_refused_up_front():
    """Its parameters are inference tensors: the restore loop raised torch's error half-way and
    left every parameter frozen."""
    pytest.importorskip("transformer_lens.model_bridge")
    with torch.inference_mode():
        model = torch.nn.Linear(2, 2)
    from lens_palrp.safety import check_usable

    with pytest.raises(RuntimeError, match="inference_mode"):
        check_usable(model)


def test_inference_mode_hooked_transformer_is_refused_and_unchanged():
    models = pytest.importorskip("models", reason="needs HookedTransformer (TransformerLens 3.x)")
    with torch.inference_mode():
        model = models.make_model("gpt2_like")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inference_mode"):
        lp.explain(model, torch.tensor([[1, 2, 3]]), 5)
    assert flags == [p.requires_grad for p in model.parameters()]


# --------------------------------------------------------------------------------- train mode
@pytest.mark.parametrize("family", ["hooked", "bridge"])
def test_train_mode_is_explained_in_eval_and_restored(family, gpt2_bridge):
    """Dropout on would make the map random (0.028 off on a bridge); one rule for every family."""
    if family == "hooked":
        models = pytest.importorskip("models", reason="needs HookedTransformer (TransformerLens 3.x)")
        model = models.make_model("gpt2_like")
    else:
        model = gpt2_bridge
    tokens = torch.tensor([[2, 5, 7, 3, 9, 4]])
    model.eval()
    reference = lp.explain(model, tokens, 5)
    model.train()
    model.blocks[0].eval()  # a mixed state must come back as it was, module by module
    before = state(model)
    try:
        trained = lp.explain(model, tokens, 5)
        assert_unchanged(model, before)
        assert model.training and not model.blocks[0].training
    finally:
        model.eval()
    torch.testing.assert_close(trained.semantic, reference.semantic, **D)
    torch.testing.assert_close(trained.target_value, reference.target_value, **D)


# --------------------------------------------------------------------------------- inputs
def test_long_strings_are_refused_not_truncated(zoo):
    model, _ = zoo
    long_prompt = " ".join("abcdefgh"[i % 8] for i in range(50))
    with pytest.raises(ValueError, match="too long: prompt 0 is 51 tokens.*n_ctx is 32"):
        lp.explain(model, long_prompt, " k")
    with pytest.raises(ValueError, match="too long: 51 tokens"):
        lp.explain(model, torch.zeros(1, 51, dtype=torch.long), 5)


def test_out_of_vocabulary_ids_name_the_id_and_position(zoo):
    model, _ = zoo
    with pytest.raises(ValueError, match=r"token id 18 at example 1, position 2 is outside the vocabulary \(0..17\)"):
        lp.explain(model, torch.tensor([[0, 4, 9], [0, 4, 18]]), 5)
    with pytest.raises(ValueError, match="token id -3 at example 0, position 0"):
        lp.explain(model, torch.tensor([[-3, 4, 9]]), 5)


def test_record_takes_a_name_a_list_or_a_names_filter(zoo):
    model, _ = zoo
    tokens = torch.tensor([[0, 4, 9, 2]])
    one = lp.explain(model, tokens, 5, record="blocks.0.hook_resid_pre")
    assert list(one.hooks) == ["blocks.0.hook_resid_pre"]
    filtered = lp.explain(model, tokens, 5, record=lambda name: name.endswith("attn.hook_z"))
    assert sorted(filtered.hooks) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    grads = lp.explain(model, tokens, 5, record_gradients="blocks.1.hook_resid_pre")
    assert list(grads.gradients) == ["blocks.1.hook_resid_pre"]
    with pytest.raises(ValueError, match="record_gradients: the model has no hook point named 'nope'"):
        lp.explain(model, tokens, 5, record_gradients=["nope"])
    with pytest.raises(TypeError, match="record: hook names are strings"):
        lp.explain(model, tokens, 5, record=[3])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"attention_mask": torch.tensor([[1, 1, 2, 0]])}, ValueError, "only 0 .pad. and 1 .real token., found 2"),
        ({"attention_mask": torch.tensor([[0.5, 1, 1, 0]])}, ValueError, "found 0.5"),
        ({"attention_mask": torch.tensor([[0, 0, 0, 0]])}, ValueError, "row 0 is all padding"),
        ({"attention_mask": torch.tensor([[1, 0, 1, 0]])}, ValueError, "row 0 has a gap"),
        ({"position": 1.0}, TypeError, "position must be an int"),
        ({"position": torch.tensor([1.5])}, TypeError, "position must hold integers"),
        ({"position": True}, TypeError, "got a bool"),
    ],
)
def test_masks_and_positions_are_checked_not_truncated(zoo, kwargs, error, match):
    model, _ = zoo
    with pytest.raises(error, match=match):
        lp.explain(model, torch.tensor([[0, 4, 9, 2]]), 5, **kwargs)


def test_numpy_integers_are_accepted_as_target_position_and_tokens(zoo):
    np = pytest.importorskip("numpy")
    model, _ = zoo
    reference = lp.explain(model, torch.tensor([[0, 4, 9, 2]]), 5, position=2)
    for attr in (
        lp.explain(model, torch.tensor([[0, 4, 9, 2]]), np.int64(5), position=np.int32(2)),
        lp.explain(model, np.array([[0, 4, 9, 2]]), np.array([5]), position=np.array([2])),
    ):
        torch.testing.assert_close(attr.semantic, reference.semantic, **D)


# --------------------------------------------------------------------------------- architectures
def test_unverified_bridge_architectures_are_refused_unless_opted_in(tmp_path, monkeypatch):
    """An unverified architecture is refused, naming it; the opt-in explains with a warning.
    GPT-NeoX (verified since ``bridge_parallel.py``) stands in for one, taken off the list here."""
    pytest.importorskip("transformer_lens.model_bridge")
    from lens_palrp.hooks import transformer_bridge

    monkeypatch.setattr(transformer_bridge, "VERIFIED_ARCHITECTURES",
                        transformer_bridge.VERIFIED_ARCHITECTURES - {"gpt_neox"})
    _, bridge = tiny_gpt_neox(tmp_path / "neox")
    before = state(bridge)
    tokens = torch.tensor([[2, 5, 7, 3]])
    with pytest.raises(NotImplementedError, match="architecture 'gpt_neox' .GPTNeoXForCausalLM.*allow_unverified=True"):
        lp.explain(bridge, tokens, 5)
    assert_unchanged(bridge, before)
    with pytest.warns(UserWarning, match="unverified architecture 'gpt_neox'"):
        opted = lp.explain(bridge, tokens, 5, allow_unverified=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lp.unverified_architectures():
            again = lp.explain(bridge, tokens, 5)
    torch.testing.assert_close(opted.semantic, again.semantic, **D)
    with pytest.raises(NotImplementedError, match="gpt_neox"):  # the opt-in does not outlive its block
        lp.explain(bridge, tokens, 5)


def test_verified_bridges_need_no_opt_in(tmp_path):
    pytest.importorskip("transformer_lens.model_bridge")
    _, bridge = tiny_llama(tmp_path / "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*hook_scale.*")
        lp.explain(bridge, torch.tensor([[2, 5, 7, 3]]), 5)
