"""Fuzz: bad inputs and fault conditions across every model family, Attribution files and the CLI.

Each case either raises one clear error of the expected type whose message names the problem (a
user's own exception from a metric or hook passes through unchanged), or, where the API promises
acceptance, succeeds and is checked. After every case the model must be exactly as it was:
parameter values, ``requires_grad``, ``.grad`` (the same object), every module's training flag,
the hooks on every hook point, the config and the tokenizer's settings. The models start with one
frozen parameter and one parameter holding a gradient so that a sloppy restore cannot pass.

HookedTransformer cases need TransformerLens 3.x and are skipped under 4.x (the bridge, ViT,
file and CLI cases run under both).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

import lens_palrp as lp
from lens_palrp.cli import main as cli_main
from lens_palrp.io import HEADER_KEY

transformers = pytest.importorskip("transformers")

HT_REASON = "HookedTransformer cases need TransformerLens 3.x (4.x removed HookedTransformer)"
TOKS = torch.tensor([[0, 4, 9, 2, 17, 12, 3, 6, 8]])  # "<bos> c h a p k b e g" in the zoo vocabulary
PROMPT = "c h a p k b e g"
EXE = shutil.which("lens-palrp") or os.path.join(os.path.dirname(sys.executable), "lens-palrp")


# ------------------------------------------------------------------------------ model snapshot
def _tokenizer_state(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    keys = ("padding_side", "truncation_side", "model_max_length", "pad_token", "bos_token", "eos_token",
            "unk_token")
    return {k: getattr(tok, k, None) for k in keys} | {"len": len(tok), "init_kwargs": repr(tok.init_kwargs)}


def snapshot(model) -> dict:
    """Everything ``explain`` promises to leave as it found it."""
    params = dict(model.named_parameters())
    hook_points = getattr(model, "hook_dict", {})
    return {
        "values": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "grads": {n: p.grad for n, p in params.items()},  # compared by identity
        "grad_values": {n: p.grad.clone() for n, p in params.items() if p.grad is not None},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(hp.fwd_hooks), len(hp.bwd_hooks), len(hp._forward_hooks), len(hp._backward_hooks))
                  for n, hp in hook_points.items()},
        "torch_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                           for m in model.modules()),
        "cfg": copy.deepcopy(model.cfg.__dict__),
        "cfg_repr": repr(model.cfg),
        "tokenizer": _tokenizer_state(model),
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["values"].keys() == before["values"].keys()
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), f"value of {name} changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    for name, grad in before["grads"].items():
        assert after["grads"][name] is grad, f".grad of {name} replaced"
    for name, grad in before["grad_values"].items():
        assert torch.equal(after["grad_values"][name], grad), f".grad of {name} edited"
    assert after["training"] == before["training"], "a module's training flag changed"
    assert after["hooks"] == before["hooks"], "hooks left on (or removed from) a hook point"
    assert after["torch_hooks"] == before["torch_hooks"], "torch module hooks changed"
    assert after["cfg"] == before["cfg"] and after["cfg_repr"] == before["cfg_repr"], "config changed"
    assert after["tokenizer"] == before["tokenizer"], "tokenizer settings changed"


def _prime(model):
    """One frozen parameter and one with a gradient: the restore must keep both exactly."""
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[-1].grad = torch.full_like(params[-1], 0.5)
    return model


def assert_same_attr(a, b) -> None:
    """Every tensor of two Attributions bit-identical."""
    for name, value in a.__dict__.items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        elif isinstance(value, dict) and name in ("hooks", "gradients"):
            assert value.keys() == other.keys(), name
            for key in value:
                assert torch.equal(value[key], other[key]), f"{name}[{key}]"


# ------------------------------------------------------------------------------ models
def _need_hooked_transformer():
    if not lp.zoo.hooked_available():
        pytest.skip(HT_REASON)


@pytest.fixture(scope="module")
def zoo():
    _need_hooked_transformer()
    return _prime(lp.zoo.load("rope-repeat", kind="hooked")[0])


@pytest.fixture(scope="module")
def zoo_inference():
    _need_hooked_transformer()
    with torch.inference_mode():
        return lp.zoo.load("rope-repeat", kind="hooked")[0]


@pytest.fixture(scope="module")
def gqa():
    _need_hooked_transformer()
    from models import make_model

    return _prime(make_model("llama_like"))


@pytest.fixture(scope="module")
def gqa_inference():
    _need_hooked_transformer()
    from models import make_model

    with torch.inference_mode():
        return make_model("llama_like")


def _warm(bridge):
    """A first forward: transformers and the bridge wire their own capture hooks into the wrapped
    modules on the first call (once, by design), which is not ours to count."""
    with torch.no_grad():
        bridge(TOKS, attention_mask=torch.ones_like(TOKS))
    return bridge


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from bridges import tiny_llama

    folder = tmp_path_factory.mktemp("llama")
    return folder, tiny_llama(folder)[1]


@pytest.fixture(scope="module")
def bridge(llama_folder):
    return _prime(_warm(llama_folder[1]))


@pytest.fixture(scope="module")
def bridge_inference(tmp_path_factory):
    from bridges import tiny_llama

    with torch.inference_mode():
        return tiny_llama(tmp_path_factory.mktemp("llama-inference"))[1]


@pytest.fixture(autouse=True)
def neox_unverified(monkeypatch):
    """GPT-NeoX stands in for an unverified architecture in this module (its bridge is verified
    since ``bridge_parallel.py``): taken off the verified list for each case."""
    from lens_palrp.hooks import transformer_bridge

    monkeypatch.setattr(transformer_bridge, "VERIFIED_ARCHITECTURES",
                        transformer_bridge.VERIFIED_ARCHITECTURES - {"gpt_neox"})


@pytest.fixture(scope="module")
def neox_folder(tmp_path_factory):
    """A tiny GPT-NeoX folder: the architecture the unverified-architecture cases use."""
    from bridges import save_with_tokenizer

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=18, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=32, rotary_pct=0.5)
    cfg.architectures = ["GPTNeoXForCausalLM"]
    hf = transformers.GPTNeoXForCausalLM(cfg).double().eval()
    return save_with_tokenizer(hf, tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="module")
def neox(neox_folder):
    from bridges import boot

    return _prime(_warm(boot(neox_folder)))


@pytest.fixture(scope="module")
def vit():
    return _prime(lp.zoo.shapes.load())


@pytest.fixture(scope="module")
def vit_inference():
    with torch.inference_mode():
        return lp.zoo.shapes.load()


@pytest.fixture(scope="module")
def images():
    return lp.zoo.shapes.batch(2, seed=3)[0]


@pytest.fixture(scope="module")
def bridge_attr(bridge):
    return lp.explain(bridge, TOKS, 3, record="blocks.0.attn.hook_pattern")


# ------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """``run(model, env)``; ``error``/``match``: the expected exception (None: must succeed, then
    ``check(result, model, env)``); ``setup(model, env)`` runs before the snapshot, ``teardown``
    after the comparison; ``post(model, env)`` runs after a raising case."""

    model: Optional[str]
    run: Callable
    error: Any = None
    match: str = ""
    check: Optional[Callable] = None
    setup: Optional[Callable] = None
    teardown: Optional[Callable] = None
    post: Optional[Callable] = None
    marks: tuple = ()


class Failed(Exception):
    """A user's metric or hook failing: it must come out of explain unchanged."""


def fail(*args, **kwargs):
    raise Failed("user code failed here")


def explain(*args, **kwargs):
    return lambda m, env: lp.explain(m, *args, **kwargs)


def err(model, run, error, match, **kw):
    return Case(model, run, error, match, **kw)


def ok(model, run, check=None, **kw):
    return Case(model, run, check=check, **kw)


def equals_plain(*args, **kwargs):
    """A check: the result equals the same call with plain Python ints / defaults."""
    return lambda result, m, env: assert_same_attr(result, lp.explain(m, *args, **kwargs))


# -- faults that need a little code
def train_mode(call):
    """``call(model, env)`` on a model in train mode: the eval-mode result exactly, train mode left on."""
    def setup(m, env):
        env.reference = call(m, env)
        m.train()

    def check(result, m, env):
        assert_same_attr(result, env.reference)
        assert all(mod.training for mod in m.modules())

    return dict(run=call, check=check, setup=setup, teardown=lambda m, env: m.eval())


def threads(inputs, targets):
    """Two threads explaining one model at once get exactly the serial results."""
    def run(m, env):
        serial = [lp.explain(m, inputs, t) for t in targets]
        out, errors = [None] * len(targets), []
        barrier = threading.Barrier(len(targets))

        def work(i):
            try:
                barrier.wait()
                out[i] = lp.explain(m, inputs, targets[i])
            except BaseException as e:  # surfaced below, in the test's own thread
                errors.append(e)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(len(targets))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not errors, errors
        for a, b in zip(out, serial):
            assert_same_attr(a, b)
        return out

    return run


def reentrant(inputs, target):
    """A metric that explains the same model again, from inside the sweep."""
    def run(m, env):
        def metric(logits):
            lp.explain(m, inputs, target)
            return logits[:, -1, target]

        return lp.explain(m, inputs, metric)

    return run


def user_hook(name, fn):
    """The user's own hook on the model before explain: it must still be there afterwards."""
    def setup(m, env):
        m.add_hook(name, fn)

    def teardown(m, env):
        m.reset_hooks()

    return dict(setup=setup, teardown=teardown)


def explains_again(inputs, target):
    """After a fault, the next call on the model works (no lock or state left behind)."""
    return lambda m, env: lp.explain(m, inputs, target)


def ungroup_stays_false(m, env):
    assert m.cfg.ungroup_grouped_query_attention is False


def detached_metric():
    """A metric on detached logits times a parameter of its own: it requires grad, yet does not
    depend on the input."""
    w = torch.ones(1, requires_grad=True)
    return lambda logits: logits[:, -1, 3].detach() * w


def record_keys(names):
    def check(result, m, env):
        assert sorted(result.hooks) == sorted(names)
    return check


def warns_unverified(run):
    def wrapped(m, env):
        with pytest.warns(UserWarning, match="unverified architecture 'gpt_neox'"):
            return run(m, env)
    return wrapped


def neox_context(m, env):
    with lp.unverified_architectures():
        with pytest.warns(UserWarning, match="unverified architecture"):
            return lp.explain(m, TOKS, 3)


def finite(result, m, env):
    assert bool(torch.isfinite(result.semantic).all()) and result.semantic.abs().sum() > 0


# -- Attribution files
def saved(env):
    path = str(env.tmp / "a.safetensors")
    env.request.getfixturevalue("bridge_attr").save(path, model_config=env.request.getfixturevalue("bridge").cfg)
    return path


def io_case(edit, error, match):
    """Save the bridge's Attribution, damage it with ``edit(path)``, load it."""
    def run(m, env):
        path = saved(env)
        edit(path)
        return lp.Attribution.load(path)

    return err("bridge", run, error, match)


def truncate(path, n=200):
    """Keep the first ``n`` bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(n)
    with open(path, "wb") as f:
        f.write(head)


def write(data):
    def edit(path):
        with open(path, "wb") as f:
            f.write(data)
    return edit


def resave(metadata):
    """Write the file's tensors again with safetensors alone and the header ``metadata`` (None: no
    ``lens_palrp`` key, what ``save_file(load_file(p), p)`` leaves)."""
    def edit(path):
        from safetensors.torch import load_file, save_file

        save_file(load_file(path), path, metadata=metadata)
    return edit


def round_trip(m, env):
    back = lp.Attribution.load(saved(env))
    assert_same_attr(back, env.request.getfixturevalue("bridge_attr"))
    return back


def save_to(where):
    def run(m, env):
        return env.request.getfixturevalue("bridge_attr").save(where(env))
    return run


# -- command line
def cli(*args, defaults=True):
    """``lens-palrp explain`` in this process; ``{llama}``/``{neox}``/``{tmp}`` fill in paths, and
    (``defaults``) the options a case leaves out are filled in to make a valid call."""
    def run(m, env):
        paths = {"llama": str(env.request.getfixturevalue("llama_folder")[0]),
                 "neox": str(env.request.getfixturevalue("neox_folder")), "tmp": str(env.tmp)}
        argv = [a.format(**paths) for a in args]
        if defaults and argv and argv[0] == "explain":
            fill = {"--model": "{llama}", "--loader": "bridge", "--prompt": PROMPT, "--target": "k",
                    "--out": "{tmp}/r.html"}
            for flag, value in fill.items():
                if flag not in argv:
                    argv += [flag, value.format(**paths)]
        return run_cli_here(argv, env)
    return run


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli_here(argv, env):
    """``main(argv)`` with Python's default warning filters, warnings printed to stderr as a real
    process prints them; returns ``(exit code, stdout, stderr)``."""
    env.capfd.readouterr()
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = _show_warning
        try:
            code = cli_main(argv)
        except SystemExit as exit_:
            code = exit_.code
    out, errors = env.capfd.readouterr()
    return code, out, errors


class CliFailed(Exception):
    """What a CLI case raises for the common assertion: exit code 2, one line on stderr."""


def cli_err(*args, match, setup=None, defaults=True):
    def run(m, env):
        code, out, errors = cli(*args, defaults=defaults)(m, env)
        lines = errors.splitlines()  # also splits progress bars' carriage returns
        if code == 2 and len(lines) == 1 and lines[0].startswith("lens-palrp: error: "):
            raise CliFailed(lines[0])
        raise AssertionError(f"exit code {code}, stderr {errors!r}")
    return err(None, run, CliFailed, match, setup=setup)


def folder_with(files):
    """A model folder ``{tmp}/m`` holding ``files`` (name -> text)."""
    def setup(m, env):
        (env.tmp / "m").mkdir()
        for name, text in files.items():
            (env.tmp / "m" / name).write_text(text)
    return setup


def folder_without_weights(m, env):
    """The tiny LLaMA folder (config and tokenizer) with its weights removed."""
    shutil.copytree(env.request.getfixturevalue("llama_folder")[0], env.tmp / "m")
    for f in (env.tmp / "m").glob("*.safetensors"):
        f.unlink()


def cli_ok(*args, check=None):
    def checked(result, m, env):
        code, out, errors = result
        assert code == 0, errors
        assert "report:" in out
        if check:
            check(out, errors)
    return ok(None, cli(*args), checked)


def cli_subprocess(m, env):
    """The installed entry point, in its own process: a model folder loads, then one error line."""
    folder = str(env.request.getfixturevalue("llama_folder")[0])
    r = subprocess.run([EXE, "explain", "--model", folder, "--prompt", PROMPT, "--target", "zz",
                        "--out", str(env.tmp / "r.html")], capture_output=True, text=True, timeout=120)
    lines = r.stderr.splitlines()
    if r.returncode == 2 and len(lines) == 1 and lines[0].startswith("lens-palrp: error: "):
        raise CliFailed(lines[0])
    raise AssertionError(f"exit code {r.returncode}, stderr {r.stderr!r}")


LONG = " ".join(["a"] * 40)
BATCH2 = TOKS.repeat(2, 1)

CASES = {
    # ---------------------------------------------------------------- HookedTransformer (zoo)
    "zoo-mask-value-2": err("zoo", explain(TOKS, 3, attention_mask=torch.full_like(TOKS, 2)), ValueError,
                            r"only 0 \(pad\) and 1 \(real token\), found 2"),
    "zoo-mask-half": err("zoo", explain(TOKS, 3, attention_mask=torch.full(TOKS.shape, 0.5)), ValueError,
                         "found 0.5"),
    "zoo-mask-gap": err("zoo", explain(TOKS, 3, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1, 1]])),
                        ValueError, "row 0 has a gap"),
    "zoo-mask-all-padding-row": err("zoo", explain(BATCH2, 3, attention_mask=torch.tensor([[1] * 9, [0] * 9])),
                                    ValueError, "row 1 is all padding"),
    "zoo-mask-wrong-shape": err("zoo", explain(TOKS, 3, attention_mask=torch.ones(1, 8)), ValueError,
                                r"attention_mask shape \(1, 8\) != tokens shape \(1, 9\)"),
    "zoo-mask-list": err("zoo", explain(TOKS, 3, attention_mask=[[1] * 9]), TypeError,
                         "attention_mask must be a tensor"),
    "zoo-mask-with-strings": err("zoo", explain([PROMPT], 3, attention_mask=torch.ones(1, 9)), ValueError,
                                 "string prompts are padded by lens_palrp"),
    "zoo-oov-id": err("zoo", explain(torch.tensor([[0, 3, 99, 4]]), 3), ValueError,
                      r"token id 99 at example 0, position 2 is outside the vocabulary \(0..17\)"),
    "zoo-negative-id": err("zoo", explain(torch.tensor([[0, 3, 4], [-1, 3, 4]]), 3), ValueError,
                           "token id -1 at example 1, position 0"),
    "zoo-too-long-string": err("zoo", explain(LONG, 3), ValueError,
                               "sequence too long: prompt 0 is 41 tokens, the model's n_ctx is 32"),
    "zoo-too-long-tensor": err("zoo", explain(torch.zeros(1, 33, dtype=torch.long), 3), ValueError,
                               "sequence too long: 33 tokens, the model's n_ctx is 32"),
    "zoo-tokens-float": err("zoo", explain(TOKS.float(), 3), TypeError, "integer token ids, got dtype torch.float32"),
    "zoo-tokens-3d": err("zoo", explain(TOKS[None], 3), ValueError, r"\[batch, pos\], got shape \(1, 1, 9\)"),
    "zoo-tokens-empty": err("zoo", explain(torch.zeros(1, 0, dtype=torch.long), 3), ValueError, "empty input"),
    "zoo-tokens-list-of-ints": err("zoo", explain([0, 4, 9], 3), TypeError, "a list input must hold strings"),
    "zoo-tokens-none": err("zoo", explain(None, 3), TypeError, "tokens must be a string"),
    "zoo-prepend-bos-not-bool": err(
        "zoo", explain(PROMPT, 3, prepend_bos="yes"), TypeError, "prepend_bos must be"),
    "zoo-gamma-on-text": err("zoo", explain(TOKS, 3, gamma=-1.0), ValueError, "gamma applies to vision transformers"),
    "zoo-allow-unverified-not-bool": err("zoo", explain(TOKS, 3, allow_unverified="no"), TypeError,
                                         "allow_unverified must be True or False"),
    "zoo-record-bytes": err("zoo", explain(TOKS, 3, record=b"hook_embed"), TypeError, "got bytes"),
    "zoo-position-float": err("zoo", explain(TOKS, 3, position=1.0), TypeError, "position must be an int"),
    "zoo-position-numpy-float": err("zoo", explain(TOKS, 3, position=np.float64(2.0)), TypeError,
                                    "position must be an int"),
    "zoo-position-bool": err("zoo", explain(TOKS, 3, position=True), TypeError, "position must be an integer, got a bool"),
    "zoo-position-out-of-range": err("zoo", explain(TOKS, 3, position=9), ValueError,
                                     "position 9 is out of range for example 0 with 9 tokens"),
    "zoo-position-count": err("zoo", explain(TOKS, 3, position=torch.tensor([1, 2])), ValueError,
                              "position has 2 entries for a batch of 1"),
    "zoo-numpy-ints-work": ok("zoo", explain(TOKS, np.int64(3), position=np.int32(4)),
                              equals_plain(TOKS, 3, position=4)),
    "zoo-numpy-array-target-works": ok("zoo", explain(TOKS, np.array([3])), equals_plain(TOKS, 3)),
    "zoo-target-float": err("zoo", explain(TOKS, 3.0), TypeError, r"^target: got float 3\.0; a target is a token id"),
    "zoo-target-bool": err("zoo", explain(TOKS, True), TypeError, r"^target: got bool True; a bool is not a token id"),
    "zoo-target-float-tensor": err("zoo", explain(TOKS, torch.tensor([3.0])), TypeError,
                                   r"^target: got a torch.float32 tensor; ids must be an integer tensor"),
    "zoo-target-out-of-vocab": err("zoo", explain(TOKS, 18), ValueError, r"target id 18 is out of the vocabulary \(0..17\)"),
    "zoo-target-multi-token": err("zoo", explain(TOKS, "a b"), ValueError, "'a b' is not a single token"),
    "zoo-target-unknown-word": err("zoo", explain(TOKS, "zz"), ValueError, "'zz' is not in the vocabulary"),
    "zoo-target-triple": err("zoo", explain(TOKS, (1, 2, 3)), ValueError, r"^target: got a tuple of 3 \(tuple \(1, 2, 3\)\); a logit-difference target is a pair"),
    "zoo-target-none": err("zoo", explain(TOKS, None), TypeError, r"^target: got None; a target is a token id"),
    "zoo-record-string-works": ok("zoo", explain(TOKS, 3, record="blocks.1.attn.hook_pattern"),
                                  record_keys(["blocks.1.attn.hook_pattern"])),
    "zoo-record-callable-works": ok("zoo", explain(TOKS, 3, record=lambda n: n.endswith("hook_pattern")),
                                    record_keys(["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"])),
    "zoo-record-bad-name": err("zoo", explain(TOKS, 3, record="blocks.7.attn.hook_pattern"), ValueError,
                               "record: the model has no hook point named 'blocks.7.attn.hook_pattern'"),
    "zoo-record-non-string": err("zoo", explain(TOKS, 3, record=[5]), TypeError, "record: hook names are strings, got int"),
    "zoo-record-int": err("zoo", explain(TOKS, 3, record=5), TypeError, "record must be a hook name"),
    "zoo-record-filter-raises": err("zoo", explain(TOKS, 3, record=fail), Failed, "user code failed"),
    "zoo-record-gradients-bad": err("zoo", explain(TOKS, 3, record_gradients="nope"), ValueError,
                                    "record_gradients: the model has no hook point named 'nope'"),
    "zoo-method-unknown": err("zoo", explain(TOKS, 3, method="lrp"), ValueError, "unknown method 'lrp'"),
    "zoo-patch-rule-on-text": err("zoo", explain(TOKS, 3, patch_rule="gamma"), ValueError,
                                  "patch_rule applies to vision transformers \\(HookedViT\\) only, not to a"),
    "zoo-metric-raises": err("zoo", explain(TOKS, fail), Failed, "user code failed",
                             post=explains_again(TOKS, 3)),
    "zoo-metric-nan": err("zoo", explain(TOKS, lambda l: l[:, -1, 3] * float("nan")), FloatingPointError,
                          r"target value is not finite: \[nan\]"),
    "zoo-metric-inf": err("zoo", explain(TOKS, lambda l: l[:, -1, 3] / 0.0), FloatingPointError, "not finite"),
    "zoo-metric-wrong-shape": err("zoo", explain(TOKS, lambda l: l[:, -1, :3]), ValueError,
                                  r"shape \[batch\]=\(1,\), got \(1, 3\)"),
    "zoo-metric-not-a-tensor": err("zoo", explain(TOKS, lambda l: 3.0), TypeError, "must evaluate to a tensor"),
    "zoo-metric-constant": err("zoo", explain(TOKS, lambda l: torch.zeros(1)), ValueError,
                               "does not depend on the input"),
    "zoo-metric-detached-own-parameter": err(
        "zoo", lambda m, env: lp.explain(m, TOKS, detached_metric()), ValueError, "does not depend on the input"),
    "zoo-metric-keyboard-interrupt": err("zoo", explain(TOKS, lambda l: (_ for _ in ()).throw(KeyboardInterrupt)),
                                         KeyboardInterrupt, "", post=explains_again(TOKS, 3)),
    "zoo-metric-reenters-explain": err("zoo", reentrant(TOKS, 3), RuntimeError, "already explaining",
                                       post=explains_again(TOKS, 3)),
    "zoo-at-hook-raises": err("zoo", explain(TOKS, lp.at_hook("blocks.0.hook_resid_post", fail)), Failed,
                              "user code failed"),
    "zoo-at-hook-wrong-shape": err("zoo", explain(TOKS, lp.at_hook("blocks.0.hook_resid_post", lambda a: a)),
                                   ValueError, r"shape \[batch\]=\(1,\), got \(1, 9, 64\)"),
    "zoo-at-hook-unknown": err("zoo", explain(TOKS, lp.at_hook("blocks.5.hook_resid_post", lambda a: a[:, -1, 0])),
                               ValueError, "at_hook: the model has no hook point named 'blocks.5.hook_resid_post'"),
    "zoo-at-hook-not-reached": err("zoo", explain(TOKS, lp.at_hook("blocks.0.attn.hook_result", lambda a: a[:, -1, 0, 0])),
                                   ValueError, "'blocks.0.attn.hook_result' was not reached"),
    "zoo-string-batch-works": ok("zoo", explain([PROMPT, "c h a"], 3),
                                 lambda r, m, env: assert_same_attr(r, lp.explain(m, m.to_tokens([PROMPT, "c h a"]), 3))),
    "zoo-user-hook-raises": err("zoo", explain(TOKS, 3), Failed, "user code failed",
                                **user_hook("blocks.0.hook_resid_post", fail)),
    "zoo-user-hook-kept": ok("zoo", explain(TOKS, 3), finite,
                             **user_hook("blocks.0.hook_resid_post", lambda a, hook: a)),
    "zoo-train-mode-works": ok("zoo", **train_mode(explain(TOKS, 3))),
    "zoo-two-threads-work": ok("zoo", threads(TOKS, (3, 5))),
    "zoo-tokens-from-inference-mode-work": ok("zoo", lambda m, env: lp.explain(m, torch.inference_mode()(TOKS.clone)(), 3),
                                              equals_plain(TOKS, 3)),
    "zoo-inference-mode-parameters": err("zoo_inference", explain(TOKS, 3), RuntimeError,
                                         "created under torch.inference_mode()"),
    # ---------------------------------------------------------------- HookedTransformer with GQA
    "gqa-metric-raises": err("gqa", explain(TOKS, fail), Failed, "user code failed", post=ungroup_stays_false),
    "gqa-at-hook-raises": err("gqa", explain(TOKS, lp.at_hook("blocks.1.attn.hook_rot_k", fail)), Failed,
                              "user code failed", post=ungroup_stays_false),
    "gqa-metric-reenters-explain": err("gqa", reentrant(TOKS, 3), RuntimeError, "already explaining",
                                       post=ungroup_stays_false),
    "gqa-inference-mode-parameters": err("gqa_inference", explain(TOKS, 3), RuntimeError, "inference_mode",
                                         post=ungroup_stays_false),
    "gqa-string-without-tokenizer": err("gqa", explain(PROMPT, 3), ValueError, "the model has no tokenizer"),
    "gqa-string-target-without-tokenizer": err("gqa", explain(TOKS, "a"), ValueError, "'a' is not a single token"),
    "gqa-too-long": err("gqa", explain(torch.zeros(1, 21, dtype=torch.long), 3), ValueError,
                        "21 tokens, the model's n_ctx is 20"),
    "gqa-train-mode-works": ok("gqa", **train_mode(explain(TOKS, 3))),
    # ---------------------------------------------------------------- TransformerBridge
    "bridge-oov-id": err("bridge", explain(torch.tensor([[0, 3, 18]]), 3), ValueError,
                         "token id 18 at example 0, position 2 is outside the vocabulary"),
    "bridge-too-long-tensor": err("bridge", explain(torch.zeros(1, 33, dtype=torch.long), 3), ValueError,
                                  "sequence too long: 33 tokens"),
    "bridge-too-long-string": err("bridge", explain(LONG, 3), ValueError, "sequence too long: prompt 0"),
    "bridge-mask-gap": err("bridge", explain(TOKS, 3, attention_mask=torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1, 1]])),
                           ValueError, "row 0 has a gap"),
    "bridge-mask-all-padding-row": err("bridge", explain(BATCH2, 3, attention_mask=torch.tensor([[0] * 9, [1] * 9])),
                                       ValueError, "row 0 is all padding"),
    "bridge-mask-value-2": err("bridge", explain(TOKS, 3, attention_mask=torch.full_like(TOKS, 2)), ValueError,
                               "found 2"),
    "bridge-bool-mask-works": ok("bridge", explain(TOKS, 3, attention_mask=torch.ones(1, 9, dtype=torch.bool)),
                                 equals_plain(TOKS, 3)),
    "bridge-numpy-ints-work": ok("bridge", explain(TOKS, np.int32(3), position=np.int64(-2)),
                                 equals_plain(TOKS, 3, position=-2)),
    "bridge-position-float": err("bridge", explain(TOKS, 3, position=-1.0), TypeError, "position must be an int"),
    "bridge-record-callable-works": ok("bridge", explain(TOKS, 3, record=lambda n: n.endswith("hook_rot_q")),
                                       record_keys(["blocks.0.attn.hook_rot_q", "blocks.1.attn.hook_rot_q"])),
    "bridge-record-bad-name": err("bridge", explain(TOKS, 3, record=["hook_embed", "nope"]), ValueError,
                                  "no hook point named 'nope'"),
    "bridge-metric-raises": err("bridge", explain(TOKS, fail), Failed, "user code failed",
                                post=explains_again(TOKS, 3)),
    "bridge-metric-nan": err("bridge", explain(TOKS, lambda l: l[:, -1, 3] * float("nan")), FloatingPointError,
                             "not finite"),
    "bridge-metric-wrong-shape": err("bridge", explain(TOKS, lambda l: l[:, -1]), ValueError,
                                     r"shape \[batch\]=\(1,\), got \(1, 18\)"),
    "bridge-at-hook-raises": err("bridge", explain(TOKS, lp.at_hook("blocks.0.hook_resid_post", fail)), Failed,
                                 "user code failed"),
    "bridge-metric-reenters-explain": err("bridge", reentrant(TOKS, 3), RuntimeError, "already explaining",
                                          post=explains_again(TOKS, 3)),
    "bridge-user-hook-raises": err("bridge", explain(TOKS, 3), Failed, "user code failed",
                                   **user_hook("blocks.1.hook_resid_pre", fail)),
    "bridge-train-mode-works": ok("bridge", **train_mode(explain(TOKS, 3))),
    "bridge-two-threads-work": ok("bridge", threads(TOKS, (3, 5))),
    "bridge-inference-mode-parameters": err("bridge_inference", explain(TOKS, 3), RuntimeError,
                                            "created under torch.inference_mode()"),
    "neox-unverified-refused": err("neox", explain(TOKS, 3), NotImplementedError,
                                   "not verified TransformerBridge maps for the architecture 'gpt_neox'"),
    "neox-allow-unverified-works": ok("neox", warns_unverified(explain(TOKS, 3, allow_unverified=True)), finite),
    "neox-unverified-block-works": ok("neox", neox_context, finite),
    # ---------------------------------------------------------------- HookedViT
    "vit-channels": err("vit", lambda m, env: lp.explain(m, env.images[:, :1], 0), ValueError,
                        "images have 1 channels, the model takes 3"),
    "vit-size": err("vit", lambda m, env: lp.explain(m, env.images[..., :16, :16], 0), ValueError,
                    r"images are \(16, 16\) pixels, the model takes \(32, 32\)"),
    "vit-integer-images": err("vit", lambda m, env: lp.explain(m, env.images.long(), 0), TypeError,
                              "images must be floating point"),
    "vit-numpy-images": err("vit", lambda m, env: lp.explain(m, env.images.numpy(), 0), TypeError,
                            "images must be a float tensor"),
    "vit-empty-batch": err("vit", lambda m, env: lp.explain(m, env.images[:0], 0), ValueError, "empty batch"),
    "vit-nan-pixel": err("vit", lambda m, env: lp.explain(m, env.images.clone().index_put_(
        (torch.tensor(1), torch.tensor(0), torch.tensor(5), torch.tensor(7)), torch.tensor(float("nan"))), 0),
        ValueError, "image 1 holds NaN or inf"),
    "vit-attention-mask": err("vit", lambda m, env: lp.explain(m, env.images, 0, attention_mask=torch.ones(2, 65)),
                              ValueError, "attention_mask does not apply to images"),
    "vit-position": err("vit", lambda m, env: lp.explain(m, env.images, 0, position=3), ValueError,
                        "position does not apply to image classifiers"),
    "vit-numpy-position-works": ok(
        "vit", lambda m, env: lp.explain(m, env.images, 0, position=np.int64(-1)),
        lambda r, m, env: assert_same_attr(r, lp.explain(m, env.images, 0))),
    "vit-class-out-of-range": err("vit", lambda m, env: lp.explain(m, env.images, 6), ValueError,
                                  r"target id 6 is out of the vocabulary \(0..5\)"),
    "vit-class-unknown-name": err("vit", lambda m, env: lp.explain(m, env.images, "hexagon"), ValueError,
                                  "no class named 'hexagon'"),
    "vit-class-name-works": ok("vit", lambda m, env: lp.explain(m, env.images, "square-left"),
                               lambda r, m, env: assert_same_attr(r, lp.explain(m, env.images, 2))),
    "vit-patch-rule": err("vit", lambda m, env: lp.explain(m, env.images, 0, patch_rule="lrp"), ValueError,
                          "patch_rule must be 'gamma' or 'epsilon', got 'lrp'"),
    "vit-gamma-string": err("vit", lambda m, env: lp.explain(m, env.images, 0, gamma="0.25"), ValueError,
                            "gamma must be a finite number >= 0"),
    "vit-metric-raises": err("vit", lambda m, env: lp.explain(m, env.images, fail), Failed, "user code failed"),
    "vit-train-mode-works": ok("vit", **train_mode(lambda m, env: lp.explain(m, env.images, 0))),
    "vit-inference-mode-parameters": err("vit_inference", lambda m, env: lp.explain(m, env.images, 0), RuntimeError,
                                         "created under torch.inference_mode()"),
    # ---------------------------------------------------------------- Attribution files
    "io-round-trip-works": ok("bridge", round_trip),
    "io-truncated-tensors": io_case(truncate, ValueError,
                                    "not a readable safetensors file"),
    "io-empty-tensor-file": io_case(write(b""), ValueError, "truncated or corrupt"),
    # (a truncated header, one holding a list or no fields, format 99 or 0, a missing format-1
    # half, a foreign tensor, unknown / missing / non-tensor fields and a shape mismatch: test_io)
    "io-metadata-binary": io_case(resave({HEADER_KEY: "\xff\xfe\x00garbage"}), ValueError,
                                  r"\(header key 'lens_palrp'\) is not valid JSON"),
    "io-metadata-missing": io_case(resave(None), FileNotFoundError,
                                   r"\.json is missing: .* has no Attribution metadata in its header"),
    "io-nothing-there": err("bridge", lambda m, env: lp.Attribution.load(str(env.tmp / "none.safetensors")),
                            FileNotFoundError, "no such Attribution file"),
    "io-save-into-missing-folder": err("bridge", save_to(lambda env: str(env.tmp / "no" / "a.safetensors")),
                                       FileNotFoundError, "does not exist"),
    "io-save-onto-a-folder": err("bridge", save_to(lambda env: str(env.tmp)), OSError,
                                 "cannot write the Attribution tensors"),
    # ---------------------------------------------------------------- command line
    "cli-no-such-model": cli_err("explain", "--model", "no-such-model", match="neither a zoo model"),
    "cli-folder-without-config": cli_err("explain", "--model", "{tmp}", match="has no config.json"),
    "cli-config-not-json": cli_err("explain", "--model", "{tmp}/m", match=r"config.json is not valid JSON",
                                   setup=folder_with({"config.json": '{"model_type": "llama",'})),
    "cli-config-a-list": cli_err("explain", "--model", "{tmp}/m", match="must hold a JSON object",
                                 setup=folder_with({"config.json": "[1, 2]"})),
    "cli-config-unknown-type": cli_err("explain", "--model", "{tmp}/m", match="cannot load --model",
                                       setup=folder_with({"config.json": '{"model_type": "no-such-type"}'})),
    "cli-folder-without-weights": cli_err("explain", "--model", "{tmp}/m", match="cannot load --model",
                                          setup=folder_without_weights),
    "cli-target-unknown-word": cli_err("explain", "--target", "zz", match="'zz' is not in the vocabulary"),
    "cli-target-id-out-of-vocab": cli_err("explain", "--target", "99", match="id 99 is out of the vocabulary"),
    "cli-target-two-tokens": cli_err("explain", "--target", "a b", match="not a single token"),
    "cli-position-out-of-range": cli_err("explain", "--position", "40", match="position 40 is out of range"),
    "cli-position-not-int": cli_err("explain", "--position", "1.5", match="--position: invalid int value"),
    "cli-method-unknown": cli_err("explain", "--method", "lrp", match="--method: invalid choice"),
    "cli-top-zero": cli_err("explain", "--top", "0", match="--top: must be a positive integer"),
    "cli-out-folder-missing": cli_err("explain", "--out", "{tmp}/no/r.html", match="the folder"),
    "cli-prompt-too-long": cli_err("explain", "--prompt", LONG, match="sequence too long"),
    "cli-prompt-missing": cli_err("explain", "--model", "{llama}", "--target", "k", "--out", "{tmp}/r.html",
                                  match="required: --prompt", defaults=False),
    "cli-no-command": cli_err(match="required: command"),
    "cli-unverified-refused": cli_err("explain", "--model", "{neox}", match="'gpt_neox'.*--allow-unverified"),
    "cli-allow-unverified-works": cli_ok("explain", "--model", "{neox}", "--allow-unverified",
                                         check=lambda out, errors: "unverified architecture" in errors
                                         or pytest.fail(errors)),
    "cli-entry-point-one-line": err(None, cli_subprocess, CliFailed, "'zz' is not in the vocabulary"),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=name, marks=c.marks) for name, c in CASES.items()])
def test_fuzz(case, request, tmp_path, capfd, images):
    model = request.getfixturevalue(case.model) if case.model else None
    env = SimpleNamespace(tmp=tmp_path, request=request, capfd=capfd, images=images)
    if case.setup:
        case.setup(model, env)
    before = snapshot(model) if model is not None else None
    try:
        if case.error is None:
            result = case.run(model, env)
            if case.check:
                case.check(result, model, env)
        else:
            with pytest.raises(case.error, match=case.match or None) as info:
                case.run(model, env)
            # the error is ours or the user's, never a raw one from deep inside torch / TransformerLens
            assert not isinstance(info.value, (IndexError, KeyError, AttributeError)), info.value
        if model is not None:
            assert_unchanged(model, before)
            if case.post:
                case.post(model, env)
    finally:
        if case.teardown:
            case.teardown(model, env)


def test_snapshot_sees_each_change(bridge):
    """The comparison itself: every kind of change it promises to catch makes it fail."""
    tok = bridge.tokenizer
    param = list(bridge.parameters())[-1]
    original = param.detach().clone()
    changes = {
        "training flag": (lambda: bridge.blocks[0].train(), lambda: bridge.blocks[0].eval()),
        "requires_grad": (lambda: param.requires_grad_(False), lambda: param.requires_grad_(True)),
        ".grad replaced": (lambda: setattr(param, "grad", param.grad.clone()), None),
        ".grad edited": (lambda: param.grad.add_(1), lambda: param.grad.sub_(1)),
        "value": (lambda: param.data.add_(1), lambda: param.data.copy_(original)),
        "hook point hook": (lambda: bridge.add_hook("blocks.0.hook_resid_pre", lambda a, hook: a),
                            bridge.reset_hooks),
        "config": (lambda: setattr(bridge.cfg, "n_ctx", 7), None),
        "tokenizer": (lambda: setattr(tok, "padding_side", "left"), lambda: setattr(tok, "padding_side", "right")),
    }
    for what, (change, undo) in changes.items():
        before = snapshot(bridge)
        saved = copy.deepcopy(bridge.cfg.__dict__), param.grad
        change()
        with pytest.raises(AssertionError):
            assert_unchanged(bridge, before)
        if undo:
            undo()
        bridge.cfg.__dict__.update(saved[0])
        param.grad = saved[1]
        assert_unchanged(bridge, before)


def test_enough_cases():
    """The issue asked for at least 40 bad inputs and faults, with the accepted ones mixed in."""
    must_succeed = [n for n, c in CASES.items() if c.error is None]
    assert len(CASES) >= 40 and len(must_succeed) >= 3
