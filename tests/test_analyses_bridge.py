"""The analyses on TransformerBridges, in the default hook naming and in compatibility mode.

Under TransformerLens 3.9 and 4.x alike a bridge answers to the HookedTransformer hook names:
in the default naming they are aliases (``hook.name`` is the bridge's own name, e.g.
``blocks.0.attn.o.hook_in`` for ``blocks.0.attn.hook_z``); ``enable_compatibility_mode()`` makes
most of them the hook points' own names and, by default, folds and centers the weights as
HookedTransformer does. Activation patching, attribution patching and attention rollout are
checked here against the same quantities computed by hand on the Hugging Face model the bridge
was saved from, so TransformerLens' hooks are not checked against themselves.
"""

import pytest
import torch

import lens_palrp as lp
from bridges import tiny_gpt2, tiny_llama
from lens_palrp import analyses as an
from lens_palrp.analyses import faithfulness as fa
from lens_palrp.analyses.common import layer_hooks
from lens_palrp.hooks import family_for
from lens_palrp.roles import Role

pytest.importorskip("transformer_lens.model_bridge")

CLEAN, CORRUPTED = "c h a p k b e g", "c h a p n b e g"
ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CASES = [(arch, mode) for arch in ARCHS for mode in ("default", "compat")]


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    """``boot(arch, mode) -> (hf_model, bridge)``, one of each per module. "compat" is
    ``enable_compatibility_mode()`` with its default weight processing, "compat-raw" without."""
    made = {}

    def make(arch, mode):
        if (arch, mode) not in made:
            hf, bridge = ARCHS[arch](tmp_path_factory.mktemp(f"{arch}-{mode}"))
            if mode != "default":
                bridge.enable_compatibility_mode(disable_warnings=True, no_processing=mode == "compat-raw")
            made[arch, mode] = hf, bridge
        return made[arch, mode]

    return make


def logit_diff(bridge):
    k, n = bridge.to_single_token("k"), bridge.to_single_token("n")
    return lambda logits: logits[:, -1, k] - logits[:, -1, n]


def rel(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


# ------------------------------------------------------------------------------ by hand, on HF
def _layers(hf):
    return hf.model.layers if hasattr(hf, "model") else hf.transformer.h


def _out_proj(layer):
    """The attention's output projection: its input is z, heads side by side."""
    return layer.self_attn.o_proj if hasattr(layer, "self_attn") else layer.attn.c_proj


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, value):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def capture(hf, tokens, keep_grad=False):
    """Each layer's z (output projection input) and residual input on ``tokens``."""
    z, resid, handles = {}, {}, []
    for l, layer in enumerate(_layers(hf)):
        def at_z(module, args, l=l):
            z[l] = args[0]
            if keep_grad:
                args[0].retain_grad()

        def at_resid(module, args, kwargs, l=l):
            resid[l] = _hidden(args, kwargs)
            if keep_grad:
                resid[l].retain_grad()

        handles.append(_out_proj(layer).register_forward_pre_hook(at_z))
        handles.append(layer.register_forward_pre_hook(at_resid, with_kwargs=True))
    try:
        logits = hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return logits, z, resid


def patch_by_hand(hf, clean, corrupted, metric):
    """Activation patching on the Hugging Face modules: ``[layers, heads]`` and ``[layers, pos]``."""
    with torch.no_grad():
        _, z, resid = capture(hf, clean)
        base = float(metric(hf(corrupted).logits))
    L, H = len(_layers(hf)), hf.config.num_attention_heads
    d = hf.config.hidden_size // H
    heads, positions = torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, clean.shape[1], dtype=torch.float64)
    for l, layer in enumerate(_layers(hf)):
        for h in range(H):
            def head(module, args, l=l, h=h):
                x = args[0].clone()
                x[..., h * d:(h + 1) * d] = z[l][..., h * d:(h + 1) * d]
                return (x,)

            handle = _out_proj(layer).register_forward_pre_hook(head)
            with torch.no_grad():
                heads[l, h] = float(metric(hf(corrupted).logits)) - base
            handle.remove()
        for p in range(clean.shape[1]):
            def position(module, args, kwargs, l=l, p=p):
                x = _hidden(args, kwargs).clone()
                x[:, p] = resid[l][:, p]
                return _with_hidden(args, kwargs, x)

            handle = layer.register_forward_pre_hook(position, with_kwargs=True)
            with torch.no_grad():
                positions[l, p] = float(metric(hf(corrupted).logits)) - base
            handle.remove()
    return heads, positions


# ------------------------------------------------------------------------------ hook names
@pytest.mark.parametrize("arch, mode", CASES)
def test_the_hookedtransformer_names_resolve_in_both_modes(boot, arch, mode):
    _, bridge = boot(arch, mode)
    family = family_for(bridge)
    z, resid = layer_hooks(family, Role.Z), layer_hooks(family, Role.RESID_PRE)
    assert z == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert resid == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    for name in z + resid + ["blocks.0.attn.hook_pattern", "unembed.hook_in", family.final_hidden_hook]:
        assert name in bridge.hook_dict, name
    # what the analyses may not rely on: the hook point's own name depends on the mode
    own = bridge.hook_dict["blocks.0.attn.hook_z"].name
    assert own == ("blocks.0.attn.o.hook_in" if mode == "default" else "blocks.0.attn.hook_z")
    assert bridge.hook_dict["blocks.0.hook_resid_pre"].name == "blocks.0.hook_in"  # in both modes
    tokens = bridge.to_tokens(CLEAN)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=z + resid)
    assert tuple(cache["blocks.1.attn.hook_z"].shape) == (1, 9, 4, 8)
    assert tuple(cache["blocks.1.hook_resid_pre"].shape) == (1, 9, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_explain_in_compatibility_mode(boot, arch):
    """Without weight processing nothing changes; with it (folded norms, centered weights) a logit
    difference is explained alike, up to the processing's rounding. GPT-2's per-head maps move:
    its value biases are folded out of z into the output bias."""
    _, default = boot(arch, "default")
    target = (default.to_single_token("k"), default.to_single_token("n"))
    a = lp.explain(default, CLEAN, target)
    raw = lp.explain(boot(arch, "compat-raw")[1], CLEAN, target)
    for field in ("target_value", "semantic", "positional", "positional_input", "heads_by_pos", "mlp", "residual"):
        assert torch.equal(getattr(raw, field), getattr(a, field)), field
    processed = lp.explain(boot(arch, "compat")[1], CLEAN, target)
    fields = ["target_value", "semantic", "positional", "positional_input", "mlp", "residual"]
    fields += ["heads_by_pos"] if arch == "llama" else []
    for field in fields:
        assert rel(getattr(processed, field), getattr(a, field)) < 1e-5, field
    if arch == "gpt2":
        assert rel(processed.heads, a.heads) > 1e-3


# ------------------------------------------------------------------------------ patching
@pytest.mark.parametrize("arch, mode", [("llama", "default"), ("gpt2", "compat")])
def test_activation_patching_equals_patching_the_hugging_face_modules(boot, arch, mode):
    hf, bridge = boot(arch, mode)
    metric = logit_diff(bridge)
    patched = an.activation_patching(bridge, CLEAN, CORRUPTED, metric, components=("heads", "resid"), progress=False)
    heads, positions = patch_by_hand(hf, bridge.to_tokens(CLEAN), bridge.to_tokens(CORRUPTED), metric)
    # the bridge's eager softmax runs in float32 even in a float64 model
    torch.testing.assert_close(patched.heads[0], heads, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched.resid[0], positions, rtol=1e-5, atol=1e-5)
    assert float(heads.abs().max()) > 0.1  # the heads matter on this input


@pytest.mark.parametrize("arch, mode", CASES)
def test_grad_estimate_is_attribution_patching_by_hand(boot, arch, mode):
    """``(clean - corrupted) . dmetric/dactivation`` on the corrupted run, with the gradient taken
    by autograd on the Hugging Face model."""
    hf, bridge = boot(arch, mode)
    metric = logit_diff(bridge)
    rp = an.relevance_patching(bridge, CLEAN, CORRUPTED, metric, methods=("grad", "pa_lrp"))
    with torch.no_grad():
        _, z_clean, r_clean = capture(hf, bridge.to_tokens(CLEAN))
    hf.zero_grad(set_to_none=True)
    logits, z, resid = capture(hf, bridge.to_tokens(CORRUPTED), keep_grad=True)
    metric(logits).sum().backward()
    H = hf.config.num_attention_heads
    heads = torch.stack([((z_clean[l] - z[l].detach()) * z[l].grad).reshape(*z[l].shape[:-1], H, -1).sum((0, 1, 3))
                         for l in sorted(z)])
    positions = torch.stack([((r_clean[l] - resid[l].detach()) * resid[l].grad).sum((0, 2)) for l in sorted(resid)])
    hf.zero_grad(set_to_none=True)
    # the booted Llama's RoPE inverse frequencies are float32 (the source model's float64), and
    # compatibility mode's weight processing rounds
    tol = 1e-8 if (arch, mode) == ("gpt2", "default") else 1e-6 if mode == "default" else 1e-5
    assert rel(rp.scores["grad"]["heads"][0], heads) < tol
    assert rel(rp.scores["grad"]["resid"][0], positions) < tol
    assert rel(rp.scores["pa_lrp"]["heads"][0], heads) > 1e-3  # the rules change the gradient
    assert rp.patching is None  # estimates only: activation patching did not run


# ------------------------------------------------------------------------------ faithfulness
@pytest.mark.parametrize("arch, mode", CASES)
def test_attention_rollout_from_the_hugging_face_attentions(boot, arch, mode):
    hf, bridge = boot(arch, mode)
    tokens = bridge.to_tokens(["c h a p k b e g", "n o p a b c k k"])
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = hf(tokens, output_attentions=True).attentions
    expected = None
    for a in attentions:
        a = 0.5 * a.double().mean(1) + 0.5 * torch.eye(tokens.shape[1], dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        expected = a if expected is None else a @ expected
    torch.testing.assert_close(fa.rollout_matrix(bridge, tokens, None), expected, rtol=1e-6, atol=1e-9)


def test_analyses_run_in_eval_mode_and_leave_training_flags_alone(tmp_path):
    """GPT-2's dropout (0.1) would make every forward random: the analyses run the eval-mode model
    (TransformerLens 4's patching refuses a training model) and hand back the flags they found,
    those of the bridge's Hugging Face model included."""
    _, bridge = tiny_gpt2(tmp_path / "gpt2")
    metric = logit_diff(bridge)
    tokens = bridge.to_tokens(CLEAN)

    def run():
        cmp = an.compare_with_patching(bridge, CLEAN, CORRUPTED, metric, methods=())
        rp = an.relevance_patching(bridge, CLEAN, CORRUPTED, metric, methods=("grad",))
        pt = fa.perturbation_test(bridge, [CLEAN], methods=("random",), modes=("pruning",), progress=False)
        return (cmp.patching.heads, cmp.patching.resid, cmp.patching.mlp, rp.scores["grad"]["heads"],
                rp.scores["grad"]["mlp"], pt.curves["random"]["pruning"]["logit"],
                fa.rollout_matrix(bridge, tokens, None))

    evaluated = run()
    bridge.train()
    modules = list(bridge.modules()) + list(bridge.original_model.modules())
    flags = [m.training for m in modules]
    assert all(flags)
    for got, want in zip(run(), evaluated):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [m.training for m in modules] == flags
    bridge.eval()
