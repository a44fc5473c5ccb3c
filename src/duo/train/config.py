"""`duo train` settings: every knob of SPEC §3, typed, defaulted to the authors' values, validated early.

Each method declares its own settings (`DuoConfig`, `EsdConfig`, `UceConfig`); `RunConfig` holds what every
method takes and `LoopConfig` what the training loop of the gradient methods takes. `METHODS` names, per
`--method`, which of these a method reads, so a flag belongs to the methods whose configs declare it and a
flag of another method set away from its default is refused before anything is read.

`TrainConfig` is their union: the flag surface of `duo train`, the keyword arguments of `resolve_config`
and the flat keys of config.json and run.json (other stages read those keys, and old folders hold them).
The parts declare fields and derived values only, never same-named behaviour, so the union inherits no
method-specific code by accident; checks live in `PART_CHECKS`, keyed by the part that owns the fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from duo.errors import UserError
from duo.train.adversary_checks import adversary_checks
from duo.train.advunlearn_config import AdvUnlearnConfig, advunlearn_checks
from duo.train.placement import LORA_PLACEMENTS


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DuoConfig:
    """DUO (Park et al., NeurIPS 2024): preference for each pair's safe image, plus the keep term."""

    recipe: str = _f(
        "concept",
        "concept: the concept file's `train:` section over the authors' defaults (the Shapes presets are tuned "
        "there); authors: the authors' defaults only, the section ignored (flags still apply)",
        choices=["concept", "authors"],
    )
    beta: float = _f(500.0, "β of L_pref = −log σ(−β(Δ⁺ − Δ⁻)); no ½ factor (DUO β=500 = Diffusion-DPO β=1000)")
    lam: float | None = _f(None, "λ, weight of the keep term (default: base_λ·β/100)")
    base_lr: float = _f(3e-4, "base of the lr coupling lr = base_lr·100/β")
    base_lambda: float = _f(1e6, "base of the λ coupling λ = base_λ·β/100")
    timesteps: str = _f(
        "independent",
        "t⁺, t⁻ drawn independently (authors) or shared per pair (Diffusion-DPO)",
        choices=["independent", "shared"],
    )
    conditioning: str = _f(
        "empty",
        "prompt of the preference term, the same for x⁺ and x⁻: empty (authors), "
        "concept (the unsafe prompt), mixed (either, per pair)",
        choices=["empty", "concept", "mixed"],
    )
    keep: str = _f(
        "noise",
        "keep term: noise (x_T at T under c∅, authors) or noise+retain (also safe images, retained prompts, random t)",
        choices=["noise", "noise+retain"],
    )
    lam_retain: float | None = _f(None, "weight of the retain part of noise+retain (default: λ)")
    lam_text_retain: float = _f(0.0, "text-encoder LoRA: weight of ‖E_θ(c_r) − E(c_r)‖² on the retain prompts")
    lam_uncond: float = _f(
        0.0,
        "weight of the unconditional anchor ‖ε_θ(x_t, c∅) − ε_ref(x_t, c∅)‖² on each pair's x⁻_t and x⁺_t (0: off). "
        "Classifier-free guidance extrapolates away from the c∅ branch, so a preference that also lowers the concept "
        "under c∅ (adversarial rows, mixed conditioning) brings it back at guidance > 1; the anchor holds c∅ in place",
    )
    retain_prompts: str = _f(
        "safe",
        "prompts of the retain term: each pair's safe prompt, or the concept's neighbours",
        choices=["safe", "neighbours"],
    )
    lora_on: str = _f(
        "unet",
        "where the LoRA sits: unet (authors; --targets default self-attention), text-encoder (the first encoder, "
        "read by the frozen UNet; default targets its attention and feed-forward, as AdvUnlearn's) or both (one "
        "process; --targets then names the UNet's). A concept file's `targets:` belong to its own placement (the "
        "UNet unless it sets lora_on): dropped when --lora-on moves them",
        choices=list(LORA_PLACEMENTS),
    )
    adversarial: str = _f(
        "none",
        "adversarial DUO: every --adv-every steps an inner attack learns token vectors that bring the concept back "
        "past the LoRA, and every pair is used again conditioned on them: none (authors), concept-inversion (in place "
        "of the concept's words), soft-prompt (before the prompt, concept words deleted), unlearndiff (a prefix of "
        "real tokens: nearest vocabulary token, straight-through gradients); several joined with '+' take turns",
    )
    adv_every: int = _f(10, "optimizer steps between rounds of the inner attack")
    adv_steps: int = _f(10, "Adam steps of the inner attack per round (its vectors carry over between rounds)")
    adv_lr: float = _f(5e-2, "learning rate of the inner attack")
    adv_vectors: int = _f(3, "trainable token vectors of the inner attack")
    adv_batch: int = _f(8, "unsafe images per inner-attack step")
    adv_weight: float = _f(1.0, "weight of the preference term on the pairs conditioned on the inner attack's prompt")
    adv_init: str = _f(
        "persistent",
        "each round of the inner attack continues from the last one's vectors (persistent), or starts afresh from "
        "random vocabulary rows (fresh)",
        choices=["persistent", "fresh"],
    )
    adv_rounds: str = _f(
        "turns",
        "with several adversaries (a+b): their rounds take turns, one adversary a round (turns: the inner attack "
        "costs what one does), or each round refreshes them all (all)",
        choices=["turns", "all"],
    )
    adv_pairs: str = _f(
        "all",
        "several adversaries: every pair under each one's prompt (all), or under one's, the batch's slots taken in "
        "turn (split: one adversary's rows, their term weighted by the number of adversaries)",
        choices=["all", "split"],
    )

    @property
    def adversary_kinds(self) -> list[str]:
        """The inner attacks `--adversarial` names, in order (none: empty)."""
        return [] if self.adversarial == "none" else self.adversarial.split("+")

    @property
    def coupled_lr(self) -> float:
        from duo.objectives import coupled_hparams  # torch: not needed to parse flags

        return coupled_hparams(self.beta, self.base_lr, self.base_lambda)[0]

    @property
    def resolved_lam(self) -> float:
        from duo.objectives import coupled_hparams

        return self.lam if self.lam is not None else coupled_hparams(self.beta, self.base_lr, self.base_lambda)[1]

    @property
    def resolved_lam_retain(self) -> float:
        return self.lam_retain if self.lam_retain is not None else self.resolved_lam


@dataclass
class EsdConfig:
    """ESD (Gandikota et al., ICCV 2023): the concept's prediction trained toward negative guidance."""

    eta: float = _f(1.0, "negative guidance η of the target ε(c∅) − η·(ε(c) − ε(c∅))")
    esd_prompts: str = _f(
        "words",
        "the concept prompts c: each unsafe word alone (authors: the concept's name), or the pairs' unsafe prompts",
        choices=["words", "unsafe"],
    )


@dataclass
class UceConfig:
    """UCE (Gandikota et al., WACV 2024): closed-form edit of the cross-attention projections, no training."""

    uce_guide: str = _f("", "the text the concept's words are mapped to (authors: empty)")
    uce_erase: str = _f(
        "words",
        "what is mapped: each unsafe word to --uce-guide (authors), or each pair's unsafe prompt to its safe prompt",
        choices=["words", "prompts"],
    )
    uce_preserve: str = _f("neighbours", "texts kept in place besides the empty prompt", choices=["neighbours", "none"])
    uce_lambda: float = _f(
        0.5, "λ, weight of staying close to the original projection W (the authors' train_erase.py passes 0.5)"
    )
    erase_scale: float = _f(1.0, "weight of the erased texts")
    preserve_scale: float = _f(0.1, "weight of the preserved texts")
    uce_keys: bool = _f(True, "edit the key projections W_k as well as the values W_v")


# LoRA lr of ESD here: the authors' 1e-5 is for full fine-tuning; a LoRA needs more (docs/baselines.md).
ESD_LR = 1e-4


@dataclass(frozen=True)
class MethodSpec:
    """What `--method NAME` selects: the config of its own settings and whether the loop trains it."""

    config: type
    trained: bool  # optimised by the training loop, so LoopConfig's flags apply (UCE is a closed form)
    summary: str
    default_lr: float | None = None  # None: DUO's coupling lr = base_lr·100/β
    module: str = "unet"  # where the LoRA sits: "unet", or "text_encoder" (the family's first text encoder)


METHODS = {
    "duo": MethodSpec(DuoConfig, True, "pairs, preference loss"),
    "esd-u": MethodSpec(EsdConfig, True, "ESD's negative guidance on the non-cross-attention layers", ESD_LR),
    "esd-x": MethodSpec(EsdConfig, True, "ESD's negative guidance on the cross-attention layers", ESD_LR),
    "uce": MethodSpec(UceConfig, False, "closed-form edit of the cross-attention keys and values, no training"),
    # AdvUnlearn's lr: the authors' 1e-5 fine-tunes the whole text encoder; a LoRA needs more, as ESD's does.
    "advunlearn": MethodSpec(
        AdvUnlearnConfig, True, "ESD on the text encoder under a refreshed prefix attack", ESD_LR, "text_encoder"
    ),
}


@dataclass
class LoopConfig:
    """The training loop of the gradient methods: optimizer, batches, LoRA, checkpoints."""

    steps: int = _f(1000, "optimizer steps (authors: 1000 nudity, 500 per violence part)")
    lr: float | None = _f(None, "learning rate (default: DUO base_lr·100/β; ESD, AdvUnlearn 1e-4)")
    t_min: int | None = _f(None, "lowest training timestep (default 0)")
    t_max: int | None = _f(
        None, "timesteps are drawn in [t_min, t_max) (default: DUO SDEdit strength·T; ESD every step)"
    )
    rank: int = _f(32, "LoRA rank")
    alpha: float = _f(32.0, "LoRA alpha")
    targets: str | None = _f(
        None,
        "LoRA target modules as a regex (default per method: DUO self-attention q/k/v/out, ESD-x cross-attention, "
        "ESD-u every other layer, AdvUnlearn and DUO --lora-on text-encoder the text encoder's attention and "
        "feed-forward layers)",
    )
    batch_size: int = _f(4, "pairs per forward pass, per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step; pairs per step = batch_size × grad_accum × processes")
    mixed_precision: str = _f("no", "no, fp16 or bf16 (LoRA weights stay fp32)", choices=["no", "fp16", "bf16"])
    compile: bool = _f(
        False,
        "torch.compile the trained module's forward (inductor; the reference forward with adapters off too). "
        "Compiles during the first steps; docs/performance.md has what it measured",
    )
    grad_clip: float = _f(1.0, "max gradient norm")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    ema_decay: float = _f(
        0.0, "save the LoRA's moving average over the steps with this decay (0.99: ~the last 100), 0: the last step's"
    )
    checkpoint_every: int = _f(250, "steps between checkpoints")
    resume: bool = _f(False, "continue the run in --out from its last checkpoint")
    tracker: str | None = _f(None, "accelerate tracker (tensorboard, wandb, ...); none by default")


@dataclass
class RunConfig:
    """The model, the pairs, the output folder and the machine."""

    model: str = _f(None, "diffusers pipeline: hub id, local folder, or 'shapes'")
    # several folders: one LoRA erasing every concept, each concept drawn equally often (duo.data.pairs)
    data: list[str] | None = _f(None, "pairs folder(s) written by `duo curate`; several train one multi-concept LoRA")
    out: str = _f(None, "output folder for the LoRA, checkpoints and metrics")
    method: str = _f(
        "duo", "; ".join(f"{name}: {spec.summary}" for name, spec in METHODS.items()), choices=list(METHODS)
    )
    part: str | None = _f(None, "train on this concept part only (violence: one LoRA per part)")
    seed: int = _f(42, "seed of LoRA init and every random draw")
    overwrite: bool = _f(False, "delete what --out holds and start afresh")
    fuse: bool = _f(False, "also write the full pipeline with the LoRA fused into the weights")
    device: str | None = _f(None, "cpu or cuda (default: what accelerate picks)")
    threads: int | None = _f(
        None,
        "CPU threads for torch (default: torch's choice); 1 per process when "
        "several jobs share a small CPU, or they slow each other down several-fold",
    )
    allow_pickle: bool = _f(False, "allow loading pickled (.bin/.ckpt) weights")


def method_parts(method: str) -> tuple[type, ...]:
    """The configs whose flags --method `method` takes."""
    spec = METHODS[method]
    return (RunConfig, LoopConfig, spec.config) if spec.trained else (RunConfig, spec.config)


def owners(name: str) -> list[str]:
    """The methods that take the setting `name`."""
    return [m for m in METHODS if any(name in {f.name for f in fields(p)} for p in method_parts(m))]


def flag_groups() -> list[tuple[str, type]]:
    """(title, config) per group of `duo train --help`: what every method takes, the loop's, each method's."""
    trained = [m for m, s in METHODS.items() if s.trained]
    groups = [("every method", RunConfig), (f"training loop ({', '.join(trained)})", LoopConfig)]
    for config in dict.fromkeys(s.config for s in METHODS.values()):
        groups.append((" / ".join(m for m, s in METHODS.items() if s.config is config), config))
    return groups


@dataclass
class TrainConfig(AdvUnlearnConfig, UceConfig, EsdConfig, DuoConfig, LoopConfig, RunConfig):
    """Every part's fields in one flat record (bases listed in reverse so that RunConfig's come first)."""

    def __post_init__(self):
        # one folder stays a string: run.json and config.json read as they always did, and old runs resume
        if isinstance(self.data, (list, tuple)):
            self.data = self.data[0] if len(self.data) == 1 else list(self.data)

    @property
    def data_folders(self) -> list[str]:
        return [] if not self.data else [self.data] if isinstance(self.data, str) else list(self.data)

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def lora_modules(self) -> tuple[str, ...]:
        """Where the trained LoRA sits: the method's module, or for DUO the one(s) --lora-on names."""
        return LORA_PLACEMENTS[self.lora_on] if self.method == "duo" else (self.spec.module,)

    @property
    def lora_module(self) -> str:
        return "+".join(self.lora_modules)

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return self.spec.default_lr if self.spec.default_lr is not None else self.coupled_lr

    def validate(self) -> None:
        """Reject bad values and invalid combinations before any model loads."""
        self.check_method_flags()
        self.check_choices()
        for part in method_parts(self.method):
            for ok, message in PART_CHECKS.get(part, lambda c: [])(self):
                if not ok:
                    raise UserError(message)

    def check_method_flags(self) -> None:
        """A flag of another method set away from its default is a mistake, not something to ignore."""
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {list(METHODS)}, got {self.method!r}")
        mine = {f.name for part in method_parts(self.method) for f in fields(part)}
        for f in fields(self):
            if f.name not in mine and getattr(self, f.name) != f.default:
                raise UserError(
                    f"--{_flag(f.name)} applies to --method {' / '.join(owners(f.name))}, not {self.method}; drop it."
                )

    def check_choices(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{_flag(f.name)} must be one of {choices}, got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(resolved_lr=self.resolved_lr, resolved_lam=self.resolved_lam)
        return d


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _run_checks(c: TrainConfig) -> list[tuple[bool, str]]:
    return [(bool(getattr(c, name)), f"--{name} is required") for name in ("model", "data", "out")] + [
        (c.threads is None or c.threads >= 1, "--threads must be ≥ 1"),
    ]


def _loop_checks(c: TrainConfig) -> list[tuple[bool, str]]:
    return [
        (c.steps >= 1, "--steps must be at least 1"),
        (c.rank >= 1 and c.alpha > 0, "--rank must be ≥ 1 and --alpha > 0"),
        (c.batch_size >= 1 and c.grad_accum >= 1, "--batch-size and --grad-accum must be ≥ 1"),
        (c.checkpoint_every >= 1, "--checkpoint-every must be ≥ 1"),
        (c.lr is None or c.lr > 0, "--lr must be positive"),
        (c.grad_clip > 0, "--grad-clip must be positive"),
        (0 <= c.ema_decay < 1, "--ema-decay must be in [0, 1): 0 turns the average off"),
        (not (c.resume and c.overwrite), "--resume and --overwrite exclude each other: pick one"),
        (c.t_min is None or c.t_min >= 0, "--t-min must be ≥ 0"),
        (c.t_min is None or c.t_max is None or c.t_min < c.t_max, "--t-min must be below --t-max"),
        (
            not (c.mixed_precision == "fp16" and c.device == "cpu"),
            "fp16 mixed precision needs a GPU; on CPU use --mixed-precision bf16 or no",
        ),
    ]


def _duo_checks(c: TrainConfig) -> list[tuple[bool, str]]:
    return [
        (c.beta > 0 and math.isfinite(c.beta), f"β must be a positive number, got {c.beta}"),
        (c.lam is None or c.lam >= 0, "--lam must be ≥ 0"),
        (
            c.keep == "noise+retain" or (c.lam_retain is None and c.retain_prompts == "safe" and not c.lam_text_retain),
            "--lam-retain, --lam-text-retain and --retain-prompts only apply with --keep noise+retain",
        ),
        (c.lam_uncond >= 0, "--lam-uncond must be ≥ 0"),
        (c.lam_text_retain >= 0, "--lam-text-retain must be ≥ 0"),
        (
            c.lam_text_retain == 0 or "text_encoder" in c.lora_modules,
            "--lam-text-retain holds the output of a text-encoder LoRA: add --lora-on text-encoder, or drop it",
        ),
        (
            c.lam_uncond == 0 or c.conditioning != "empty",
            "--lam-uncond anchors the c∅ branch that --conditioning empty trains: use concept or mixed, or drop it",
        ),
        *adversary_checks(c),
    ]


PART_CHECKS = {
    RunConfig: _run_checks,
    LoopConfig: _loop_checks,
    DuoConfig: _duo_checks,
    AdvUnlearnConfig: advunlearn_checks,
}

# Settings a resumed run may change: the rest must equal the first run's.
RESUMABLE_CHANGES = ("steps", "resume", "overwrite", "fuse", "checkpoint_every", "tracker", "device")
RESUMABLE_CHANGES += ("allow_pickle", "threads")
