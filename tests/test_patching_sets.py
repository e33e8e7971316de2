"""Patching over sets of prompt pairs: batching, MLP patching, linear components, reuse, the
progress bar, TransformerLens' own attribution patching, and the bootstrap statistics."""

import importlib

import numpy as np
import pytest
import torch
from scipy import stats

import lens_palrp as lp
from lens_palrp import analyses as an
from lens_palrp.analyses import patching as P
from lens_palrp.zoo.tasks import SYMBOLS  # the zoo tokenizer's symbols
from tolerances import meeting_dtype, rounding



def repeat_pairs(n, n_symbols=8, seed=0):
    """``n`` pairs for the zoo's repeat-3-back task: the answer (3 back from the end) is replaced
    by another symbol in the corrupted prompt; ``(clean, corrupted, correct, wrong)``."""
    rng = np.random.default_rng(seed)
    clean, corrupted, correct, wrong = [], [], [], []
    for _ in range(n):
        words = list(rng.choice(SYMBOLS, n_symbols))
        other = rng.choice([s for s in SYMBOLS if s != words[-3]])
        clean.append(" ".join(words))
        corrupted.append(" ".join(words[:-3] + [other] + words[-2:]))
        correct.append(words[-3])
        wrong.append(other)
    return clean, corrupted, correct, wrong


@pytest.fixture(scope="module")
def zoo():
    if not lp.zoo.available():
        pytest.skip("the zoo models do not load here")
    model, _ = lp.zoo.load("rope-repeat")
    model = model.to(torch.float64)
    model.cfg.dtype = torch.float64
    return model


def _zero_leaves(names):
    """Forward hooks that add a zero leaf of our own at each hook (``act + 0``): after a backward,
    ``zeros[name].grad`` is the gradient at that hook and ``acts[name]`` the activation there."""
    acts, zeros = {}, {}

    def leaf(name):
        def add(act, hook):
            acts[name] = act.detach().clone()
            zeros[name] = torch.zeros_like(acts[name], requires_grad=True)
            return act + zeros[name]
        return add

    return [(n, leaf(n)) for n in names], acts, zeros


def linear_tail_model(attn_only=False):
    """A random float64 HookedTransformer without normalization: the last layer's MLP output (and,
    attention-only, the last layer's head outputs) reach the logits linearly, so attribution
    patching is exact there."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("no HookedTransformer in this TransformerLens (4.x): the linear-tail model needs one")
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=None if attn_only else 32,
                                  act_fn="gelu", normalization_type=None, d_vocab=12, n_ctx=10,
                                  dtype=torch.float64, model_name="linear-tail", attn_only=attn_only)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.eval()
    return model


@pytest.fixture(scope="module")
def linear_tail():
    return linear_tail_model()


def test_batched_patching_equals_one_pair_at_a_time(zoo):
    """Rows of different pairs and units share forwards (batch_size 37 cuts through both); pairs
    of two lengths are grouped. Each pair's effects must be those of patching it alone."""
    clean, corrupted, correct, wrong = repeat_pairs(3, seed=1)
    c2, k2, correct2, wrong2 = repeat_pairs(2, n_symbols=6, seed=2)
    clean, corrupted, correct, wrong = clean + c2, corrupted + k2, correct + correct2, wrong + wrong2
    metric = an.logit_difference(correct, wrong, model=zoo)
    together = an.activation_patching(zoo, clean, corrupted, metric, batch_size=37, progress=False)
    assert together.resid.shape == (5, 2, 9) and together.head_pos.shape == (5, 2, 4, 9)
    assert torch.isnan(together.resid[3:, :, 7:]).all() and not torch.isnan(together.resid[:3]).any()
    for i in range(5):
        alone = an.activation_patching(zoo, clean[i], corrupted[i], an.logit_difference(correct[i], wrong[i], model=zoo),
                                       batch_size=1000, progress=False)
        for comp, grid in alone.effects.items():
            T = grid.shape[-1] if comp in P.POSITIONAL else None
            got = together.effects[comp][i]
            got = got[..., :T] if T is not None else got
            torch.testing.assert_close(got, grid[0], rtol=1e-10, atol=1e-12, msg=f"pair {i} {comp}")
    with pytest.raises(ValueError, match="different lengths"):
        together.mean("resid")
    torch.testing.assert_close(together.mean("heads"), together.heads.mean(0))


def test_mlp_and_head_patching_match_hand_written_hooks(zoo):
    clean, corrupted, correct, wrong = repeat_pairs(2, seed=3)
    metric = an.logit_difference(correct, wrong, model=zoo)
    got = an.activation_patching(zoo, clean, corrupted, metric, components=("mlp", "head_pos"), progress=False)
    assert set(got.effects) == {"mlp", "head_pos"}
    ids = torch.tensor([zoo.to_single_token(s) for s in correct]), torch.tensor([zoo.to_single_token(s) for s in wrong])
    for i in range(2):
        c, k = zoo.to_tokens(clean[i]), zoo.to_tokens(corrupted[i])
        m = lambda logits: float(logits[0, -1, ids[0][i]] - logits[0, -1, ids[1][i]])
        with torch.no_grad():
            _, cache = zoo.run_with_cache(c)
            base = m(zoo(k))
            for layer in range(2):
                name = f"blocks.{layer}.hook_mlp_out"
                patched = zoo.run_with_hooks(k, fwd_hooks=[(name, lambda act, hook, n=name: cache[n])])
                assert float(got.mlp[i, layer]) == pytest.approx(m(patched) - base, rel=1e-10, abs=1e-12)
            for layer, head, pos in [(1, 2, 8), (0, 1, 6), (1, 0, 7)]:
                name = f"blocks.{layer}.attn.hook_z"

                def one(act, hook, n=name, h=head, p=pos):
                    act = act.clone()
                    act[:, p, h] = cache[n][:, p, h]
                    return act

                patched = zoo.run_with_hooks(k, fwd_hooks=[(name, one)])
                assert float(got.head_pos[i, layer, head, pos]) == pytest.approx(m(patched) - base, rel=1e-10, abs=1e-12)
    assert float(got.mlp.abs().max()) > 1e-3  # the MLPs matter here: the comparison is not of zeros


@pytest.mark.parametrize("attn_only", [False, True])
def test_estimate_is_exact_where_the_metric_is_linear(attn_only):
    """Without normalization the last layer's MLP output (attention-only: its z) reaches the logit
    difference linearly: (clean - corrupted) . gradient is the patching effect, to float64
    rounding. The first layer's are not linear (attention and GELU follow): the estimate differs."""
    model = linear_tail_model(attn_only)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 12, (4, 7), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 1 + torch.randint(0, 10, (4,), generator=gen)) % 12
    metric = an.logit_difference([1, 2, 3, 4], [5, 6, 7, 8])
    rp = an.relevance_patching(model, clean, corrupted, metric, methods=("grad",), patching=True)
    est, true = rp.scores["grad"], rp.patching.effects
    assert ("mlp" in true) is not attn_only  # an attention-only model has no MLP to patch
    for comp in ("heads", "head_pos") if attn_only else ("mlp",):
        torch.testing.assert_close(est[comp][:, 1], true[comp][:, 1], rtol=1e-9, atol=1e-12, msg=comp)
        assert float((est[comp][:, 0] - true[comp][:, 0]).abs().max()) > 1e-4 * float(true[comp][:, 0].abs().max())
        assert float(true[comp][:, 1].abs().max()) > 1e-2


def test_grad_estimate_equals_autograd_and_transformer_lens(zoo):
    """Against attribution patching by hand (torch.autograd on the corrupted batch) for every
    component, and against TransformerLens' own ``attribution_patch`` where it ships (3.9 and 4.3
    have ``transformer_lens.tools.analysis.attribution_patching``)."""
    clean, corrupted, _, _ = repeat_pairs(4, seed=4)
    # TransformerLens' metric sees one example at a time: one (correct, wrong) for every pair
    clean = [" ".join(s.split()[:-3] + ["k"] + s.split()[-2:]) for s in clean]
    corrupted = [" ".join(s.split()[:-3] + ["n"] + s.split()[-2:]) for s in corrupted]
    metric = an.logit_difference("k", "n", model=zoo)
    rp = an.relevance_patching(zoo, clean, corrupted, metric, methods=("grad", "relp"))
    c, k = zoo.to_tokens(clean), zoo.to_tokens(corrupted)
    names = {kind: [f"blocks.{l}.{kind}" for l in range(2)] for kind in ("attn.hook_z", "hook_resid_pre", "hook_mlp_out")}
    flat = [n for ns in names.values() for n in ns]
    with torch.no_grad():
        _, cache = zoo.run_with_cache(c, names_filter=flat)
    leaves, acts, zeros = _zero_leaves(flat)
    with zoo.hooks(fwd_hooks=leaves):
        metric(zoo(k)).sum().backward()
    zoo.zero_grad(set_to_none=True)
    prod = {n: (cache[n] - acts[n]) * zeros[n].grad for n in flat}
    expected = {
        "heads": torch.stack([prod[n].sum((1, 3)) for n in names["attn.hook_z"]], 1),
        "head_pos": torch.stack([prod[n].sum(3).transpose(1, 2) for n in names["attn.hook_z"]], 1),
        "resid": torch.stack([prod[n].sum(2) for n in names["hook_resid_pre"]], 1),
        "mlp": torch.stack([prod[n].sum((1, 2)) for n in names["hook_mlp_out"]], 1),
    }
    # under TransformerLens 4 the zoo is a bridge: its eager softmax (the hand-run) is float32
    tol = dict(rtol=1e-5, atol=1e-6) if lp.hooks.transformer_bridge.is_transformer_bridge(zoo) else \
        dict(rtol=1e-9, atol=1e-12)
    for comp, want in expected.items():
        torch.testing.assert_close(rp.scores["grad"][comp], want.double(), **tol, msg=comp)
    assert not torch.allclose(rp.scores["relp"]["heads"], expected["heads"])  # relp's rules act
    try:
        ap = importlib.import_module("transformer_lens.tools.analysis.attribution_patching")
    except ImportError:
        pytest.skip("this TransformerLens ships no attribution_patch: compared with autograd only")
    nodes = ap.attribution_patch(zoo, c, k, lambda logits: metric(logits).sum()).node_scores
    head_pos = rp.scores["grad"]["head_pos"].mean(0)
    mlp_pos = expected["mlp"]  # TransformerLens scores the MLP per position: sum them
    tl_heads = torch.tensor([[[nodes[ap.Node("attn_head_out", p, l, h)] for p in range(9)] for h in range(4)]
                             for l in range(2)], dtype=torch.float64)
    tl_mlp = torch.tensor([sum(nodes[ap.Node("mlp_out", p, l)] for p in range(9)) for l in range(2)], dtype=torch.float64)
    torch.testing.assert_close(head_pos, tl_heads, **tol)
    torch.testing.assert_close(rp.scores["grad"]["mlp"].mean(0), tl_mlp, **tol)
    assert float(tl_heads.abs().max()) > 1e-3 and mlp_pos.shape == (4, 2)


@pytest.mark.parametrize("mode", ["default", "compat"])
def test_grad_estimate_equals_transformer_lens_attribution_patch_on_a_bridge(tmp_path, mode):
    """The bridge, in both hook namings, against TransformerLens' ``attribution_patch`` (which
    targets the bridge): per head and position, and per MLP output."""
    pytest.importorskip("transformer_lens.model_bridge")
    try:
        ap = importlib.import_module("transformer_lens.tools.analysis.attribution_patching")
    except ImportError:
        pytest.skip("this TransformerLens ships no attribution_patch")
    from bridges import tiny_gpt2

    _, bridge = tiny_gpt2(tmp_path)
    if mode == "compat":
        bridge.enable_compatibility_mode(disable_warnings=True)
    clean = ["c h a p k b e g", "a b c d k f g h", "p o n m k l a b"]
    corrupted = [s.replace("k", "n") for s in clean]
    metric = an.logit_difference("k", "n", model=bridge)
    rp = an.relevance_patching(bridge, clean, corrupted, metric, methods=("grad",), components=("mlp", "head_pos"))
    c, k = bridge.to_tokens(clean), bridge.to_tokens(corrupted)
    nodes = ap.attribution_patch(bridge, c, k, lambda logits: metric(logits).sum()).node_scores
    tl_heads = torch.tensor([[[nodes[ap.Node("attn_head_out", p, l, h)] for p in range(9)] for h in range(4)]
                             for l in range(2)], dtype=torch.float64)
    tl_mlp = torch.tensor([sum(nodes[ap.Node("mlp_out", p, l)] for p in range(9)) for l in range(2)], dtype=torch.float64)
    scale = float(tl_heads.abs().max())
    assert scale > 1e-3
    # the bridge's eager softmax (TransformerLens' run) is float32; the sweep's fused one float64
    torch.testing.assert_close(rp.scores["grad"]["head_pos"].mean(0), tl_heads, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(rp.scores["grad"]["mlp"].mean(0), tl_mlp, rtol=1e-5,
                               atol=1e-6 * float(tl_mlp.abs().max()))


def test_reuse_with_other_inputs_model_or_metric_is_refused(zoo, linear_tail):
    clean, corrupted, correct, wrong = repeat_pairs(3, seed=5)
    metric = an.logit_difference(correct, wrong, model=zoo)
    pr = an.activation_patching(zoo, clean, corrupted, metric, components=("heads",), progress=False)
    reused = an.relevance_patching(zoo, clean, corrupted, metric, methods=("grad",), patching=pr)
    assert reused.patching is pr and reused.components == ["heads"]
    with pytest.raises(ValueError, match="other inputs"):
        an.relevance_patching(zoo, clean[:2], corrupted[:2], metric, methods=("grad",), patching=pr)
    swapped = [corrupted[0]] + corrupted[1:]
    swapped[1] = clean[1]
    with pytest.raises(ValueError, match="other inputs"):
        an.compare_with_patching(zoo, clean, swapped, metric, patching=pr)
    with pytest.raises(ValueError, match="another metric"):
        an.relevance_patching(zoo, clean, corrupted, an.logit_difference(wrong, correct, model=zoo),
                              methods=("grad",), patching=pr)
    tokens = torch.randint(0, 12, (3, 5))
    with pytest.raises(ValueError, match="computed on model"):
        an.relevance_patching(linear_tail, tokens, tokens, an.logit_difference(1, 2), patching=pr)


def test_one_progress_bar_for_the_whole_job(zoo, monkeypatch, capsys):
    import transformer_lens.patching as tl_patching

    bars = []

    class Recording(P.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    def refuse(*args, **kwargs):
        raise AssertionError("TransformerLens' per-layer bars must not run")

    monkeypatch.setattr(P, "tqdm", Recording)
    monkeypatch.setattr(tl_patching, "tqdm", refuse)
    clean, corrupted, correct, wrong = repeat_pairs(3, seed=6)
    c2, k2, _, _ = repeat_pairs(2, n_symbols=5, seed=7)
    metric = an.logit_difference(correct + ["a", "a"], wrong + ["b", "b"], model=zoo)
    pr = an.activation_patching(zoo, clean + c2, corrupted + k2, metric, components=("heads", "resid"), batch_size=16)
    assert len(bars) == 1 and bars[0].n == bars[0].total
    units = 2 * 4 + 2 * 9, 2 * 4 + 2 * 6  # heads + positions, per pair of each length
    assert bars[0].total == -(-3 * units[0] // 16) + -(-2 * units[1] // 16)
    assert capsys.readouterr().err.count("activation patching: 100%") >= 1
    assert pr.heads.shape == (5, 2, 4)


def synthetic(n, seed=0, noise=0.3):
    """A comparison built from numbers: patching effects and one method's noisy estimate."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(2, 3))
    effects = torch.tensor(base + rng.normal(scale=1.0, size=(n, 2, 3)))
    estimate = effects + torch.tensor(rng.normal(scale=noise, size=(n, 2, 3)))
    pr = P.PatchingResult({"heads": effects}, torch.zeros(n), torch.zeros(n), [["a"]] * n, "m",
                          [torch.tensor([0])] * n, [torch.tensor([0])] * n)
    return P.PatchingComparison({"est": {"heads": estimate}}, pr, [["a"]] * n, "estimate", [1] * n)


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_more_pairs():
    small, large = synthetic(10), synthetic(160)
    fx_small, fx_large = small.effects(seed=3), large.effects(seed=3)
    for fx in (fx_small, fx_large):
        assert ((fx["low"] <= fx["mean"]) & (fx["mean"] <= fx["high"])).all()
    width_small = (fx_small["high"] - fx_small["low"]).mean()
    width_large = (fx_large["high"] - fx_large["low"]).mean()
    assert width_large < 0.5 * width_small  # ~ 1 / sqrt(16) = 0.25 expected
    # the percentile interval of a mean is about mean +- 1.96 sd / sqrt(n) (normal approximation)
    X = large.patching.effects["heads"].numpy().reshape(160, -1)
    normal = 2 * 1.96 * X.std(0, ddof=1) / np.sqrt(160)
    rows = fx_large[fx_large["source"] == "patching"]
    np.testing.assert_allclose(rows["high"] - rows["low"], normal, rtol=0.15)
    pd_equal = small.effects(seed=3)
    assert pd_equal.equals(fx_small)  # seeded: the same intervals again
    agree = large.agreement(seed=1)
    row = agree[(agree["statistic"] == "spearman_of_means")].iloc[0]
    P_mean = X.mean(0)
    E_mean = large.scores["est"]["heads"].numpy().reshape(160, -1).mean(0)
    assert row["value"] == pytest.approx(stats.spearmanr(P_mean, E_mean).statistic, abs=1e-12)
    per_pair = [stats.pearsonr(p, e).statistic for p, e in
                zip(X, large.scores["est"]["heads"].numpy().reshape(160, -1))]
    row = agree[(agree["statistic"] == "mean_pearson_per_pair")].iloc[0]
    assert row["value"] == pytest.approx(np.mean(per_pair), abs=1e-12)
    assert row["low"] <= row["value"] <= row["high"] and row["n_pairs"] == 160
    assert set(agree.columns) == {"method", "component", "statistic", "value", "low", "high", "n_pairs"}


def test_metric_and_input_errors(zoo):
    clean, corrupted, correct, wrong = repeat_pairs(2, seed=8)
    metric = an.logit_difference(correct, wrong, model=zoo)
    with pytest.raises(ValueError, match="must pair up"):
        an.activation_patching(zoo, clean, corrupted[:1], metric, progress=False)
    with pytest.raises(ValueError, match="pair 1: clean has 9 tokens and corrupted 8"):
        an.activation_patching(zoo, clean, [corrupted[0], "a b c d e f g"], metric, progress=False)
    with pytest.raises(ValueError, match="components: pick from"):
        an.activation_patching(zoo, clean, corrupted, metric, components=("attn",), progress=False)
    with pytest.raises(ValueError, match=r"one value per pair \(\[batch\] = \[2\]\)"):
        an.relevance_patching(zoo, clean, corrupted, lambda logits: logits[:, -1], methods=("grad",))
    with pytest.raises(ValueError, match="not a single token"):
        an.logit_difference("a b", "c", model=zoo)
    with pytest.raises(ValueError, match="need the model"):
        an.logit_difference("a", "c")
    # one id for all pairs, or one per pair; per pair follows the rows' pair index
    logits = torch.zeros(3, 1, 18, dtype=torch.float64)
    logits[:, 0, 5] = torch.tensor([1.0, 2.0, 3.0])
    per_pair = an.logit_difference([5, 6], [7, 5])
    assert per_pair(logits, torch.tensor([0, 1, 0])).tolist() == [1.0, -2.0, 3.0]
    assert an.logit_difference(5, 7)(logits).tolist() == [1.0, 2.0, 3.0]


def _direction(zoo, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(zoo.cfg.d_model, generator=gen, dtype=torch.float64)


def test_a_metric_at_a_hook_patches_and_estimates_as_by_hand(zoo):
    """``lp.at_hook(name, fn)`` as the metric (an encoder's pooled similarity is one): the
    activation at ``name`` along a per-pair direction. Patching equals hand-written hooks that
    read the same activation, and the "grad" estimate equals autograd at that activation; a
    wrong hook-to-metric wiring (the logits read, the unpatched activation read, another pair's
    direction) would differ."""
    clean, corrupted, _, _ = repeat_pairs(3, seed=9)
    name = "blocks.1.hook_resid_post"
    dirs = torch.stack([_direction(zoo, s) for s in range(3)])
    metric = lp.at_hook(name, lambda act, pairs: (act[:, -1].double() * dirs.to(act.device)[pairs]).sum(-1))
    rp = an.relevance_patching(zoo, clean, corrupted, metric, methods=("grad", "pa_lrp"), patching=True,
                               components=("heads", "mlp"))
    c, k = zoo.to_tokens(clean), zoo.to_tokens(corrupted)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(2)]
    with torch.no_grad():
        _, cache = zoo.run_with_cache(c, names_filter=z_names + [name])
    seen = {}

    def read(act, hook):
        seen["act"] = act.detach()

    def value(i):
        return float((seen["act"][0, -1].double() * dirs[i]).sum())

    bridge = lp.hooks.transformer_bridge.is_transformer_bridge(zoo)
    tol = dict(rel=1e-5, abs=1e-6) if bridge else dict(rel=1e-10, abs=1e-12)
    for i in range(3):
        with torch.no_grad():
            zoo.run_with_hooks(k[i:i + 1], fwd_hooks=[(name, read)])
            base = value(i)
            assert float(rp.patching.corrupted_metric[i]) == pytest.approx(base, **tol)
            for layer, head in [(0, 1), (1, 3), (1, 0)]:
                z = z_names[layer]

                def one(act, hook, z=z, h=head):
                    act = act.clone()
                    act[:, :, h] = cache[z][i:i + 1, :, h]
                    return act

                zoo.run_with_hooks(k[i:i + 1], fwd_hooks=[(z, one), (name, read)])
                assert float(rp.patching.heads[i, layer, head]) == pytest.approx(value(i) - base, **tol)
    assert float(rp.patching.heads.abs().max()) > 1e-3
    # "grad": (clean - corrupted) . d metric / d z, by autograd on the corrupted batch
    leaves, acts, zeros = _zero_leaves(z_names)
    with zoo.hooks(fwd_hooks=leaves + [(name, lambda act, hook: seen.update(act=act))]):
        zoo(k)
        (seen["act"][:, -1].double() * dirs).sum().backward()
    zoo.zero_grad(set_to_none=True)
    want = torch.stack([((cache[z] - acts[z]) * zeros[z].grad).sum((1, 3)) for z in z_names], 1).double()
    torch.testing.assert_close(rp.scores["grad"]["heads"], want,
                               **(dict(rtol=1e-5, atol=1e-6) if bridge else dict(rtol=1e-9, atol=1e-12)))
    assert not torch.allclose(rp.scores["pa_lrp"]["heads"], want)  # the rules act on this target too


def test_a_metric_upstream_of_a_patched_layer_gets_no_effect_from_it(zoo):
    """A metric read at layer 0's output cannot depend on layer 1: its estimates there are
    exactly 0 (no gradient path), its patching effects 0 to rounding, and layer 0's are not."""
    clean, corrupted, _, _ = repeat_pairs(2, seed=10)
    d = _direction(zoo, 7)
    name = "blocks.0.hook_resid_post"
    metric = lp.at_hook(name, lambda act: (act[:, -1].double() * d.to(act.device)).sum(-1))
    rp = an.relevance_patching(zoo, clean, corrupted, metric, methods=("grad",), patching=True, components=("heads",))
    # Patching layer 1 leaves layer 0 as it was, but the patched forward (a batch of every unit)
    # and the corrupted one (a batch of 2) round differently: 0 to the rounding of the metric's terms.
    with torch.no_grad():
        _, cache = zoo.run_with_cache(zoo.to_tokens(corrupted), names_filter=[name])
    scale = (cache[name][:, -1].double().abs() * d.abs().to(cache[name].device)).sum(-1).max()
    assert float(rp.patching.heads[:, 1].abs().max()) <= rounding(meeting_dtype(zoo), scale)
    assert torch.equal(rp.scores["grad"]["heads"][:, 1], torch.zeros(2, 4, dtype=torch.float64))
    assert float(rp.patching.heads[:, 0].abs().max()) > 1e-3


def test_a_metric_at_an_unknown_hook_is_refused(zoo):
    clean, corrupted, _, _ = repeat_pairs(1, seed=11)
    with pytest.raises(ValueError, match="metric: the model has no hook point named 'blocks.7.hook_nothing'"):
        an.activation_patching(zoo, clean, corrupted, lp.at_hook("blocks.7.hook_nothing", lambda a: a[:, -1, 0]),
                               components=("mlp",), progress=False)


@pytest.mark.parametrize("position", [-1, -2, 7])  # the corruption is at 6 of 9
def test_a_logit_difference_unembeds_its_position_only_and_changes_nothing(zoo, position):
    """With ``logit_difference`` the unembedding gets one position per row (a third of a forward
    on a large vocabulary); the same metric as a plain callable keeps every position. Effects,
    metrics and estimates agree (a wrong position or wrong per-pair ids would not), and the
    unembedding's forward is put back, also when a forward fails."""
    from lens_palrp.hooks import family_for

    clean, corrupted, correct, wrong = repeat_pairs(3, seed=12)
    fast = an.logit_difference(correct, wrong, position=position, model=zoo)
    c, w = fast.correct, fast.wrong
    def plain(logits, pairs):
        at = logits[:, position]
        rows = torch.arange(len(pairs))
        return at[rows, c[pairs]] - at[rows, w[pairs]]

    unembed = family_for(zoo).unembed_module()
    widths = []
    handle = unembed.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    try:
        narrow = an.relevance_patching(zoo, clean, corrupted, fast, methods=("grad", "pa_lrp"), patching=True,
                                       components=("heads", "resid"))
        assert set(widths) == {1}, widths
        widths.clear()
        full = an.relevance_patching(zoo, clean, corrupted, plain, methods=("grad", "pa_lrp"), patching=True,
                                     components=("heads", "resid"))
        assert set(widths) == {9}, widths
    finally:
        handle.remove()
    tol = dict(rtol=1e-5, atol=1e-6) if lp.hooks.transformer_bridge.is_transformer_bridge(zoo) else \
        dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(narrow.patching.corrupted_metric, full.patching.corrupted_metric, **tol)
    assert float((narrow.patching.clean_metric - narrow.patching.corrupted_metric).abs().min()) > 1e-6
    for comp in ("heads", "resid"):
        torch.testing.assert_close(narrow.patching.effects[comp], full.patching.effects[comp], **tol)
        for method in ("grad", "pa_lrp"):
            torch.testing.assert_close(narrow.scores[method][comp], full.scores[method][comp], **tol)
    assert "forward" not in unembed.__dict__
    broken = an.logit_difference([0, 1, 10**6], wrong, model=zoo)  # an id past the vocabulary
    with pytest.raises(IndexError):
        an.activation_patching(zoo, clean, corrupted, broken, components=("mlp",), progress=False)
    assert "forward" not in unembed.__dict__
