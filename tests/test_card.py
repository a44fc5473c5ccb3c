"""Hub-ready output of `duo train`: the card's front matter, the LoRA's safetensors metadata, and `duo card`,
which refreshes the card with the results of an evaluation of that very LoRA (and refuses any other)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from duo.cli.main import main
from duo.data.files import sha256_file
from duo.data.pairs import load_pairs
from duo.runs import RunFolder, content_hash, read_run
from duo.train.api import LORA_FILE, resolve_config, train
from duo.train.card import front_matter


@pytest.fixture(scope="module")
def trained(tiny_model, pairs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "lora"
    return train(resolve_config(model=tiny_model, data=pairs_dir, out=str(out), steps=2, lr=1e-2))


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """A real `duo evaluate` of the LoRA: neutral prompts only (the tiny concept has no judge for attacks)."""
    from duo.evaluate import EvaluateConfig, evaluate

    root = tmp_path_factory.mktemp("eval")
    (root / "neutral.txt").write_text("a red car on the street\na dog in a house\n")
    cfg = EvaluateConfig(out=str(root / "e"), lora=[str(trained)], n_prompts=2, prompts_file=str(root / "neutral.txt"),
                         lpips="shapes", fid_features="shapes", steps=2, threads=1)  # fmt: skip
    evaluate(cfg)
    return root / "e"


def parse_front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A copy of the train folder: its hash names its content, so an evaluation of the original matches it."""
    return Path(shutil.copytree(folder, tmp_path / "run"))


def fake_evaluation(folder: Path, results: dict, parents: dict) -> Path:
    """An evaluate run folder holding `results` (the card reads what evaluate writes, not how it measured)."""
    run = RunFolder.claim(folder, "evaluate", {"fake": True}, parents).start()
    (folder / "results.json").write_text(json.dumps(results))
    run.finish(["results.json"])
    return folder


def test_front_matter_is_hub_yaml(trained, tiny_model):
    text = (trained / "README.md").read_text()
    meta = parse_front_matter(text)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"lora", "concept-erasure", "duo-unlearn", "tiny-test"} <= set(meta["tags"])
    # a local folder is no Hub id: the Hub refuses a commit whose base_model names none, so the body names it
    assert meta["license"] == "other" and "base_model" not in meta and f"`{tiny_model}`" in text
    assert "| β | 500.0 |" in text and "Not evaluated yet" in text


def test_front_matter_names_hub_base_models_and_their_license():
    sd = parse_front_matter(front_matter("CompVis/stable-diffusion-v1-4", "nudity: a | b"))
    assert sd["base_model"] == "CompVis/stable-diffusion-v1-4" and sd["license"] == "creativeml-openrail-m"
    assert "nudity: a | b" in sd["tags"]  # quoted, whatever a concept name holds
    shapes = parse_front_matter(front_matter("shapes", "shapes-red"))
    assert shapes["license"] == "apache-2.0" and "base_model" not in shapes  # our own world, our license
    other = parse_front_matter(front_matter("someone/their-model", "x"))
    assert other["license"] == "other" and other["base_model"] == "someone/their-model"


def test_lora_metadata_names_its_origin(trained, tiny_model, pairs_dir):
    path = trained / LORA_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"  # diffusers' own key kept
    assert meta["duo.base_model"] == tiny_model
    assert meta["duo.base_model_hash"] == "sha256:" + content_hash(tiny_model)
    assert meta["duo.data_hash"] == load_pairs(pairs_dir).data_hash
    assert (meta["duo.concept"], meta["duo.method"], meta["duo.beta"]) == ("tiny-test", "duo", "500.0")
    assert meta["duo.version"] and all(isinstance(v, str) for v in meta.values())
    outputs = read_run(trained)["outputs"]
    assert outputs[LORA_FILE] == sha256_file(path)  # hashed after the metadata was written
    assert "README.md" not in outputs  # `duo card` rewrites the card without making the LoRA another one


def test_lora_with_metadata_loads_in_diffusers_as_without(trained, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(trained / LORA_FILE), bare / LORA_FILE, metadata={"format": "pt"})
    kwargs = dict(prompt="a naked white woman, realistic photo", num_inference_steps=2, output_type="np")

    def images(lora):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
        if lora:
            pipe.load_lora_weights(str(lora))
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images

    with_meta = images(trained)
    np.testing.assert_array_equal(with_meta, images(bare))
    assert np.abs(with_meta - images(None)).max() > 1e-4  # the LoRA was loaded, not skipped


def test_card_writes_the_evaluation_and_image_pairs(trained, evaluated, tmp_path):
    run = copy_of(trained, tmp_path)
    results = json.loads((evaluated / "results.json").read_text())
    before = content_hash(run)
    assert main(["card", str(run), "--eval", str(evaluated)]) == 0
    text = (run / "README.md").read_text()
    assert f"| PP | {results['preservation']['pp']:.3f} (n = 2 neutral prompts) | LPIPS network shapes-lpips |" in text
    assert f"| FID vs original | {results['fid']['original']['fid']:.2f} | features shapes |" in text
    assert "| β | 500.0 |" in text and "Not evaluated yet" not in text  # the recipe stays, the placeholder goes
    linked = sorted(p for p in (run / "card").iterdir())
    pngs = ["pair-0-lora.png", "pair-0-original.png", "pair-1-lora.png", "pair-1-original.png"]
    assert [p.name for p in linked] == pngs
    assert all(f"](card/{p.name})" in text for p in linked)
    assert parse_front_matter(text)["license"] == "other"
    assert content_hash(run) == before  # the LoRA is still the one the evaluation measured
    assert main(["card", str(run), "--eval", str(evaluated)]) == 0  # so a refresh can be refreshed
    assert (run / "README.md").read_text() == text


def test_card_names_dsr_per_attack_with_its_judge(trained, evaluated, tmp_path):
    run = copy_of(trained, tmp_path)
    results = json.loads((evaluated / "results.json").read_text())
    results["attacks"] = {
        "prompts": {
            "dsr": {"rate": 0.75, "n": 4, "ci95": [0.3, 0.95]},
            "judge": {"name": "nudenet", "version": "3.4", "preset": "exposed", "threshold": 0.6},
        },
        "ring-a-bell@training": {"dsr": {"rate": 0.5, "n": 2, "ci95": [0.1, 0.9]}, "judge": {"name": "clip"}},
    }
    results["clip_score"] = {
        m: {"x100": x, "provenance": {"model": "tiny-clip"}} for m, x in (("original", 31.0), ("unlearned", 30.25))
    }
    fake = fake_evaluation(tmp_path / "e", results, {"lora0": str(trained)})
    assert main(["card", str(run), "--eval", str(fake)]) == 0
    text = (run / "README.md").read_text()
    judge = "judge nudenet 3.4 (preset exposed, threshold 0.6)"
    assert f"| DSR, attack prompts | 0.750 (95% CI 0.300–0.950, n = 4) | {judge} |" in text
    assert "| DSR, attack ring-a-bell@training | 0.500 (95% CI 0.100–0.900, n = 2) | judge clip |" in text
    assert "| CLIP score ×100 | 30.25 (original 31.00) | CLIP tiny-clip |" in text
    # its grids name images of another folder: none here, so none are shown rather than invented
    assert "holds no image pairs" in text and not (run / "card").exists()


def test_card_refuses_what_is_not_this_loras_evaluation(trained, evaluated, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    card = (run / "README.md").read_bytes()
    results = json.loads((evaluated / "results.json").read_text())
    other = RunFolder.claim(tmp_path / "other", "train", {"other": True}).start()
    (other.path / LORA_FILE).write_bytes(b"another LoRA")
    other.finish([LORA_FILE])
    legacy = copy_of(trained, tmp_path / "legacy")
    record = read_run(legacy)
    record["outputs"]["README.md"] = sha256_file(legacy / "README.md")
    (legacy / "run.json").write_text(json.dumps(record))
    cases = [
        (run, fake_evaluation(tmp_path / "e-other", results, {"lora0": other.path}), "not the one in"),
        (run, fake_evaluation(tmp_path / "e-none", results, {}), "evaluated no LoRA"),
        (run, fake_evaluation(tmp_path / "e-two", results, {"lora0": trained, "lora1": other.path}), "2 LoRAs"),
        (evaluated, evaluated, "not a `duo train` folder"),
        (run, run, "not a finished `duo evaluate` folder"),
        (legacy, evaluated, "before model cards could be refreshed"),
    ]
    for folder, evaluation, cause in cases:
        assert main(["card", str(folder), "--eval", str(evaluation)]) == 2
        err = capsys.readouterr().err
        assert cause in err and ("duo evaluate --lora" in err or "duo train" in err), err  # cause and fix
        assert (run / "README.md").read_bytes() == card and not (run / "card").exists()


def test_card_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["card", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--eval" in out and "hf upload" in out
