"""Edge attribution patching (``lens_palrp.analyses.edges``) on the zoo's HookedTransformers.

The references are independent of the scores: explicit path patching (a forward that adds the
sender's clean-minus-corrupted output to one receiver's input only), whose difference quotient
at a small patch must tend to the plain-gradient edge score; each sender's node score, read at
the sender's own output, which its edge scores must sum to for every method; and ``explain``'s
own positional sinks for the positional edges. Identities are checked on float64 copies.
"""

import copy

import pytest
import torch

import lens_palrp as lp
from lens_palrp.analyses import pearson
from lens_palrp.analyses.edges import Edge, EdgeAttribution, edge_attribution, path_patching

METHODS = ("grad", "relp", "attn_lrp", "pa_lrp", "cp_lrp")

pytestmark = pytest.mark.filterwarnings("ignore:.*HookedTransformer is deprecated.*")


def _hooked(name):
    if not lp.zoo.hooked_available():
        pytest.skip("HookedTransformer needs TransformerLens 3.x")
    model, _ = lp.zoo.load(name, kind="hooked")
    return model


@pytest.fixture(scope="module", params=["rope-repeat", "learned-absolute", "alibi-repeat"])
def task_model(request):
    """``(name, float64 model, clean [4, 16], corrupted, metric)``: the zoo task's prompts with the
    decisive token changed, the metric the answer's logit minus the corrupted answer's."""
    name = request.param
    model = copy.deepcopy(_hooked(name)).to(torch.float64)
    task = lp.zoo.task(name)
    gen = torch.Generator().manual_seed(0)
    clean, _ = task.batch(4, gen)
    t = clean.shape[1] - 1
    rel = task.relevant_position(t)
    corrupted = clean.clone()
    corrupted[:, rel] = 2 + (clean[:, rel] - 2 + torch.tensor([1, 5, 9, 13])) % 16
    good, bad = clean[:, rel], corrupted[:, rel]

    def metric(logits, pairs):
        rows = torch.arange(len(pairs))
        return logits[rows, t, good[pairs]] - logits[rows, t, bad[pairs]]

    return name, model, clean, corrupted, metric


@pytest.fixture(scope="module")
def all_methods(task_model):
    name, model, clean, corrupted, metric = task_model
    return edge_attribution(model, clean, corrupted, metric, methods=METHODS)


def test_node_score_is_the_sum_of_its_edge_scores(task_model, all_methods):
    """The residual stream is a sum, so a sender's rule-modified gradient is the sum of its
    receivers' gradients: the edge scores add up to the node score, per pair and method. A
    receiver read at a shared hook (the whole residual stream's gradient), a missing receiver or a
    wrong feed mask breaks it."""
    ea = all_methods
    for method in METHODS:
        for sender, node in ea.node_scores[method].items():
            cols = [i for i, e in enumerate(ea.edges) if e.sender == sender]
            total = ea.per_pair[method][:, cols].sum(1)
            assert torch.allclose(total, node, rtol=1e-10, atol=1e-12), (method, sender, total, node)
        # the identity is not vacuous: the methods' gradients differ and nodes carry signal
        assert max(float(v.abs().max()) for v in ea.node_scores[method].values()) > 1e-2
    assert not torch.allclose(ea.per_pair["grad"], ea.per_pair["attn_lrp"])


def _patch_by_hand(model, clean, corrupted, metric, edge: Edge, eps: float) -> float:
    """Path patching written from the edge's names alone: the sender's output rebuilt from
    TransformerLens' own hooks (a head's from ``hook_z`` and ``W_O``), added times ``eps`` to the
    receiver's split input; mean over pairs of the metric's change."""
    L = model.cfg.n_layers
    pairs = torch.arange(clean.shape[0])

    def hook_and_head(name, suffix):
        layer, part = name.split(".")
        return f"blocks.{layer[1:]}.{suffix}", (int(part[1:]) if part.startswith("H") else None)

    def sender_output(cache):
        if edge.sender in ("embed", "pos_embed"):
            return cache[f"hook_{edge.sender}"]
        if edge.sender.endswith("MLP"):
            return cache[hook_and_head(edge.sender, "hook_mlp_out")[0]]
        hook, head = hook_and_head(edge.sender, "attn.hook_z")
        return cache[hook][:, :, head] @ model.blocks[int(edge.sender.split(".")[0][1:])].attn.W_O[head]

    if edge.receiver == "logits":
        receiver_hook, head = f"blocks.{L - 1}.hook_resid_post", None
    elif edge.receiver_input == "mlp":
        receiver_hook, head = hook_and_head(edge.receiver, "hook_mlp_in")
    else:
        receiver_hook, head = hook_and_head(edge.receiver, f"hook_{edge.receiver_input}_input")
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(clean)
            corrupted_logits, corrupted_cache = model.run_with_cache(corrupted)
            delta = eps * (sender_output(clean_cache) - sender_output(corrupted_cache))

            def patch(act, hook):
                act = act.clone()
                if head is None:
                    act += delta
                else:
                    act[:, :, head] += delta
                return act

            patched = model.run_with_hooks(corrupted, fwd_hooks=[(receiver_hook, patch)])
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    return float((metric(patched, pairs) - metric(corrupted_logits, pairs)).mean())


def test_grad_edge_score_is_the_derivative_of_path_patching(task_model, all_methods):
    """Patching ``eps * (clean - corrupted)`` into one receiver: ``(metric - corrupted metric) /
    eps`` tends to the plain-gradient score, the error shrinking in proportion to eps. The patch
    is built here from the edge's names, so a receiver read at the wrong hook (q for k), a wrong
    head index, a sign flip or a score summed over the wrong axes fails; ``path_patching``
    equals it."""
    name, model, clean, corrupted, metric = task_model
    ea = all_methods
    patching = [i for i, e in enumerate(ea.edges) if e.kind == "patching"]
    biggest = sorted(patching, key=lambda i: -abs(float(ea.scores["grad"][i])))[:4]
    picked = biggest + [i for i in patching if ea.edges[i].receiver_input in ("q", "k", "mlp", "logits")][::9]
    edges = [ea.edges[i] for i in picked]
    score = ea.scores["grad"][picked]
    err = {eps: max(abs(_patch_by_hand(model, clean, corrupted, metric, e, eps) / eps - float(s))
                    for e, s in zip(edges, score)) for eps in (1e-3, 1e-4)}
    scale = float(score.abs().max())
    assert scale > 0.1 and {e.receiver_input for e in edges} >= {"q", "k", "v", "mlp", "logits"}
    assert err[1e-4] < 1e-3 * scale
    assert err[1e-4] < 0.2 * err[1e-3]  # first order: ten times smaller patch, ten times smaller error
    by_hand = torch.tensor([_patch_by_hand(model, clean, corrupted, metric, e, 1.0) for e in edges[:6]],
                           dtype=torch.float64)
    assert torch.allclose(path_patching(model, clean, corrupted, metric, edges[:6]), by_hand, rtol=1e-9, atol=1e-12)


def test_full_path_patching_correlates_with_the_grad_scores(task_model, all_methods):
    """With whole patches, attribution patching is an estimate: on the zoo tasks its scores
    track the true path-patching effects closely (Pearson > 0.9 measured 0.97-0.99). One
    forward per edge: run on the two models the docs report."""
    name, model, clean, corrupted, metric = task_model
    if name == "alibi-repeat":
        return
    ea = all_methods
    patching = [i for i, e in enumerate(ea.edges) if e.kind == "patching"]
    effect = path_patching(model, clean, corrupted, metric, [ea.edges[i] for i in patching])
    assert pearson(effect, ea.scores["grad"][patching]) > 0.9


def test_edges_point_forward_and_are_all_there(task_model, all_methods):
    """Heads of layer l feed the MLP of layer l and everything after; an MLP feeds later layers;
    the inputs feed everything. The count is the closed form for the model's shape."""
    name, model, *_ = task_model
    ea = all_methods
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for e in ea.edges:
        if e.kind == "positional":
            assert (e.sender, e.receiver_input, e.sender_layer) == ("pos", "pos", -1)
            continue
        if e.receiver_layer == e.sender_layer:
            assert e.receiver_input == "mlp" and ".H" in e.sender, e
        else:
            assert e.receiver_layer > e.sender_layer, e
    receivers_after = lambda l: (L - 1 - l) * (3 * H + 1) + 1  # layers > l and the logits  # noqa: E731
    n_inputs = 2 if name == "learned-absolute" else 1
    expected = n_inputs * (L * (3 * H + 1) + 1) + sum(H * (receivers_after(l) + 1) + receivers_after(l)
                                                      for l in range(L))
    positional = L * H if name != "learned-absolute" else 0
    assert sum(e.kind == "patching" for e in ea.edges) == expected
    assert sum(e.kind == "positional" for e in ea.edges) == positional
    assert len({(e.sender, e.receiver, e.receiver_input) for e in ea.edges}) == len(ea.edges)


def test_positional_edges_are_explains_sinks(task_model, all_methods):
    """``pos -> head`` under PA-LRP is the head's positional sink relevance on the corrupted run
    (``explain``'s ``attr.positional`` summed over positions, run here without the split inputs);
    methods that let positional relevance leak report no such rows. A learned position
    embedding is an ordinary sender, with nothing to patch (same positions): all zeros."""
    name, model, clean, corrupted, metric = task_model
    ea = all_methods
    rows = ea.table()
    if name == "learned-absolute":
        assert not any(r["kind"] == "positional" for r in rows)
        pos_embed = [r for r in rows if r["sender"] == "pos_embed"]
        assert pos_embed and all(r["score"] == 0.0 for r in pos_embed)
        return
    assert {r["method"] for r in rows if r["kind"] == "positional"} == {"pa_lrp"}
    attr = lp.explain(model, corrupted, lambda logits: metric(logits, torch.arange(4)), method="pa_lrp")
    sinks = attr.positional.sum(-1).mean(0)  # [layers, heads]
    got = {r["receiver"]: r["score"] for r in rows if r["kind"] == "positional" and r["method"] == "pa_lrp"}
    expected = {f"L{l}.H{h}": float(sinks[l, h]) for l in range(sinks.shape[0]) for h in range(sinks.shape[1])}
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert max(abs(v) for v in expected.values()) > 1e-4


def test_batch_is_the_mean_of_single_pairs_and_lengths_may_differ():
    """Scores of a batch are the mean of each pair run alone; pairs of different lengths run in
    their own batches, the metric told which pairs (``metric(logits, pair_indices)``)."""
    model = copy.deepcopy(_hooked("rope-repeat")).to(torch.float64)
    clean = ["a b c d e f", "a b c d e f g h", "p o n m l k"]
    corrupted = ["a b c h e f", "a b c d e k g h", "p o n a l k"]
    ids = model.to_tokens(["c", "e", "m"], prepend_bos=False)[:, 0]
    metric = lambda logits, pairs: logits[torch.arange(len(pairs)), -1, ids[pairs]]  # noqa: E731
    batch = edge_attribution(model, clean, corrupted, metric, methods=("grad", "pa_lrp"))
    for i in range(3):
        one = edge_attribution(model, clean[i], corrupted[i], lambda logits: logits[:, -1, ids[i]],
                               methods=("grad", "pa_lrp"))
        for m in ("grad", "pa_lrp"):
            assert torch.allclose(batch.per_pair[m][i], one.per_pair[m][0], rtol=1e-9, atol=1e-12)
    for m in ("grad", "pa_lrp"):
        assert torch.allclose(batch.scores[m], batch.per_pair[m].mean(0))
    assert [len(r["scores"]) for r in batch.table()[:3]] == [3, 3, 3]


def test_model_is_left_unchanged_even_when_the_metric_fails():
    model = _hooked("rope-repeat")
    model.set_use_attn_result(True)  # a flag the user set stays set
    flags = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in")
    before_flags = {f: getattr(model.cfg, f) for f in flags}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    clean, corrupted = "a b c d e f", "a b c h e f"

    def failing(logits):
        if torch.is_grad_enabled() and logits.requires_grad:
            raise RuntimeError("metric failed inside the sweep")
        return logits[:, -1, 3]

    def check():
        assert {f: getattr(model.cfg, f) for f in flags} == before_flags
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert model.training and all(m.training for m in model.modules())
        for point in model.hook_dict.values():
            assert not point._forward_hooks and not point._backward_hooks and not point.fwd_hooks

    try:
        edge_attribution(model, clean, corrupted, lambda logits: logits[:, -1, 3], methods=METHODS)
        check()
        with pytest.raises(RuntimeError, match="metric failed inside the sweep"):
            edge_attribution(model, clean, corrupted, failing)
        check()
        path_patching(model, clean, corrupted, lambda logits: logits[:, -1, 3],
                      [Edge("embed", "L1.H0", -1, 1, "q")])
        check()
    finally:
        model.set_use_attn_result(False)
        model.eval()


def test_bad_input_is_refused_by_name():
    model = _hooked("rope-repeat")
    metric = lambda logits: logits[:, -1, 3]  # noqa: E731
    with pytest.raises(ValueError, match="pair 0.*same length"):
        edge_attribution(model, "a b c", "a b c d", metric)
    with pytest.raises(ValueError, match="as many prompts"):
        edge_attribution(model, ["a b", "c d"], ["a b"], metric)
    with pytest.raises(ValueError, match="different lengths.*pair_indices"):
        edge_attribution(model, ["a b", "c d e"], ["a c", "c d d"], metric)
    with pytest.raises(ValueError, match=r"one value per pair \(\[batch\] = \[2\]\)"):
        edge_attribution(model, ["a b", "c d"], ["a c", "c c"], lambda logits: logits[:, -1].sum())
    with pytest.raises(ValueError, match="unknown method"):
        edge_attribution(model, "a b", "a c", metric, methods=("grad", "lrp_typo"))
    with pytest.raises(TypeError, match="metric on the logits"):
        edge_attribution(model, "a b", "a c", lp.at_hook("blocks.1.hook_resid_post", lambda a: a[:, -1, 0]))
    with pytest.raises(ValueError, match="corrupted: .*pad id"):  # the zoo's pad id is 1
        edge_attribution(model, torch.tensor([[0, 3, 4], [0, 5, 6]]), torch.tensor([[0, 3, 1], [0, 5, 6]]), metric)
    with pytest.raises(TypeError, match="integers"):
        edge_attribution(model, torch.ones(1, 3), torch.ones(1, 3), metric)
    with pytest.raises(ValueError, match="no edge L1.H0 -> L0.H0"):  # backwards
        path_patching(model, "a b", "a c", metric, [Edge("L1.H0", "L0.H0", 1, 0, "q")])


def test_bridge_is_refused_naming_what_is_missing():
    if not lp.zoo.bridge_available():
        pytest.skip("no TransformerBridge here")
    model, _ = lp.zoo.load("rope-repeat", kind="bridge")
    with pytest.raises(NotImplementedError, match="HookedTransformer only.*use_split_qkv_input"):
        edge_attribution(model, "a b c", "a b d", lambda logits: logits[:, -1, 3])


def test_table_top_and_figure(all_methods):
    ea: EdgeAttribution = all_methods
    rows = ea.table()
    assert set(rows[0]) == {"sender", "receiver", "sender_layer", "receiver_layer", "receiver_input", "kind",
                            "method", "score", "scores"}
    frame = ea.to_frame()
    assert len(frame) == len(rows) and set(frame["method"]) == set(METHODS)
    top = ea.top(5, method="pa_lrp")
    assert len(top) == 5 and all(r["method"] == "pa_lrp" and r["kind"] == "patching" for r in top)
    assert [abs(r["score"]) for r in top] == sorted((abs(r["score"]) for r in top), reverse=True)
    best = max((r for r in rows if r["method"] == "pa_lrp" and r["kind"] == "patching"), key=lambda r: abs(r["score"]))
    assert top[0] == best
    assert ea.score(best["sender"], best["receiver"], best["receiver_input"], "pa_lrp") == best["score"]
    edge_traces = lambda fig: [t for t in fig.data if t.mode == "lines"]  # noqa: E731
    assert len(edge_traces(ea.figure(top=7))) == 7
    threshold = abs(top[2]["score"])
    kept = [r for r in rows if r["method"] == "grad" and abs(r["score"]) >= threshold]
    assert len(edge_traces(ea.figure("grad", threshold=threshold))) == len(kept)
    fig = ea.figure("pa_lrp", top=1)
    line = edge_traces(fig)[0]
    assert f"{top[0]['score']:.4g}" in line.text[0]
    assert line.line.color == ("crimson" if top[0]["score"] > 0 else "royalblue")
