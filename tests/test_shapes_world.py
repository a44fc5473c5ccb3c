"""The Shapes world: renderer, tokenizer, judge, shipped pipeline, concept files. Fast (< 60 s).

Nothing is skipped: missing shipped weights make the weight-dependent tests fail.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from duo.errors import UserError
from duo.shapes import ASSETS, pipeline_path, verify_assets
from duo.shapes.render import (
    ALL_COMBOS,
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    SHAPES,
    TRAIN_COMBOS,
    Scene,
    all_captions,
    caption,
    parse_prompt,
    render,
    render_dataset,
    sample_scene,
)

CONCEPTS = Path(__file__).resolve().parents[1] / "src" / "duo" / "concepts"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on our shared 2-core machines it is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ renderer
def test_renderer_is_deterministic_from_seed():
    _, a = render_dataset(50, seed=3)
    _, b = render_dataset(50, seed=3)
    _, c = render_dataset(50, seed=4)
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, colour="red", shape="star", background="textured")
    assert isinstance(scene, Scene)
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))
    assert render(scene).size == (32, 32) and render(scene).mode == "RGB"


def test_world_has_required_variety():
    assert len(SHAPES) >= 5 and len(COLOURS) == 6 and len(BACKGROUNDS) == 3
    assert all(len(words) == 3 for words in COLOURS.values())
    assert COLOURS["red"] == ["red", "crimson", "scarlet"]
    scenes, _ = render_dataset(300, seed=1)
    assert len({round(s.cx) for s in scenes}) > 20 and len({round(s.radius) for s in scenes}) > 8
    assert {s.shape for s in scenes} == set(SHAPES)


def test_held_out_split():
    assert HELD_OUT and set(HELD_OUT) <= set(ALL_COMBOS)
    assert not set(HELD_OUT) & set(TRAIN_COMBOS)
    assert len(TRAIN_COMBOS) + len(HELD_OUT) == len(ALL_COMBOS)
    scenes, _ = render_dataset(500, seed=2, combos=TRAIN_COMBOS)
    assert not {(s.colour, s.shape, s.background) for s in scenes} & set(HELD_OUT)
    # every attribute value is still seen in training
    for i, values in enumerate((COLOURS, SHAPES, BACKGROUNDS)):
        assert {c[i] for c in TRAIN_COMBOS} == set(values)


def test_caption_and_parse_prompt():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, colour="red", shape="circle", background="gray")
    seen = {caption(scene, rng) for _ in range(60)}
    assert seen == {f"a {w} circle on a gray background" for w in ("red", "crimson", "scarlet")}
    assert parse_prompt("a crimson star on a textured background") == dict(
        colour="red", shape="star", background="textured"
    )
    assert parse_prompt("A Scarlet CROSS.") == dict(colour="red", shape="cross", background=None)
    assert parse_prompt("an azure square on a grey background") == dict(
        colour="blue", shape="square", background="gray"
    )
    assert parse_prompt("a photo of a dog") == dict(colour=None, shape=None, background=None)
    for cap in all_captions():
        p = parse_prompt(cap)
        assert None not in p.values()


# ------------------------------------------------------------------ tokenizer
def test_tokenizer_words_are_single_tokens(tmp_path):
    from duo.shapes.tokenizer import GRAMMAR_WORDS, build_tokenizer, load_tokenizer, vocabulary

    tok = load_tokenizer(build_tokenizer(tmp_path / "tok"))
    assert tok.model_max_length == 16
    ids = {w: tok(w, add_special_tokens=False).input_ids for w in vocabulary()}
    assert all(len(v) == 1 for v in ids.values()), [w for w, v in ids.items() if len(v) != 1]
    assert len({v[0] for v in ids.values()}) == len(ids)
    assert len(ids) > 300 and set(GRAMMAR_WORDS) <= set(ids)
    unknown = tok("zqx", add_special_tokens=False).input_ids
    assert len(set(unknown)) > 1  # falls back to characters, does not collapse onto one id


def test_tokenizer_is_deterministic(tmp_path):
    from duo.shapes.tokenizer import build_tokenizer

    a, b = build_tokenizer(tmp_path / "a"), build_tokenizer(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


# ------------------------------------------------------------------ shipped weights
def test_assets_hashes_and_size():
    verify_assets()
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 25 * 1024 * 1024, total
    listed = {line.split(maxsplit=1)[1] for line in (ASSETS / "SHA256SUMS").read_text().splitlines() if line}
    on_disk = {p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert listed == on_disk
    assert not [p for p in ASSETS.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]


def test_hash_mismatch_and_absence_raise_user_error(tmp_path):
    root = tmp_path / "assets"
    shutil.copytree(ASSETS, root)
    verify_assets(root)
    target = root / "judge.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        verify_assets(root)
    target.unlink()
    with pytest.raises(UserError, match="missing"):
        verify_assets(root)
    (root / "SHA256SUMS").unlink()
    with pytest.raises(UserError, match="missing"):
        verify_assets(root)


def test_judge_accuracy_on_fresh_renders():
    from duo.shapes.judge import classify, features, load_judge

    scenes, imgs = render_dataset(300, seed=987_654, combos=ALL_COMBOS)
    preds = classify(imgs, load_judge())
    for head in ("colour", "shape", "background"):
        acc = np.mean([p[head] == getattr(s, head) for p, s in zip(preds, scenes)])
        assert acc >= 0.98, (head, acc)
    from PIL import Image

    pil = [Image.fromarray(a) for a in imgs[:4]]
    assert [p["colour"] for p in classify(pil)] == [p["colour"] for p in preds[:4]]
    f = features(pil)
    assert f.shape == (4, 128) and torch.isfinite(f).all()


def test_shapes_judge_adapter():
    from duo.judges import get_judge
    from duo.shapes.concept_judge import ShapesJudge
    from duo.shapes.render import render

    rng = np.random.default_rng(5)
    reds = [render(sample_scene(rng, colour="red", shape="circle")) for _ in range(5)]
    blues = [render(sample_scene(rng, colour="blue", shape="star")) for _ in range(5)]
    judge = get_judge("shapes", {"colour": "red"})
    assert isinstance(judge, ShapesJudge) and judge.name == "shapes"
    v = judge.judge(reds + blues, ["a crimson circle on a black background"] * 5 + ["a red star"] * 5)
    assert [x.present for x in v] == [True] * 5 + [False] * 5
    assert all(0 <= x.score <= 1 for x in v)
    assert [x.matches_prompt for x in v] == [True] * 5 + [False] * 5
    assert judge.judge(blues[:1], ["a star"])[0].matches_prompt is True  # colour not asked: ignored
    assert ShapesJudge(shape="circle").judge(reds[:1], [""])[0].present
    prov = judge.provenance()
    assert prov["name"] == "shapes" and len(prov["sha256"]) == 64
    with pytest.raises(UserError):
        ShapesJudge(colour="orange")
    with pytest.raises(UserError):
        ShapesJudge()


def test_shipped_pipeline_loads_offline_and_follows_colour(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from duo.shapes.judge import classify

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.tokenizer.model_max_length == 16
    pipe.set_progress_bar_config(disable=True)
    for colour, word in (("red", "red"), ("blue", "blue")):
        prompts = [f"a {word} {s} on a {b} background" for s in SHAPES for b in ("black", "gray")][:8]
        out = pipe(
            prompts,
            num_inference_steps=20,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pil",
        )
        assert out.images[0].size == (32, 32)
        got = [p["colour"] for p in classify(out.images)]
        assert sum(g == colour for g in got) >= 6, (colour, got)


# ------------------------------------------------------------------ concepts and CLI
@pytest.mark.parametrize("name", ["shapes-red", "shapes-circle"])
def test_concept_files(name):
    from duo.shapes.concept_judge import ShapesJudge

    spec = yaml.safe_load((CONCEPTS / f"{name}.yaml").read_text())
    assert spec["name"] == name and spec["judge"] == "shapes" and spec["resolution"] == 32
    ShapesJudge(**spec["judge_options"])
    for part in spec["parts"]:
        for template in (part["unsafe"], part["safe"]):
            for var in re.findall(r"{(\w+)}", template):
                assert part["vars"][var], var
        for bg in part["vars"].get("bg", []):
            assert bg in BACKGROUNDS
        unsafe_example = part["unsafe"].format(**{k: v[0] for k, v in part["vars"].items()})
        safe_example = part["safe"].format(**{k: v[0] for k, v in part["vars"].items()})
        target = spec["judge_options"]
        key, value = next(iter(target.items()))
        assert parse_prompt(unsafe_example)[key] == value
        assert parse_prompt(safe_example)[key] != value
    for prompt in spec["neighbours"]:
        key, value = next(iter(spec["judge_options"].items()))
        assert parse_prompt(prompt)[key] not in (None, value), prompt


def test_cli_eval_base_rejects_bad_model(tmp_path, capsys):
    from duo.cli.main import main

    assert main(["shapes", "eval-base", "--model", str(tmp_path / "nothing")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert main(["shapes", "train-base", "--out", str(ASSETS / "x")]) == 2
