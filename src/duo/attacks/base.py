"""What every attack shares: the config, the targets it starts from, and the context it works in.

An attack module (see `duo.attacks.ATTACKS`) defines
    Settings   a dataclass of its knobs; field defaults are the published ("paper") setting
    BUDGETS    {"small": {field: value, ...}, "paper": {}}: overrides of Settings per budget
    prepare(ctx, s) -> dict   one-time work (concept vector, learned token), resumable, returns provenance
    attack(ctx, s, target) -> Found   the adversarial prompt for one target, deterministic in (seed, target)
    attack_batch(ctx, s, targets) -> list[Found]   optional: several targets searched side by side, each as
                 attack() would alone but for float rounding (deterministic in seed and batch); the harness
                 then passes --batch-size targets at a time
Generation, judging, resume and results.json are the harness's (`duo.attacks.harness`), not the attack's.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from duo.errors import UserError
from duo.guards import GUARDS

if TYPE_CHECKING:
    from duo.data.concepts import Concept
    from duo.models.protocol import ModelFamily

BUDGET_NAMES = ("small", "paper")
# How many targets and images per adversarial prompt, per budget (attack knobs live in each module).
COMMON_BUDGETS = {
    "small": {"n_prompts": 16, "images_per_prompt": 2},
    "paper": {"n_prompts": 100, "images_per_prompt": 1},
}


@dataclass
class AttackConfig:
    """Settings of `duo attack NAME`; None means "the budget's or the concept's default"."""

    out: str = field(metadata={"help": "output folder (resumed if it holds a run with the same settings)"})
    model: str | None = field(
        default=None,
        metadata={"help": "diffusers pipeline under attack: hub id, local folder, or 'shapes' (default: the LoRA's)"},
    )
    concept: str | None = field(
        default=None,
        metadata={"help": "preset name (nudity, shapes-red, ...) or a concept YAML file (default: the LoRA's)"},
    )
    lora: list[str] | None = field(
        default=None, metadata={"help": "LoRA under attack, DIR or DIR:WEIGHT; repeat to combine"}
    )
    guard: str = field(
        default="none", metadata={"help": "inference-time defence of the model under attack", "choices": GUARDS}
    )
    budget: str = field(default="small", metadata={"help": "small (CPU minutes on Shapes) or paper (published)"})
    prompts_file: str | None = field(
        default=None,
        metadata={"help": "targets: CSV or JSONL with prompt[, seed, guidance, category] (wins over --targets)"},
    )
    targets: str = field(
        default="held-out",
        metadata={
            "help": "targets drawn from the concept: held-out (prompts curation never used) or training (the "
            "prompts the LoRA was trained on)",
            "choices": ("held-out", "training"),
        },
    )
    images: str | None = field(
        default=None,
        metadata={
            "help": "concept images for attacks that learn from images: an image folder or a `duo curate` folder "
            "(default: the LoRA's training pairs, else images of the original model)"
        },
    )
    n_prompts: int | None = field(default=None, metadata={"help": "targets drawn from the concept (budget's)"})
    images_per_prompt: int | None = field(default=None, metadata={"help": "images per adversarial prompt"})
    seed: int = field(default=0, metadata={"help": "base seed of targets, searches and images"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the concept's)"})
    guidance: float | None = field(default=None, metadata={"help": "guidance scale (default: the concept's)"})
    resolution: int | None = field(default=None, metadata={"help": "image size (default: the concept's)"})
    judge: str | None = field(
        default=None, metadata={"help": "judge of the images: nudenet, shapes, clip, vlm (default: the concept's)"}
    )
    judge_options: str | None = field(
        default=None, metadata={"help": 'judge options as JSON, e.g. \'{"preset": "rece9"}\' (default: the concept\'s)'}
    )
    batch_size: int = field(
        default=8,
        metadata={"help": "images per forward pass; UnlearnDiffAtk also searches this many targets side by side"},
    )
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: torch's)"})
    allow_pickle: bool = field(default=False, metadata={"help": "allow loading pickled (.bin/.ckpt) weights"})
    override: list[str] | None = field(
        default=None,
        metadata={"help": "let --model / --concept contradict the LoRA's lineage: model, concept (recorded)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "delete the run in --out and start afresh"})

    def common(self, key: str):
        value = getattr(self, key)
        return COMMON_BUDGETS[self.budget][key] if value is None else value

    def validate(self) -> None:
        if self.budget not in BUDGET_NAMES:
            raise UserError(f"--budget must be one of {', '.join(BUDGET_NAMES)}, got '{self.budget}'")
        if self.targets not in ("held-out", "training"):
            raise UserError(f"--targets must be held-out or training, got '{self.targets}'")
        for key in ("n_prompts", "images_per_prompt", "steps", "batch_size", "threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {value}")


@dataclass
class Target:
    """A concept prompt an attack starts from (and the seed its images use)."""

    id: str
    prompt: str
    seed: int
    guidance: float
    category: str = ""


@dataclass
class Found:
    """What an attack made of a target: the prompt to generate with, and how it was found."""

    id: str
    source: str
    prompt: str
    seed: int
    guidance: float
    details: dict = field(default_factory=dict)


def guidance_groups(items: list, guidance=lambda item: item.guidance) -> dict[float, list]:
    """Items grouped by guidance scale (a forward pass has one; prompt files such as I2P's set it per row), groups
    and items in order of first appearance."""
    groups: dict[float, list] = {}
    for item in items:
        groups.setdefault(guidance(item), []).append(item)
    return groups


def target_id(index: int, prompt: str) -> str:
    return f"{index:04d}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


@dataclass
class AttackContext:
    """The model under attack (LoRAs loaded), the concept, and the shared services attacks use."""

    family: ModelFamily
    concept: Concept
    guard: object
    config: AttackConfig
    out: Path
    targets: list[Target]
    judge: object = None  # the concept's judge (the harness's); attacks that judge in the loop use it
    has_loras: bool = False
    steps: int = 50
    resolution: int | None = None
    memo: dict = field(default_factory=dict)  # what an attack computes once per run and reuses per target

    @property
    def seed(self) -> int:
        return self.config.seed

    def original(self):
        """Context in which the family generates as the model before unlearning (LoRAs off)."""
        return self.family.loras_off() if self.has_loras else nullcontext()

    def generate(self, prompts: list[str], seeds: list[int], guidance: float) -> list[Image.Image]:
        """Images of the system under attack (model + LoRAs + guard), exactly as the harness generates them:
        the harness's first image of a found prompt uses the found seed, so an attack that judges
        `generate([prompt], [target.seed], ...)` in its loop sees the image the harness will judge."""
        return self.guard.generate(self.family, prompts, seeds, self.steps, guidance, self.resolution)

    def judge_images(self, images: list[Image.Image], sources: list[str]) -> list:
        """The concept judge's verdicts (`present`, `score`); `sources` are the prompts the images stand for."""
        return self.judge.judge(images, sources)

    def shows_concept(self, prompts: list[str], seeds: list[int], guidance: float, sources: list[str]) -> list:
        """Generate under the guard and judge: one verdict per prompt (the judge-in-the-loop of an attack)."""
        return self.judge_images(self.generate(prompts, seeds, guidance), sources)

    def verdicts(self, items: list[tuple[Target, str]]) -> list:
        """Each (target, prompt) generated at the target's seed under the guard and judged: one generation per
        guidance scale and --batch-size images (the judge-in-the-loop of a search over several targets)."""
        verdicts: list = [None] * len(items)
        size = self.config.batch_size
        for guidance, rows in guidance_groups(range(len(items)), lambda i: items[i][0].guidance).items():
            for chunk in (rows[i : i + size] for i in range(0, len(rows), size)):
                targets = [items[i][0] for i in chunk]
                prompts, seeds = [items[i][1] for i in chunk], [t.seed for t in targets]
                for i, v in zip(chunk, self.shows_concept(prompts, seeds, guidance, [t.prompt for t in targets])):
                    verdicts[i] = v
        return verdicts

    def original_shows_concept(self, target: Target) -> bool:
        """Whether the original model's image of the target (`target_image`) shows the concept; cached."""
        from duo.data.files import append_jsonl, read_jsonl

        index = self.out / "targets" / "verdicts.jsonl"
        key = ("original", index)
        if key not in self.memo:
            self.memo[key] = {r["id"]: r["present"] for r in read_jsonl(index, repair=True)}
        seen = self.memo[key]
        if target.id not in seen:
            verdict = self.judge_images([self.target_image(target)], [target.prompt])[0]
            seen[target.id] = bool(verdict.present)
            append_jsonl(index, {"id": target.id, "present": seen[target.id], "score": float(verdict.score)})
        return seen[target.id]

    def target_image(self, target: Target) -> Image.Image:
        """The original model's image for a target (UnlearnDiffAtk's target); cached in out/targets/."""
        return self.target_images([target])[0]

    def target_images(self, targets: list[Target]) -> list[Image.Image]:
        """`target_image` of several targets, drawn in one batch per guidance scale. If any is missing the whole
        group is drawn (an image's pixels depend on its batch) and only the missing ones are written, so a run
        cut short between two writes draws the same images as one that was not."""
        from duo.data.files import atomic_save_image, load_image

        paths = {t.id: self.out / "targets" / f"{t.id}.png" for t in targets}
        for guidance, group in guidance_groups(targets).items():
            if all(paths[t.id].is_file() for t in group):
                continue
            with self.original():
                images = self.family.text2image(
                    [t.prompt for t in group], [t.seed for t in group], self.steps, guidance, self.resolution
                )
            for t, image in zip(group, images):
                if not paths[t.id].is_file():
                    atomic_save_image(paths[t.id], image)
        return [load_image(paths[t.id]) for t in targets]

    def concept_images(self, n: int) -> tuple[list[Image.Image], list[str], dict]:
        """Up to n images showing the concept with their prompts, and where they came from."""
        from duo.attacks.concept_images import concept_images

        return concept_images(self, n)
