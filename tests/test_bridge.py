"""TransformerBridge: same numbers as HookedTransformer on the same weights, hooks in the path."""

import copy

import pytest
import torch

import lens_palrp as lp
from bridges import save_with_tokenizer, tiny_gpt2, tiny_llama
from devices import assert_on_device
from lens_palrp.zoo import TOKENIZER_DIR

bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
TransformerBridge = bridge_mod.TransformerBridge

try:
    from transformer_lens import HookedTransformer
except ImportError:  # TransformerLens 4.x
    HookedTransformer = None

needs_hooked = pytest.mark.skipif(
    HookedTransformer is None, reason="TransformerLens 4.x has no HookedTransformer to compare with"
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def hooked_llama(hf):
    return lp.models.hooked_transformer_from_hf(hf)


def hooked_gpt2(hf):
    return lp.models.hooked_transformer_from_hf(hf)


def rel(a, b):
    """Max relative error; exact zeros on both sides count as agreement."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


TOKENS = torch.randint(2, 18, (2, 11), generator=torch.Generator().manual_seed(5))


@needs_hooked
@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp", "cp_lrp", "grad_x_input"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bridge_matches_hooked_transformer(arch, method, llama, gpt2, request):
    hf, bridge = llama if arch == "llama" else gpt2
    ht = hooked_llama(hf) if arch == "llama" else hooked_gpt2(hf)
    a = lp.explain(bridge, TOKENS, (3, 5), method=method)
    b = lp.explain(ht, TOKENS, (3, 5), method=method)
    # the bridge uses Hugging Face's RoPE tables, computed in float32
    assert rel(a.target_value, b.target_value) < 1e-6
    for field in ("semantic", "heads_by_pos", "mlp", "residual"):
        assert rel(getattr(a, field), getattr(b, field)) < 1e-5, field
    if method == "pa_lrp":
        for field in ("positional", "positional_input"):
            if getattr(b, field).abs().max() > 0:
                assert rel(getattr(a, field), getattr(b, field)) < 1e-5, field
        assert rel(a.combined(), b.combined()) < 1e-5
    ca, cb = a.conservation(), b.conservation()
    assert rel(ca.softmax_absorbed, cb.softmax_absorbed) < 1e-5


def test_bridge_matches_the_independent_llama_reference(llama, device):
    """The reference on the CPU; the bridge on ``device`` too (CUDA: a copy of the Hugging Face
    model moved there by ``bridge_from_hf``), its results staying there."""
    from reference_llama import explain_llama

    hf, bridge = llama
    logit, semantic, positional, heads = explain_llama(hf, TOKENS, 7)
    if device != "cpu":
        bridge = lp.models.bridge_from_hf(copy.deepcopy(hf), bridge.tokenizer, device=device)
    attr = lp.explain(bridge, TOKENS.to(device), 7)
    assert_on_device(attr, device)
    attr = attr.to("cpu")
    assert rel(attr.target_value, logit) < 1e-6
    assert rel(attr.semantic, semantic) < 1e-5
    assert rel(attr.positional, positional) < 1e-5
    assert rel(attr.heads_by_pos, heads) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_hook_the_sweep_patches_is_in_the_computation_path(arch, llama, gpt2):
    """A rule installed on an observer-only hook would silently do nothing: every hook whose
    output the sweep replaces must change the model's output when perturbed."""
    from lens_palrp.hooks import family_for
    from lens_palrp.roles import Role

    _, bridge = llama if arch == "llama" else gpt2
    roles = family_for(bridge).hook_roles()
    observers = {Role.RESID_FINAL, Role.ROPE_COS, Role.ROPE_SIN}
    with torch.no_grad():
        base = bridge(TOKENS)
    for name, role in roles.items():
        if role.role in observers:
            continue
        with torch.no_grad():
            out = bridge.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda a, hook: a * 1.3 + 0.05)])
        assert float((out - base).abs().max()) > 1e-8, name


def test_bridge_left_unchanged_and_errors(llama):
    _, bridge = llama
    flags = [p.requires_grad for p in bridge.parameters()]
    n_hooks = sum(len(h.fwd_hooks) for h in bridge.hook_dict.values())
    lp.explain(bridge, TOKENS, 3)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        lp.explain(bridge, TOKENS, 99)
    assert flags == [p.requires_grad for p in bridge.parameters()]
    assert n_hooks == sum(len(h.fwd_hooks) for h in bridge.hook_dict.values())
    assert all(p.grad is None for p in bridge.parameters())


def test_bridge_padding_and_strings(llama):
    _, bridge = llama
    attr = lp.explain(bridge, ["a b c d e f", "a b c"], "c")
    one = lp.explain(bridge, "a b c", "c")
    torch.testing.assert_close(attr.semantic[1, :4], one.semantic[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(attr.positional[1, ..., :4], one.positional[0], rtol=1e-9, atol=1e-12)


@needs_hooked
def test_hooked_transformer_from_folder_matches_hugging_face(llama, tmp_path):
    hf, _ = llama
    folder = save_with_tokenizer(hf, tmp_path / "m")
    ht = lp.models.hooked_transformer_from_folder(str(folder), dtype=torch.float64)
    with torch.no_grad():
        assert rel(ht(TOKENS), hf(TOKENS).logits) < 1e-6
    assert ht.to_str_tokens("a b")[1:] == ["a", "b"]
    with pytest.raises(NotImplementedError, match="bridge_from_folder"):
        lp.models.hooked_transformer_from_hf(torch.nn.Linear(2, 2))


def test_bridge_from_an_in_memory_model_object(llama):
    """boot_transformers with hf_model=: config.architectures is set from the class if missing."""
    from transformers import AutoTokenizer

    hf, folder_bridge = llama
    hf.config.architectures = None
    obj_bridge = lp.models.bridge_from_hf(hf, AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    a, b = lp.explain(obj_bridge, TOKENS, 3), lp.explain(folder_bridge, TOKENS, 3)
    for field in ("target_value", "semantic", "positional", "heads"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-10, atol=1e-12)
