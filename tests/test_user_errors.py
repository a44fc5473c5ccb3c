"""User errors exit with code 2, name the cause and the fix, and leave earlier outputs untouched.

`duo` runs the CLI in this process (`duo.cli.main.main`, stdout/stderr and the log captured): a subprocess per
call costs seconds of imports. `test_a_real_process_exits_2` checks the exit code of a real `python -m duo`.
"""

import hashlib
import io
import logging
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from duo.cli.main import main


def duo(*args) -> subprocess.CompletedProcess:
    """`duo ARGS` in this process: its exit code, stdout and stderr (log lines included, as a terminal shows)."""
    out, err = io.StringIO(), io.StringIO()
    root, handler = logging.getLogger(), logging.StreamHandler(err)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse: --help, bad flags
                code = exc.code
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_a_real_process_exits_2(concept_file, tmp_path):
    command = ["curate", "--model", tmp_path / "nope", "--concept", concept_file, "--out", tmp_path / "o"]
    result = subprocess.run([sys.executable, "-m", "duo", *map(str, command)], capture_output=True, text=True)
    assert_user_error(result, "nope", "not found")
    assert not (tmp_path / "o").exists()


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def assert_user_error(result, *words):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["curate", "train", "sample", "attack ring-a-bell"])
def test_help(command):
    result = duo(*command.split(), "--help")
    assert result.returncode == 0 and "--model" in result.stdout


def test_list_defaults_reach_the_configs_when_flags_are_omitted():
    from duo.cli.main import build_parser
    from duo.demo import DEMO_ATTACKS

    parser = build_parser()
    assert parser.parse_args(["demo"]).attacks == list(DEMO_ATTACKS)
    assert parser.parse_args(["sample", "--model", "m", "--out", "o", "--prompt", "p"]).seeds == [0]


def test_missing_model(concept_file, tmp_path):
    assert_user_error(
        duo("curate", "--model", tmp_path / "nope", "--concept", concept_file, "--out", tmp_path / "o"),
        "nope",
        "not found",
    )
    assert_user_error(
        duo("curate", "--model", "someone/not-cached", "--concept", concept_file, "--out", tmp_path / "o"),
        "someone/not-cached",
        "HF_HUB_OFFLINE",
    )


@pytest.mark.parametrize(
    "text,words",
    [
        ("", ["empty"]),
        ("name: x\nparts: [{name: a, pairs: 2, unsafe: 'a {y}', safe: b}]", ["{y}"]),
        ("name: x\ncolour: red\nparts: []", ["unknown keys"]),
        ("name: [unclosed", ["not valid YAML"]),
    ],
)
def test_bad_concept_file(tiny_model, tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert_user_error(duo("curate", "--model", tiny_model, "--concept", path, "--out", tmp_path / "o"), *words)


def copy_pairs(pairs_dir, tmp_path):
    import shutil

    return Path(shutil.copytree(pairs_dir, tmp_path / "pairs"))


def test_manifest_pointing_at_missing_image(tiny_model, pairs_dir, tmp_path):
    pairs = copy_pairs(pairs_dir, tmp_path)
    (pairs / "images" / "naked-00001-safe.png").unlink()
    result = duo("train", "--model", tiny_model, "--data", pairs, "--out", tmp_path / "lora", "--steps", 1)
    assert_user_error(result, "naked-00001-safe.png", "missing", "duo curate")
    assert not (tmp_path / "lora").exists()


def test_corrupt_png(tiny_model, pairs_dir, tmp_path):
    pairs = copy_pairs(pairs_dir, tmp_path)
    (pairs / "images" / "naked-00002-unsafe.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = duo("train", "--model", tiny_model, "--data", pairs, "--out", tmp_path / "lora", "--steps", 1)
    assert_user_error(result, "naked-00002-unsafe.png", "corrupt")


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--beta", "0"], ["β must be a positive"]),
        (["--beta", "-5"], ["β must be a positive"]),
        (["--lam-retain", "3"], ["noise+retain"]),
        (["--resume", "--overwrite"], ["exclude"]),
    ],
)
def test_invalid_settings_rejected_before_loading(pairs_dir, tmp_path, flags, words):
    # The model does not exist: the settings must be rejected before anything tries to load it.
    result = duo("train", "--model", tmp_path / "no-model", "--data", pairs_dir, "--out", tmp_path / "lora", *flags)
    assert_user_error(result, *words)


def test_existing_output_is_not_overwritten(tiny_model, pairs_dir, tmp_path):
    out = tmp_path / "lora"
    assert duo("train", "--model", tiny_model, "--data", pairs_dir, "--out", out, "--steps", 1).returncode == 0
    before = tree_digest(out)
    assert_user_error(
        duo("train", "--model", tiny_model, "--data", pairs_dir, "--out", out, "--steps", 1), "--resume", "--overwrite"
    )
    assert_user_error(
        duo("train", "--model", tiny_model, "--data", pairs_dir, "--out", out, "--steps", 1, "--resume", "--beta", 100),
        "beta",
    )
    assert tree_digest(out) == before


def test_nan_loss_stops_with_checkpoints_intact(tiny_model, pairs_dir, tmp_path):
    out = tmp_path / "nan"
    result = duo(
        "train",
        "--model",
        tiny_model,
        "--data",
        pairs_dir,
        "--out",
        out,
        "--steps",
        30,
        "--lr",
        "1e30",
        "--checkpoint-every",
        1,
    )
    assert_user_error(result, "loss became", "lower --lr", "--resume")
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept and kept[-1] < "step-0000030"
    assert (out / "checkpoints" / "last").read_text() == kept[-1]
    assert f"the last good checkpoint, {out / 'checkpoints' / kept[-1]}, is kept" in result.stderr
    # --resume continues from that checkpoint (here the same lr diverges at the same step again)
    again = duo("train", "--model", tiny_model, "--data", pairs_dir, "--out", out, "--steps", 30, "--lr", "1e30",
                "--checkpoint-every", 1, "--resume")  # fmt: skip
    assert_user_error(again, "loss became", kept[-1])
    assert f"step {int(kept[-1].split('-')[1])})" in again.stderr  # the log line "resumed from ... (step N)"


def test_empty_timestep_range_is_refused_before_writing(tiny_model, pairs_dir, tmp_path):
    # strength 0.75 of T = 1000 gives [0, 750): a lower bound of 800 leaves nothing to draw.
    result = duo("train", "--model", tiny_model, "--data", pairs_dir, "--out", tmp_path / "lora", "--t-min", 800)
    assert_user_error(result, "--t-min")
    assert not (tmp_path / "lora").exists()


def test_overwrite_never_deletes_a_foreign_folder(pairs_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = duo("train", "--model", tmp_path / "no-model", "--data", pairs_dir, "--out", precious, "--overwrite")
    assert_user_error(result, "refuses to delete")
    assert (precious / "thesis.tex").read_text() == "years of work"
