"""Fused attention and block-wise recomputation (``explain(attention=..., checkpoint=...)``).

The two rewrites change how the sweep computes, never what: every map agrees with eager attention
without recomputation to float64 rounding. Eager attention is chosen (and the reason given) where
the fused kernel cannot serve, ``attention="fused"`` refuses those cases, and the model is left as
it was, also when the sweep fails.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lens_palrp as lp
from lens_palrp import rules
from lens_palrp.methods import METHODS
from lens_palrp.roles import Role

from long_context import assert_same_maps, swapped_forwards
from models import make_model
from padding import pad

FUSED_CONFIGS = ["gpt2_like", "llama_like", "gptj_like", "neox_like", "shortformer", "solu_ln", "sinusoidal"]
VARIANTS = {  # name -> explain options, compared with attention="eager", checkpoint=False
    "fused": {},
    "fused+checkpoint": {"checkpoint": True},
    "eager+checkpoint": {"attention": "eager", "checkpoint": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp", "cp_lrp", "grad_x_input"])
@pytest.mark.parametrize("config", FUSED_CONFIGS)
def test_maps_agree_with_eager_attention(config, method, variant, device):
    model = make_model(config, device=device)
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 9), device=device)
    eager = lp.explain(model, tokens, 3, method=method, attention="eager")
    other = lp.explain(model, tokens, 3, method=method, **VARIANTS[variant])
    assert other.computation["attention"] == ("eager" if variant.startswith("eager") else "fused")
    assert other.computation["checkpoint"] == variant.endswith("checkpoint")
    assert eager.computation == {"attention": "eager", "eager_reason": "attention='eager' was asked for",
                                 "eager_layers": [0, 1], "checkpoint": False, "logits": "explained positions"}
    assert_same_maps(other, eager)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config", ["llama_like", "gpt2_like"])
def test_padded_batches_agree(config, side):
    """Pads are masked keys, and a left pad is a query that sees no key: its output is zero in
    eager attention and in the kernel."""
    model = make_model(config)
    tokens, mask = pad([torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([11, 12, 13])], side)
    record = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_v"]
    eager = lp.explain(model, tokens, 3, attention_mask=mask, attention="eager", record=record)
    for options in ({}, {"checkpoint": True}):
        fused = lp.explain(model, tokens, 3, attention_mask=mask, record=record, **options)
        assert fused.computation["attention"] == "fused"
        assert_same_maps(fused, eager)


def test_records_and_gradients_agree_under_checkpoint():
    model = make_model("llama_like")
    tokens = torch.randint(1, 40, (2, 8))
    names = ["blocks.0.attn.hook_rot_q", "blocks.1.attn.hook_rot_k", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_pre"]
    eager = lp.explain(model, tokens, 3, record=names, record_gradients=names, attention="eager")
    fused = lp.explain(model, tokens, 3, record=names, record_gradients=names, checkpoint=True)
    assert set(fused.hooks) == set(names)
    assert fused.hooks["blocks.1.attn.hook_rot_k"].shape[2] == 2  # folded back to the model's kv heads
    assert_same_maps(fused, eager)


def test_at_hook_target_inside_a_block_under_checkpoint():
    """The forward stops at the explained hook, inside a recomputed block; the recomputation
    runs the block to its end without stopping again."""
    model = make_model("llama_like")
    tokens = torch.randint(1, 40, (2, 8))
    target = lp.at_hook("blocks.1.hook_resid_mid", lambda x: x[:, -1].sum(-1))
    eager = lp.explain(model, tokens, target, attention="eager")
    for options in ({}, {"checkpoint": True}, {"attention": "eager", "checkpoint": True}):
        assert_same_maps(lp.explain(model, tokens, target, **options), eager)


# ------------------------------------------------------------------------ when eager, and why
@pytest.mark.parametrize("config, reason", [
    ("alibi", "ALiBi"),
    ("gemma_like", "no constant gradient factor"),  # the softcap's identity rule
    ("sinks", "attention sinks"),
])
def test_eager_where_the_kernel_cannot_serve(config, reason):
    model = make_model(config)
    tokens = torch.randint(1, 40, (1, 6))
    attr = lp.explain(model, tokens, 3)
    assert attr.computation["attention"] == "eager" and reason in attr.computation["eager_reason"]
    with pytest.raises(ValueError, match="attention='fused' is not possible here"):
        lp.explain(model, tokens, 3, attention="fused")
    assert_same_maps(lp.explain(model, tokens, 3, checkpoint=True), attr)


@pytest.mark.parametrize("option", ["record", "record_gradients"])
def test_recording_the_pattern_needs_eager_attention(option):
    model = make_model("llama_like")
    tokens = torch.randint(1, 40, (1, 6))
    attr = lp.explain(model, tokens, 3, **{option: ["blocks.0.attn.hook_pattern"]})
    assert attr.computation["attention"] == "eager"
    assert "blocks.0.attn.hook_pattern" in attr.computation["eager_reason"]
    kept = attr.hooks if option == "record" else attr.gradients
    assert kept["pattern", 0].shape == (1, 4, 6, 6)
    with pytest.raises(ValueError, match="hook_pattern"):
        lp.explain(model, tokens, 3, attention="fused", **{option: ["blocks.0.attn.hook_pattern"]})


class _ClippedPattern(rules.Rule):
    """A pattern rule that is no constant factor (its apply is its own)."""

    def apply(self, act, site):
        return rules.scale_grad(act, 0.5), 0.5


def test_a_rule_that_is_no_constant_factor_keeps_eager_attention():
    method = METHODS["pa_lrp"].with_rules("pa_lrp_own_pattern_rule", {Role.PATTERN: _ClippedPattern()})
    model = make_model("gpt2_like")
    tokens = torch.randint(1, 40, (1, 6))
    attr = lp.explain(model, tokens, 3, method=method)
    assert attr.computation["attention"] == "eager"
    assert "no constant gradient factor" in attr.computation["eager_reason"]
    assert _ClippedPattern().gradient_factor(None) is None
    assert rules.UniformShare(0.25).gradient_factor(None) == 0.25
    assert rules.HeldConstant().gradient_factor(None) == 0.0
    assert rules.Gradient().gradient_factor(None) == 1.0


@pytest.mark.parametrize("options, error", [
    ({"attention": "flash"}, ValueError),
    ({"attention": None}, ValueError),
    ({"checkpoint": "yes"}, TypeError),
    ({"checkpoint": 1}, TypeError),
])
def test_bad_options_are_named(options, error):
    model = make_model("gpt2_like")
    with pytest.raises(error, match=next(iter(options))):
        lp.explain(model, torch.tensor([[1, 2, 3]]), 3, **options)


# ------------------------------------------------------------------------ the model is left alone
def test_rewrites_are_removed_also_when_the_sweep_fails():
    model = make_model("llama_like")
    tokens = torch.randint(1, 40, (1, 6))

    def failing(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        lp.explain(model, tokens, failing, checkpoint=True)
    assert swapped_forwards(model) == []
    lp.explain(model, tokens, 3, checkpoint=True)
    assert swapped_forwards(model) == []
    _, cache = model.run_with_cache(tokens)  # eager attention again: the pattern exists
    assert cache["pattern", 0].shape == (1, 4, 6, 6)


# ------------------------------------------------------------------------ each rewrite alone
def _bare_sweep(model):
    """What the two rewrites read of a sweep, for plain gradient x input (no rules anywhere)."""
    from lens_palrp.hooks import family_for
    from lens_palrp.methods import get_method

    family = family_for(model)
    encoding = SimpleNamespace(keys_per_query_head=False)
    sweep = SimpleNamespace(
        method=get_method("grad_x_input"), roles=dict(family.hook_roles()), encoding=encoding,
        scores_materialized=True, replaying=False, _pattern_shares={},
        softmax_absorbed=torch.zeros(2, family.n_layers, dtype=torch.float64),
        accumulate=lambda total, value: total.add_(value),
        observed=lambda tensor, fn: tensor,
    )
    return family, sweep


def _logits_and_input_gradient(model, tokens):
    embed = model.embed(tokens).detach().requires_grad_(True)
    with model.hooks(fwd_hooks=[("hook_embed", lambda act, hook: embed)]):
        logits = model(tokens)
    (grad,) = torch.autograd.grad(logits[:, -1, 3].sum(), embed)
    return logits.detach(), grad


@pytest.mark.parametrize("rewrite", ["fused", "checkpoint"])
def test_each_rewrite_alone_computes_the_models_function(rewrite):
    """Registered on a model without any rule, each rewrite leaves the logits and the input
    gradient as they were; fused attention runs no hook_pattern, and remove() brings it back."""
    from lens_palrp.canonizers import CheckpointBlocks, FusedAttention, canonized

    model = make_model("llama_like")
    tokens, mask = pad([torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12, 13])], "left")
    logits, grad = _logits_and_input_gradient(model, tokens)
    family, sweep = _bare_sweep(model)
    fired = []
    hook = ("blocks.0.attn.hook_pattern", lambda act, hook: fired.append(1))
    with canonized([FusedAttention() if rewrite == "fused" else CheckpointBlocks()], family, sweep):
        assert swapped_forwards(model)
        with model.hooks(fwd_hooks=[hook]):
            logits_rw, grad_rw = _logits_and_input_gradient(model, tokens)
    torch.testing.assert_close(logits_rw, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_rw, grad, rtol=1e-10, atol=1e-12)
    assert fired == ([] if rewrite == "fused" else [1, 1])  # checkpoint: the forward and its recomputation
    assert swapped_forwards(model) == []
    assert sweep.scores_materialized is (rewrite != "fused")
    with model.hooks(fwd_hooks=[hook]):
        model(tokens)
    assert fired[-1:] == [1]


# ------------------------------------------------------------------------ logits at the explained positions
@pytest.mark.parametrize("config", ["llama_like", "gemma_like", "gpt2_like"])
def test_logits_at_the_explained_positions_only(config):
    """A token or a logit difference reads one position per example: the unembedding gets only
    those (LogitsAtPositions); a metric may read any position and gets every logit. The maps are
    the same (gemma_like: the output softcap's identity rule on the narrowed logits)."""
    model = make_model(config)
    tokens, mask = pad([torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([11, 12, 13])], "left")
    shapes = []
    hook = ("unembed.hook_in", lambda act, hook: shapes.append(tuple(act.shape)))

    def metric(logits, positions):
        rows = torch.arange(logits.shape[0])
        return logits[rows, positions, 3] - logits[rows, positions, 4]

    with model.hooks(fwd_hooks=[hook]):
        narrowed = lp.explain(model, tokens, (3, 4), attention_mask=mask, position=torch.tensor([-1, 1]))
        full = lp.explain(model, tokens, metric, attention_mask=mask, position=torch.tensor([-1, 1]))
    assert shapes == [(2, 1, 24), (2, 6, 24)]
    assert narrowed.computation["logits"] == "explained positions"
    assert full.computation["logits"] == "all positions"
    assert_same_maps(narrowed, full)
    recorded = lp.explain(model, tokens, (3, 4), attention_mask=mask, record=["unembed.hook_in"])
    assert recorded.computation["logits"] == "all positions"
    assert recorded.hooks["unembed.hook_in"].shape == (2, 6, 24)
    assert swapped_forwards(model) == []
