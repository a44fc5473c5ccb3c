"""Run folders and lineage: every stage claims its folder one way, and reads model and concept from its parents."""

import json

import pytest
import torch

from duo.attacks import AttackConfig, run_attack
from duo.cli.main import main
from duo.data.curate import CurateConfig, curate
from duo.errors import UserError
from duo.evaluate import EvaluateConfig, evaluate
from duo.runs import RunFolder, content_hash, find_ancestor, read_run
from duo.train.api import resolve_config, train


def test_run_folder_resumes_refuses_and_overwrites_only_its_own(tmp_path):
    out = tmp_path / "run"
    run = RunFolder.claim(out, "sample", {"a": 1, "b": {"c": 2}})
    assert run.state == "new" and not out.exists()  # nothing is written before start()
    run.start()
    (out / "x.txt").write_text("x")
    run.finish(["x.txt"])
    assert RunFolder.claim(out, "sample", {"a": 1, "b": {"c": 2}}).state == "resume"
    with pytest.raises(UserError, match=r"differs in: a, b\.c"):
        RunFolder.claim(out, "sample", {"a": 2, "b": {"c": 3}})
    assert RunFolder.claim(out, "sample", {"a": 2, "b": {"c": 2}}, volatile=("a",)).state == "resume"
    with pytest.raises(UserError, match="not a `duo attack` run"):
        RunFolder.claim(out, "attack", {"a": 1})
    with pytest.raises(UserError, match="--resume"):
        RunFolder.claim(out, "sample", {"a": 1, "b": {"c": 2}}, auto_resume=False)
    RunFolder.claim(out, "sample", {"a": 9}, overwrite=True).start()
    assert not (out / "x.txt").exists() and read_run(out)["config"] == {"a": 9}
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter.tex").write_text("years of work")
    with pytest.raises(UserError, match="refuses to delete"):
        RunFolder.claim(foreign, "sample", {}, overwrite=True)
    assert (foreign / "chapter.tex").read_text() == "years of work"


def test_a_resume_sweeps_the_temporaries_a_killed_atomic_write_left(tmp_path):
    out = tmp_path / "run"
    RunFolder.claim(out, "sample", {"a": 1}).start()
    (out / "images").mkdir()
    left = [out / ".results.json.k2j4.tmp", out / "images" / ".0-0.png.x9.tmp", out / ".lora.ab12.tmp"]
    left[-1].mkdir()
    (left[-1] / "pytorch_lora_weights.safetensors").write_bytes(b"half")
    for path in left[:2]:
        path.write_text("half")
    kept = [out / "images" / "0-0.png", out / "notes.tmp", out / ".hidden"]
    for path in kept:
        path.write_text("mine")
    RunFolder.claim(out, "sample", {"a": 1}).start()
    assert not any(p.exists() for p in left) and all(p.read_text() == "mine" for p in kept)


def test_parents_are_named_by_hash_and_checked(tmp_path):
    parent = tmp_path / "parent"
    p = RunFolder.claim(parent, "curate", {}).start()
    (parent / "data.txt").write_text("one")
    with pytest.raises(UserError, match="not finished"):
        RunFolder.claim(tmp_path / "child", "train", {}, {"data": parent})
    p.finish(["data.txt"])
    child = RunFolder.claim(tmp_path / "child", "train", {}, {"data": parent}).start()
    child.finish([])
    assert read_run(child.path)["parents"]["data"]["hash"] == content_hash(parent)
    assert find_ancestor(child.path, "curate") == parent.resolve()
    (parent / "data.txt").write_text("two")  # edited after it finished: what is built on it is stale
    with pytest.raises(UserError, match="changed after"):
        RunFolder.claim(tmp_path / "child", "train", {}, {"data": parent})


@pytest.fixture(scope="module")
def shapes_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    pairs = root / "pairs"
    curate(CurateConfig(model="shapes", concept="shapes-red", out=str(pairs), pairs=2, batch_size=2))
    loras = [root / f"lora{i}" for i in range(2)]
    for i, lora in enumerate(loras):
        train(
            resolve_config(
                model="shapes", data=str(pairs), out=str(lora), steps=2, seed=i, threads=torch.get_num_threads()
            )
        )
    return pairs, loras


def small_attack(out, **kw):
    return AttackConfig(out=str(out), n_prompts=2, images_per_prompt=1, threads=torch.get_num_threads(), **kw)


def test_attack_reads_model_and_concept_from_the_lora_and_names_its_parents(shapes_lora, tmp_path):
    pairs, (lora, _) = shapes_lora
    results = run_attack("prompts", small_attack(tmp_path / "a", lora=[str(lora)]))
    assert results["concept"]["name"] == "shapes-red" and results["model"]["ref"] == "shapes"
    parents = results["lineage"]["parents"]
    assert parents["lora0"]["kind"] == "train" and parents["lora0"]["hash"] == content_hash(lora)
    assert results["lineage"]["origin"] == {"model": "lineage", "concept": "lineage"}
    assert find_ancestor(tmp_path / "a", "curate") == pairs.resolve()
    assert read_run(tmp_path / "a")["parents"] == parents


def test_an_attack_on_another_concept_than_the_loras_is_refused(shapes_lora, tmp_path, capsys):
    _, (lora, _) = shapes_lora
    out = tmp_path / "a"
    with pytest.raises(UserError, match="--override concept"):
        run_attack("prompts", small_attack(out, lora=[str(lora)], concept="shapes-circle"))
    assert not out.exists()
    argv = ["attack", "prompts", "--lora", str(lora), "--concept", "shapes-circle", "--out", str(out)]
    assert main(argv) == 2 and "contradicts the LoRA" in capsys.readouterr().err
    results = run_attack("prompts", small_attack(out, lora=[str(lora)], concept="shapes-circle", override=["concept"]))
    assert results["lineage"]["overrides"] == ["concept"] and results["concept"]["name"] == "shapes-circle"


def test_evaluate_refuses_a_rerun_with_another_lora_and_attacks_of_another_lora(shapes_lora, tmp_path):
    _, (first, second) = shapes_lora
    attack = tmp_path / "attack"
    run_attack("prompts", small_attack(attack, lora=[str(first)]))
    cfg = dict(out=str(tmp_path / "eval"), n_prompts=2, threads=torch.get_num_threads())
    r = evaluate(EvaluateConfig(lora=[str(first)], attacks=[str(attack)], **cfg))
    parents = r["lineage"]["parents"]
    assert parents["lora0"]["hash"] == content_hash(first) and parents["attack:0"]["hash"] == content_hash(attack)
    assert r["method"]["name"] == "duo" and r["concept"]["name"] == "shapes-red"
    before = (tmp_path / "eval" / "images.jsonl").read_text()
    with pytest.raises(UserError, match="other settings"):  # it reused the first LoRA's images before
        evaluate(EvaluateConfig(lora=[str(second)], **cfg))
    assert (tmp_path / "eval" / "images.jsonl").read_text() == before
    with pytest.raises(UserError, match="its own attacks"):
        evaluate(EvaluateConfig(lora=[str(second)], attacks=[str(attack)], **{**cfg, "out": str(tmp_path / "e2")}))
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["lineage"]["parents"] == parents
    from duo.report import build_report

    page = tmp_path / "report.html"
    build_report([str(tmp_path / "eval")], str(page))
    html = page.read_text()
    assert "Lineage" in html and content_hash(first)[:12] in html and "curate" in html  # lora → pairs, two levels


def test_sample_takes_model_and_the_guards_concept_from_the_lora(shapes_lora, tmp_path):
    from duo.sample import SampleConfig, sample

    _, (lora, _) = shapes_lora
    cfg = SampleConfig(out=str(tmp_path / "s"), lora=[str(lora)], prompt=["a circle"], guard="negprompt", steps=2)
    records = sample(cfg)
    assert records[0]["model"] == "shapes" and "red" in records[0]["guard"]["words"]
    assert read_run(tmp_path / "s")["parents"]["lora0"]["hash"] == content_hash(lora)
