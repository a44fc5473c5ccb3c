"""The demo on the Shapes world: DUO takes red away and leaves the other colours alone."""

import json
from pathlib import Path

import pytest

from duo.demo import DemoConfig, run_demo
from duo.errors import UserError
from duo.runs import RunFolder, read_run


def check(results, min_dsr):
    prompts = results["attacks"]["prompts"]
    other = results["other_colours"]
    assert prompts["original"]["rate"] <= 0.05  # the base model draws red when asked
    assert prompts["duo"]["rate"] >= min_dsr
    assert other["original"]["colour_accuracy"] - other["duo"]["colour_accuracy"] <= 0.05
    assert other["original"]["shape_accuracy"] - other["duo"]["shape_accuracy"] <= 0.05
    rows = {row["label"]: row for row in results["comparison"]["rows"]}
    assert rows["original"]["pp"]["mean"] == pytest.approx(1.0, abs=1e-6)  # no LoRA: the same images twice
    assert rows["DUO"]["pp"]["mean"] >= 0.9
    assert results["judge"]["name"] == "shapes" and results["judge"]["classes"] == ["red"]


def keys_named(value, names: set[str], path: str = "") -> list[str]:
    """Dotted paths of every key in `names`, anywhere in a JSON value."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{k}" if path else k
            found += [here] if k in names else []
            found += keys_named(v, names, here)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += keys_named(v, names, f"{path}[{i}]")
    return found


def check_one_preservation(saved: dict) -> None:
    """PP is `duo evaluate`'s 1 − LPIPS-style distance, once per point, in the comparison rows, and nothing else."""
    assert sorted(keys_named(saved, {"pp", "preservation"})) == [
        "comparison.preservation",
        "comparison.rows[0].pp",
        "comparison.rows[1].pp",
    ]
    assert "cosine" not in json.dumps(saved)
    for row in saved["comparison"]["rows"]:
        point = saved["comparison"]["points"][row["label"]]
        evaluation = json.loads((Path(point["eval"]) / "results.json").read_text())["preservation"]
        assert row["pp"]["values"] == [evaluation["pp"]]
        assert saved["comparison"]["preservation"]["definition"] == evaluation["definition"]
    assert saved["comparison"]["preservation"]["definition"].startswith("1 − LPIPS")


def test_reduced_demo(tmp_path):
    """Fewer pairs, steps and images than `make demo`, same settings otherwise."""
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out), world="shapes", pairs=24, steps=250, eval_images=30, attacks=["prompts"])
    results = run_demo(cfg)
    check(results, min_dsr=0.6)
    rows = {row["label"]: row for row in results["comparison"]["rows"]}
    assert rows["original"]["dsr"]["prompts"]["mean"] <= 0.1 and rows["DUO"]["dsr"]["prompts"]["mean"] >= 0.6
    assert results["comparison"]["points"]["DUO"]["attacks"]["prompts"]["n"] == 16
    # The folders README and scripts name: attacks/{original,duo}/{attack}/, eval/{original,duo}/, lora/.
    for key in ("original", "duo"):
        assert read_run(out / "attacks" / key / "prompts")["kind"] == "attack"
        assert read_run(out / "eval" / key)["kind"] == "evaluate"
    assert read_run(out / "lora")["kind"] == "train"
    run = read_run(out)
    assert run["kind"] == "demo" and set(run["outputs"]) == {"results.json", "report.html"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["attacks"]["prompts"]["duo"]["n"] == 30
    check_one_preservation(saved)
    assert "| DUO | " in saved["comparison"]["table"]  # duo.compare.markdown_table
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64" in page


def tiny(out: Path, **kw) -> DemoConfig:
    return DemoConfig(out=str(out), world="tiny", pairs=2, steps=2, eval_images=1, attacks=["none"], **kw)


def test_fresh_replaces_only_a_demo_run_folder(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refuses to delete"):
        run_demo(tiny(foreign, fresh=True))
    assert (foreign / "notes.txt").read_text() == "mine" and read_run(foreign) is None

    older = tmp_path / "older"  # a demo of a version before run folders: pairs/ and no run.json
    (older / "pairs").mkdir(parents=True)
    (older / "pairs" / "curate.json").write_text("{}")
    with pytest.raises(UserError, match="older duo"):
        run_demo(tiny(older, fresh=True))
    assert (older / "pairs" / "curate.json").is_file()

    demo = tmp_path / "demo"  # a demo run folder with other settings, and a file no stage wrote
    RunFolder.claim(demo, "demo", {"seed": 99}).start()
    (demo / "stale.txt").write_text("old")
    with pytest.raises(UserError, match=r"differs in: .*seed.*--fresh"):
        run_demo(tiny(demo))
    assert (demo / "stale.txt").is_file()
    results = run_demo(tiny(demo, fresh=True))
    assert not (demo / "stale.txt").exists()
    run = read_run(demo)
    assert run["kind"] == "demo" and run["config"]["seed"] == 0 and run["finished"] is not None
    assert results["world"] == "tiny" and (demo / "results.json").is_file() and (demo / "lora").is_dir()
    # Run again without --fresh: the same settings resume, nothing is deleted.
    (demo / "kept.txt").write_text("x")
    run_demo(tiny(demo))
    assert (demo / "kept.txt").is_file()


@pytest.mark.slow
def test_full_demo(tmp_path):
    check(run_demo(DemoConfig(out=str(tmp_path / "demo"), world="shapes")), min_dsr=0.9)
