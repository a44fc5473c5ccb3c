"""Generate images from a model with any number of LoRAs combined with weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from duo.data.files import append_jsonl, atomic_save_image, read_jsonl
from duo.errors import UserError
from duo.models.lora import parse_lora_spec


@dataclass
class SampleConfig:
    model: str = field(metadata={"help": "diffusers pipeline: hub id, local folder, or 'shapes'"})
    out: str = field(metadata={"help": "folder for the images and images.jsonl (resumed if present)"})
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
    steps: int = field(default=50, metadata={"help": "sampling steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    resolution: int | None = field(default=None, metadata={"help": "image size (default: the model's native)"})
    batch_size: int = field(default=4, metadata={"help": "images per forward pass"})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})
    allow_pickle: bool = field(default=False, metadata={"help": "allow loading pickled (.bin/.ckpt) weights"})

    def prompts(self) -> list[str]:
        prompts = list(self.prompt or [])
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise UserError(f"prompts file '{path}' does not exist.")
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UserError("no prompts: pass --prompt TEXT or --prompts-file FILE.")
        return prompts


def sample(cfg: SampleConfig) -> list[dict]:
    """Generate every prompt × seed into cfg.out; returns the records of images.jsonl."""
    prompts = cfg.prompts()
    loras = [parse_lora_spec(s) for s in cfg.lora or []]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "images.jsonl"
    done = {r["file"] for r in read_jsonl(index, repair=True)}
    jobs = [(p, s, f"{i:04d}-seed{s}.png") for i, p in enumerate(prompts) for s in cfg.seeds]
    todo = [j for j in jobs if j[2] not in done]
    if todo:
        from duo.models.family import load_family

        family = load_family(cfg.model, dtype=cfg.dtype, device=cfg.device, allow_pickle=cfg.allow_pickle)
        family.load_loras(loras)
        settings = {k: v for k, v in asdict(cfg).items() if k not in ("prompt", "prompts_file", "seeds", "out")}
        for start in tqdm(range(0, len(todo), cfg.batch_size), desc="sample", unit="batch"):
            batch = todo[start : start + cfg.batch_size]
            negatives = [cfg.negative_prompt] * len(batch) if cfg.negative_prompt else None
            images = family.text2image(
                [p for p, _, _ in batch],
                [s for _, s, _ in batch],
                cfg.steps,
                cfg.guidance,
                cfg.resolution,
                negative_prompts=negatives,
            )
            for (prompt, seed, name), image in zip(batch, images):
                atomic_save_image(out / name, image)
                append_jsonl(index, {"file": name, "prompt": prompt, "seed": seed, **json.loads(json.dumps(settings))})
    return read_jsonl(index)
