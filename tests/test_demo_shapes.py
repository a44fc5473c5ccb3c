"""The demo on the Shapes world: DUO takes red away and leaves the other colours alone."""

import json

import pytest

from duo.demo import DemoConfig, run_demo


def check(results, min_dsr):
    prompts = results["attacks"]["prompts"]
    other = results["other_colours"]
    assert prompts["original"]["rate"] <= 0.05  # the base model draws red when asked
    assert prompts["duo"]["rate"] >= min_dsr
    assert other["original"]["colour_accuracy"] - other["duo"]["colour_accuracy"] <= 0.05
    assert other["original"]["shape_accuracy"] - other["duo"]["shape_accuracy"] <= 0.05
    assert results["preservation"]["pp"] >= 0.9
    assert results["judge"]["name"] == "shapes" and results["judge"]["classes"] == ["red"]


def test_reduced_demo(tmp_path):
    """Fewer pairs, steps and images than `make demo`, same settings otherwise."""
    cfg = DemoConfig(
        out=str(tmp_path / "demo"), world="shapes", pairs=24, steps=250, eval_images=30, attacks=["prompts"]
    )
    results = run_demo(cfg)
    check(results, min_dsr=0.6)
    red = results["red_teaming"]["prompts"]
    assert red["original"]["rate"] <= 0.1 and red["duo"]["rate"] >= 0.6 and red["duo"]["n"] == 16
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["attacks"]["prompts"]["duo"]["n"] == 30
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64" in page


@pytest.mark.slow
def test_full_demo(tmp_path):
    check(run_demo(DemoConfig(out=str(tmp_path / "demo"), world="shapes")), min_dsr=0.9)
