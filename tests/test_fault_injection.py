"""Faults (issue 15): a SIGKILL mid-run, then the same command again, gives the uninterrupted run's files byte for
byte; a full or read-only disk is exit 2 with a message, and what was written stays whole.

The fast tests kill at fixed points (a number of manifest lines) and rerun in-process; the slow one runs
scripts/fault_inject.py, which kills every command at random moments.
"""

import errno
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
from test_user_errors import tree_digest as digest

from duo.cli.main import main

SCRIPT = Path(__file__).parents[1] / "scripts" / "fault_inject.py"
CURATE = ["curate", "--model", "shapes", "--concept", "shapes-red", "--pairs", "4", "--batch-size", "4"]
TRAIN = ["--steps", "8", "--checkpoint-every", "2", "--batch-size", "2", "--threads", "1", "--resume"]


def load_script():
    spec = importlib.util.spec_from_file_location("fault_inject", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fi = load_script()


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "pairs"
    assert main([*CURATE, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def lora(pairs, tmp_path_factory):
    cwd, back = tmp_path_factory.mktemp("lora"), os.getcwd()
    os.chdir(cwd)  # train records --out as given: `out`, as the killed run in its own folder does
    try:
        assert main(["train", "--model", "shapes", "--data", str(pairs), "--out", "out", *TRAIN]) == 0
    finally:
        os.chdir(back)
    return cwd / "out"


@pytest.mark.parametrize("after_steps", [3, 7])
def test_train_killed_between_checkpoints_resumes_to_the_same_bytes(pairs, lora, tmp_path, monkeypatch, after_steps):
    """Killed one step after a checkpoint (3: after step 2's, 7: after step 6's), rerun: the same LoRA, checkpoints,
    metrics lines (none twice) and run.json as the uninterrupted run."""
    args = ["train", "--model", "shapes", "--data", str(pairs), *TRAIN]
    assert fi.kill_after(args, tmp_path, 300, until=lambda out: lines(out / "metrics.jsonl") >= after_steps)
    assert lines(tmp_path / "out" / "metrics.jsonl") >= after_steps
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--out", "out"]) == 0
    assert fi.problems(tmp_path / "out", lora) == []


def fail_fsync_after(monkeypatch, calls: int, code: int = errno.ENOSPC) -> None:
    """Every fsync from the `calls`-th on fails: the disk filled up. Atomic writes and manifest appends fsync."""
    count = {"n": 0}
    real = os.fsync

    def fsync(fd):
        count["n"] += 1
        if count["n"] >= calls:
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def read_only(monkeypatch, folder: Path) -> None:
    """Nothing can be created or opened for writing in `folder` (a chmod does not stop root, who runs CI here)."""
    real_mkstemp, real_open = tempfile.mkstemp, os.open

    def refused(path) -> bool:
        return Path(path).resolve().is_relative_to(folder.resolve())

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and refused(dir):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR) and refused(path):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "open", open_)


def test_full_disk_then_read_only_folder_exit_2_and_damage_nothing(pairs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pairs"
    with monkeypatch.context() as m:
        # run.json, the batch's 8 PNGs, its first manifest line; then the disk is full (the second line is refused).
        # The rerun must redraw the whole batch: pairs drawn 3 at a time are other pixels than 4 at a time.
        fail_fsync_after(m, 11)
        assert main([*CURATE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "Free space" in err and "Traceback" not in err
    assert lines(out / "pairs.jsonl") == 1 and not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    before = digest(out)
    with monkeypatch.context() as m:
        fail_fsync_after(m, 1)
        assert main([*CURATE, "--out", str(out)]) == 2
    assert digest(out) == before  # not even run.json was touched
    with monkeypatch.context() as m:
        read_only(m, out)
        assert main([*CURATE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "writable" in err and str(out) in err
    assert digest(out) == before
    assert main([*CURATE, "--out", str(out)]) == 0  # room again: it resumes to the uninterrupted run's pairs
    assert fi.problems(out, pairs) == []


def test_attack_cut_mid_batch_redraws_the_whole_batch(tmp_path, monkeypatch, capsys):
    """A batch whose second image was never recorded: the rerun draws both again (an image alone in a batch is other
    pixels on CPU) and records the second, so images, images.jsonl and the DSR equal the uninterrupted run's."""
    attack = ["attack", "prompts", "--model", "shapes", "--concept", "shapes-red", "--n-prompts", "2"]
    attack += ["--images-per-prompt", "1", "--threads", "1"]
    assert main([*attack, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        # run.json, prepare.json, 2 found lines, prompts.csv, the first PNG and its line, the second PNG; then full
        fail_fsync_after(m, 9)
        assert main([*attack, "--out", str(out)]) == 2
    assert lines(out / "images.jsonl") == 1
    assert main([*attack, "--out", str(out)]) == 0
    assert fi.problems(out, tmp_path / "ref") == []


def test_full_disk_while_saving_the_lora_is_exit_2(pairs, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as its own error type; the CLI reads it too, and no half LoRA is left."""

    def full(*args, **kwargs):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)  # what diffusers' save_lora_weights calls
    out = tmp_path / "lora"
    train = ["--steps", "2", "--checkpoint-every", "2", "--batch-size", "2", "--threads", "1"]
    assert main(["train", "--model", "shapes", "--data", str(pairs), "--out", str(out), *train]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "pytorch_lora_weights.safetensors" in err and "Traceback" not in err
    assert not list(out.glob("pytorch_lora_weights*")) and not list(out.glob(".lora.*"))


@pytest.mark.slow
def test_fault_injection_script_full_trials(tmp_path):
    """Every command, 20 random kills each (1-2 h on one core)."""
    assert fi.main(["--trials", "20", "--work", str(tmp_path)]) == 0, "see the table above"


def test_script_compares_what_it_should(tmp_path):
    """problems() flags a duplicated line, a temp file and a changed byte, and ignores only VOLATILE_KEYS."""
    ref, trial = tmp_path / "ref", tmp_path / "trial"
    for folder, when in ((ref, "1"), (trial, "2")):
        folder.mkdir()
        (folder / "m.jsonl").write_text('{"id": 1, "seconds": ' + when + "}\n")
        (folder / "results.json").write_text('{"dsr": 0.5, "written": "' + when + '"}')
    assert fi.problems(trial, ref) == []
    (trial / "m.jsonl").write_text('{"id": 1, "seconds": 2}\n{"id": 1, "seconds": 2}\n')
    (trial / ".x.png.abc.tmp").write_bytes(b"")
    (trial / "results.json").write_text('{"dsr": 0.6, "written": "2"}')
    found = fi.problems(trial, ref)
    assert {"duplicated line in m.jsonl", "temp file left: .x.png.abc.tmp", "differs: results.json"} <= set(found)
