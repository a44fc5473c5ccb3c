"""Soft-prompt attack's knobs and budgets (no torch: `duo attack soft-prompt --help` reads them).

No paper publishes this attack, so `paper` is our chosen full setting (k = 5, 1000 Adam steps at lr 1e-2, the
rate of UnlearnDiffAtk), not a published one; `small` is CPU-sized for Shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from duo.errors import UserError

NAME = "soft-prompt"
IMAGE_CHOICES = ("concept", "target", "both")


@dataclass
class Settings:
    # 5 = UnlearnDiffAtk's prefix length: the same positions without the projection, so its search space holds
    # every prefix UnlearnDiffAtk can find (and it fits Shapes' 16-position prompts, which 8 would not).
    k: int = field(default=5, metadata={"help": "trainable input vectors placed before the prompt"})
    train_prompt: bool = field(
        default=False,
        metadata={"help": "also train the prompt's own token positions (initialised from their embeddings)"},
    )
    # not `images`: that flag is the run's (AttackConfig.images: where concept images come from)
    learn_from: str = field(
        default="target",
        metadata={
            "help": "images the denoising loss is on: concept (the run's judge-filtered concept images), target "
            "(the original model's image of the target, as UnlearnDiffAtk), or both (half the draws each)",
            "choices": IMAGE_CHOICES,
        },
    )
    n_images: int = field(default=16, metadata={"help": "concept images to learn from (learn_from concept or both)"})
    # not `steps`: that flag is the run's sampling steps
    iterations: int = field(default=1000, metadata={"help": "Adam steps per target"})
    batch: int = field(default=4, metadata={"help": "(image, timestep, noise) draws per step"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate"})
    init: str = field(
        default="a", metadata={"help": "word whose embedding every prefix vector starts from, or 'random' real words"}
    )
    eval_draws: int = field(
        default=16, metadata={"help": "fixed draws that score the vectors (the lowest-loss vectors are kept)"}
    )
    eval_every: int = field(default=25, metadata={"help": "steps between scorings on the fixed draws"})
    # UnlearnDiffAtk's protocol: the prompt is judged after each block and the attack stops at the first success.
    stop_on_success: bool = field(
        default=True,
        metadata={
            "help": "after each scoring, generate the target seed's image under the guard and judge it; stop at the "
            "first success and keep those vectors (else keep the lowest-loss ones)"
        },
    )
    check_seeds: int = field(
        default=1,
        metadata={
            "help": "with --stop-on-success, seeds the harness never generates with that must show the concept too "
            "(0: the target seed alone, as UnlearnDiffAtk)"
        },
    )
    # White-box means the system as deployed: an attacker who can read the weights can read the guard too.
    guard_aware: bool = field(
        default=True,
        metadata={
            "help": "optimise against the guard: negprompt's guided prediction, wordfilter's filtered prompt "
            "(SLD's guidance is not followed)"
        },
    )

    def validate(self) -> None:
        if self.k < (0 if self.train_prompt else 1):
            raise UserError(f"--k must be at least {0 if self.train_prompt else 1}, got {self.k}")
        for key in ("n_images", "iterations", "batch", "eval_draws", "eval_every"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.check_seeds < 0:
            raise UserError(f"--check-seeds must be 0 or more, got {self.check_seeds}")
        if self.learn_from not in IMAGE_CHOICES:
            raise UserError(f"--learn-from must be one of {', '.join(IMAGE_CHOICES)}, got '{self.learn_from}'")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not self.init.strip():
            raise UserError("--init must be a word (such as 'a') or 'random'")


# Small: 100 steps at 5× the rate; on Shapes at one thread most targets stop at the first judging (25 steps),
# ~7 s per target on a shared CPU; ASR (16 targets × 2 images) none 1.00, negprompt 0.94, wordfilter 1.00.
BUDGETS = {"small": {"iterations": 100, "lr": 5e-2}, "paper": {}}
