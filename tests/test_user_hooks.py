"""Hooks the caller left on the model are part of the computation ``explain`` explains.

What each test catches: a fused sweep that skips a caller's hook at ``hook_pattern`` (the
explanation of the unhooked model), a wrong list of the hook points fused attention skips, the
sweep's rule seeing the value before the caller's hook, a backward hook silently rewriting the
relevance, hooks lost or reordered by a sweep that raised, and a replacing hook's constant whose
relevance no sink accounts for.

Models: a float64 bias-free Llama-like HookedTransformer (TransformerLens 3.x only; its kv heads
not grouped, since the sweep ungroups them and refuses hooks at k and v there, tested below) and
a float64 Llama bridge with grouped kv heads (so the mixed fused / eager sweep also exercises the per-head
key credit of both paths). Values are compared at a tolerance of float64 rounding scaled to the
logit, never for equality: the explained forward takes other arithmetic paths than the model's
own (a fused kernel, ungrouped heads, recomputed blocks).
"""

import pytest
import torch

import lens_palrp as lp
from lens_palrp.hooks import family_for
from lens_palrp.user_hooks import _points_by_name
from long_context import assert_same_maps

TOKENS = torch.tensor([[0, 2, 3, 4, 5, 6, 7]])
TARGET = 3
LAYER = 1
SKIPPED_BY_FUSED = ("attn.hook_attn_scores", "attn.hook_pattern")  # measured: test_fused_skips_*
RESIDUAL = tuple(f"blocks.{LAYER}.{n}" for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_in",
                                                   "hook_out"))  # every path passes them
# relative to the logit: float64 rounding through two arithmetic paths, with margin; the bridge's
# Llama rounds some steps to float32 in its own forward that the sweep's fused kernel does not
# (~3e-7 of the logit, hooked or not). A skipped hook moves the logit by 1e-2 or more.
TOL = {"HookedTransformer": 1e-9, "TransformerBridge": 1e-6}


@pytest.fixture(scope="module")
def hooked():
    models = pytest.importorskip("models", reason="needs HookedTransformer (TransformerLens 3.x)")
    return models.make_model("llama_like", biases=False, n_key_value_heads=None)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    pytest.importorskip("transformer_lens.model_bridge")
    from bridges import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("llama"))[1]


@pytest.fixture(params=["hooked", "bridge"])
def model(request, float64_softmax):
    """float64 softmax: Hugging Face takes it in float32, which the fused kernel does not."""
    model = request.getfixturevalue(request.param)
    model.reset_hooks()
    yield model
    model.reset_hooks()


def block_points(model):
    """One name per hook point of block ``LAYER`` (a bridge's aliases of one point once), those a
    hook can be added to (a bridge gates some behind a flag)."""
    family = family_for(model)
    addable = set(family.hook_names())
    return sorted(n for n in _points_by_name(family) if n.startswith(f"blocks.{LAYER}.") and n in addable)


def skipped_by_fused(name):
    return name.endswith(SKIPPED_BY_FUSED)


def hook_of(kind, seed=0):
    """A hook of the everyday kinds: a fixed tensor in place of the activation, a scale, and a
    zeroing of index 1 along dim 1 (a position, or a head of the pattern), on a copy: an in-place
    edit of a tensor the backward needs (a softmax's output) is refused by autograd."""
    if kind == "replace":
        def hook(act, hook):
            g = torch.Generator().manual_seed(seed)
            return 0.3 * torch.randn(act.shape, generator=g, dtype=act.dtype).to(act.device)
    elif kind == "scale":
        def hook(act, hook):
            return act * 0.5
    else:
        def hook(act, hook):
            act = act.clone()
            act[:, 1] = 0
            return act
    return hook


def expected_refusal(model, name, kind):
    """What ``explain`` must refuse, and how, for a hook of ``kind`` at ``name``: a constant on
    every path (nothing depends on the input), a RoPE table that is no rotation table (the
    positional strategy cannot split it), a zeroed norm scale (a division by zero: the forward or
    its backward is not finite), edited scores where grouped kv heads are credited from them."""
    if edits_grouped_scores(model, name):
        return NotImplementedError, "grouped kv heads get their RoPE key sink per query head"
    if kind == "replace" and name in RESIDUAL:
        return ValueError, "does not depend on the input"
    if kind == "replace" and name.endswith(("hook_cos", "hook_sin")):
        return NotImplementedError, "RoPE"
    if kind == "zero" and name.endswith("hook_scale"):
        return FloatingPointError, "not finite|NaN or inf"
    return None


def logit(model):
    """The hooked model's own forward: the value the explanation must explain."""
    with torch.no_grad():
        return float(model(TOKENS)[0, -1, TARGET])


def close(model, value, reference):
    tol = TOL[family_for(model).name]
    assert abs(value - reference) <= tol * max(1.0, abs(reference)), (value, reference)


def fired_points(model, attention):
    """Hook points that run in a sweep, seen by a global module hook (which is no hook of the
    caller's at any point, so the sweep's mode stays the one asked for)."""
    points = {id(p): n for n, p in _points_by_name(family_for(model)).items()}
    fired = set()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: fired.add(points[id(m)]) if id(m) in points else None)
    try:
        attr = lp.explain(model, TOKENS, TARGET, attention=attention)
    finally:
        handle.remove()
    assert attr.computation["attention"] == attention
    return fired


def test_fused_skips_exactly_the_scores_and_the_pattern(model):
    """The engine's list of points the fused forward skips is the measured one."""
    skipped = fired_points(model, "eager") - fired_points(model, "fused")
    assert skipped == {f"blocks.{layer}.{name}" for layer in range(2) for name in SKIPPED_BY_FUSED}
    for name in skipped:  # and a hook there keeps exactly its layer eager
        with model.hooks(fwd_hooks=[(name, hook_of("scale"))]):
            if edits_grouped_scores(model, name):
                with pytest.raises(NotImplementedError, match=f"hook the caller added at {name} cannot be"):
                    lp.explain(model, TOKENS, TARGET)
                continue
            attr = lp.explain(model, TOKENS, TARGET)
        assert attr.computation["eager_layers"] == [int(name.split(".")[1])], name


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("attention", ["auto", "eager", "fused"])
@pytest.mark.parametrize("kind", ["replace", "scale", "zero"])
def test_the_explained_value_is_the_hooked_forward(model, kind, attention, checkpoint):
    """Every hook point of a block, every ``attention`` and ``checkpoint`` option: the target
    value is the hooked model's logit; under ``"auto"`` the layer runs eagerly exactly where fused
    attention would skip the hook, and ``"fused"`` refuses there naming it; conservation holds for
    the hooked model under a scaling or zeroing hook (bias-free weights: only the softmax absorbs)."""
    options = dict(attention=attention, checkpoint=checkpoint)
    for name in block_points(model):
        if name == GATED_PRODUCT:
            continue  # test_a_hook_at_a_gated_product_*
        with model.hooks(fwd_hooks=[(name, hook_of(kind))]):
            reference = logit(model)
            refusal = expected_refusal(model, name, kind)
            if attention == "fused" and skipped_by_fused(name):
                refusal = ValueError, f"attention='fused' is not possible here: a hook the caller added at {name}"
            if refusal:
                with pytest.raises(refusal[0], match=refusal[1]):
                    lp.explain(model, TOKENS, TARGET, **options)
                continue
            attr = lp.explain(model, TOKENS, TARGET, **options)
        close(model, float(attr.target_value), reference)
        assert attr.computation["checkpoint"] is checkpoint
        if attention == "auto":
            assert attr.computation["eager_layers"] == ([LAYER] if skipped_by_fused(name) else []), name
        if kind == "replace":  # a constant absorbs what reaches it, as a bias does: not conserved
            continue
        close(model, float(attr.conservation().other_absorbed) + reference, reference)


def edits_grouped_scores(model, name):
    """A hook at the scores of a bridge with grouped kv heads, which credits each query head's key
    from the gradient of the scores (PA-LRP's rotation split): refused, since the hook changes it."""
    family = family_for(model)
    return (name.endswith("attn.hook_attn_scores") and family.n_kv_heads is not None
            and family.name == "TransformerBridge")


GATED_PRODUCT = f"blocks.{LAYER}.mlp.hook_post"  # act(gate) * up in both models


def test_a_hook_at_a_gated_product_is_kept(model):
    with model.hooks(fwd_hooks=[(GATED_PRODUCT, hook_of("scale"))]):
        reference = logit(model)
        attr = lp.explain(model, TOKENS, TARGET)
    close(model, float(attr.target_value), reference)


def neuron_edits(act, hook):
    """Everyday neuron interventions at once: neurons 0-3 ablated, 4-7 doubled, the rest kept."""
    factor = torch.ones(act.shape[-1], dtype=act.dtype, device=act.device)
    factor[:4], factor[4:8] = 0.0, 2.0
    return act * factor


@pytest.mark.parametrize("edit", ["scale", "neurons"])
def test_a_hook_at_a_gated_product_conserves(model, edit):
    """The gated-MLP rule shares the relevance of ``act(gate) * up`` between its factors; what a
    caller's hook made of the product is what flows on, so the factors share that (as the
    element-wise edit ``value / product``). A rule that shared the unedited product's relevance
    misses by the edit (half of the MLP's share under a 0.5 scale), which this catches."""
    with model.hooks(fwd_hooks=[(GATED_PRODUCT, hook_of("scale") if edit == "scale" else neuron_edits)]):
        reference = logit(model)
        attr = lp.explain(model, TOKENS, TARGET)
    close(model, float(attr.target_value), reference)
    close(model, float(attr.conservation().other_absorbed) + reference, reference)


def test_a_hook_at_the_scores_of_grouped_kv_heads_is_refused_by_name(bridge, float64_softmax):
    """There the key side of the RoPE sink is credited per query head from the gradient of
    ``q k^T``, read at the scores; a hook that edits them would leave that sink off (by 3% of the
    logit under a 0.5 scale), so it is refused, naming the hook, before any forward."""
    name = f"blocks.{LAYER}.attn.hook_attn_scores"
    with bridge.hooks(fwd_hooks=[(name, hook_of("scale"))]):
        with pytest.raises(NotImplementedError, match=f"hook the caller added at {name} cannot be explained"):
            lp.explain(bridge, TOKENS, TARGET)
        attr = lp.explain(bridge, TOKENS, TARGET, method="attn_lrp")  # no rotation split: no key credit
    assert attr.computation["eager_layers"] == [LAYER]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_layer_run_eagerly_for_a_hook_gives_the_all_eager_maps(model, checkpoint):
    with model.hooks(fwd_hooks=[(f"blocks.{LAYER}.attn.hook_pattern", hook_of("scale"))]):
        mixed = lp.explain(model, TOKENS, TARGET, checkpoint=checkpoint, record=f"blocks.{LAYER}.attn.hook_v")
        eager = lp.explain(model, TOKENS, TARGET, attention="eager", record=f"blocks.{LAYER}.attn.hook_v")
    assert mixed.computation["attention"] == "mixed" and mixed.computation["eager_layers"] == [LAYER]
    assert f"blocks.{LAYER}.attn.hook_pattern" in mixed.computation["eager_reason"]
    assert_same_maps(mixed, eager, rtol=1e-9)


def test_checkpoint_runs_a_pure_hook_twice_with_the_same_maps(model):
    calls = []

    def scale(act, hook):
        calls.append(hook.name)
        return act * 0.5

    name = f"blocks.{LAYER}.mlp.hook_pre"
    with model.hooks(fwd_hooks=[(name, scale)]):
        plain = lp.explain(model, TOKENS, TARGET)
        once = len(calls)
        recomputed = lp.explain(model, TOKENS, TARGET, checkpoint=True)
    assert (once, len(calls) - once) == (1, 2)  # once more while the backward recomputes the block
    assert_same_maps(recomputed, plain, rtol=1e-9)


def test_the_rules_see_the_value_the_callers_hooks_made(model):
    """PyTorch runs a point's hooks in the order added, ``prepend=True`` first; the sweep's own
    are added last, so the explained activation is ``(x + 1) * 2`` here, not ``x`` or ``x * 2 + 1``."""
    name = f"blocks.{LAYER}.attn.hook_z"
    point = family_for(model).hook_points()[name]
    seen = {}
    point.add_hook(lambda act, hook: act * 2)
    point.add_hook(lambda act, hook: act + 1, prepend=True)
    point.add_hook(lambda act, hook: seen.__setitem__("final", act.detach().clone()))  # last: the final value
    before = [h.hook for h in point.fwd_hooks], list(point._forward_hooks.values())
    logit(model)
    attr = lp.explain(model, TOKENS, lp.at_hook(name, lambda act: act.sum((1, 2, 3))))
    close(model, float(attr.target_value), float(seen["final"].sum()))
    assert ([h.hook for h in point.fwd_hooks], list(point._forward_hooks.values())) == before


def test_backward_hooks_are_refused_naming_the_point(model):
    name = f"blocks.{LAYER}.mlp.hook_pre"
    family_for(model).hook_points()[name].add_hook(lambda grad, hook: grad * 2, dir="bwd")
    with pytest.raises(ValueError, match=f"backward hooks at {name}"):
        lp.explain(model, TOKENS, TARGET)


def test_the_callers_hooks_stay_as_they_were_after_a_failed_sweep(model):
    """The sweep's hooks go, the caller's stay (same hooks, same order), whether the sweep
    returns or a hook of the caller's raises inside it."""
    names = [f"blocks.{LAYER}.attn.hook_pattern", f"blocks.{LAYER}.mlp.hook_pre", "blocks.0.hook_resid_pre"]
    points = family_for(model).hook_points()
    state = lambda: {n: list(points[n]._forward_hooks.values()) for n in points}  # noqa: E731
    fail = {"on": False}

    def maybe_raise(act, hook):
        if fail["on"]:
            raise RuntimeError("the caller's hook failed")
        return act * 0.5

    for n in names:
        model.add_hook(n, maybe_raise)
    points[names[1]].add_hook(lambda act, hook: act + 0.0, prepend=True)
    before = state()
    lp.explain(model, TOKENS, TARGET, checkpoint=True)
    assert state() == before
    fail["on"] = True
    with pytest.raises(RuntimeError, match="the caller's hook failed"):
        lp.explain(model, TOKENS, TARGET)
    assert state() == before
