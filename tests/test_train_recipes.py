"""The train stage as recipes: method configs own their flags, UCE and the loop stay apart, setup() gives a
state that steps, and every train folder is a run folder naming its pairs by hash."""

import ast
import json
import shutil
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from duo.errors import UserError
from duo.runs import RUN_FILE, content_hash, read_run
from duo.train import loop
from duo.train.advunlearn_config import AdvUnlearnConfig
from duo.train.api import LORA_FILE, RECIPES, resolve_config, train
from duo.train.config import METHODS, DuoConfig, EsdConfig, LoopConfig, RunConfig, TrainConfig, UceConfig, owners

TRAIN = Path(__file__).resolve().parents[1] / "src" / "duo" / "train"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from duo.train import uce`
    return found


def test_loop_and_uce_do_not_import_each_other_and_train_has_no_cycle():
    assert not {"duo.train.uce", "duo.train.api"} & imported_modules(TRAIN / "loop.py")
    assert not {"duo.train.loop", "duo.train.api"} & imported_modules(TRAIN / "uce.py")
    graph = {
        f"duo.train.{p.stem}": {m for m in imported_modules(p) if m.startswith("duo.train.") and m != "duo.train"}
        for p in TRAIN.glob("*.py")
    }

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m)] == []
    assert set(RECIPES) == set(METHODS)  # every --method has a recipe, and no recipe lacks a method


def other_value(f):
    """A value of field f that is not its default."""
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != f.default)
    if isinstance(f.default, bool):
        return not f.default
    if isinstance(f.default, str):
        return f.default + "x"
    return 7 if f.default is None else f.default + 1


CASES = [
    (DuoConfig, "esd-x", "duo"),
    (EsdConfig, "duo", "esd-u / esd-x"),
    (UceConfig, "esd-u", "uce"),
    (LoopConfig, "uce", "duo / esd-u / esd-x / advunlearn"),
    (AdvUnlearnConfig, "duo", "advunlearn"),
]


@pytest.mark.parametrize("config,method,owned_by", CASES, ids=[c[0].__name__ for c in CASES])
def test_each_flag_belongs_to_the_configs_that_declare_it(config, method, owned_by):
    for f in fields(config):
        flag = f.name.replace("_", "-")
        # data does not exist: the refusal comes before anything is read
        with pytest.raises(UserError, match=f"^--{flag} applies to --method {owned_by}, not {method}; drop it"):
            resolve_config(model="m", data="no-such-folder", out="o", method=method, **{f.name: other_value(f)})
    # ... and the method that declares them takes them
    owner = owned_by.split(" / ")[0]
    TrainConfig(model="m", data="d", out="o", method=owner).check_method_flags()
    assert all(owners(f.name) == owned_by.split(" / ") for f in fields(config))


def test_common_settings_are_every_methods_and_the_cli_groups_flags_by_config():
    from duo.cli.main import build_parser

    assert all(owners(f.name) == list(METHODS) for f in fields(RunConfig))
    for method in METHODS:
        TrainConfig(model="m", data="d", out="o", method=method, seed=3, fuse=True, threads=1).validate()
    # the union is exactly the parts: no field declared twice, none outside a part
    parts = [
        f.name for c in (RunConfig, LoopConfig, DuoConfig, EsdConfig, UceConfig, AdvUnlearnConfig) for f in fields(c)
    ]
    assert len(parts) == len(set(parts)) and parts == [f.name for f in fields(TrainConfig)]
    assert all(f.default is not MISSING for f in fields(TrainConfig))
    sub = next(a for a in build_parser()._subparsers._group_actions if "train" in a.choices).choices["train"]
    groups = {g.title: {a.dest for a in g._group_actions} for g in sub._action_groups}
    assert groups["duo"] == {f.name for f in fields(DuoConfig)}
    assert groups["esd-u / esd-x"] == {f.name for f in fields(EsdConfig)}
    assert groups["uce"] == {f.name for f in fields(UceConfig)}
    assert groups["advunlearn"] == {f.name for f in fields(AdvUnlearnConfig)}
    assert groups["training loop (duo, esd-u, esd-x, advunlearn)"] == {f.name for f in fields(LoopConfig)}
    assert groups["every method"] == {f.name for f in fields(RunConfig)}


def test_run_json_names_the_pairs_folder_by_its_hash(tiny_model, pairs_dir, tmp_path):
    out = train(resolve_config(model=tiny_model, data=pairs_dir, out=str(tmp_path / "lora"), steps=1))
    run = read_run(out)
    assert run["kind"] == "train" and run["finished"] is not None
    assert run["parents"]["data"]["path"] == str(Path(pairs_dir).resolve())
    assert run["parents"]["data"]["hash"] == content_hash(pairs_dir)
    assert run["config"]["beta"] == 500.0 and run["config"]["method"] == "duo"
    assert set(run["outputs"]) == {LORA_FILE, "config.json", "metrics.jsonl"}  # not the card: `duo card` rewrites it
    config = json.loads((out / "config.json").read_text())
    assert config["processes"] == 1 and config["pairs_per_step"] == 4
    assert config["resolved_lr"] == pytest.approx(3e-4 * 100 / 500)
    uce = train(
        resolve_config(model=tiny_model, data=pairs_dir, out=str(tmp_path / "uce"), method="uce", uce_erase="prompts")
    )
    assert set(read_run(uce)["outputs"]) == {LORA_FILE, "config.json", "uce.json"}
    assert read_run(uce)["parents"]["data"]["hash"] == content_hash(pairs_dir)


def test_uce_refuses_to_rerun_without_overwrite(tiny_model, pairs_dir, tmp_path):
    out = tmp_path / "uce"
    train(resolve_config(model=tiny_model, data=pairs_dir, out=str(out), method="uce", uce_erase="prompts"))
    before = (out / RUN_FILE).read_text()
    with pytest.raises(UserError, match="--overwrite"):
        train(resolve_config(model=tiny_model, data=pairs_dir, out=str(out), method="uce", uce_erase="prompts"))
    assert (out / RUN_FILE).read_text() == before
    (out / "stale.txt").write_text("from the first run")
    train(
        resolve_config(
            model=tiny_model, data=pairs_dir, out=str(out), method="uce", uce_erase="prompts", overwrite=True
        )
    )
    assert not (out / "stale.txt").exists() and read_run(out)["finished"] is not None


def test_setup_returns_a_state_whose_step_runs(tiny_model, pairs_dir, tmp_path):
    cfg = resolve_config(model=tiny_model, data=pairs_dir, out=str(tmp_path / "s"), steps=2, batch_size=2, lr=1e-2)
    state = loop.setup(cfg)
    try:
        assert state.start == 0 and state.global_batch == 2
        assert read_run(state.out)["finished"] is None  # started, not finished
        before = [p.detach().clone() for p in state.params]
        metrics = loop.optimizer_step(state, 0)
        assert metrics["step"] == 1 and torch.isfinite(torch.tensor(metrics["loss"]))
        assert {"pref", "keep", "accuracy", "grad_norm"} <= metrics.keys()
        assert any(not torch.equal(a, b) for a, b in zip(before, state.params))
    finally:
        loop.cleanup(state)
    with pytest.raises(TypeError, match="TrainState"):
        loop.train(cfg)


def test_nothing_is_written_before_the_model_loads(pairs_dir, tmp_path):
    with pytest.raises(UserError, match="no-model"):
        loop.setup(TrainConfig(model=str(tmp_path / "no-model"), data=pairs_dir, out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_a_folder_from_before_run_json_resumes_and_refuses_other_settings(tiny_model, pairs_dir, tmp_path):
    def run(out, **kw):
        return train(resolve_config(model=tiny_model, data=pairs_dir, out=str(out), checkpoint_every=1, **kw))

    straight = run(tmp_path / "straight", steps=3)
    old = run(tmp_path / "old", steps=2)
    (old / RUN_FILE).unlink()  # as written before run folders had a run.json
    config = json.loads((old / "config.json").read_text())
    del config["retain_prompts"], config["uce_keys"]  # settings added later: missing means their default
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="beta"):
        run(old, steps=3, resume=True, beta=100.0)
    assert not (old / RUN_FILE).exists()
    run(old, steps=3, resume=True)
    assert read_run(old)["finished"] is not None
    assert [json.loads(x)["step"] for x in (old / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    a, b = load_file(straight / LORA_FILE), load_file(old / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a run.json written before a setting existed: the setting compares at its default
    record = read_run(old)
    del record["config"]["esd_prompts"]
    (old / RUN_FILE).write_text(json.dumps(record))
    run(old, steps=4, resume=True)
    # and a legacy folder may be replaced: its config.json says it is ours
    legacy = Path(shutil.copytree(straight, tmp_path / "legacy"))
    (legacy / RUN_FILE).unlink()
    run(legacy, steps=1, overwrite=True)
    assert not (legacy / "checkpoints" / "step-0000003").exists()
