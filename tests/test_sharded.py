"""`accelerate launch ... duo curate|sample|evaluate|attack`: 2 CPU processes (gloo) write the same bytes as one.

Each command runs once in this process and once under a 2-process launch, both into the same path (the folder
is moved aside after each run), so that a path recorded in a file cannot tell them apart. A launch costs ~15 s
on a 2-core machine, so one launch runs every command (the CLI's `main`, in turn) and a crashed run's resume.

What may differ: the timestamps of run.json (started, finished, and resumed after a resume) and results.json's
`written`, and so run.json's hash of results.json (checked against the file instead).
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from duo.attacks import AttackConfig, run_attack
from duo.data.curate import CurateConfig, curate
from duo.evaluate import EvaluateConfig, evaluate
from duo.sample import SampleConfig, sample

TIMESTAMPS = {"run.json": {"started", "finished", "resumed"}, "results.json": {"written"}}
PROMPTS = ["a cat", "a dog", "a red car"]
IMAGES = {"prompt": PROMPTS, "seeds": [0, 1, 2], "steps": 2, "batch_size": 2}  # 9 images, 5 batches
SHAPES = ["--model", "shapes", "--concept", "shapes-red", "--batch-size", "2", "--threads", "1"]
DRIVER = """
import json, sys
from pathlib import Path
from duo import shard
from duo.cli.main import main

plain, shares = shard.mine, []
shard.mine = lambda batches: shares.append([len(batches), len(plain(batches))]) or plain(batches)
for argv in json.loads(sys.argv[1]):
    if main(argv):
        sys.exit(f"failed: {argv}")
Path(sys.argv[2], f"shares-{shard.rank()}.json").write_text(json.dumps(shares))
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As many threads as a launched process has (OMP_NUM_THREADS=1): CPU kernels may sum in another order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(folder: Path, commands: list[list[str]]) -> None:
    """`duo COMMAND ...` for each command, in turn, on 2 processes of one launch."""
    driver = folder / "driver.py"
    driver.write_text(DRIVER)
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*cmd, str(driver), json.dumps(commands), str(folder)], capture_output=True, text=True, timeout=400, env=env
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def crash(one: Path, work: Path) -> None:
    """`one`'s images as a 2-process run a kill stopped: each part file with some of its process's images (one
    line cut short), the unrecorded images gone, no images.jsonl yet, run.json not finished."""
    shutil.copytree(one, work)
    lines = (work / "images.jsonl").read_text().splitlines(keepends=True)
    (work / "images.jsonl").unlink()
    # batches of 2: process 0 has batch 0 and half of batch 2, process 1 half of batch 1 and a cut line
    for rank, text in {0: lines[0] + lines[1] + lines[4], 1: lines[2] + lines[3][:20]}.items():
        (work / f"images.jsonl.part-{rank}").write_text(text)
    for line in lines[3:4] + lines[5:]:
        (work / json.loads(line)["file"]).unlink()
    run = json.loads((work / "run.json").read_text())
    (work / "run.json").write_text(json.dumps({**run, "finished": None, "outputs": None}))


@pytest.fixture(scope="module")
def runs(tiny_model, concept_file, tmp_path_factory) -> Path:
    """root/COMMAND/one (this process) and root/COMMAND/two (2 processes); root/resume/two (the crashed run)."""
    root = tmp_path_factory.mktemp("sharded")
    work = {name: root / name / "work" for name in ("curate", "sample", "evaluate", "attack", "resume")}
    curate(CurateConfig(model=tiny_model, concept=concept_file, out=str(work["curate"]), pairs=4, batch_size=2))
    sample(SampleConfig(out=str(work["sample"]), model=tiny_model, **IMAGES))
    shapes = {"model": "shapes", "concept": "shapes-red", "batch_size": 2, "threads": 1}
    evaluate(EvaluateConfig(out=str(work["evaluate"]), n_prompts=4, **shapes))
    run_attack("prompts", AttackConfig(out=str(work["attack"]), n_prompts=3, images_per_prompt=2, **shapes))
    for name in ("curate", "sample", "evaluate", "attack"):
        work[name].rename(root / name / "one")
    crash(root / "sample" / "one", work["resume"])
    images = ["--prompt", *PROMPTS, "--seeds", "0", "1", "2", "--steps", "2", "--batch-size", "2"]
    commands = [
        ["curate", "--model", tiny_model, "--concept", concept_file, "--pairs", "4", "--batch-size", "2"],
        ["sample", "--model", tiny_model, *images],
        ["evaluate", *SHAPES, "--n-prompts", "4"],
        ["attack", "prompts", *SHAPES, "--n-prompts", "3", "--images-per-prompt", "2"],
        ["sample", "--model", tiny_model, *images],
    ]
    launch(root, [[*argv, "--out", str(w)] for argv, w in zip(commands, work.values())])
    for name in work:
        work[name].rename(root / name / "two")
    return root


def files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def settled(path: Path) -> dict:
    """A JSON file less its timestamps; run.json's hash of a file that holds one is checked, then left out."""
    record = {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMESTAMPS[path.name]}
    for rel, digest in (record.get("outputs") or {}).copy().items() if path.name == "run.json" else ():
        if Path(rel).name in TIMESTAMPS:
            assert digest == hashlib.sha256((path.parent / rel).read_bytes()).hexdigest(), rel
            del record["outputs"][rel]
    return record


def assert_same(one: Path, two: Path) -> None:
    a, b = files(one), files(two)
    assert sorted(a) == sorted(b)  # no part file is left behind, no image is missing
    for rel in a:
        if Path(rel).name in TIMESTAMPS:
            assert settled(a[rel]) == settled(b[rel]), rel
        else:
            assert a[rel].read_bytes() == b[rel].read_bytes(), rel


def test_each_process_draws_its_share_of_the_batches(runs):
    """(batches, this process's) per call of shard.mine: the two shares add up, and neither is empty."""
    zero, one = (json.loads((runs / f"shares-{rank}.json").read_text()) for rank in (0, 1))
    assert len(zero) == len(one) == 5  # curate, sample, evaluate, attack, the resumed sample
    assert all(a[0] == b[0] == a[1] + b[1] and a[1] > 0 and b[1] > 0 for a, b in zip(zero, one))


def test_curate_on_two_processes_writes_what_one_writes(runs):
    assert len((runs / "curate" / "one" / "pairs.jsonl").read_text().splitlines()) == 4
    assert_same(runs / "curate" / "one", runs / "curate" / "two")


def test_sample_on_two_processes_writes_what_one_writes(runs):
    assert len((runs / "sample" / "one" / "images.jsonl").read_text().splitlines()) == 9
    assert_same(runs / "sample" / "one", runs / "sample" / "two")


def test_two_processes_resume_the_parts_a_crash_left(runs):
    assert "resumed" in json.loads((runs / "resume" / "two" / "run.json").read_text())
    assert_same(runs / "sample" / "one", runs / "resume" / "two")


def test_one_process_resumes_the_parts_a_crash_of_two_left(runs, tiny_model, tmp_path):
    crash(runs / "sample" / "one", tmp_path / "work")
    sample(SampleConfig(out=str(tmp_path / "work"), model=tiny_model, **IMAGES))
    assert_same(runs / "sample" / "one", tmp_path / "work")


def test_evaluate_on_two_processes_writes_what_one_writes(runs):
    assert len((runs / "evaluate" / "one" / "images.jsonl").read_text().splitlines()) > 8  # neighbours too
    assert_same(runs / "evaluate" / "one", runs / "evaluate" / "two")


def test_attack_on_two_processes_writes_what_one_writes(runs):
    assert len((runs / "attack" / "one" / "images.jsonl").read_text().splitlines()) == 6
    assert_same(runs / "attack" / "one", runs / "attack" / "two")
