"""UnlearnDiffAtk's knobs and budgets (no torch: `duo attack unlearndiff --help` reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field

NAME = "unlearndiff"


@dataclass
class Settings:
    # k, iterations, lr and weight decay are UnlearnDiffAtk's nudity settings (text_grad attacker, prefix_k).
    k: int = field(default=5, metadata={"help": "adversarial prefix tokens"})
    iterations: int = field(default=40, metadata={"help": "optimisation steps per target"})
    lr: float = field(default=0.01, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    draws: int = field(default=1, metadata={"help": "(t, noise) draws per step (paper: 1)"})
    eval_draws: int = field(
        default=8, metadata={"help": "fixed (t, noise) draws that score each projected prefix (keeps the best)"}
    )
    init: str = field(default="random", metadata={"help": "'random' real words (seeded), or a word for every token"})
    metric: str = field(default="cosine", metadata={"help": "nearest-token projection", "choices": ("cosine", "l2")})
    # The published attack prepends tokens to the I2P prompt as it is, concept words and all.
    exclude_unsafe_words: bool = field(
        default=False, metadata={"help": "never project onto the concept's unsafe words (a word filter catches them)"}
    )
    # White-box means the system as deployed: an attacker who can read the weights can read the guard too.
    guard_aware: bool = field(
        default=True,
        metadata={
            "help": "optimise against the guard: negprompt's guided prediction, wordfilter's filtered prompt "
            "(SLD's guidance is not followed)"
        },
    )


# Shapes: the published setting takes ~1 s per target on one core and barely moves the prefix off its random
# start; 5× the steps at 10× the rate lowers the loss about twice as much (~5 s per target).
BUDGETS = {"small": {"iterations": 200, "lr": 0.1}, "paper": {}}
