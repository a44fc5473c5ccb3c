"""The world registry: which (model, concept) pairs the Shapes world claims, lazy lookup, and what the
Shapes world supplies to evaluate, metrics and compare."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from duo.data.concepts import load_concept
from duo.errors import UserError
from duo.worlds import WORLDS, World, world_for, world_named

RED_WORDS = ("red", "crimson", "scarlet")


def _modules_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(__import__('json').dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_shapes_model_or_shapes_concept_is_the_shapes_world():
    red, nudity = load_concept("shapes-red"), load_concept("nudity")
    world = world_for("shapes", red)
    assert isinstance(world, World) and world.name == "shapes" and world.judge == "shapes"
    assert world is world_named("shapes")
    assert world_for("/some/folder/pipeline", red) is world  # a Shapes concept is judged in the Shapes world
    assert world_for("shapes", None) is world
    assert world_for("CompVis/stable-diffusion-v1-4", nudity) is None
    assert world_for("/some/folder/pipeline", None) is None
    assert world_named("sd") is None


def test_importing_metrics_or_the_registry_imports_no_world():
    loaded = _modules_after("import duo.metrics, duo.worlds, duo.judges")
    assert "duo.metrics" in loaded and "duo.worlds" in loaded
    assert [m for m in loaded if m == "duo.shapes" or m.startswith("duo.shapes.")] == []
    assert "torch" not in _modules_after("import duo.worlds")


def test_world_networks_are_resolved_by_name_only_when_asked_for():
    loaded = _modules_after("import duo.metrics; duo.metrics.get_lpips('shapes'); duo.metrics.get_features('shapes')")
    assert "duo.shapes.world" in loaded and "duo.shapes.features" in loaded


def test_shapes_specs_give_the_judges_networks(tmp_path):
    from duo.metrics import get_features, get_lpips
    from duo.shapes.features import ShapesFeatures, ShapesLpips

    weights = tmp_path / "judge.safetensors"
    net, feats = get_lpips(f"shapes:{weights}"), get_features(f"shapes:{weights}")
    assert isinstance(net, ShapesLpips) and net.weights == weights
    assert isinstance(feats, ShapesFeatures) and feats.weights == weights
    assert get_lpips("shapes").provenance()["name"] == "shapes-lpips"
    assert get_features("shapes").provenance()["name"] == "shapes"
    with pytest.raises(UserError, match="'shapes'"):
        get_lpips("alexnet")
    with pytest.raises(UserError, match="'shapes'"):
        get_features("inception")


def test_a_registered_world_is_found_by_model_concept_and_spec(monkeypatch):
    import duo.worlds
    from duo.metrics import get_features, get_lpips

    toy = World(
        name="toy",
        model_ref="toy",
        judge="toy-judge",
        lpips=lambda weights=None: ("lpips", weights),
        features=lambda weights=None: ("features", weights),
        neutral_prompts=lambda concept, n: ["a"] * n,
    )
    monkeypatch.setitem(WORLDS, "toy", "test_worlds:TOY")
    monkeypatch.setattr(sys.modules[__name__], "TOY", toy, raising=False)
    monkeypatch.setattr(duo.worlds, "_LOADED", {})
    assert world_for("toy", None) is toy
    assert world_for("elsewhere", load_concept("nudity")) is None
    assert get_lpips("toy:w.bin") == ("lpips", "w.bin") and get_features("toy") == ("features", None)


def test_neutral_prompts_leave_the_concepts_colour_out():
    world = world_named("shapes")
    prompts = world.neutral_prompts(load_concept("shapes-red"), 10)
    assert len(prompts) == 10
    assert not any(w in p.split() for p in prompts for w in RED_WORDS)


def test_a_shape_concepts_neutral_prompts_ask_for_every_colour_and_never_its_shape():
    from duo.shapes.render import COLOURS, parse_prompt

    prompts = world_named("shapes").neutral_prompts(load_concept("shapes-circle"), 30)
    asked = [parse_prompt(p) for p in prompts]
    assert len(prompts) == 30 and not any(a["shape"] == "circle" for a in asked)
    assert {a["colour"] for a in asked} == set(COLOURS)  # red too: a circle eraser must leave red squares alone


def test_compare_methods_are_the_worlds():
    from duo.compare import SHAPES_METHODS, Method

    world = world_named("shapes")
    assert all(isinstance(m, Method) for m in SHAPES_METHODS)
    assert [m.label for m in SHAPES_METHODS] == [m["label"] for m in world.methods]
    by_label = {m.label: m for m in SHAPES_METHODS}
    assert by_label["SLD-Max"].guard == "sld-max" and by_label["SLD-Max"].train is None
    assert by_label["UCE"].train == {"method": "uce", "uce_erase": "prompts"}


def test_evaluate_measures_shapes_with_its_networks_and_alignment(tmp_path):
    from duo.evaluate import EvaluateConfig, evaluate

    r = evaluate(EvaluateConfig(model="shapes", concept="shapes-red", out=str(tmp_path / "e"), n_prompts=2, threads=1))
    world = world_named("shapes")
    assert r["config"]["lpips"] == "shapes" and r["config"]["fid_features"] == "shapes"
    assert r["preservation"]["network"]["name"] == "shapes-lpips"
    assert r["fid"]["original"]["features"]["name"] == "shapes"
    assert r["alignment"]["definition"] == world.alignment_definition
    assert set(r["alignment"]["original"]) == {"colour_accuracy", "shape_accuracy"}


def test_real_model_without_named_weights_is_refused(tmp_path):
    from duo.evaluate import EvaluateConfig, resolve_metrics

    cfg = EvaluateConfig(model="CompVis/stable-diffusion-v1-4", concept="nudity", out=str(tmp_path))
    with pytest.raises(UserError, match="--lpips"):
        resolve_metrics(cfg, load_concept("nudity"))


def test_unet_learning_rate_warms_up_then_decays_to_a_tenth():
    from duo.shapes.train_unet import Schedule

    s = Schedule(lr=1.0, steps=1000, minutes=None, warmup=200)
    assert s.lr_at(0) == pytest.approx(1 / 200) and s.lr_at(199) == pytest.approx(1.0)
    assert s.lr_at(500) == 1.0 and s.lr_at(900) == pytest.approx(0.55) and s.lr_at(1000) == pytest.approx(0.1)
    budget = Schedule(lr=1.0, steps=10**9, minutes=1.0, warmup=0, t0=0.0)  # the time budget long spent
    assert budget.out_of_time() and budget.lr_at(1) == pytest.approx(0.1)
