"""The comparison harness: methods × seeds on the same pairs and attacks, mean ± sd, one report."""

import json
import subprocess
import sys

import pytest

from duo.compare import SHAPES_METHODS, Method, PointConfig, compare, markdown_table, summarise
from duo.errors import UserError


def _run(dsr: float, pp: float, fid: float) -> dict:
    return {"method": {"name": "x"}, "attacks": {"prompts": {"dsr": {"rate": dsr}}},
            "preservation": {"pp": pp}, "fid": {"original": {"fid": fid}}}  # fmt: skip


def test_summary_is_the_mean_and_sample_sd_over_seeds():
    row = summarise("m", [_run(1.0, 0.9, 2.0), _run(0.5, 0.7, 4.0), _run(0.0, 0.8, 6.0)], ["prompts"])
    assert row["n_seeds"] == 3
    assert row["dsr"]["prompts"]["mean"] == pytest.approx(0.5) and row["dsr"]["prompts"]["sd"] == pytest.approx(0.5)
    assert row["pp"]["mean"] == pytest.approx(0.8) and row["pp"]["sd"] == pytest.approx(0.1)
    assert row["fid"]["values"] == [2.0, 4.0, 6.0] and row["fid"]["sd"] == pytest.approx(2.0)
    table = markdown_table([row], ["prompts"], 3)
    assert "| m | 0.50 ± 0.50 | 0.800 ± 0.100 | 4.0 ± 2.0 |" in table


def test_method_folders_are_distinct_file_names():
    slugs = [m.slug for m in SHAPES_METHODS]
    assert len(set(slugs)) == len(slugs) and all(s.replace("-", "").replace(".", "").isalnum() for s in slugs)
    assert Method("DUO β=50").slug == "duo-beta50"


def test_small_comparison_on_shapes(tmp_path):
    from duo.data.curate import CurateConfig, curate

    pairs = tmp_path / "pairs"
    curate(CurateConfig(model="shapes", concept="shapes-red", out=str(pairs), pairs=8, batch_size=8))
    methods = [Method("UCE", {"method": "uce", "uce_erase": "prompts"}), Method("negative prompt", guard="negprompt")]
    point = PointConfig(model="shapes", concept="shapes-red", attacks=["prompts"], n_prompts=2,
                        images_per_prompt=1, eval_prompts=4, training_attacks=("prompts",))  # fmt: skip
    out = tmp_path / "cmp"
    rows = compare("shapes", str(pairs), out, methods, [0, 1], point, "test")
    assert [r["label"] for r in rows] == ["UCE", "negative prompt"]
    assert all(r["n_seeds"] == 2 and len(r["dsr"]["prompts"]["values"]) == 2 for r in rows)
    # held-out and training targets side by side, each attack folder saying which it used
    assert all(set(r["dsr"]) == {"prompts", "prompts@training"} for r in rows)
    table = (out / "compare.md").read_text()
    assert "DSR prompts (held-out) | DSR prompts (training)" in table
    for split, folder in (("held-out", "prompts"), ("training", "prompts-training")):
        result = json.loads((out / "uce" / "seed0" / "attacks" / folder / "results.json").read_text())
        assert result["targets"]["split"] == split
    for seed in (0, 1):
        evaluation = json.loads((out / "negative-prompt" / f"seed{seed}" / "eval" / "results.json").read_text())
        assert evaluation["guard_settings"]["name"] == "negprompt" and evaluation["method"]["name"] == "guard negprompt"
        assert (out / "uce" / f"seed{seed}" / "lora" / "uce.json").is_file()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["rows"] == rows
    page = (out / "report.html").read_text()
    assert "Comparison (mean ± sd over 2 seed(s))" in page and "negative prompt" in page
    assert "<h2>Images: UCE s0</h2>" in page and "<h2>Images: UCE s1</h2>" not in page  # grids of seed 0 only
    # A rerun resumes: no image is generated twice.
    index = out / "uce" / "seed0" / "attacks" / "prompts" / "images.jsonl"
    before = index.read_text()
    assert compare("shapes", str(pairs), out, methods, [0, 1], point, "test") == rows
    assert index.read_text() == before
    # A finished point is reused only with the settings it was trained with: a changed row is refused.
    changed = [Method("UCE", {"method": "uce", "uce_erase": "prompts", "uce_lambda": 0.2}), methods[1]]
    with pytest.raises(UserError, match="uce_lambda"):
        compare("shapes", str(pairs), out, changed, [0, 1], point, "test")


def test_compare_needs_the_shapes_world(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "duo", "demo", "--compare", "--world", "tiny", "--out", str(tmp_path / "d"),
         "--attacks", "none"],
        capture_output=True,
    )  # fmt: skip
    assert r.returncode == 2 and b"--compare needs the Shapes world" in r.stderr


def test_rows_pick_comparison_methods_by_label_and_an_unknown_one_is_refused(tmp_path):
    from duo.demo import DemoConfig, compare_rows, run_demo

    assert [m.label for m in compare_rows(["UCE", "DUO paper recipe"])] == ["UCE", "DUO paper recipe"]
    assert compare_rows(None) == list(SHAPES_METHODS)
    paper = compare_rows(["DUO paper recipe"])[0]
    assert paper.train == {"recipe": "authors"}  # the authors' settings, not the Shapes preset's
    with pytest.raises(UserError, match="no comparison row is labelled \\['nope'\\]"):
        run_demo(DemoConfig(out=str(tmp_path / "d"), world="shapes", compare=True, rows=["nope"]))
    assert not (tmp_path / "d").exists()


def test_summary_without_fid_features_has_no_fid_column_values():
    """A real model evaluated without --fid-features has no FID: the table says so instead of failing."""
    from duo.compare import markdown_table, summarise

    run = {"attacks": {"prompts": {"dsr": {"rate": 0.5}}}, "preservation": {"pp": 0.9}}
    row = summarise("DUO", [run, run], ["prompts"])
    assert row["fid"] is None and row["pp"]["mean"] == 0.9
    assert markdown_table([row], ["prompts"], 2).splitlines()[-1].endswith("| 0.900 ± 0.000 | — |")
