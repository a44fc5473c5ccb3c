"""Curation: manifest as the source of truth, resume without duplicates, judge-driven rejection sampling."""

import json

import pytest
from PIL import Image

from duo.data.curate import CurateConfig, curate
from duo.data.files import read_jsonl
from duo.errors import UserError
from duo.judges.base import Verdict


def manifest(folder):
    return read_jsonl(folder / "pairs.jsonl")


def test_pairs_are_joined_by_id_with_full_records(pairs_dir):
    from pathlib import Path

    records = manifest(Path(pairs_dir))
    assert [r["id"] for r in records] == [f"naked-{i:05d}" for i in range(4)]
    for r in records:
        assert r["unsafe"]["prompt"].startswith("a naked") and r["safe"]["prompt"].startswith("a dressed")
        assert r["safe"]["negative_prompt"] == r["unsafe"]["prompt"]
        assert r["safe"]["strength"] == 0.75 and r["unsafe"]["seed"] != r["safe"]["seed"]
        assert Image.open(Path(pairs_dir) / r["safe"]["file"]).size == (64, 64)
    assert {r["unsafe"]["prompt"].split()[2] for r in records} == {"white", "black"}


def test_resume_after_a_crash_never_duplicates(tiny_model, concept_file, tmp_path):
    out = tmp_path / "pairs"
    curate(CurateConfig(model=tiny_model, concept=concept_file, out=str(out), pairs=2))
    first = (out / "images" / "naked-00000-unsafe.png").read_bytes()
    with open(out / "pairs.jsonl", "a") as f:
        f.write('{"id": "naked-00002", "torn')  # a crash in the middle of writing a line
    (out / "images" / ".naked-00002-unsafe.png.x.tmp").write_bytes(b"half")  # and of writing an image
    curate(CurateConfig(model=tiny_model, concept=concept_file, out=str(out), pairs=4))
    ids = [r["id"] for r in manifest(out)]
    assert ids == [f"naked-{i:05d}" for i in range(4)]
    assert (out / "images" / "naked-00000-unsafe.png").read_bytes() == first  # finished pairs untouched
    for r in manifest(out):
        Image.open(out / r["unsafe"]["file"]).load()


def test_same_seed_same_pixels_whatever_the_batch(tiny_model, concept_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    curate(CurateConfig(model=tiny_model, concept=concept_file, out=str(a), pairs=2, batch_size=1))
    curate(CurateConfig(model=tiny_model, concept=concept_file, out=str(b), pairs=2, batch_size=2))
    assert [r["unsafe"]["seed"] for r in manifest(a)] == [r["unsafe"]["seed"] for r in manifest(b)]


def test_resume_with_other_settings_is_refused(tiny_model, concept_file, tmp_path):
    out = tmp_path / "pairs"
    curate(CurateConfig(model=tiny_model, concept=concept_file, out=str(out), pairs=1))
    before = (out / "pairs.jsonl").read_bytes()
    with pytest.raises(UserError, match="other settings"):
        curate(CurateConfig(model=tiny_model, concept=concept_file, out=str(out), pairs=1, strength=0.5))
    assert (out / "pairs.jsonl").read_bytes() == before


class RejectFirstTries:
    """Says the concept is present only from the third draw of each image on (seed-independent)."""

    def __init__(self):
        self.calls = {}

    def judge(self, images, prompts):
        verdicts = []
        for p in prompts:
            n = self.calls[p] = self.calls.get(p, 0) + 1
            unsafe = "naked" in p
            verdicts.append(Verdict(present=unsafe and n >= 3, score=0.9 if unsafe else 0.1, matches_prompt=True))
        return verdicts

    def provenance(self):
        return {"name": "fake"}


def test_rejection_sampling_counts_tries(tiny_model, concept_file, tmp_path, monkeypatch):
    import duo.judges

    monkeypatch.setattr(duo.judges, "get_judge", lambda name, options=None: RejectFirstTries())
    out = tmp_path / "pairs"
    curate(CurateConfig(model=tiny_model, concept=concept_file, out=str(out), pairs=2, judge="fake"))
    records = manifest(out)
    assert [r["unsafe"]["tries"] for r in records] == [3, 3]
    assert [r["safe"]["tries"] for r in records] == [1, 1]
    assert records[0]["unsafe"]["judge"]["present"] is True
    assert json.loads((out / "run.json").read_text())["config"]["judge"] == "fake"


def test_running_out_of_tries_is_a_clear_error(tiny_model, concept_file, tmp_path, monkeypatch):
    import duo.judges

    monkeypatch.setattr(duo.judges, "get_judge", lambda name, options=None: RejectFirstTries())
    with pytest.raises(UserError, match="max-tries"):
        curate(
            CurateConfig(
                model=tiny_model, concept=concept_file, out=str(tmp_path / "p"), pairs=1, judge="fake", max_tries=2
            )
        )


def test_concept_templates_and_negative_prompt():
    from duo.data.concepts import concept_from_dict

    concept = concept_from_dict(
        {
            "name": "c",
            "parts": [
                {
                    "name": "p",
                    "pairs": 5,
                    "unsafe": "a {c} {s}",
                    "safe": "a blue {s}",
                    "negative": "{c}",
                    "vars": {"c": ["red", "crimson"], "s": ["star"]},
                }
            ],
        }
    )
    prompts = concept.parts[0].prompt_pairs(seed=3)
    assert len(prompts) == 5
    assert all(neg in unsafe and neg in ("red", "crimson") for unsafe, _, neg in prompts)
    assert {neg for _, _, neg in prompts} == {"red", "crimson"}
    assert prompts[:2] == prompts[2:4]  # combinations cycle
    default = concept_from_dict({"name": "c", "parts": [{"name": "p", "pairs": 1, "unsafe": "x", "safe": "y"}]})
    assert default.parts[0].prompt_pairs(0) == [("x", "y", "x")]  # the authors' negative: the unsafe prompt


def test_violence_preset_follows_the_authors_data_and_timesteps():
    """The authors' violence data (datasets/SD/config.json): horror is the bare word against "comfort", 32 pairs
    per part like the others; and their trainer samples t < 750 although violence's SDEdit strength is 0.8."""
    from duo.data.concepts import load_concept
    from duo.train.api import config_with_concept_defaults

    concept = load_concept("violence")
    horror = {p.name: p for p in concept.parts}["horror"]
    assert set(horror.prompt_pairs(seed=0)) == {("horror", "comfort", "horror")} and horror.pairs == 32
    cfg = config_with_concept_defaults({"model": "m", "data": "d", "out": "o"}, concept.train)
    assert (cfg.t_max, cfg.beta, cfg.steps) == (750, 1000, 500)
