"""`duo train` settings: every knob of SPEC §3, typed, defaulted to the authors' values, validated early."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from duo.errors import UserError
from duo.objectives import coupled_hparams


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    model: str = _f(None, "diffusers pipeline: hub id, local folder, or 'shapes'")
    data: str = _f(None, "pairs folder written by `duo curate`")
    out: str = _f(None, "output folder for the LoRA, checkpoints and metrics")
    method: str = _f(
        "duo",
        "duo (pairs, preference loss); esd-u / esd-x (ESD's negative guidance on the non-cross-attention / "
        "cross-attention layers); uce (closed-form edit of the cross-attention keys and values, no training)",
        choices=["duo", "esd-u", "esd-x", "uce"],
    )
    part: str | None = _f(None, "train on this concept part only (violence: one LoRA per part)")
    steps: int = _f(1000, "optimizer steps (authors: 1000 nudity, 500 per violence part)")
    beta: float = _f(500.0, "β of L_pref = −log σ(−β(Δ⁺ − Δ⁻)); no ½ factor (DUO β=500 = Diffusion-DPO β=1000)")
    lr: float | None = _f(None, "learning rate (default: base_lr·100/β)")
    lam: float | None = _f(None, "λ, weight of the keep term (default: base_λ·β/100)")
    base_lr: float = _f(3e-4, "base of the lr coupling lr = base_lr·100/β")
    base_lambda: float = _f(1e6, "base of the λ coupling λ = base_λ·β/100")
    t_min: int | None = _f(None, "lowest preference timestep (default 0)")
    t_max: int | None = _f(None, "preference timesteps are drawn in [t_min, t_max) (default: SDEdit strength·T)")
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
        "keep term: noise (x_T at T under c∅, authors) or noise+retain (also safe images "
        "under retained prompts at random t)",
        choices=["noise", "noise+retain"],
    )
    lam_retain: float | None = _f(None, "weight of the retain part of noise+retain (default: λ)")
    retain_prompts: str = _f(
        "safe",
        "prompts of the retain term: each pair's safe prompt, or the concept's neighbours",
        choices=["safe", "neighbours"],
    )
    eta: float = _f(1.0, "ESD: negative guidance η of the target ε(c∅) − η·(ε(c) − ε(c∅))")
    esd_prompts: str = _f(
        "words",
        "ESD: the concept prompts c: each unsafe word alone (authors: the concept's name), or the pairs' unsafe "
        "prompts",
        choices=["words", "unsafe"],
    )
    uce_guide: str = _f("", "UCE: the text the concept's words are mapped to (authors: empty)")
    uce_erase: str = _f(
        "words",
        "UCE: what is mapped: each unsafe word to --uce-guide (authors), or each pair's unsafe prompt "
        "to its safe prompt",
        choices=["words", "prompts"],
    )
    uce_preserve: str = _f(
        "neighbours", "UCE: texts kept in place besides the empty prompt", choices=["neighbours", "none"]
    )
    uce_lambda: float = _f(0.1, "UCE: λ, weight of staying close to the original projection")
    erase_scale: float = _f(1.0, "UCE: weight of the erased texts")
    preserve_scale: float = _f(0.1, "UCE: weight of the preserved texts")
    uce_keys: bool = _f(True, "UCE: edit the key projections as well as the values")
    rank: int = _f(32, "LoRA rank")
    alpha: float = _f(32.0, "LoRA alpha")
    targets: str | None = _f(
        None,
        "LoRA target modules as a regex (default per method: DUO self-attention q/k/v/out, ESD-x cross-attention, "
        "ESD-u every other layer)",
    )
    batch_size: int = _f(4, "pairs per forward pass, per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step; pairs per step = batch_size × grad_accum × processes")
    mixed_precision: str = _f("no", "no, fp16 or bf16 (LoRA weights stay fp32)", choices=["no", "fp16", "bf16"])
    grad_clip: float = _f(1.0, "max gradient norm")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    seed: int = _f(42, "seed of LoRA init and every random draw")
    checkpoint_every: int = _f(250, "steps between checkpoints")
    resume: bool = _f(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = _f(False, "delete what --out holds and start afresh")
    fuse: bool = _f(False, "also write the full pipeline with the LoRA fused into the weights")
    device: str | None = _f(None, "cpu or cuda (default: what accelerate picks)")
    threads: int | None = _f(
        None,
        "CPU threads for torch (default: torch's choice); 1 per process when "
        "several jobs share a small CPU, or they slow each other down several-fold",
    )
    tracker: str | None = _f(None, "accelerate tracker (tensorboard, wandb, ...); none by default")
    allow_pickle: bool = _f(False, "allow loading pickled (.bin/.ckpt) weights")

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.method.startswith("esd"):
            return ESD_LR
        return coupled_hparams(self.beta, self.base_lr, self.base_lambda)[0]

    @property
    def resolved_lam(self) -> float:
        return self.lam if self.lam is not None else coupled_hparams(self.beta, self.base_lr, self.base_lambda)[1]

    @property
    def resolved_lam_retain(self) -> float:
        return self.lam_retain if self.lam_retain is not None else self.resolved_lam

    def validate(self) -> None:
        """Reject bad values and invalid combinations before any model loads."""
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{f.name.replace('_', '-')} must be one of {choices}, got {getattr(self, f.name)!r}")
        checks = [
            (self.beta > 0 and math.isfinite(self.beta), f"β must be a positive number, got {self.beta}"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.rank >= 1 and self.alpha > 0, "--rank must be ≥ 1 and --alpha > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be ≥ 1"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be ≥ 1"),
            (self.threads is None or self.threads >= 1, "--threads must be ≥ 1"),
            (self.lr is None or self.lr > 0, "--lr must be positive"),
            (self.lam is None or self.lam >= 0, "--lam must be ≥ 0"),
            (self.grad_clip > 0, "--grad-clip must be positive"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other: pick one"),
            (
                self.keep == "noise+retain" or (self.lam_retain is None and self.retain_prompts == "safe"),
                "--lam-retain and --retain-prompts only apply with --keep noise+retain",
            ),
            (self.t_min is None or self.t_min >= 0, "--t-min must be ≥ 0"),
            (self.t_min is None or self.t_max is None or self.t_min < self.t_max, "--t-min must be below --t-max"),
            (
                not (self.mixed_precision == "fp16" and self.device == "cpu"),
                "fp16 mixed precision needs a GPU; on CPU use --mixed-precision bf16 or no",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.check_method_flags()

    def check_method_flags(self) -> None:
        """A flag of another method set away from its default is a mistake, not something to ignore."""
        defaults = {f.name: f.default for f in fields(self)}
        for name, methods in METHOD_ONLY.items():
            if self.method not in methods and getattr(self, name) != defaults[name]:
                raise UserError(
                    f"--{name.replace('_', '-')} applies to --method {' / '.join(methods)}, not {self.method}; drop it."
                )

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(resolved_lr=self.resolved_lr, resolved_lam=self.resolved_lam)
        return d


# LoRA lr of ESD here: the authors' 1e-5 is for full fine-tuning; a LoRA needs more (docs/baselines.md).
ESD_LR = 1e-4

_GRADIENT = ("duo", "esd-u", "esd-x")
_UCE_FLAGS = ("uce_guide", "uce_erase", "uce_preserve", "uce_lambda", "erase_scale", "preserve_scale", "uce_keys")
_DUO_FLAGS = (
    "beta", "lam", "base_lr", "base_lambda", "timesteps", "conditioning", "keep", "lam_retain", "retain_prompts",
)  # fmt: skip
_LOOP_FLAGS = (
    "steps", "lr", "t_min", "t_max", "rank", "alpha", "targets", "batch_size", "grad_accum", "mixed_precision",
    "grad_clip", "weight_decay", "checkpoint_every", "resume", "tracker",
)  # fmt: skip
METHOD_ONLY = {
    **{k: ("duo",) for k in _DUO_FLAGS},
    "eta": ("esd-u", "esd-x"),
    "esd_prompts": ("esd-u", "esd-x"),
    **{k: ("uce",) for k in _UCE_FLAGS},
    **{k: _GRADIENT for k in _LOOP_FLAGS},
}

# Settings a resumed run may change: the rest must equal the first run's.
RESUMABLE_CHANGES = {
    "steps",
    "resume",
    "overwrite",
    "fuse",
    "checkpoint_every",
    "tracker",
    "device",
    "allow_pickle",
    "threads",
}


def config_with_concept_defaults(explicit: dict, concept_train: dict) -> TrainConfig:
    """Authors' defaults, then the concept file's `train:` section (DUO's settings), then explicit flags."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(concept_train) - known
    if unknown:
        raise UserError(f"the concept's train section has unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    if explicit.get("method", concept_train.get("method", "duo")) != "duo":
        concept_train = {}  # the section tunes DUO; a baseline runs with its own authors' settings
    return TrainConfig(**{**concept_train, **explicit})
