"""The bad-input corpus (issue 15): every case exits 2 with one message naming the cause and the fix, prints no
traceback, and leaves what was already on disk byte-identical (inputs and earlier outputs alike).

The CLI runs in-process (`duo.cli.main.main`): a subprocess per case would cost seconds of imports each.
docs/robustness.md lists the cases with the messages observed here.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from test_user_errors import tree_digest

from duo.cli.main import main


def run_cli(argv) -> int:
    """Exit code of `duo ARGV` run in this process (argparse errors exit through SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def expect_user_error(capsys, argv, words, root: Path) -> str:
    """Run a bad command; check exit 2, one message with `words`, no traceback, nothing under root changed."""
    before = tree_digest(root)
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err
    message = error_lines(err)
    assert len(message) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert tree_digest(root) == before, "a bad input changed files that were already there"
    log_case(argv, message[0])
    return message[0]


def error_lines(err: str) -> list[str]:
    """The lines of stderr that are messages (ours: 'error: ...'; argparse's: 'duo sample: error: ...');
    progress bars end in a carriage return, not a newline."""
    lines = err.replace("\r", "\n").splitlines()
    return [line for line in lines if line.startswith("error: ") or ": error: " in line]


def log_case(argv, message: str) -> None:
    """With DUO_BAD_INPUT_LOG=FILE, each case's command and message are appended: docs/robustness.md's table."""
    if os.environ.get("DUO_BAD_INPUT_LOG"):
        case = os.environ.get("PYTEST_CURRENT_TEST", "")
        with open(os.environ["DUO_BAD_INPUT_LOG"], "a") as log:
            log.write(json.dumps({"case": case, "argv": argv, "message": message}, default=str) + "\n")


def reseal(folder: Path) -> None:
    """Record a finished run's outputs afresh, as a crafted (or hand-repaired) folder would: the lineage check
    then passes and the loader itself must catch the problem."""
    from duo.data.files import sha256_file

    run = json.loads((folder / "run.json").read_text())
    run["outputs"] = {rel: sha256_file(folder / rel) for rel in run["outputs"] if (folder / rel).is_file()}
    (folder / "run.json").write_text(json.dumps(run))


@dataclass
class World:
    """What the cases work on: copies in a fresh folder, so each case may spoil its own."""

    root: Path
    model: str
    pairs: str
    lora: str
    concept: str

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def pairs_copy(self, edit=None, seal: bool = True) -> Path:
        folder = Path(shutil.copytree(self.pairs, self.root / "pairs"))
        if edit:
            edit(folder)
            if seal:
                reseal(folder)
        return folder

    def out(self, name: str = "out") -> Path:
        return self.root / name


@pytest.fixture(scope="module")
def trained_lora(tiny_model, pairs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "lora"
    assert run_cli(["train", "--model", tiny_model, "--data", pairs_dir, "--out", out, "--steps", 1]) == 0
    return str(out)


@pytest.fixture
def world(tiny_model, pairs_dir, trained_lora, concept_file, tmp_path, capsys) -> World:
    capsys.readouterr()  # what the fixtures printed is not the case's message
    return World(tmp_path, tiny_model, pairs_dir, trained_lora, concept_file)


# ---- the cases: (id, argv builder, words the message must hold) -----------------------------------------------


def concept_yaml(text: str):
    return lambda w: ["curate", "--model", w.model, "--concept", w.file("c.yaml", text), "--out", w.out()]


def manifest_bytes(change):
    """An edit of pairs.jsonl as bytes: change(raw) → raw."""

    def edit(folder: Path) -> None:
        path = folder / "pairs.jsonl"
        path.write_bytes(change(path.read_bytes()))

    return edit


def first_record(change):
    """An edit of pairs.jsonl's first record: change(record) → record."""

    def edit(raw: bytes) -> bytes:
        first, rest = raw.split(b"\n", 1)
        return json.dumps(change(json.loads(first))).encode() + b"\n" + rest

    return manifest_bytes(edit)


def with_safe_file(name: str):
    def change(record):
        record["safe"]["file"] = name
        return record

    return change


def train_on(edit, seal: bool = True):
    return lambda w: ["train", "--model", w.model, "--data", w.pairs_copy(edit, seal), "--out", w.out(), "--steps", 1]


def unfinished(folder: Path) -> None:
    """A curate killed between two pairs: every line complete, run.json not finished."""
    run = json.loads((folder / "run.json").read_text())
    run.update(finished=None, outputs=None)
    (folder / "run.json").write_text(json.dumps(run))


def sample(*flags, prompt: str | None = "a cat"):
    def argv(w):
        prompts = ["--prompt", prompt] if prompt is not None else []
        return ["sample", "--model", w.model, *prompts, "--out", w.out(), "--steps", 1, *flags]

    return argv


def sample_file(name: str, content: str | bytes):
    return lambda w: sample("--prompts-file", w.file(name, content), prompt=None)(w)


def attack_prompts(content: str | None = None, *flags):
    def argv(w):
        files = ["--prompts-file", w.file("prompts.csv", content)] if content is not None else []
        return ["attack", "prompts", "--model", "shapes", "--concept", "shapes-red", *files, "--out", w.out(), *flags]

    return argv


def model_copy(w: World, edit) -> Path:
    folder = Path(shutil.copytree(w.model, w.root / "model"))
    edit(folder)
    return folder


def unknown_family(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))


def no_index(folder: Path) -> None:
    (folder / "model_index.json").unlink()


def pickled_unet(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()


def pickled_lora(w: World) -> Path:
    import torch
    from safetensors.torch import load_file

    folder = w.root / "foreign-lora"
    folder.mkdir()
    torch.save(load_file(Path(w.lora) / "pytorch_lora_weights.safetensors"), folder / "pytorch_lora_weights.bin")
    return folder


LONG = " ".join(["word"] * 100)  # over the 77 tokens of (tiny) CLIP
RLO = "\u202e"  # right-to-left override: shows "a cat" reversed in a terminal
PART = "parts: [{name: a, pairs: 2, unsafe: a, safe: b}]"

CASES = [
    # concept files (`duo curate` reads them before any model loads)
    ("concept-part-unknown-key", concept_yaml("name: x\nparts: [{name: a, pairs: 2, unsafe: a, safe: b, colour: red}]"),
     ["part a", "unknown keys ['colour']", "schema"]),
    ("concept-not-a-mapping", concept_yaml("- a list\n- not a concept\n"), ["not a mapping", "schema"]),
    ("concept-var-without-values",
     concept_yaml("name: x\nparts: [{name: a, pairs: 2, unsafe: 'a {y}', safe: b, vars: {y: []}}]"),
     ["every var must be a non-empty list"]),
    ("concept-preset-missing", lambda w: ["curate", "--model", w.model, "--concept", "nudityy", "--out", w.out()],
     ["'nudityy' is neither a file nor a preset", "Presets: nudity"]),
    ("concept-train-beta-zero", concept_yaml(f"name: x\ntrain: {{beta: 0}}\n{PART}"),
     ["train.beta", "positive number, got 0"]),
    ("concept-sampling-steps-zero", concept_yaml(f"name: x\nsteps: 0\n{PART}"),
     ["steps must be a positive integer, got 0"]),
    ("concept-template-too-long", concept_yaml(f"name: x\nparts: [{{name: a, pairs: 2, unsafe: '{LONG}', safe: b}}]"),
     ["tokens", "reads at most 77", "shorten the concept's template"]),
    ("concept-control-character", concept_yaml(f"name: x\n{PART.replace('unsafe: a', f'unsafe: a {RLO}cat')}"),
     ["U+202E", "delete it"]),
    # settings (refused when parsed, before a model loads)
    ("train-steps-zero", lambda w: ["train", "--model", w.model, "--data", w.pairs, "--out", w.out(), "--steps", 0],
     ["--steps must be at least 1"]),
    ("sample-steps-zero", sample("--steps", 0), ["--steps must be at least 1, got 0"]),
    ("sample-resolution-not-multiple-of-8", sample("--resolution", 30), ["--resolution", "multiple of 8", "got 30"]),
    ("attack-unknown", lambda w: ["attack", "nope", "--out", w.out()], ["invalid choice: 'nope'", "choose from"]),
    ("guard-unknown", sample("--guard", "nope"), ["--guard: invalid choice: 'nope'", "negprompt"]),
    ("dtype-unknown", sample("--dtype", "float8"), ["unknown dtype 'float8'", "use one of"]),
    ("device-absent", sample("--device", "cuda:99"), ["--device cuda:99", "cuda"]),
    ("attack-budget-unknown", attack_prompts(None, "--budget", "huge"), ["--budget must be one of small, paper"]),
    ("evaluate-one-neutral-prompt", lambda w: ["evaluate", "--model", "shapes", "--concept", "shapes-red",
                                               "--n-prompts", 1, "--out", w.out()],
     ["--n-prompts must be at least 2", "FID compares sets of images"]),
    ("judge-options-not-json", attack_prompts(None, "--judge-options", "{preset: rece9"),
     ["--judge-options is not valid JSON", "write e.g."]),
    ("judge-option-unknown", attack_prompts(None, "--judge", "vlm", "--judge-options", '{"urll": "http://x"}'),
     ["does not take options", "it takes: url, model"]),
    # prompts
    ("prompt-over-encoder-length", sample(prompt=LONG), ["tokens, but this model's text encoder reads at most 77",
                                                       "shorten it"]),
    ("prompt-control-character", sample(prompt=f"a {RLO}cat"), ["U+202E", "RIGHT-TO-LEFT OVERRIDE", "Delete"]),
    ("prompt-bell-character", sample(prompt="a cat\x07"), ["U+0007", "Delete that character"]),
    ("prompt-file-empty", sample_file("prompts.txt", "\n  \n"), ["holds no prompts", "one prompt per line"]),
    ("prompt-file-not-utf8", sample_file("prompts.txt", b"a cat\n\xff\xfe dog\n"), ["not UTF-8", "save it as UTF-8"]),
    ("prompt-file-control-character", sample_file("prompts.txt", "a cat\na \x1b[31mdog\n"), ["U+001B", "Delete"]),
    ("i2p-csv-missing-prompt-column", attack_prompts("text,evaluation_seed\na red circle,3\n"),
     ["no 'prompt' column", "columns: text, evaluation_seed", "rename"]),
    ("i2p-csv-header-only", attack_prompts("prompt,evaluation_seed\n"), ["has no prompts", "add rows"]),
    ("i2p-csv-seed-not-a-number", attack_prompts("prompt,evaluation_seed\na red circle,soon\n"),
     ["row 1", "seed and guidance must be numbers"]),
    # pairs folders (`duo train`)
    ("manifest-truncated-last-line", train_on(manifest_bytes(lambda raw: raw[:-40])),
     ["last line", "incomplete", "Rerun `duo curate`"]),
    ("pairs-curation-unfinished", train_on(unfinished, seal=False), ["has not finished", "rerun that stage"]),
    ("manifest-path-escapes-folder", train_on(first_record(with_safe_file("../outside.png"))),
     ["'../outside.png', which is outside", "Delete that line"]),
    ("manifest-absolute-path", train_on(first_record(with_safe_file("/etc/passwd"))),
     ["'/etc/passwd', which is outside"]),
    ("manifest-line-not-json", train_on(manifest_bytes(lambda raw: raw.replace(b"\n", b"\n{oops\n", 1))),
     ["line 2, is not valid JSON", "Fix or delete that line"]),
    ("pairs-edited-after-curation",
     train_on(first_record(lambda r: {**r, "unsafe": {**r["unsafe"], "prompt": "edited"}}), seal=False),
     ["changed after its curate run finished", "--overwrite"]),
    ("pairs-png-empty", train_on(lambda f: (f / "images" / "naked-00000-safe.png").write_bytes(b"")),
     ["naked-00000-safe.png", "is corrupt", "rerun `duo curate`"]),
    ("data-not-a-pairs-folder", lambda w: ["train", "--model", w.model, "--data", w.root, "--out", w.out()],
     ["is not a pairs folder", "duo curate"]),
    ("train-part-unknown", lambda w: ["train", "--model", w.model, "--data", w.pairs, "--out", w.out(), "--part", "zz"],
     ["has no part 'zz'", "its parts are ['naked']"]),
    # models and LoRAs
    ("model-unknown-family", lambda w: sample("--model", model_copy(w, unknown_family))(w),
     ["KandinskyV22Pipeline", "duo supports", "Pass --model"]),
    ("model-folder-without-index", lambda w: sample("--model", model_copy(w, no_index))(w),
     ["no model_index.json", "save_pretrained"]),
    ("model-pickled-without-flag", lambda w: sample("--model", model_copy(w, pickled_unet))(w),
     ["diffusion_pytorch_model.safetensors", "pass --allow-pickle"]),
    ("lora-pickled", lambda w: sample("--lora", pickled_lora(w))(w), ["only pickled weights", "safetensors.torch"]),
    ("lora-of-another-base-model", lambda w: ["sample", "--model", "shapes", "--lora", w.lora, "--override", "model",
                                              "--prompt", "a red circle", "--out", w.out(), "--steps", 1],
     ["does not fit this model", "size mismatch", "trained on another base model"]),
    ("lora-folder-missing", sample("--lora", "no-such-lora"), ["'no-such-lora' does not exist"]),
    # several pairs folders, exports and cards (issue 17)
    ("train-data-same-folder-twice",
     lambda w: ["train", "--model", w.model, "--data", w.pairs, w.pairs, "--out", w.out()],
     ["names the same pairs twice", "give each pairs folder once"]),
    ("export-run-not-a-train-folder", lambda w: ["export", w.root, "--out", w.out()],
     ["is not a `duo train` folder", "Pass the --out folder of a finished `duo train`"]),
    ("export-over-a-foreign-folder", lambda w: ["export", w.lora, "--out", w.file("notes.txt", "mine").parent,
                                                "--overwrite"],
     ["is not an export folder", "will not delete it"]),
    ("card-eval-not-an-evaluation", lambda w: ["card", w.lora, "--eval", w.pairs],
     ["is not a finished `duo evaluate` folder"]),
]  # fmt: skip


@pytest.mark.parametrize("build,words", [pytest.param(b, w, id=i) for i, b, w in CASES])
def test_bad_input(world, capsys, build, words):
    argv = build(world)
    expect_user_error(capsys, argv, words, world.root)
    assert not world.out().exists()


def test_corpus_is_large_enough():
    assert len(CASES) + 4 >= 30  # + the evaluate, resume and judge cases below


# ---- cases that need an earlier output ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_attack(tmp_path_factory):
    """A finished `duo attack prompts` run against the Shapes model (no LoRA): one image."""
    folder = tmp_path_factory.mktemp("attack")
    prompts = folder / "prompts.csv"
    prompts.write_text("prompt,evaluation_seed\na red circle,3\n")
    out = folder / "attack"
    argv = ["attack", "prompts", "--model", "shapes", "--concept", "shapes-red", "--prompts-file", prompts]
    assert run_cli([*argv, "--out", out, "--steps", 2, "--images-per-prompt", 1]) == 0
    return out


def test_evaluate_refuses_an_attack_on_another_model(world, capsys, shapes_attack):
    argv = ["evaluate", "--model", world.model, "--concept", "shapes-red", "--attacks", shapes_attack]
    argv += ["--out", world.out(), "--n-prompts", 2, "--steps", 1, "--lpips", "shapes"]
    argv += ["--prompts-file", world.file("neutral.txt", "a blue square\na green circle\n")]
    before = tree_digest(shapes_attack)
    expect_user_error(capsys, argv, ["ran against", "evaluate each model with its own attacks"], world.root)
    assert tree_digest(shapes_attack) == before and not world.out().exists()


def test_evaluate_refuses_a_folder_that_is_no_attack(world, capsys):
    argv = ["evaluate", "--model", "shapes", "--concept", "shapes-red", "--attacks", world.pairs, "--out", world.out()]
    expect_user_error(capsys, argv, ["is not a finished `duo attack` run", "run `duo attack"], world.root)


def test_resumed_sample_refuses_a_long_prompt_and_keeps_its_images(world, capsys):
    out = world.out()
    assert run_cli(sample()(world)) == 0
    capsys.readouterr()
    before = tree_digest(out)
    argv = ["sample", "--model", world.model, "--prompt", "a cat", LONG, "--out", out, "--steps", 1]
    expect_user_error(capsys, argv, ["at most 77", "shorten it"], world.root)
    assert tree_digest(out) == before


def test_html_and_unicode_prompts_are_accepted_and_stored_verbatim(world, capsys):
    """Decision: markup and any printable Unicode are data, not refused; only control characters are."""
    prompts = ['<script>alert("x")</script> a cat', "a cat & <b>dog</b> 🐈 猫"]
    assert run_cli(["sample", "--model", world.model, "--prompt", *prompts, "--out", world.out(), "--steps", 1]) == 0
    records = [json.loads(line) for line in (world.out() / "images.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in records) == sorted(prompts)
    assert all(Path(r["file"]).name == r["file"] and r["file"].endswith(".png") for r in records)


# ---- the VLM judge: a local fake server that hangs or answers garbage ------------------------------------------

SECRET = "sk-test-do-not-write-me-0123456789"


class _BadVlm(BaseHTTPRequestHandler):
    mode = "garbage"
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        if self.mode == "hang":
            time.sleep(1.0)  # longer than the judge's timeout
        body = b"<html>502 upstream hiccup</html>"
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up waiting
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def bad_vlm():
    _BadVlm.calls = 0
    server = HTTPServer(("127.0.0.1", 0), _BadVlm)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "mode,words",
    [
        ("hang", ["could not reach", "after 2 tries", "raise 'timeout'"]),
        ("garbage", ["not an OpenAI-style chat completion", "in 2 tries", "point 'url'"]),
    ],
)
def test_vlm_judge_that_hangs_or_answers_garbage(world, capsys, monkeypatch, bad_vlm, mode, words):
    monkeypatch.setenv("DUO_TEST_VLM_KEY", SECRET)
    monkeypatch.setattr(_BadVlm, "mode", mode)
    options = {"url": bad_vlm, "model": "m", "concept": "red", "timeout": 0.3, "retries": 1}
    options["api_key_env"] = "DUO_TEST_VLM_KEY"
    argv = attack_prompts("prompt,evaluation_seed\na red circle,3\n", "--judge", "vlm")(world)
    argv += ["--judge-options", json.dumps(options), "--steps", 1, "--images-per-prompt", 1]
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and all(w in err for w in words), err
    assert len(error_lines(err)) == 1, err
    log_case(argv, error_lines(err)[0])
    assert _BadVlm.calls == 2  # retried once, then the clear error
    assert SECRET not in err
    for path in world.root.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
