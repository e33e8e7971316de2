"""A report loaded in headless Chromium: every figure rendered at its own height, no JavaScript
error, a screenshot that is not blank. Skipped (with the reason) where no Chromium is installed;
.ci/run installs Debian's chromium where it can."""

import shutil
import struct
import subprocess
import zlib

import pytest

import lens_palrp as lp
from lens_palrp import analyses as an

pytestmark = pytest.mark.browser


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


if _chromium() is None:
    pytest.skip("no Chromium binary (chromium, chromium-browser or google-chrome) on PATH; "
                "Debian: apt-get install chromium", allow_module_level=True)

WINDOW = (1200, 2600)


@pytest.fixture(scope="module")
def attr():
    if not lp.zoo.available():
        pytest.skip("the zoo models do not load here")
    model, _ = lp.zoo.load("rope-repeat")
    return lp.explain(model, "c h a p k b e g", "k")


def _chromium_run(tmp_path, *args):
    run = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines()
              if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert not errors, errors
    return run


def _rendered_figure_heights(dom: str):
    """Height of each figure plotly drew: its first ``main-svg`` (the one with the background)."""
    import re

    return [int(h) for h in re.findall(r'<svg class="main-svg"[^>]*height="(\d+)" style="background', dom)]


@pytest.mark.parametrize("plotlyjs", ["inline", "beside"])
def test_every_figure_renders_at_its_height(attr, tmp_path, plotlyjs):
    path = attr.report(str(tmp_path / "report.html"), plotlyjs=plotlyjs)
    dom = _chromium_run(tmp_path, "--dump-dom", f"file://{path}").stdout
    expected = [fig.layout.height for fig in an.report_figures(attr)]
    assert _rendered_figure_heights(dom) == expected  # five figures drawn, none collapsed or stretched
    assert dom.count('class="plotly-graph-div js-plotly-plot"') == len(expected)  # plotly ran on each div


def _png_size_and_pixels(path):
    """``(width, height, inflated image data)`` of a PNG, read with the standard library only."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, width, height, idat = 8, None, None, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_screenshot_is_not_blank(attr, tmp_path):
    path = attr.report(str(tmp_path / "report.html"))
    shot = tmp_path / "report.png"
    _chromium_run(tmp_path, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", f"file://{path}")
    width, height, pixels = _png_size_and_pixels(shot)
    assert (width, height) == WINDOW
    # a blank page inflates to a few distinct bytes (white rows and filter tags); coloured
    # heatmaps, bars and text give many
    assert len(set(pixels)) > 128
    assert sum(1 for b in pixels[::97] if b not in (0, 255)) > len(pixels[::97]) * 0.005  # 0 for a blank page
