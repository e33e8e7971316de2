"""Fused attention and block-wise recomputation on TransformerBridges, and the pieces alone: the
kernel against eager softmax attention with the pattern's gradient factor, and the forward swap
both rewrites use. (``test_long_context.py``: the HookedTransformer configurations.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lens_palrp as lp
from lens_palrp import rules
from lens_palrp.canonizers import ForwardSwap, FusedAttention
from long_context import assert_same_maps, swapped_forwards

def test_forward_swap_puts_back_an_instance_forward():
    module = torch.nn.Linear(2, 2)
    own = lambda x: x  # noqa: E731 - a forward the user had set on the instance
    module.forward = own
    swap = ForwardSwap()
    swap.replace(module, lambda x: 2 * x)
    assert float(module(torch.ones(2)).sum()) == 4.0
    swap.restore()
    assert module.forward is own
    plain = torch.nn.Linear(2, 2)
    swap.replace(plain, lambda x: x)
    swap.restore()
    assert "forward" not in plain.__dict__


# ------------------------------------------------------------------------ the kernel alone
def _kernel_sweep(n_layers=1, batch=2, keys_per_query_head=False):
    captured = {}
    encoding = SimpleNamespace(
        keys_per_query_head=keys_per_query_head,
        at_key_gradient=lambda layer, key, grad: captured.__setitem__("key", (key, grad)),
    )

    def observed(tensor, fn):
        if not tensor.requires_grad:
            return tensor
        tensor = tensor.view_as(tensor)

        def hook(g, a=tensor.detach()):
            fn(a, g)  # returns nothing: the gradient passes unchanged

        tensor.register_hook(hook)
        return tensor

    sweep = SimpleNamespace(
        encoding=encoding, observed=observed, softmax_absorbed=torch.zeros(batch, n_layers, dtype=torch.float64),
        accumulate=lambda total, value: total.add_(value), _pattern_shares={},
    )
    return sweep, captured


def _fused(sweep, pattern_factor):
    kernel = FusedAttention()
    kernel.sweep, kernel.pattern_factor, kernel.score_factor = sweep, pattern_factor, 1.0
    return kernel.kernel


def _eager(q, k, v, scale, mask, pattern_factor):
    """softmax(q k^T / scale + mask) v, the pattern's gradient scaled, fully masked rows zero."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = q @ k.transpose(-1, -2) / scale
    empty = ~mask.any(-1, keepdim=True)  # a query that sees no key: pattern 0 (no NaN either way)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    pattern = torch.softmax(scores, -1).masked_fill(empty, 0.0)
    pattern = rules.scale_grad(pattern, pattern_factor)
    return pattern @ v, scores


@pytest.mark.parametrize("pattern_factor", [0.5, 0.0])
def test_kernel_matches_eager_softmax_attention_with_the_pattern_factor(pattern_factor):
    torch.manual_seed(0)
    b, h, kv, n, d = 2, 4, 2, 5, 3
    q, k, v = (torch.randn(b, heads, n, d, dtype=torch.float64, requires_grad=True) for heads in (h, kv, kv))
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    mask[1, :, :, :2] = False  # example 1: two left pads; its first two queries see no key
    sweep, captured = _kernel_sweep(batch=b, keys_per_query_head=True)
    z = _fused(sweep, pattern_factor)(0, q, k, v, 1.7, True, mask)
    z_ref, scores = _eager(q, k, v, 1.7, mask, pattern_factor)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    assert float(z[1, :, :2].abs().max()) == 0.0
    g = torch.randn_like(z)
    grads = torch.autograd.grad((z * g).sum(), (q, k, v), allow_unused=True)
    refs = torch.autograd.grad((z_ref * g).sum(), (q, k, v), allow_unused=True, retain_graph=True)
    for got, ref in zip(grads, refs):
        if ref is None or float(ref.abs().max()) == 0.0:
            assert got is None or float(got.abs().max()) == 0.0
        else:
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    if pattern_factor == 0.0:
        assert captured == {} and sweep._pattern_shares == {}
        return
    # what enters the softmax: sum over scores of s * dL/ds, computed from q alone
    score_grad = torch.autograd.grad((z_ref * g).sum(), scores)[0]
    r_in = torch.where(mask.expand_as(scores), scores * score_grad, torch.zeros_like(scores)).sum((1, 2, 3))
    torch.testing.assert_close(sweep.softmax_absorbed[:, 0], -r_in.detach(), rtol=1e-10, atol=1e-12)
    assert sweep._pattern_shares == {0: pattern_factor}
    # each query head's key gradient: the score gradient of that head times its queries
    key, key_grad = captured["key"]
    assert key.shape == (b, n, h, d)
    expected = torch.einsum("bhqk,bhqd->bkhd", score_grad, q.detach()) / 1.7
    torch.testing.assert_close(key_grad, expected, rtol=1e-10, atol=1e-12)


def test_kernel_with_an_additive_mask_keeps_huggingface_rows():
    """Hugging Face's additive mask (the dtype's minimum, not -inf): a query that sees no key
    averages the values, as eager softmax does, unless its rows are zeroed."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64) for _ in range(3))
    lowest = torch.finfo(torch.float64).min
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., 0, :] = lowest  # query 0 sees nothing
    sweep, _ = _kernel_sweep(batch=1)
    kernel = _fused(sweep, 0.5)
    z = kernel(0, q, k, v, 1.0, False, mask, zero_empty_rows=False)
    eager = torch.softmax(q @ k.transpose(-1, -2) + mask, -1) @ v
    torch.testing.assert_close(z, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z[..., 0, :], v.mean(2), rtol=1e-12, atol=1e-12)
    zeroed = kernel(0, q, k, v, 1.0, False, mask, zero_empty_rows=True)
    assert float(zeroed[..., 0, :].abs().max()) == 0.0


# ------------------------------------------------------------------------ bridges
@pytest.fixture(scope="module")
def llama_bridge(tmp_path_factory):
    pytest.importorskip("transformer_lens.model_bridge")
    from bridges import tiny_llama

    try:
        return tiny_llama(tmp_path_factory.mktemp("llama"))[1]
    except Exception as err:  # pragma: no cover - depends on the installed TransformerLens
        pytest.skip(f"no Llama bridge here: {err}")


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp", "cp_lrp"])
def test_bridge_fused_agrees_with_eager(llama_bridge, method, padded):
    """Grouped kv heads stay grouped on a bridge: the kernel hands each query head's key gradient
    to the RoPE strategy instead of the score gradients. The bridge's eager softmax runs in
    float32 even for a float64 model, so the two agree to float32 rounding; recomputation on
    either path changes nothing."""
    tokens = torch.randint(1, 18, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    if padded:
        mask[0, 5:] = 0
    kwargs = dict(method=method, attention_mask=mask if padded else None)
    eager = lp.explain(llama_bridge, tokens, 3, attention="eager", **kwargs)
    fused = lp.explain(llama_bridge, tokens, 3, **kwargs)
    assert fused.computation["attention"] == "fused", fused.computation
    assert_same_maps(fused, eager, rtol=2e-6)
    assert_same_maps(lp.explain(llama_bridge, tokens, 3, checkpoint=True, **kwargs), fused)
    assert_same_maps(lp.explain(llama_bridge, tokens, 3, attention="eager", checkpoint=True, **kwargs), eager)
    if method != "cp_lrp":  # fused runs the softmax in float64: conservation to float64 rounding
        c = fused.conservation()
        assert float(c.other_absorbed.abs().max()) < 1e-10 * float(fused.target_value.abs().max())


def test_bridge_is_left_as_it_was(llama_bridge):
    config = llama_bridge.original_model.config
    before = config._attn_implementation
    lp.explain(llama_bridge, torch.randint(1, 18, (1, 6)), 3, checkpoint=True)
    assert config._attn_implementation == before
    assert swapped_forwards(llama_bridge) == []


def test_bridge_logits_at_the_explained_positions(llama_bridge):
    """The bridge's unembedding (Hugging Face's lm_head inside it) gets each example's explained
    position only; the maps equal those of a metric that reads the full logits."""
    tokens = torch.randint(1, 18, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0

    def metric(logits, positions):
        return logits[torch.arange(2), positions, 3]

    narrowed = lp.explain(llama_bridge, tokens, 3, attention_mask=mask, checkpoint=True)
    full = lp.explain(llama_bridge, tokens, metric, attention_mask=mask, checkpoint=True)
    assert (narrowed.computation["logits"], full.computation["logits"]) == ("explained positions", "all positions")
    assert_same_maps(narrowed, full)
    assert swapped_forwards(llama_bridge) == []
