"""The command line, through the installed entry point."""

import os
import shutil
import subprocess
import sys

import pytest

import lens_palrp as lp

needs_zoo = pytest.mark.skipif(not lp.zoo.available(), reason="the zoo models do not load here")

EXE = shutil.which("lens-palrp") or os.path.join(os.path.dirname(sys.executable), "lens-palrp")


def run(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300)


def test_help_documents_every_option():
    out = run("explain", "--help").stdout
    for option in ("--model", "--prompt", "--target", "--wrong", "--position", "--method",
                   "--aggregation", "--loader", "--top", "--attention", "--checkpoint", "--out"):
        assert option in out, option
    assert "explain" in run("--help").stdout


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
    assert eager.stdout.splitlines()[:4] == r.stdout.splitlines()[:4]  # same map, printed alike


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
