"""GPT-NeoX / Pythia, Phi-3, Phi and Falcon TransformerBridges (RoPE, fused qkv, parallel blocks).

Each architecture's tiny float64 model (``tests/architectures.py``) must: agree with plain
autograd on the bare Hugging Face model under ``grad_x_input`` (embedding and per-head z);
conserve under the LRP methods with biases zeroed; report nonzero RoPE sinks under PA-LRP; and
have every hook point the rules patch in the computation path, shown by intervention. Before
``RotationHooksInPath``, the joint-qkv attentions' ``hook_rot_q`` / ``hook_rot_k`` were not in
the path and GPT-NeoX lost 39% of its logit with all positional maps zero.
"""

import warnings

import pytest
import torch

import lens_palrp as lp
from architectures import COMMON, build
from bridges import softmax_in_float64
from padding import ROWS, assert_rows_equal_single_runs, pad
from lens_palrp.hooks import family_for
from lens_palrp.hooks.bridge_parallel import rotation_hooks_missing
from lens_palrp.hooks.transformer_bridge import VERIFIED_ARCHITECTURES
from lens_palrp.roles import Role

pytest.importorskip("transformer_lens.model_bridge")

ARCHS = ["gpt_neox", "phi3", "phi", "falcon"]
JOINT_QKV = {"gpt_neox", "phi3", "falcon"}  # JointQKVPositionEmbeddingsAttentionBridge
# the attention output projection of the bare Hugging Face model: its input is z, [batch, pos, heads * d_head]
O_PROJ = {
    "gpt_neox": "gpt_neox.layers.{}.attention.dense",
    "phi3": "model.layers.{}.self_attn.o_proj",
    "phi": "model.layers.{}.self_attn.dense",
    "falcon": "transformer.h.{}.self_attention.dense",
}
ROTARY_DIM = {"gpt_neox": 4, "phi3": 8, "phi": 4, "falcon": 8}  # d_head 8; rotary_pct / partial factor 0.5
TOKENS = torch.randint(2, 18, (2, 9), generator=torch.Generator().manual_seed(5))
TARGET = 3
LRP = ["pa_lrp", "attn_lrp", "cp_lrp"]
_BRIDGES = {}


def bridge_of(arch, biases=False):
    """One bridge per architecture and bias setting for the module (built from the same seed)."""
    key = (arch, biases)
    if key not in _BRIDGES:
        from lens_palrp.zoo import TOKENIZER_DIR
        from transformers import AutoTokenizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BRIDGES[key] = lp.models.bridge_from_hf(build(arch, biases=biases),
                                                     AutoTokenizer.from_pretrained(TOKENIZER_DIR), dtype=torch.float64)
    return _BRIDGES[key]




@pytest.mark.parametrize("arch", ARCHS)
def test_verified(arch):
    assert arch in VERIFIED_ARCHITECTURES


# ------------------------------------------------------------------------------ hooks in the path
@pytest.mark.parametrize("arch", ARCHS)
def test_every_hook_the_sweep_patches_is_in_the_computation_path(arch):
    """With the family's canonizers registered, perturbing any hook the rules patch changes the
    logits; without them the joint-qkv attention's rotated q and k are observed nowhere (the
    canonizer exists exactly where they are missing)."""
    bridge = bridge_of(arch)
    family = family_for(bridge)
    roles = family.hook_roles()
    assert {Role.ROT_Q, Role.ROT_K, Role.ROPE_COS, Role.PATTERN, Role.MLP_PRE} <= {r.role for r in roles.values()}
    names = [n for n, r in roles.items() if r.role not in (Role.RESID_FINAL, Role.ROPE_COS, Role.ROPE_SIN)]
    with torch.no_grad():
        base = bridge(TOKENS)

    def change(name):
        with torch.no_grad():
            out = bridge.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda a, hook: a * 1.3 + 0.05)])
        return float((out - base).abs().max())

    rotated = [n for n in names if n.endswith(("hook_rot_q", "hook_rot_k"))]
    out_of_path = [n for n in rotated if change(n) < 1e-8]
    assert bool(out_of_path) == bool(rotation_hooks_missing(bridge))
    assert not out_of_path or arch in JOINT_QKV
    canonizers = family.canonizers()
    for c in canonizers:
        c.register(family, None)
    try:
        for name in names:
            assert change(name) > 1e-8, name
    finally:
        for c in reversed(canonizers):
            c.remove()
    assert all("_apply_rotary_pos_emb" not in block.attn.__dict__ for block in bridge.blocks)
    assert not out_of_path or change(rotated[0]) < 1e-8  # removed again: back as it was


@pytest.mark.parametrize("arch", ARCHS)
def test_rotated_hooks_hold_the_rotated_query_and_key(arch):
    """What the rules see at ``hook_rot_q`` / ``hook_rot_k`` is ``hook_q`` / ``hook_k`` rotated
    by the observed tables on their first ``rotary_dim`` channels (rotate-half), the rest
    unchanged; ``rotary_dim`` is the observed table width."""
    bridge = bridge_of(arch)
    family = family_for(bridge)
    assert family.rotary_dim == ROTARY_DIM[arch]
    seen = {}

    def keep(key):
        return lambda a, hook: seen.__setitem__(key, a.detach().clone())

    canonizers = family.canonizers()
    for c in canonizers:
        c.register(family, None)
    try:
        hooks = [(f"blocks.1.attn.{h}", keep(h)) for h in ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k",
                                                         "hook_cos", "hook_sin")]
        with torch.no_grad():
            bridge.run_with_hooks(TOKENS, fwd_hooks=hooks)
    finally:
        for c in reversed(canonizers):
            c.remove()
    rd = family.rotary_dim
    cos, sin = seen["hook_cos"], seen["hook_sin"]
    assert cos.shape[-1] == rd
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [batch, pos, 1, rd]
    for raw, rotated in (("hook_q", "hook_rot_q"), ("hook_k", "hook_rot_k")):
        x = seen[raw]
        assert x.shape == seen[rotated].shape and x.shape[1] == TOKENS.shape[1]  # [batch, pos, heads, d_head]
        a, b = x[..., : rd // 2], x[..., rd // 2: rd]
        expected = torch.cat([x[..., :rd] * cos + torch.cat([-b, a], -1) * sin, x[..., rd:]], -1)
        torch.testing.assert_close(seen[rotated], expected, rtol=1e-12, atol=1e-12)
    n_kv = family.n_kv_heads or family.n_heads
    assert seen["hook_rot_k"].shape[2] == n_kv


def test_gated_mlp_hooks_are_gate_and_up():
    """Phi-3's fused gate_up projection, split by the bridge: ``hook_post`` is ``act(hook_pre) *
    hook_pre_linear``, the product ``GatedShares`` splits (gate side at ``hook_pre``)."""
    bridge = bridge_of("phi3")
    family = family_for(bridge)
    seen = {}
    hooks = [(f"blocks.0.mlp.{h}", lambda a, hook, h=h: seen.__setitem__(h, a.detach().clone()))
             for h in ("hook_pre", "hook_pre_linear", "hook_post")]
    with torch.no_grad():
        bridge.run_with_hooks(TOKENS, fwd_hooks=hooks)
    act = family.activation(0)
    gated = act(seen["hook_pre"]) * seen["hook_pre_linear"]
    torch.testing.assert_close(seen["hook_post"], gated, rtol=1e-12, atol=1e-14)
    assert float((seen["hook_post"] - seen["hook_pre"] * act(seen["hook_pre_linear"])).abs().max()) > 1e-3


# ------------------------------------------------------------------------------ grad x input
def hugging_face_gradients(arch, biases):
    """Plain autograd on the bare Hugging Face model (a fresh one of the same weights): gradient x
    input of the embedding output ``[batch, pos, d_model]`` and of each layer's z ``[batch, pos,
    heads, d_head]``, for the logit of ``TARGET`` at the last position."""
    hf = build(arch, biases=biases)
    n_heads = hf.config.num_attention_heads
    leaves, zs = {}, {}

    def embed_hook(module, args, out):
        leaves["e"] = out.detach().requires_grad_(True)
        return leaves["e"]

    def z_hook(layer):
        def hook(module, args):
            zs[layer] = args[0]  # kept in the graph: autograd.grad reads its gradient
        return hook

    handles = [hf.get_input_embeddings().register_forward_hook(embed_hook)]
    for layer in range(hf.config.num_hidden_layers):
        handles.append(hf.get_submodule(O_PROJ[arch].format(layer)).register_forward_pre_hook(z_hook(layer)))
    try:
        logits = hf(TOKENS).logits
    finally:
        for h in handles:
            h.remove()
    y = logits[:, -1, TARGET].sum()
    grads = torch.autograd.grad(y, [leaves["e"], *zs.values()])
    embed = leaves["e"].detach() * grads[0]
    heads = {layer: (z.detach() * g).reshape(*z.shape[:2], n_heads, -1) for (layer, z), g in zip(zs.items(), grads[1:])}
    return logits[:, -1, TARGET].detach(), embed, heads


@pytest.mark.parametrize("attention", ["eager", "fused"])
@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_grad_x_input_is_hugging_face_autograd(arch, biases, attention, monkeypatch):
    """To 1e-9 of each map's largest entry. Phi's eager attention takes its softmax in float32
    (the bridge's, not Hugging Face's): as shipped to 1e-6 (~5e-7 here), then with that softmax
    put in float64 (``softmax_in_float64``) to 1e-9."""
    target, embed, heads = hugging_face_gradients(arch, biases)
    bridge = bridge_of(arch, biases)
    names = [f"blocks.{layer}.attn.hook_z" for layer in heads]

    def check(tol):
        attr = lp.explain(bridge, TOKENS, TARGET, method="grad_x_input", record=names, attention=attention)
        assert attr.computation["attention"] == attention
        pairs = [(attr.target_value, target, "target"), (attr.semantic, embed.sum(-1), "semantic")]
        pairs += [(attr.hooks[name], heads[layer], name) for layer, name in zip(heads, names)]
        for ours, reference, msg in pairs:
            torch.testing.assert_close(ours, reference, rtol=0, atol=tol * float(reference.abs().max()), msg=msg)

    if arch == "phi" and attention == "eager":
        check(1e-6)
        softmax_in_float64(monkeypatch)
    check(1e-9)
    assert all(float(h.abs().max()) > 1e-3 for h in heads.values())  # every head path carries signal


# ------------------------------------------------------------------------------ conservation
@pytest.mark.parametrize("attention", ["eager", "fused"])
@pytest.mark.parametrize("method", LRP)
@pytest.mark.parametrize("arch", ARCHS)
def test_conservation_without_biases(arch, method, attention, monkeypatch):
    """Biases zeroed: the softmax rules are the only sink besides tokens and positions. Under
    PA-LRP every layer keeps a nonzero RoPE sink, and PA-LRP's token map is not AttnLRP's (the
    rotation's half is taken from q and k). Phi's eager softmax is put in float64 for the 1e-8
    check (``float64_softmax``); as shipped it conserves to 1e-6."""
    bridge = bridge_of(arch)
    if arch == "phi" and attention == "eager":
        shipped = lp.explain(bridge, TOKENS, TARGET, method=method, attention=attention).conservation()
        assert float((shipped.other_absorbed / shipped.target_value).abs().max()) < 1e-6
        softmax_in_float64(monkeypatch)
    attr = lp.explain(bridge, TOKENS, TARGET, method=method, attention=attention)
    assert attr.computation["attention"] == attention
    c = attr.conservation()
    gap = (c.other_absorbed / c.target_value).abs()
    assert float(gap.max()) < 1e-8, (arch, method, gap)
    per_layer = attr.positional.abs().sum(dim=(2, 3))  # [batch, layers]
    if method == "pa_lrp":
        assert float(per_layer.min()) > 1e-4
        assert float(attr.combined("relu", parts="positional").abs().sum()) > 0
        attn = lp.explain(bridge, TOKENS, TARGET, method="attn_lrp")
        assert float((attr.semantic - attn.semantic).abs().max()) > 1e-6
    else:
        assert float(per_layer.abs().max()) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_is_its_single_runs(arch):
    bridge = bridge_of(arch)
    tokens, mask = pad(ROWS, "left")
    attr = lp.explain(bridge, tokens, TARGET, attention_mask=mask)
    assert_rows_equal_single_runs(bridge, ROWS, attr, TARGET, "pa_lrp")


def test_model_left_unchanged_after_an_error():
    """The rotation wrappers are instance attributes of the sweep only, also when it fails."""
    bridge = bridge_of("gpt_neox")

    def boom(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        lp.explain(bridge, TOKENS, boom)
    assert all("_apply_rotary_pos_emb" not in block.attn.__dict__ for block in bridge.blocks)
    assert sum(len(h.fwd_hooks) for h in bridge.hook_dict.values()) == 0


# ------------------------------------------------------------------------------ fused attention
FIELDS = ("semantic", "positional", "heads_by_pos", "mlp", "residual", "target_value")


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_attention_gives_the_eager_maps(arch, float64_softmax):
    """The fused forward (``bridge_parallel.fused_forward`` for the joint-qkv attention, the
    generic one for Phi's) reproduces the eager maps, every method, on a padded batch (Phi's eager
    softmax in float64, as the kernel takes it)."""
    bridge = bridge_of(arch, biases=True)
    tokens, mask = pad(ROWS, "left")
    for method in ["pa_lrp", "attn_lrp", "cp_lrp", "grad_x_input"]:
        eager = lp.explain(bridge, tokens, TARGET, method=method, attention_mask=mask, attention="eager")
        fused = lp.explain(bridge, tokens, TARGET, method=method, attention_mask=mask, attention="fused")
        assert fused.computation["attention"] == "fused" and eager.computation["attention"] == "eager"
        for field in FIELDS:
            torch.testing.assert_close(getattr(fused, field), getattr(eager, field), rtol=1e-9, atol=1e-11,
                                       msg=f"{method} {field}")
        torch.testing.assert_close(fused.conservation().softmax_absorbed, eager.conservation().softmax_absorbed,
                                   rtol=1e-9, atol=1e-11)
        if method == "pa_lrp":  # each block recomputed in the backward: the wrappers run again
            again = lp.explain(bridge, tokens, TARGET, method=method, attention_mask=mask, attention="fused",
                               checkpoint=True)
            for field in FIELDS:
                torch.testing.assert_close(getattr(again, field), getattr(fused, field), rtol=1e-12, atol=1e-14)
    assert all("forward" not in block.attn.__dict__ for block in bridge.blocks)


@pytest.mark.parametrize("arch", sorted(JOINT_QKV))
def test_compatibility_mode_gives_the_same_maps(arch):
    """``enable_compatibility_mode(no_processing=True)`` (the hook conversions of compatibility
    mode, weights as they are): the same maps, eager and fused."""
    from lens_palrp.zoo import TOKENIZER_DIR
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compat = lp.models.bridge_from_hf(build(arch, biases=False), AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                                          dtype=torch.float64)
        compat.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    for attention in ("eager", "fused"):
        a = lp.explain(compat, TOKENS, TARGET, attention=attention)
        b = lp.explain(bridge_of(arch), TOKENS, TARGET, attention=attention)
        for field in FIELDS:
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-9, atol=1e-12, msg=field)


# ------------------------------------------------------------------------------ variants, refusals
VARIANTS = {  # the same model types with the other block layout or rotary width
    "gpt_neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                            dict(COMMON, intermediate_size=48, rotary_pct=0.25, use_parallel_residual=False)),
    "falcon_sequential": ("FalconConfig", "FalconForCausalLM",
                          dict(vocab_size=18, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=False)),
    "phi3_partial_rotary": ("Phi3Config", "Phi3ForCausalLM",
                            dict(COMMON, intermediate_size=48, num_key_value_heads=2, partial_rotary_factor=0.5,
                                 pad_token_id=0, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sequential_and_partial_variants_conserve(variant, monkeypatch):
    import architectures
    from lens_palrp.zoo import TOKENIZER_DIR
    from transformers import AutoTokenizer

    config, model, kwargs = VARIANTS[variant]
    monkeypatch.setitem(architectures.BUILDERS, variant, architectures._from(config, model, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = lp.models.bridge_from_hf(build(variant, biases=False), AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                                          dtype=torch.float64)
    for method in LRP:
        for attention in ("eager", "fused"):
            attr = lp.explain(bridge, TOKENS, TARGET, method=method, attention=attention)
            c = attr.conservation()
            assert float((c.other_absorbed / c.target_value).abs().max()) < 1e-8, (method, attention)
            assert (float(attr.positional.abs().sum()) > 1e-4) == (method == "pa_lrp")


def test_a_score_scale_the_bridge_ignores_is_refused(monkeypatch):
    """The joint-qkv bridge divides the scores by sqrt(head_dim) whatever the Hugging Face module's
    ``scaling`` says: where the two differ, nothing is explained."""
    bridge = bridge_of("gpt_neox")
    hf_attn = bridge.blocks[1].attn.original_component
    monkeypatch.setattr(hf_attn, "scaling", 0.1)
    refusal = r"'gpt_neox': layer 1's Hugging Face attention scales the scores by 1/10"
    with pytest.raises(NotImplementedError, match=refusal):
        lp.explain(bridge, TOKENS, TARGET)


def test_a_joint_attention_rotating_elsewhere_is_refused():
    """A subclass with its own rotation and no rotation hooks: the wrapper would sit beside the
    path, so the bridge is refused instead (checked on a bridge of its own)."""
    from lens_palrp.zoo import TOKENIZER_DIR
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = lp.models.bridge_from_hf(build("gpt_neox", biases=False), AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                                          dtype=torch.float64)
    joint = type(bridge.blocks[0].attn)
    own = type("OwnRotation", (joint,), {"_apply_rotary_pos_emb": lambda self, q, k, cos, sin: (q, k)})
    object.__setattr__(bridge.blocks[1].attn, "__class__", own)
    with pytest.raises(NotImplementedError, match="'gpt_neox': OwnRotation rotates q and k otherwise"):
        lp.explain(bridge, TOKENS, TARGET)
