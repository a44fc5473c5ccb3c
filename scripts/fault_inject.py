"""Fault injection (issue 15): SIGKILL each command at a random moment, rerun it, compare with an uninterrupted run.

    python scripts/fault_inject.py --trials 20 --commands train curate --work runs/faults --seed 0

For each command: one uninterrupted run into WORK/<command>/reference, then per trial a run into
WORK/<command>/trial-<i> killed (SIGKILL, the whole process group) after a delay drawn uniformly in
(0, reference wall time), then the same command again to completion. The trial folder must then hold the same
files as the reference, byte for byte, except the run-specific fields listed in VOLATILE_KEYS; no temp file left
behind; no manifest line twice; every run.json output hash matching its file. Exit 1 on any failure.

Every command runs with its own folder as working directory and `--out out`, so the paths it records are the same
in the reference and in every trial; its inputs are the reference folders of the commands before it (curate → train
→ attacks → evaluate), given as absolute paths. CPU only, one thread: the outputs must be bit-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Fields that legitimately differ between two runs of the same command, by key name, anywhere in a JSON or JSONL file:
VOLATILE_KEYS = {
    "started",  # run.json: wall-clock time the run first started
    "finished",  # run.json: wall-clock time it finished
    "resumed",  # run.json: only a resumed run has it (when it resumed); attack prepare.json: True when resumed
    "installed",  # soft-prompt's prepare record: how many targets' vectors this session found already learned
    "resumed_from_step",  # concept inversion's provenance: the checkpoint step it went on from (0 when fresh)
    "written",  # results.json (attack, evaluate): when the file was written
    "seconds",  # metrics.jsonl (train: time of one step), relearn's curve and provenance: durations
    "seconds_probe",  # relearn results.json: durations of its DSR probes
}
# run.json's `outputs` holds sha256 of each declared output; a file with a volatile field has another hash in each
# run, so those hashes are checked against the files of their own folder rather than against the reference.
TEMP_MARKERS = (".tmp",)  # atomic writes (duo.data.files, checkpoints) name their temp files and folders so

SHAPES = ["--model", "shapes"]
ATTACK = [*SHAPES, "--threads", "1", "--n-prompts", "2", "--images-per-prompt", "1"]
# Per attack, settings that shrink the small budget to seconds on Shapes yet keep its inner checkpoints.
ATTACK_SETTINGS = {
    "prompts": [],
    "ring-a-bell": [],
    "concept-inversion": ["--train-steps", "40", "--checkpoint-every", "10", "--n-images", "4"],
    "unlearndiff": [],
    "soft-prompt": [],
    "relearn": ["--n-images", "4", "--checkpoints", "0", "4", "8", "--curve-targets", "2"],
    "sneakyprompt": [],
}
COMMANDS = ["curate", "train", *(f"attack-{a}" for a in ATTACK_SETTINGS), "evaluate"]
NEEDS = {"curate": [], "train": ["curate"], "evaluate": ["train", "attack-prompts"]}


def needs(name: str) -> list[str]:
    return NEEDS.get(name, ["train"])


def argv(name: str, refs: dict[str, Path]) -> list[str]:
    """The command line of `name`; refs: the reference output folders of the commands it needs."""
    if name == "curate":
        return ["curate", *SHAPES, "--concept", "shapes-red", "--pairs", "8", "--batch-size", "4"]
    if name == "train":
        # train resumes only with --resume (a deliberate act); on an empty or missing --out it starts at step 0,
        # so the first run and the rerun are the very same command.
        train = ["--steps", "16", "--checkpoint-every", "4", "--batch-size", "2", "--threads", "1", "--resume"]
        return ["train", *SHAPES, "--data", str(refs["curate"]), *train]
    if name == "evaluate":
        attacks = ["--attacks", str(refs["attack-prompts"])]
        return ["evaluate", *SHAPES, "--lora", str(refs["train"]), *attacks, "--n-prompts", "4", "--threads", "1"]
    kind = name.removeprefix("attack-")  # attacks resume on their own: per target (found.jsonl), per image
    return ["attack", kind, *ATTACK, "--lora", str(refs["train"]), *ATTACK_SETTINGS[kind]]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / "log.txt", "ab")  # noqa: SIM115 - the child writes to it; closed when the parent exits
    # A session of its own, so one killpg reaches the command and any child it starts, and nothing else.
    cmd = [sys.executable, "-m", "duo", *args, "--out", "out"]
    return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)


def run_to_end(args: list[str], cwd: Path, timeout: float = 900) -> float:
    began = time.perf_counter()
    proc = start(args, cwd)
    if proc.wait(timeout) != 0:
        tail = (cwd / "log.txt").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"`duo {' '.join(args)}` in {cwd} exited {proc.returncode}:\n{tail}")
    return time.perf_counter() - began


def kill_after(args: list[str], cwd: Path, delay: float, until: Callable[[Path], bool] | None = None) -> bool:
    """Start the command, SIGKILL it after `delay` s (or once until(out) holds); True if it had not finished."""
    proc = start(args, cwd)
    deadline = time.perf_counter() + delay
    while proc.poll() is None and time.perf_counter() < deadline and not (until and until(cwd / "out")):
        time.sleep(0.01)
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def normalise(value):
    """A JSON value without its volatile fields."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def run_json(path: Path) -> dict:
    """run.json with each output hash replaced by whether it matches its file (see VOLATILE_KEYS)."""
    record = json.loads(path.read_text())
    outputs = record.get("outputs") or {}
    for rel, digest in outputs.items():
        file = path.parent / rel
        outputs[rel] = file.is_file() and hashlib.sha256(file.read_bytes()).hexdigest() == digest
    return normalise(record)


def comparable(path: Path):
    """What of a file must equal the reference: JSON and JSONL without their volatile fields, re-serialised in the
    order they were written (key order too: a resumed run must write the same bytes), else the bytes."""
    if path.name == "run.json":
        return json.dumps(run_json(path))
    if path.suffix == ".json":
        return json.dumps(normalise(json.loads(path.read_text())))
    if path.suffix == ".jsonl":
        return [json.dumps(normalise(json.loads(line))) for line in path.read_text().splitlines()]
    return path.read_bytes()


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def problems(trial: Path, reference: Path) -> list[str]:
    """Every way the trial's output folder differs from the reference's."""
    found = []
    temps = [str(p.relative_to(trial)) for p in trial.rglob("*") if any(m in p.name for m in TEMP_MARKERS)]
    found += [f"temp file left: {t}" for t in temps]
    mine, theirs = files(trial), files(reference)
    found += [f"missing: {f}" for f in sorted(theirs - mine)] + [f"extra: {f}" for f in sorted(mine - theirs)]
    for rel in sorted(mine & theirs):
        if rel.endswith(".jsonl"):
            lines = (trial / rel).read_text().splitlines()
            if len(set(lines)) < len(lines):
                found.append(f"duplicated line in {rel}")
            if not (trial / rel).read_text().endswith("\n") and lines:
                found.append(f"half-written last line in {rel}")
        try:
            if comparable(trial / rel) != comparable(reference / rel):
                found.append(f"differs: {rel}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            found.append(f"unreadable: {rel} ({exc})")
    return found


def reference(name: str, work: Path, refs: dict[str, Path], walls: dict[str, float]) -> None:
    """The uninterrupted run of `name` (and of what it needs), reused when WORK already holds it."""
    for dep in needs(name):
        if dep not in refs:
            reference(dep, work, refs, walls)
    cwd = work / name / "reference"
    if not (cwd / "wall.txt").is_file():
        shutil.rmtree(cwd, ignore_errors=True)
        (cwd / "wall.txt").parent.mkdir(parents=True, exist_ok=True)
        (cwd / "wall.txt").write_text(str(run_to_end(argv(name, refs), cwd)))
    refs[name], walls[name] = (cwd / "out").resolve(), float((cwd / "wall.txt").read_text())


def trial(name: str, i: int, work: Path, refs: dict, delay: float, until=None) -> tuple[bool, bool, list[str]]:
    """Kill, rerun, compare: (killed before done, killed run left files behind, problems)."""
    cwd = work / name / f"trial-{i:03d}"
    shutil.rmtree(cwd, ignore_errors=True)
    args = argv(name, refs)
    killed = kill_after(args, cwd, delay, until)
    partial = killed and (cwd / "out").is_dir() and bool(files(cwd / "out"))
    try:
        run_to_end(args, cwd)
    except RuntimeError as exc:
        return killed, partial, [f"rerun failed: {exc}"]
    return killed, partial, problems(cwd / "out", refs[name])


def run_command(name: str, trials: int, work: Path, rng: random.Random, refs: dict, walls: dict) -> dict:
    reference(name, work, refs, walls)
    row = {"command": name, "trials": trials, "killed": 0, "partial": 0, "failures": 0, "identical": 0}
    for i in range(trials):
        delay = rng.uniform(0, walls[name])
        killed, partial, found = trial(name, i, work, refs, delay)
        row["killed"] += killed
        row["partial"] += partial
        row["failures"] += bool(found)
        row["identical"] += not found
        status = "ok" if not found else "FAIL: " + "; ".join(found[:6])
        when = f"kill at {delay:.2f}s/{walls[name]:.1f}s, killed={killed}, partial={partial}"
        print(f"{name} trial {i}: {when}: {status}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    """partial: trials whose killed run had already written into its folder (the kill hit the writing)."""
    head = "| command | trials | killed-before-done | partial output | failures | bit-identical checks passed |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["command"], r["trials"], r["killed"], r["partial"], r["failures"], f"{r['identical']}/{r['trials']}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv_: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--commands", nargs="+", default=COMMANDS, choices=COMMANDS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--work", default="runs/faults", help="folder for references and trials (reused)")
    args = parser.parse_args(argv_)
    work, rng, refs, walls = Path(args.work).resolve(), random.Random(args.seed), {}, {}
    rows = [run_command(name, args.trials, work, rng, refs, walls) for name in args.commands]
    print(table(rows))
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
