"""`duo evaluate` on the Shapes world: the results.json schema, consistency checks, refusals."""

import json

import pytest
import torch

from duo.attacks import AttackConfig, run_attack
from duo.errors import UserError
from duo.evaluate import EvaluateConfig, evaluate


def test_identical_models_preserve_everything(tmp_path, monkeypatch):
    import duo.evaluate_images as ei

    drawn, make = [], ei.make_guard

    class Counting:
        def __init__(self, guard):
            self.guard = guard

        def generate(self, family, texts, *rest):
            drawn.extend(texts)
            return self.guard.generate(family, texts, *rest)

    counting = lambda *args: Counting(make(*args))  # noqa: E731

    monkeypatch.setattr(ei, "make_guard", counting)
    r = evaluate(
        EvaluateConfig(
            model="shapes", concept="shapes-red", out=str(tmp_path / "e"), n_prompts=6, threads=torch.get_num_threads()
        )
    )
    assert r["preservation"]["pp"] == pytest.approx(1.0, abs=1e-6)  # LoRAs off twice: the same images
    assert r["fid"]["original"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert r["neighbours"]["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert r["method"] == {"name": "original"} and r["attacks"] == {}
    # the model without LoRA or guard is the original: its images are copied, not drawn a second time
    records = [json.loads(x) for x in (tmp_path / "e" / "images.jsonl").read_text().splitlines()]
    pairs = {(x["group"], x["i"]): {} for x in records}
    for x in records:
        pairs[(x["group"], x["i"])][x["model"]] = (tmp_path / "e" / x["file"]).read_bytes()
    assert all(p["original"] == p["unlearned"] for p in pairs.values()) and len(drawn) == len(pairs)
    assert (
        r["alignment"]["original"] == r["alignment"]["unlearned"]
        and r["alignment"]["original"]["colour_accuracy"] > 0.9
    )


def test_image_seeds_of_two_base_seeds_share_nothing(tmp_path):
    """seed + i would give seed 1's image i the seed of seed 0's image i + 1: three seeds, one image set."""

    def seeds(base):
        cfg = EvaluateConfig(
            model="shapes", concept="shapes-red", out=str(tmp_path / f"s{base}"), n_prompts=4, seed=base
        )
        evaluate(cfg)
        lines = (tmp_path / f"s{base}" / "images.jsonl").read_text().splitlines()
        return {(r["group"], r["model"], r["seed"]) for r in map(json.loads, lines)}

    a, b = seeds(0), seeds(1)
    assert len(a) == len(b) > 4 and not {x[2] for x in a} & {x[2] for x in b}


def test_guarded_model_with_its_attack(tmp_path):
    attack = tmp_path / "attack"
    run_attack(
        "prompts",
        AttackConfig(
            model="shapes", concept="shapes-red", out=str(attack), guard="negprompt", n_prompts=3, images_per_prompt=1
        ),
    )
    cfg = EvaluateConfig(
        model="shapes",
        concept="shapes-red",
        out=str(tmp_path / "e"),
        guard="negprompt",
        attacks=[str(attack)],
        n_prompts=6,
        threads=torch.get_num_threads(),
    )
    r = evaluate(cfg)
    cell = r["attacks"]["prompts"]
    assert cell["dsr"]["n"] == 3 and len(cell["dsr"]["ci95"]) == 2 and cell["judge"]["name"] == "shapes"
    # a negative prompt naming red changes every image, not only red ones
    assert 0.0 <= r["preservation"]["pp"] < 0.95 and r["fid"]["original"]["fid"] > 1.0
    assert r["preservation"]["network"]["name"] and r["fid"]["original"]["features"]["name"]
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert saved["preservation"] == r["preservation"]
    assert set(saved["grids"]) == {"neutral prompts", "neighbours", "attack: prompts"}
    for rows in saved["grids"].values():
        for g in rows:  # original vs unlearned, also for the attack's prompts
            assert (tmp_path / "e" / g["original"]).is_file() and (tmp_path / "e" / g["unlearned"]).is_file()
    lines = (tmp_path / "e" / "images.jsonl").read_text().count("\n")
    evaluate(cfg)  # a rerun generates nothing new
    assert (tmp_path / "e" / "images.jsonl").read_text().count("\n") == lines
    with pytest.raises(UserError, match="its own attacks"):
        evaluate(EvaluateConfig(model="shapes", concept="shapes-red", out=str(tmp_path / "x"), attacks=[str(attack)]))


def test_real_models_need_named_weights(tmp_path, tiny_model, concept_file):
    with pytest.raises(UserError, match="--lpips"):
        evaluate(EvaluateConfig(model=tiny_model, concept=concept_file, out=str(tmp_path / "e")))
