"""Generate images from a model with any number of LoRAs combined with weights."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from duo import shard
from duo.data.files import append_jsonl, atomic_save_image, read_jsonl
from duo.data.lineage import lora_parents, resolve_inputs
from duo.data.text import check_prompt, check_prompt_lengths
from duo.errors import UserError
from duo.guards import GUARDS, Guard, make_guard
from duo.models.lora_spec import lora_dirs
from duo.runs import RunFolder


@dataclass
class SampleConfig:
    out: str = field(metadata={"help": "folder for the images and images.jsonl (resumed if present)"})
    model: str | None = field(
        default=None, metadata={"help": "diffusers pipeline: hub id, local folder, or 'shapes' (default: the LoRA's)"}
    )
    prompt: list[str] | None = field(default=None, metadata={"help": "one or more prompts"})
    prompts_file: str | None = field(default=None, metadata={"help": "text file, one prompt per line"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "seeds; every prompt × every seed"})
    lora: list[str] | None = field(
        default=None,
        metadata={
            "help": "LoRA folder, optionally with a weight: DIR or DIR:0.8; repeat to combine (violence: 4 × :1)"
        },
    )
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt for every image"})
    guard: str = field(
        default="none",
        metadata={"help": "inference-time guard (needs --concept)", "choices": GUARDS},
    )
    concept: str | None = field(
        default=None,
        metadata={"help": "preset name or concept YAML whose unsafe words the guard uses (default: the LoRA's)"},
    )
    override: list[str] | None = field(
        default=None,
        metadata={"help": "let --model / --concept contradict the LoRA's lineage: model, concept (recorded)"},
    )
    steps: int = field(default=50, metadata={"help": "sampling steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    resolution: int | None = field(default=None, metadata={"help": "image size (default: the model's native)"})
    batch_size: int = field(default=4, metadata={"help": "images per forward pass"})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})
    allow_pickle: bool = field(default=False, metadata={"help": "allow loading pickled (.bin/.ckpt) weights"})
    overwrite: bool = field(default=False, metadata={"help": "delete the run in --out and start afresh"})

    def prompts(self) -> list[str]:
        prompts = [check_prompt(p, "--prompt") for p in self.prompt or []]
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise UserError(f"prompts file '{path}' does not exist.")
            # split on newlines only: splitlines() would also split at control characters and hide them
            from_file = [line.strip() for line in _read_text(path).split("\n") if line.strip()]
            if not from_file:
                raise UserError(f"prompts file '{path}' holds no prompts (it is empty); write one prompt per line.")
            prompts += [check_prompt(p, f"prompts file '{path}'") for p in from_file]
        if not prompts:
            raise UserError("no prompts: pass --prompt TEXT or --prompts-file FILE.")
        return prompts

    def validate(self) -> None:
        """Settings that would fail deep inside a pipeline (a division by zero, a 0-pixel image) fail here."""
        for flag, value in (("--steps", self.steps), ("--batch-size", self.batch_size)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise UserError(f"--resolution must be a positive multiple of 8 (the VAE's factor), got {self.resolution}")

    def make_guard(self, concept=None) -> Guard:
        """The guard built from the concept's unsafe words; refuses a guard without a concept."""
        if self.guard in (None, "none"):
            return make_guard("none", [])
        if concept is None:
            raise UserError(
                f"guard '{self.guard}' is built from a concept's unsafe words: pass --concept NAME "
                "(a preset such as shapes-red or nudity, or a concept YAML file), or a --lora from `duo train`."
            )
        guard = make_guard(self.guard, concept.unsafe_words)
        if self.negative_prompt and guard.apply([""])[1] is not None:
            raise UserError(
                f"guard '{self.guard}' sets the negative prompt to the concept's words; drop --negative-prompt "
                "or use another guard."
            )
        return guard


# Settings that decide the pixels; a folder holds images of one setting only.
# "guard" is recorded as the guard's provenance (name, words, SLD settings), so the concept's words count too.
RUN_KEYS = ("model", "lora", "negative_prompt", "guard", "steps", "guidance", "resolution", "dtype")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"prompts file '{path}' is not UTF-8 text ({exc}); save it as UTF-8.") from None


def image_name(prompt: str, seed: int) -> str:
    return f"{hashlib.sha256(prompt.encode()).hexdigest()[:12]}-seed{seed}.png"


def sample(cfg: SampleConfig) -> list[dict]:
    """Generate every prompt × seed into cfg.out; returns the records of images.jsonl (resumes)."""
    cfg.validate()
    prompts = cfg.prompts()
    inputs = resolve_inputs(cfg.model, cfg.concept, lora_dirs(cfg.lora), cfg.override, need_concept=False)
    cfg = replace(cfg, model=inputs.model)
    guard = cfg.make_guard(inputs.concept)
    out = Path(cfg.out)
    index = out / "images.jsonl"
    settings = json.loads(json.dumps({k: getattr(cfg, k) for k in RUN_KEYS} | {"guard": guard.provenance()}))
    parents = lora_parents(cfg.lora)
    run = RunFolder.claim(out, "sample", settings, parents, overwrite=cfg.overwrite, overrides=inputs.overrides)
    shard.init(cfg.device)
    done = {(r["prompt"], r["seed"]) for r in shard.recorded(index)} if run.state == "resume" else set()
    planned = list(dict.fromkeys((p, s) for p in prompts for s in cfg.seeds))  # a repeated seed: one image
    todo = [item for item in planned if item not in done]
    # A run a crash stopped after its last image but before it finished has nothing to draw, and still finishes.
    if todo or not (run.previous or {}).get("finished"):
        family = None
        if todo:
            from duo.models.family import load_with_loras

            family = load_with_loras(cfg.model, cfg.lora, cfg.dtype, cfg.device, cfg.allow_pickle)
            check_prompt_lengths(family, [p for p, _ in todo])
        shard.start(run)
        _draw(cfg, guard, family, settings, planned, done)
        shard.gather_planned(index, planned, lambda r: (r["prompt"], r["seed"]))
        if shard.is_main():
            run.finish(["images.jsonl"] + [r["file"] for r in read_jsonl(index)])
        shard.barrier()
    return read_jsonl(index)


def _draw(cfg: SampleConfig, guard: Guard, family, settings: dict, planned: list[tuple], done: set) -> None:
    """Batches of every planned image, not of those left: pixels depend on the batch an image is drawn in (CPU
    kernels), so a resumed or sharded run draws each image in the batch a fresh single process draws it in."""
    out = Path(cfg.out)
    todo = shard.pending(shard.cut(planned, cfg.batch_size), done)
    for batch in tqdm(todo, desc="sample", unit="batch", disable=not shard.is_main()):
        negatives = [cfg.negative_prompt] * len(batch) if cfg.negative_prompt else None
        images = guard.generate(
            family,
            [p for p, _ in batch],
            [s for _, s in batch],
            cfg.steps,
            cfg.guidance,
            cfg.resolution,
            negative_prompts=negatives,
        )
        for (prompt, seed), image in zip(batch, images):
            if (prompt, seed) in done:  # recorded before a crash cut this batch short
                continue
            name = image_name(prompt, seed)
            atomic_save_image(out / name, image)
            append_jsonl(shard.part(out / "images.jsonl"), {"file": name, "prompt": prompt, "seed": seed, **settings})
