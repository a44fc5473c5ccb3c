"""`duo report`: a self-contained page that renders in a real headless Chromium and never runs prompt text."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from duo.errors import UserError
from duo.report import build_report

ATTACK = "<script>document.body.insertAdjacentHTML('beforeend','<div id=\"pwned\">x</div>')</script>"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    BROWSER is None and not os.environ.get("DUO_REQUIRE_BROWSER"),
    reason="no chromium here (.ci/run installs Debian's chromium and sets DUO_REQUIRE_BROWSER)",
)


def fake_run(folder, label, beta, pp, dsr):
    """An evaluation result as `duo evaluate` writes it, with an adversarial prompt in every text field."""
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "images" / "a.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(folder / "images" / "b.png")
    cell = {"dsr": {"rate": dsr, "n": 32, "ci95": [max(0, dsr - 0.1), min(1, dsr + 0.1)]}}
    result = {
        "label": f"{label} {ATTACK}",
        "method": {"name": "duo", "beta": beta},
        "attacks": {"prompts": cell, "concept-inversion": {**cell, "note": ATTACK}},
        "preservation": {"pp": pp},
        "fid": {"original": {"fid": 1.5}},
        "grids": {"concept-inversion": [{"prompt": ATTACK, "original": "images/a.png", "unlearned": "images/b.png"}]},
    }
    (folder / "results.json").write_text(json.dumps(result))
    return folder


def browser(*flags, url):
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", *flags, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_escapes_everything_and_embeds_figure_and_images(tmp_path):
    runs = [fake_run(tmp_path / f"b{b}", f"β={b}", b, pp, dsr) for b, pp, dsr in ((50, 0.99, 0.9), (500, 0.9, 1.0))]
    page = build_report([str(r) for r in runs], str(tmp_path / "report.html")).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("data:image/png;base64,") == 1 + 2 * 2  # the figure, and both runs' grid images
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    with pytest.raises(UserError, match="results.json"):
        build_report([str(tmp_path)], str(tmp_path / "other.html"))


@needs_browser
def test_report_renders_in_chromium_and_prompt_scripts_do_not_run(tmp_path):
    run = fake_run(tmp_path / "run", "β=50", 50, 0.99, 0.9)
    report = build_report([str(run)], str(tmp_path / "report.html"))
    dom = browser("--dump-dom", url=report.as_uri())
    assert dom.returncode == 0 and "Summary" in dom.stdout
    assert '<div id="pwned">' not in dom.stdout  # as text it serialises as &lt;div ...
    # the same check on a page that does not escape: the script runs, so the check above can fail
    unsafe = tmp_path / "unsafe.html"
    unsafe.write_text(f"<!doctype html><html><body>{ATTACK}</body></html>")
    assert '<div id="pwned">' in browser("--dump-dom", url=unsafe.as_uri()).stdout
    shot = tmp_path / "shot.png"
    browser(f"--screenshot={shot}", "--window-size=1200,1600", url=report.as_uri())
    with Image.open(shot) as im:
        lo, hi = im.convert("L").getextrema()
    assert hi - lo > 100, "the screenshot is blank"


def test_cli_report(tmp_path):
    run = fake_run(tmp_path / "run", "β=50", 50, 0.99, 0.9)
    out = tmp_path / "r.html"
    r = subprocess.run([sys.executable, "-m", "duo", "report", str(run), "--out", str(out)], capture_output=True)
    assert r.returncode == 0 and out.is_file()


@pytest.mark.parametrize("pps, left", [([0.992, 1.0], -0.03), ([0.5, 0.99], -0.03), ([-0.10, 0.99], -0.28)])
def test_the_pp_axis_is_fixed_not_zoomed_to_the_data(monkeypatch, pps, left):
    """Both figures draw PP on [0, 1] (left of 0 only for a method that damages more than nothing)."""
    from matplotlib.figure import Figure

    from duo.report.plot import compare_figure, dsr_pp_figure

    limits = []
    original = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, *a, **k: (limits.append(fig.axes[0].get_xlim()), original(fig, *a, **k))
    )
    cell = {"dsr": {"rate": 0.5, "ci95": [0.3, 0.7]}}
    runs = [{"attacks": {"prompts": cell}, "preservation": {"pp": pp}, "method": {"name": "m"}} for pp in pps]
    dsr_pp_figure(runs, ["prompts"])
    rows = [{"label": str(pp), "dsr": {"prompts": {"mean": 0.5, "sd": 0}}, "pp": {"mean": pp, "sd": 0}} for pp in pps]
    compare_figure(rows, ["prompts"])
    assert limits == [pytest.approx((left, 1.03))] * 2
