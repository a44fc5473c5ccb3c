"""UnlearnDiffAtk's knobs and budgets (no torch: `duo attack unlearndiff --help` reads them).

The defaults are the published attack (OPTML-Group/Diffusion-MU-Attack, text_grad attacker, prefix_k, nudity
config): k = 5 prefix tokens; a distribution over the whole vocabulary per token, optimised with Adam (lr 1e-2,
weight decay 0.1) through a sampled one-hot (straight-through) and projected back onto the simplex after every
step; 40 iterations at each of 50 fixed timesteps 10, 30, …, 990; after each block the argmax prompt is
generated and judged, and the attack stops at the first success; targets on which the original model does not
show the concept are dropped. `schedule random`, `relaxation pez` and `vocabulary whole-words` together are the
weaker attack this package ran before (kept to compare).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from duo.errors import UserError

NAME = "unlearndiff"
CHOICES = {
    "schedule": ("published", "random"),
    "relaxation": ("simplex", "pez"),
    "vocabulary": ("full", "whole-words"),
    "metric": ("cosine", "l2"),
}


@dataclass
class Settings:
    k: int = field(default=5, metadata={"help": "adversarial prefix tokens"})
    schedule: str = field(
        default="published",
        metadata={
            "help": "published: --iterations steps at each of --timesteps fixed timesteps, the prompt judged after "
            "each block, stop at the first success; random: --iterations steps in all at random timesteps, "
            "judged once by the harness (this package's earlier attack)",
            "choices": CHOICES["schedule"],
        },
    )
    timesteps: int = field(
        default=50, metadata={"help": "published schedule: n fixed timesteps T/(2n), T/(2n) + T/n, … (paper: 50)"}
    )
    iterations: int = field(
        default=40, metadata={"help": "optimisation steps per timestep block (published) or in all (random)"}
    )
    relaxation: str = field(
        default="simplex",
        metadata={
            "help": "simplex: a distribution over the vocabulary per token, sampled one-hot with a straight-through "
            "gradient (the authors'); pez: continuous vectors projected to their nearest token (Wen et al.)",
            "choices": CHOICES["relaxation"],
        },
    )
    vocabulary: str = field(
        default="full",
        metadata={
            "help": "full: every token id but special and added ones (the authors': the whole vocabulary); "
            "whole-words: whole-word tokens that survive decoding and re-tokenizing",
            "choices": CHOICES["vocabulary"],
        },
    )
    lr: float = field(default=0.01, metadata={"help": "Adam(W) learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "Adam(W) weight decay"})
    filter_targets: bool = field(
        default=True,
        metadata={"help": "drop targets whose original-model image does not show the concept (the authors' targets)"},
    )
    # The published attack prepends tokens to the I2P prompt as it is, concept words and all.
    exclude_unsafe_words: bool = field(
        default=False, metadata={"help": "never pick the concept's unsafe words as prefix tokens"}
    )
    # White-box means the system as deployed: an attacker who can read the weights can read the guard too.
    # The authors' loss is the conditional prediction (they met no guard); without a guard both are the same.
    guard_aware: bool = field(
        default=True,
        metadata={
            "help": "optimise against the guard: negprompt's guided prediction, wordfilter's filtered prompt "
            "(SLD's guidance is not followed)"
        },
    )
    # Only the pez relaxation uses these (the earlier attack's way of choosing among projected prefixes).
    draws: int = field(default=1, metadata={"help": "pez: (t, noise) draws per step (paper: 1)"})
    eval_draws: int = field(
        default=8, metadata={"help": "pez: fixed (t, noise) draws that score each projected prefix (keeps the best)"}
    )
    init: str = field(default="random", metadata={"help": "pez: 'random' tokens (seeded), or a word for every token"})
    metric: str = field(
        default="cosine", metadata={"help": "pez: nearest-token projection", "choices": CHOICES["metric"]}
    )

    def validate(self) -> None:
        for key in ("k", "iterations", "timesteps", "draws", "eval_draws"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise UserError(f"--{key} must be one of {', '.join(choices)}, got '{getattr(self, key)}'")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")


# Shapes: the same schedule at 10 timesteps (50, 150, …, 950) instead of 50: at most 400 steps and 11 judged
# images per target, seconds on one core.
BUDGETS = {"small": {"timesteps": 10}, "paper": {}}
# The attack as this package ran it before the published schedule (docs/attacks_shapes.md compares both).
EARLIER = {
    "schedule": "random",
    "relaxation": "pez",
    "vocabulary": "whole-words",
    "filter_targets": False,
    "iterations": 200,
    "lr": 0.1,
}
