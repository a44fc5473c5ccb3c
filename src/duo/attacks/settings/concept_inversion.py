"""Concept Inversion's knobs and budgets (no torch: `duo attack concept-inversion --help` reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field

NAME = "concept-inversion"


@dataclass
class Settings:
    token: str = field(default="<concept>", metadata={"help": "the new token; prompts carry it instead of the concept"})
    num_vectors: int = field(default=1, metadata={"help": "embedding vectors behind the token"})
    # Not an unsafe word: the token must not start from the very word a word filter would look for.
    init_word: str = field(default="a", metadata={"help": "word whose embedding the token starts from"})
    n_images: int = field(default=25, metadata={"help": "images of the concept to learn from"})
    train_steps: int = field(default=3000, metadata={"help": "optimisation steps (paper: 3000)"})
    train_batch: int = field(default=4, metadata={"help": "images per step (paper: 4)"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate (paper: 5e-3)"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between resumable checkpoints"})
    # White-box means the system as deployed; the published attack met no guard, so this changes nothing there.
    guard_aware: bool = field(
        default=True, metadata={"help": "under the negprompt guard, learn through its guided prediction"}
    )


# Small: 400 steps at 10× the paper's rate (at 5e-3 this step count barely moves the vector) and 3 vectors
# (with one, the token beat the negprompt guard in 16-22/32 Shapes images; with three, 28/32): ~20 s on Shapes.
BUDGETS = {
    "small": {
        "n_images": 16,
        "num_vectors": 3,
        "train_steps": 400,
        "train_batch": 8,
        "lr": 5e-2,
        "checkpoint_every": 100,
    },
    "paper": {},
}
