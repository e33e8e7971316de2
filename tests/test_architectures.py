"""Every architecture of the coverage table (``lens_palrp.hooks.bridge_support``), checked on a tiny
random float64 model built offline from its Hugging Face config class (``tests/architectures.py``).

For a verified row:
* gradient x input: the token, learned-position and per-head relevance equal autograd on the bare
  Hugging Face model (hooks on its own modules), to 1e-6 relative: the rules' hook points sit
  where the model computes what their names say;
* every hook point the rules patch is in the computation path: scaling its output changes the
  explained value (an observe-only hook would change nothing);
* conservation, biases zeroed: semantic + positional + what the rules absorb equals the
  explained value to 1e-8 under pa_lrp, attn_lrp and cp_lrp;
* PA-LRP's positional sinks are nonzero where there is a positional encoding, and AttnLRP's leak
  of the same relevance is reported.
Any other row, and an architecture in no row, is refused with a reason naming it.

Hugging Face and TransformerLens take the attention softmax, RMSNorm and the rotary tables in
float32 even in a float64 model (~1e-6 of the logit). The 1e-6 and 1e-8 checks run with those kept
in float64 on both sides (``float64_throughout``); conservation as shipped is checked to float32
rounding (64 float32 eps of the logit, ``tests/tolerances.py``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lens_palrp as lp
from architectures import BUILDERS, MODEL_TYPE, build
from bridges import softmax_in_float64
from tolerances import rounding
from lens_palrp.hooks import family_for
from lens_palrp.hooks.bridge_support import ARCHITECTURES, support_for
from lens_palrp.roles import Role
from lens_palrp.zoo import TOKENIZER_DIR

pytest.importorskip("transformer_lens.model_bridge")

TOKENS = torch.randint(2, 18, (2, 9), generator=torch.Generator().manual_seed(5))
TARGET = 3
RULE_METHODS = ["pa_lrp", "attn_lrp", "cp_lrp"]
_CACHE = {}


def bridge_of(name: str, biases: bool = True):
    """``(reference, bridge)``, built once per module run: the bridge wraps (and rewires) its own
    copy of the model; ``reference`` is a second, untouched copy with the same weights."""
    key = (name, biases)
    if key not in _CACHE:
        from transformers import AutoTokenizer

        hf = build(name, biases=biases)
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CACHE[key] = (build(name, biases=biases), lp.models.bridge_from_hf(hf, tokenizer, dtype=torch.float64))
    return _CACHE[key]


def row_of(name: str):
    return support_for(MODEL_TYPE[name])


CHECKED_HERE = [name for name in BUILDERS if row_of(name) is None or row_of(name).test == "tests/test_architectures.py"]
VERIFIED = [name for name in CHECKED_HERE if row_of(name) is not None and row_of(name).refusal_here() is None]
REFUSED = [name for name in CHECKED_HERE if name not in VERIFIED]


def is_encoder(bridge) -> bool:
    return not family_for(bridge).logits_supported


def target_for(bridge):
    """The explained scalar: the logit of TARGET at the last position, or (encoders, whose MLM
    head has no hook) a fixed projection of the last position's final hidden state."""
    if not is_encoder(bridge):
        return TARGET
    family = family_for(bridge)
    direction = torch.randn(family.cfg.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return lp.at_hook(family.final_hidden_hook, lambda act: act[:, -1] @ direction)


def hf_scalar(hf, bridge, tokens):
    """The same scalar on the bare Hugging Face model, [batch]."""
    if not is_encoder(bridge):
        return hf(tokens, use_cache=False).logits[:, -1, TARGET]
    direction = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return hf.base_model(tokens).last_hidden_state[:, -1] @ direction


def rel(a, b) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


@pytest.fixture
def float64_throughout(monkeypatch):
    """The model's float64 kept where Hugging Face or the bridge compute in float32 on purpose
    (the attention softmax, RMSNorm, rotary tables): with those roundings (~1e-6 of the logit)
    gone, what remains of a difference is the rules'. Only float64 tensors are affected."""
    to, as_float = torch.Tensor.to, torch.Tensor.float
    softmax_in_float64(monkeypatch)

    def to64(self, *args, **kwargs):
        if self.dtype == torch.float64 and (args[:1] == (torch.float32,) or kwargs.get("dtype") == torch.float32):
            return self
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to64)
    monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **k: self if self.dtype == torch.float64 else as_float(self, *a, **k))


# ---------------------------------------------------------------------------------- the table
def test_every_row_has_a_tiny_model_here():
    covered = {support_for(t).name for t in MODEL_TYPE.values() if support_for(t) is not None}
    assert {row.name for row in ARCHITECTURES} <= covered


def test_readme_table_is_the_coverage_table():
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("| architecture | positional encoding | supported | test |"):]
    table = table[:table.index("\n\n")].splitlines()[2:]
    assert table == [row.markdown() for row in ARCHITECTURES]


# ---------------------------------------------------------------------------------- verified rows
# where the bridge's hook_embed reads the token embedding, if not at the input embedding module:
# BLOOM's bridge names the output of the embedding LayerNorm hook_embed (its first residual stream)
EMBED_MODULE = {"bloom": "transformer.word_embeddings_layernorm"}


def _hf_gradient_x_input(name, hf, bridge, tokens):
    """Autograd on the bare model: gradient x input of the embedding output, the learned
    position embedding output (if any) and each head's output before the output projection."""
    outputs, handles = {}, []

    def keep(key):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            tensor.retain_grad()
            outputs[key] = tensor
        return hook

    def keep_input(key):
        def hook(module, args):
            args[0].retain_grad()
            outputs[key] = args[0]
        return hook

    family = family_for(bridge)
    embed = hf.get_submodule(EMBED_MODULE[name]) if name in EMBED_MODULE else hf.get_input_embeddings()
    handles.append(embed.register_forward_hook(keep("embed")))
    for name, module in hf.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("wpe", "embed_positions", "position_embeddings") and isinstance(module, torch.nn.Embedding):
            handles.append(module.register_forward_hook(keep("pos")))
    for layer in range(family.n_layers):  # the output projection: the module with the same weight
        weight = bridge.blocks[layer].attn.o.original_component.weight
        o = next(m for m in hf.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                 and (m.weight.shape == weight.shape and torch.equal(m.weight, weight)
                      or m.weight.shape == weight.T.shape and torch.equal(m.weight, weight.T)))
        handles.append(o.register_forward_pre_hook(keep_input(layer)))
    try:
        hf_scalar(hf, bridge, tokens).sum().backward()
    finally:
        for h in handles:
            h.remove()
    hf.zero_grad(set_to_none=True)
    gi = {k: (v * v.grad).detach() for k, v in outputs.items()}
    heads = torch.stack([gi[layer].reshape(*gi[layer].shape[:2], family.n_heads, -1).sum(-1).transpose(1, 2)
                         for layer in range(family.n_layers)], 1)  # [batch, layers, heads, pos]
    return gi["embed"].sum(-1), gi["pos"].sum(-1) if "pos" in gi else None, heads


@pytest.mark.parametrize("name", VERIFIED)
def test_gradient_x_input_equals_autograd_on_the_hugging_face_model(name, float64_throughout):
    hf, bridge = bridge_of(name)
    family = family_for(bridge)
    pos_hooks = [name for name, hr in family.hook_roles().items() if hr.role is Role.POS_EMBED]
    attr = lp.explain(bridge, TOKENS, target_for(bridge), method="grad_x_input", record=pos_hooks)
    # one example at a time: a position embedding is shared by the batch, its gradient summed
    rows = [_hf_gradient_x_input(name, hf, bridge, TOKENS[i:i + 1]) for i in range(len(TOKENS))]
    token, position, heads = (None if rows[0][k] is None else torch.cat([r[k] for r in rows]) for k in range(3))
    assert rel(attr.target_value, hf_scalar(hf, bridge, TOKENS).detach()) < 1e-6
    assert rel(attr.semantic, token) < 1e-6
    assert (position is None) == (not pos_hooks)
    if position is not None:  # under gradient x input a learned position is a leak: read its record
        assert rel(attr.hooks[pos_hooks[0]].sum(-1), position) < 1e-6
    assert rel(attr.heads_by_pos, heads) < 1e-6


@pytest.mark.parametrize("name", VERIFIED)
def test_every_hook_the_rules_patch_is_in_the_computation_path(name):
    """Scaling the output of each rule site changes the explained value (with the rewrites the
    sweep registers, e.g. the joint-qkv bridges' rotated q and k routed through their hooks)."""
    hf, bridge = bridge_of(name)
    family = family_for(bridge)
    target = target_for(bridge)

    def output():  # through explain, so that the family's rewrites (canonizers) are in place
        return lp.explain(bridge, TOKENS[:1], target, method="grad_x_input", attention="eager").target_value

    plain = output()
    skip = {Role.ROPE_COS, Role.ROPE_SIN}  # tables: checked through the rotated q and k
    off_path = []
    for hook_name, (hook_role, _) in lp.rule_sites(bridge, "pa_lrp").items():
        if hook_role.role in skip or is_encoder(bridge) and hook_name.startswith("ln_final"):
            continue  # (an encoder's explained hidden state comes before its final norm)
        point = family.hook_points()[hook_name]
        point.add_hook(lambda act, hook: act * 1.25 if act.is_floating_point() else act)
        try:
            changed = output()
        except NotImplementedError as err:  # an attention rebuilt at hook_z saw the edit and refused
            assert "rebuilt z differs" in str(err)
            continue
        finally:
            point.remove_hooks("fwd")
        if torch.allclose(changed, plain, rtol=1e-12, atol=0):
            off_path.append(hook_name)
    assert not off_path


@pytest.mark.parametrize("method", RULE_METHODS)
@pytest.mark.parametrize("name", VERIFIED)
def test_conservation_bias_free(name, method, request):
    hf, bridge = bridge_of(name, biases=False)
    target = target_for(bridge)
    shipped = lp.explain(bridge, TOKENS, target, method=method).conservation()
    # as shipped, Hugging Face's float32 softmax / norms / tables cap conservation at float32
    # rounding of the logit: seen up to 12 float32 eps under torch's scalar kernels (GPT-OSS,
    # Cohere), ~8 with AVX-512; bounded at 64 (docs/tolerances.md); a wrong rule misses by percents
    assert float(shipped.other_absorbed.abs().max() / shipped.target_value.abs().max()) < rounding(torch.float32, 1.0)
    request.getfixturevalue("float64_throughout")
    c = lp.explain(bridge, TOKENS, target, method=method).conservation()
    assert float((c.other_absorbed / c.target_value).abs().max()) < 1e-8


@pytest.mark.parametrize("name", VERIFIED)
def test_positional_sinks_and_the_attn_lrp_leak(name):
    hf, bridge = bridge_of(name)
    target = target_for(bridge)
    pa = lp.explain(bridge, TOKENS, target, method="pa_lrp")
    total = pa.positional.abs().sum() + pa.positional_input.abs().sum()
    assert float(total) > 1e-6 * float(pa.target_value.abs().max())
    attn = lp.explain(bridge, TOKENS, target, method="attn_lrp").conservation()
    if family_for(bridge).pe_type == "rotary":  # a rotation hands all relevance on to q and k: no leak
        assert float(pa.positional.abs().sum()) > 0
        assert float(attn.positional_leak.abs().max()) == 0
    else:  # an added position term (learned, ALiBi) leaks under AttnLRP, reported
        assert float(attn.positional_leak.abs().min()) > 0


# ---------------------------------------------------------------------------------- refused rows
@pytest.mark.parametrize("name", REFUSED)
def test_refused_with_the_architecture_named(name):
    hf, bridge = bridge_of(name)
    row = row_of(name)
    with pytest.raises(NotImplementedError) as err:
        lp.explain(bridge, TOKENS, TARGET)
    message = str(err.value)
    assert MODEL_TYPE[name] in message or (row is not None and row.name in message)


# ---------------------------------------------------------------------------------- compatibility mode
def compat_bridge_of(name: str, no_processing: bool):
    key = (name, "compat", no_processing)
    if key not in _CACHE:
        from transformers import AutoTokenizer

        bridge = lp.models.bridge_from_hf(build(name, biases=False), AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                                          dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge.enable_compatibility_mode(disable_warnings=True, no_processing=no_processing)
        _CACHE[key] = bridge
    return _CACHE[key]


@pytest.mark.parametrize("name", VERIFIED)
def test_compatibility_mode_gives_the_same_maps_and_conserves(name, float64_throughout):
    """TransformerBridge.enable_compatibility_mode(): without weight processing the hooks are
    converted only, so the maps equal the default mode's; with it (LayerNorm folding, centring)
    the weights change but every method still conserves."""
    _, bridge = bridge_of(name, biases=False)
    target = target_for(bridge)
    plain = lp.explain(bridge, TOKENS, target)
    raw = lp.explain(compat_bridge_of(name, no_processing=True), TOKENS, target_for(bridge))
    assert rel(raw.semantic, plain.semantic) < 1e-9
    assert rel(raw.positional, plain.positional) < 1e-9
    assert rel(raw.heads_by_pos, plain.heads_by_pos) < 1e-9
    processed = compat_bridge_of(name, no_processing=False)
    for method in RULE_METHODS:
        c = lp.explain(processed, TOKENS, target_for(processed), method=method).conservation()
        assert float((c.other_absorbed / c.target_value).abs().max()) < 1e-8, method


# ---------------------------------------------------------------------------------- RoPE table layout
def test_rope_layout_is_read_from_the_tables_the_forward_used(monkeypatch):
    """Cohere's config claims rotate-half, its tables pair adjacent channels: the per-layer table
    split follows the tables (it adds up to the sink), and a layout they contradict is refused."""
    from lens_palrp.positional.rope import Rotary

    if "cohere" not in VERIFIED:
        pytest.skip("Cohere is refused with this TransformerLens")
    _, bridge = bridge_of("cohere", biases=False)
    assert not family_for(bridge).rotary_adjacent_pairs  # what the bridge's config says
    seen = {}
    original = Rotary.layer_reductions

    def spy(self, positional):
        seen.update(adjacent=dict(self.adjacent), tables={l: (self.cos[l] + self.sin[l]).sum(-1) for l in self.cos})
        return original(self, positional)

    monkeypatch.setattr(Rotary, "layer_reductions", spy)
    attr = lp.explain(bridge, TOKENS, TARGET)
    assert seen["adjacent"] == {0: True, 1: True}
    for layer in range(2):
        torch.testing.assert_close(seen["tables"][layer], attr.positional.sum(2)[:, layer], rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(Rotary, "_layout", lambda self, cos, layer: False)  # the config's claim
    with pytest.raises(NotImplementedError, match="RoPE tables do not rebuild the rotated query/key"):
        lp.explain(bridge, TOKENS, TARGET)


def test_rope_tables_in_no_known_layout_are_refused():
    _, bridge = bridge_of("llama", biases=False)
    point = family_for(bridge).hook_points()["blocks.0.attn.hook_cos"]
    point.add_hook(lambda act, hook: act.flip(-1) * torch.linspace(0.5, 1.0, act.shape[-1], dtype=act.dtype))
    try:
        with pytest.raises(NotImplementedError, match="pairs its channels neither by halves nor by adjacent pairs"):
            lp.explain(bridge, TOKENS, TARGET, attention="eager")
    finally:
        point.remove_hooks("fwd")
