"""Targets, batches with padding, records, aggregation, errors and the safety promises."""

import copy

import pytest
import torch

import lens_palrp as lp
from models import make_model

D = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def model():
    return make_model("llama_like", biases=True)


def toks(n=8, batch=2, seed=0, vocab=40):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_token_target_equals_the_logit(model):
    t = toks()
    attr = lp.explain(model, t, 5, position=-2)
    with torch.no_grad():
        logits = model(t)
    torch.testing.assert_close(attr.target_value, logits[:, -2, 5], **D)
    per_example = lp.explain(model, t, torch.tensor([5, 9]), position=torch.tensor([3, 7]))
    torch.testing.assert_close(per_example.target_value, torch.stack([logits[0, 3, 5], logits[1, 7, 9]]), **D)


def test_logit_difference_is_the_difference_of_two_explanations(model):
    t = toks()
    diff = lp.explain(model, t, (5, 9))
    a, b = lp.explain(model, t, 5), lp.explain(model, t, 9)
    for field in ("semantic", "positional", "heads_by_pos", "mlp", "target_value"):
        torch.testing.assert_close(getattr(diff, field), getattr(a, field) - getattr(b, field), **D)


def test_metric_callable(model):
    t = toks()
    metric = lambda logits: logits[:, -1, 5] - logits[:, -1].mean(-1)
    attr = lp.explain(model, t, metric)
    with torch.no_grad():
        torch.testing.assert_close(attr.target_value, metric(model(t)), **D)


def test_at_hook_neuron_target_and_linearity(model):
    """A neuron's relevance flows down from its hook; layers above it get nothing."""
    t = toks()
    target = lp.at_hook("blocks.0.mlp.hook_post", lambda a: a[:, -1, 3])
    attr = lp.explain(model, t, target)
    _, cache = model.run_with_cache(t, names_filter="blocks.0.mlp.hook_post")
    torch.testing.assert_close(attr.target_value, cache["blocks.0.mlp.hook_post"][:, -1, 3], **D)
    assert attr.heads_by_pos[:, 1].abs().sum() == 0 and attr.positional[:, 1].abs().sum() == 0
    assert attr.positional[:, 0].abs().sum() > 0
    # the identity rule makes the neuron's relevance reach the MLP input whole (no bias lost)
    direction = torch.randn(model.cfg.d_model, dtype=torch.float64)
    resid = lp.explain(model, t, lp.at_hook("blocks.1.hook_resid_pre", lambda a: a[:, -1] @ direction))
    torch.testing.assert_close(resid.residual[:, 1].sum(-1), resid.target_value, **D)


def test_records_are_activation_times_gradient_and_feed_the_summary_fields(model):
    """Every record is ``activation * recorded rule-modified gradient`` with the activation's
    shape (grouped keys included: both folded to the kv heads); the summary fields are sums of
    the records over channels; the uniform rule on ``A V`` gives the pattern and the values half
    of the head output's relevance each (no bias inside ``A V``)."""
    names = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_v", "blocks.0.attn.hook_z",
             "blocks.1.attn.hook_k", "blocks.1.attn.hook_v", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"]
    t = toks()
    attr = lp.explain(model, t, 5, record=names, record_gradients=names)
    _, cache = model.run_with_cache(t, names_filter=names)
    for n in names:
        assert attr.hooks[n].shape == cache[n].shape == attr.gradients[n].shape, n
        torch.testing.assert_close(attr.hooks[n], cache[n] * attr.gradients[n], **D)
        assert float(attr.hooks[n].abs().max()) > 0, n
    assert attr.hooks["blocks.1.attn.hook_k"].shape[2] == model.cfg.n_key_value_heads < model.cfg.n_heads
    torch.testing.assert_close(attr.semantic, attr.hooks["hook_embed"].sum(-1), **D)
    torch.testing.assert_close(attr.heads_by_pos[:, 0], attr.hooks["blocks.0.attn.hook_z"].sum(-1).transpose(1, 2), **D)
    torch.testing.assert_close(attr.mlp[:, 1], attr.hooks["blocks.1.mlp.hook_post"].sum(-1), **D)
    torch.testing.assert_close(attr.residual[:, 2], attr.hooks["blocks.1.hook_resid_post"].sum(-1), **D)
    r_z = attr.hooks["blocks.0.attn.hook_z"].sum((1, 2, 3))
    torch.testing.assert_close(attr.hooks["blocks.0.attn.hook_pattern"].sum((1, 2, 3)), 0.5 * r_z, **D)
    torch.testing.assert_close(attr.hooks["blocks.0.attn.hook_v"].sum((1, 2, 3)), 0.5 * r_z, **D)


@pytest.mark.parametrize("config", ["llama_like", "gpt2_like", "alibi", "shortformer"])
def test_padded_batch_equals_single_runs(config):
    model = make_model(config, biases=True)
    a, b = toks(n=9, batch=1, seed=1), toks(n=5, batch=1, seed=2)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, :5] = a[0], b[0]
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0], mask[1, :5] = 1, 1
    for method in ("pa_lrp", "attn_lrp", "grad_x_input"):
        both = lp.explain(model, batch, (5, 7), attention_mask=mask, method=method)
        for i, single in enumerate((a, b)):
            one = lp.explain(model, single, (5, 7), method=method)
            n = single.shape[1]
            torch.testing.assert_close(both.target_value[i], one.target_value[0], **D)
            torch.testing.assert_close(both.semantic[i, :n], one.semantic[0], **D)
            torch.testing.assert_close(both.positional[i, ..., :n], one.positional[0], **D)
            torch.testing.assert_close(both.heads[i], one.heads[0], **D)
            torch.testing.assert_close(both.combined()[i, :n], one.combined()[0], **D)
            assert both.semantic[i, n:].abs().sum() == 0


def test_string_inputs_are_tokenized_and_padded():
    model, _ = lp.zoo.load("rope-repeat")
    attr = lp.explain(model, ["a b c d e f", "a b c"], 0)
    assert attr.tokens.shape[0] == 2 and attr.attention_mask[1].sum() < attr.attention_mask[0].sum()
    assert attr.str_tokens[1][-1].strip() == "c"


def test_combined_per_example_parts_and_normalization():
    """The contract of ``combined()`` beyond each reduction (those are rebuilt from the records in
    test_headline_maps.py): a padded batch gives each example's own map, pads 0, the max-abs
    normalization taken per example; the "all" map is the semantic part plus the positional part;
    ``normalize`` divides by each row's max-abs and leaves an all-zero map at 0 (not NaN); relu
    maps are >= max(signed, 0) (positive parts of every channel)."""
    model = make_model("gpt2_like", biases=True)  # input PE: both parts present
    a, b = toks(n=9, batch=1, seed=1), toks(n=5, batch=1, seed=2)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, :5] = a[0], b[0]
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0], mask[1, :5] = 1, 1
    both = lp.explain(model, batch, 5, attention_mask=mask)
    singles = [lp.explain(model, x, 5) for x in (a, b)]
    for agg in ("relu", "abs", "signed"):
        for parts in ("all", "semantic", "positional"):
            for normalize in (None, True, False):
                kw = dict(parts=parts, normalize=normalize)
                got = both.combined(agg, **kw)
                for i, single in enumerate(singles):
                    n = single.tokens.shape[1]
                    torch.testing.assert_close(got[i, :n], single.combined(agg, **kw)[0], **D)
                    assert float(got[i, n:].abs().sum()) == 0.0
            raw = {p: both.combined(agg, p, normalize=False) for p in ("all", "semantic", "positional")}
            assert float(raw["semantic"].abs().max()) > 1e-6 and float(raw["positional"].abs().max()) > 1e-6
            torch.testing.assert_close(raw["all"], raw["semantic"] + raw["positional"], **D)
            row_max = raw["all"].abs().amax(-1, keepdim=True)
            torch.testing.assert_close(both.combined(agg, normalize=True), raw["all"] / row_max, **D)
    # the two examples' maps have different max-abs: a batch-wide normalization would show
    maxima = both.combined("abs", normalize=False).abs().amax(-1)
    assert float((maxima[0] - maxima[1]).abs()) > 1e-3 * float(maxima.max())
    relu, signed = both.combined("relu"), both.combined("signed")
    assert bool((relu >= signed.clamp(min=0) - 1e-12).all())
    assert float((relu - signed.clamp(min=0)).abs().max()) > 1e-6
    # no PE rule: the positional parts are zero, and normalizing them gives 0, not NaN
    attn = lp.explain(model, batch, 5, attention_mask=mask, method="attn_lrp")
    for agg in ("relu", "abs", "signed"):
        zero = attn.combined(agg, parts="positional", normalize=True)
        assert bool(torch.isfinite(zero).all()) and float(zero.abs().max()) == 0.0
    with pytest.raises(ValueError, match="aggregation"):
        both.combined("max")
    with pytest.raises(ValueError, match="parts"):
        both.combined("relu", parts="tokens")


def test_conservation_prints(model):
    text = str(lp.explain(model, toks(), 5).conservation())
    assert "semantic" in text and "positional" in text and "softmax" in text


# ------------------------------------------------------------------------------------ safety
def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": model.training,
        "hooks": sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values()),
        "torch_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "ungroup": model.cfg.ungroup_grouped_query_attention,
    }


def assert_same(model, before):
    after = snapshot(model)
    for k in ("requires_grad", "training", "hooks", "torch_hooks", "ungroup"):
        assert after[k] == before[k], k
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for g0, g1 in zip(before["grads"], after["grads"]):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)


def test_model_left_unchanged_after_success_and_errors():
    model = make_model("llama_like")
    model.train()
    model.blocks[0].attn.W_Q.requires_grad_(False)
    model.blocks[1].mlp.W_in.grad = torch.ones_like(model.blocks[1].mlp.W_in)
    before = snapshot(model)
    lp.explain(model, toks(), 5)
    assert_same(model, before)

    def bad_metric(logits):
        raise RuntimeError("user metric failed")

    with pytest.raises(RuntimeError, match="user metric failed"):
        lp.explain(model, toks(), bad_metric)
    assert_same(model, before)

    def bad_hook_fn(act):
        raise KeyError("inside the forward")

    with pytest.raises(KeyError):
        lp.explain(model, toks(), lp.at_hook("blocks.0.hook_resid_post", bad_hook_fn))
    assert_same(model, before)


def test_works_inside_no_grad_and_inference_mode(model):
    t = toks()
    ref = lp.explain(model, t, 5)
    with torch.no_grad():
        a = lp.explain(model, t, 5)
    with torch.inference_mode():
        b = lp.explain(model, t, 5)
    torch.testing.assert_close(a.semantic, ref.semantic, **D)
    torch.testing.assert_close(b.positional, ref.positional, **D)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target=40), ValueError, "out of the vocabulary"),
        (dict(target=-1), ValueError, "out of the vocabulary"),
        (dict(target=5, position=8), ValueError, "out of range"),
        (dict(target=5, position=-9), ValueError, "out of range"),
        (dict(target=5, method="lrp"), ValueError, "unknown method"),
        (dict(target=5.0), TypeError, "target"),
        (dict(target=(1, 2, 3)), ValueError, "pair"),
        (dict(target=lambda logits: logits[:, -1]), ValueError, "shape"),
        (dict(target=lp.at_hook("blocks.9.hook_resid_post", lambda a: a.sum())), ValueError, "no hook point"),
        (dict(target=5, record=["blocks.0.nope"]), ValueError, "no hook point"),
    ],
)
def test_clear_errors(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        lp.explain(model, toks(), **kwargs)


def test_input_errors(model):
    with pytest.raises(ValueError, match="too long"):
        lp.explain(model, toks(n=21), 5)
    with pytest.raises(ValueError, match="empty"):
        lp.explain(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="empty"):
        lp.explain(model, [], 5)
    with pytest.raises(TypeError, match="integer"):
        lp.explain(model, torch.zeros(1, 3), 5)
    with pytest.raises(TypeError, match="cannot explain"):
        lp.explain(torch.nn.Linear(2, 2), toks(), 5)


def test_half_precision_is_explained_in_float32_records():
    model = make_model("gpt2_like").to(torch.float32)
    model.cfg.dtype = torch.float32
    attr = lp.explain(model, toks(), 5)
    assert attr.semantic.dtype == torch.float32 and torch.isfinite(attr.semantic).all()
    half = copy.deepcopy(model).to(torch.bfloat16)
    half_attr = lp.explain(half, toks(), 5)  # tests/test_precision.py checks its accuracy
    assert half_attr.semantic.dtype == torch.float32 and torch.isfinite(half_attr.semantic).all()


def test_unsupported_config_names_the_option():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_vocab=10,
                                  act_fn="gelu", clip_qkv=1.0)
    with pytest.raises(NotImplementedError, match="clip_qkv"):
        lp.explain(HookedTransformer(cfg), toks(vocab=10), 1)
