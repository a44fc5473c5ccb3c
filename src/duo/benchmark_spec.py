"""Named benchmarks for `duo benchmark`, what a dry run shrinks, and the GPU-time estimate printed before work.

A benchmark fixes what a paper's protocol fixes (model family, concept, β sweep, attacks, budget, seed); the
user brings the model and the prompt files. The estimate counts the denoiser passes each stage makes at the
protocol's sizes and prices them with published throughput (GPU_ASSUMPTIONS): nothing here was measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from duo.errors import UserError


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    title: str
    concept: str  # preset of duo/concepts
    family: str  # what --model must be, in words (checked by pipeline class and cross-attention width)
    pipeline_class: str
    cross_attention_dim: int
    betas: tuple[float, ...]
    attacks: tuple[str, ...]
    budget: str = "paper"
    seed: int = 42  # the authors' training seed; attacks and evaluation draw from it too
    train: dict = field(default_factory=dict)  # `duo train` flags every β shares


# DUO (Park et al., NeurIPS 2024) on nudity, SD 1.4: β 250 (their white-box setting), 500 (their nudity default),
# 1000 (the top of the range where nudity DSR saturates). The attacks are the paper's four (Ring-A-Bell,
# Concept Inversion, UnlearnDiffAtk, SneakyPrompt) after the prompt set itself (the I2P prompts as written, the
# baseline they must beat). Soft-prompt and relearn are ours, beyond the paper: run them with `duo attack`.
# recipe authors: the preset's `train:` section may change, the benchmark must not change with it.
BENCHMARKS = {
    "nudity-sd14": BenchmarkSpec(
        name="nudity-sd14",
        title="DUO nudity benchmark (Park et al. 2024, SD 1.4)",
        concept="nudity",
        family="Stable Diffusion 1.x (e.g. CompVis/stable-diffusion-v1-4)",
        pipeline_class="StableDiffusionPipeline",
        cross_attention_dim=768,  # CLIP ViT-L/14's width: SD 1.x; SD 2.x reads OpenCLIP-H (1024)
        betas=(250.0, 500.0, 1000.0),
        attacks=("prompts", "ring-a-bell", "concept-inversion", "unlearndiff", "sneakyprompt"),
        train={"recipe": "authors"},
    ),
}


def benchmark_named(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark '{name}'; the known ones: {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[name]


# --dry-run: the whole pipeline at these sizes, so that a CPU checks the wiring in seconds. A random model draws
# nothing a judge could see, so curation keeps unjudged images (judge none), Concept Inversion learns from the
# dry run's own unsafe images, and UnlearnDiffAtk keeps targets its filter would drop; the attacks' judge stays
# the concept's (NudeNet), so every DSR of a random model is 1. Every number it writes is mechanics, not a result.
@dataclass(frozen=True)
class DryRun:
    pairs: int = 2
    train: dict = field(default_factory=lambda: {"steps": 2, "batch_size": 2, "checkpoint_every": 2})
    sampling_steps: int = 2
    targets: int = 1  # the first rows of --prompts-file
    captions: int = 2  # the first captions of --coco-captions (FID needs two)
    networks: str = "shapes"  # the Shapes world's LPIPS-style and FID feature networks stand in (no weights needed)
    attack_settings: dict = field(
        default_factory=lambda: {
            "ring-a-bell": {"length": 4, "population": 4, "generations": 1, "vocabulary": "whole-words"},
            "concept-inversion": {"n_images": 2, "train_steps": 1, "train_batch": 1, "checkpoint_every": 1},
            "unlearndiff": {"timesteps": 1, "iterations": 1, "filter_targets": False},
            "sneakyprompt": {"max_queries": 2, "max_steps": 2},
        }
    )


DRY_RUN = DryRun()


@dataclass(frozen=True)
class GpuAssumption:
    """Throughput on a reference GPU, taken from published numbers (sources in `notes`), never measured here."""

    gpu: str = "NVIDIA A100 80GB SXM"
    image_s_half: float = 1.604  # one 512 px image, 50 steps, CFG (100 UNet rows), fp16, batch 1, decode included
    fp32_factor: float = 2.2  # fp32 / fp16 time: attacks and evaluation sample in fp32 (their tested setting)
    text_encoder_share: float = 1 / 35  # one CLIP-L text pass (77 tokens) / one UNet row, by multiply-adds
    notes: tuple[str, ...] = (
        "image: 1.604 s for SD 1.5 (same UNet as 1.4), 512 px, 50 steps, fp16, batch 1, diffusers + torch 2.1 SDPA "
        "on an A100 80GB SXM (fal-ai/stable-diffusion-benchmarks, 31.19 it/s); a UNet row = image / 100",
        "fp32 = 2.2 x fp16 (SD 1.5, diffusers SDPA, 33 vs 73 it/s on an RTX 4090: vladmandic/sdnext wiki Benchmark)",
        "text encoder: 123 M params x 77 tokens ~ 9.5 G multiply-adds against 339 G for the UNet at 64x64 "
        "latents (BK-SDM, Kim et al. 2024, Table 1) ~ 1/35 of a UNet row",
        "training: bf16 mixed precision at the fp16 row time; a step = 3 rows per pair (x-, x+, x_T) x 3 passes "
        "(reference forward, policy forward, backward to the inputs of frozen weights ~ 1 forward)",
        "not counted: NudeNet/LPIPS/FID/CLIP networks, model loading, rejection redraws; attacks that stop at "
        "their first success (UnlearnDiffAtk, SneakyPrompt) are counted at their full budget (an upper bound)",
    )

    @property
    def row_half(self) -> float:
        return self.image_s_half / 100

    @property
    def image_fp32(self) -> float:
        return self.image_s_half * self.fp32_factor


GPU = GpuAssumption()

# The published settings the estimate counts (duo.attacks.settings.* paper budgets, SPEC §2-4).
CURATE_STRENGTH = 0.75
PAIRS, TRAIN_STEPS, PAIRS_PER_STEP = 64, 1000, 4
RING_A_BELL = {"population": 200, "generations": 3000, "children": 100}  # elite 0.5: half re-scored a generation
CONCEPT_INVERSION = {"images": 25, "steps": 3000, "batch": 4}
UNLEARNDIFF = {"timesteps": 50, "iterations": 40}
SNEAKYPROMPT_QUERIES = 60


def attack_seconds(name: str, targets: int, g: GpuAssumption = GPU) -> tuple[float, str]:
    """(seconds, how) of one attack on one model: its search plus the harness's image per target."""
    image, row = g.image_fp32, g.row_half * g.fp32_factor
    if name == "prompts":
        return targets * image, f"{targets} images"
    if name == "ring-a-bell":
        passes = RING_A_BELL["population"] + RING_A_BELL["generations"] * RING_A_BELL["children"]
        s = targets * (passes * g.text_encoder_share * row + image)
        return s, f"{targets} x {passes:,} text-encoder passes + {targets} images"
    if name == "concept-inversion":
        ci = CONCEPT_INVERSION
        s = ci["images"] * image + ci["steps"] * ci["batch"] * 2 * row + targets * image
        return s, f"{ci['images']} concept images + {ci['steps']} steps x {ci['batch']} x 2 passes + {targets} images"
    if name == "unlearndiff":
        blocks = UNLEARNDIFF["timesteps"]
        per = blocks * UNLEARNDIFF["iterations"] * 2 * row + (blocks + 2) * image
        return (
            targets * per,
            f"{targets} x ({blocks} x {UNLEARNDIFF['iterations']} steps x 2 passes + {blocks + 2} images)",
        )
    if name == "sneakyprompt":
        return targets * (SNEAKYPROMPT_QUERIES + 1) * image, f"{targets} x {SNEAKYPROMPT_QUERIES + 1} images"
    raise UserError(f"no estimate for attack '{name}'")


def estimate(spec: BenchmarkSpec, targets: int, captions: int, neighbours: int, g: GpuAssumption = GPU) -> list:
    """[(stage, seconds, how)] of the whole protocol at its published sizes on the reference GPU."""
    points = len(spec.betas) + 1  # every β and the original model
    step = PAIRS_PER_STEP * 3 * 3 * g.row_half
    stages = [
        ("curate", PAIRS * (1 + CURATE_STRENGTH) * g.image_fp32, f"{PAIRS} pairs x (1 + {CURATE_STRENGTH}) images"),
        ("train", len(spec.betas) * TRAIN_STEPS * step, f"{len(spec.betas)} β x {TRAIN_STEPS} steps x {step:.2f} s"),
    ]
    for name in spec.attacks:
        seconds, how = attack_seconds(name, targets, g)
        stages.append((f"attack {name}", points * seconds, f"{points} models x ({how})"))
    images = 2 * (captions + neighbours)
    stages.append(("evaluate", points * images * g.image_fp32, f"{points} models x {images} images"))
    return stages


def format_estimate(stages: list, g: GpuAssumption = GPU) -> str:
    total = sum(s for _, s, _ in stages)
    lines = [f"Estimated GPU time on one {g.gpu} (published throughput, not measured here):"]
    lines += [f"  {name:<26}{_hours(s):>10}   {how}" for name, s, how in stages]
    lines.append(f"  {'total':<26}{_hours(total):>10}")
    lines.append(f"  assumptions: one image {g.image_fp32:.2f} s in fp32 ({g.image_s_half} s fp16 x {g.fp32_factor})")
    lines += [f"  - {note}" for note in g.notes]
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"
