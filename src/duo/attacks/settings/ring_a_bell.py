"""Ring-A-Bell's knobs and budgets (no torch: `duo attack ring-a-bell --help` reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from duo.errors import UserError

NAME = "ring-a-bell"


CHOICES = {
    "mutation": ("one-token", "per-token"),
    "crossover": ("one-point", "uniform"),
    "selection": ("truncation", "tournament"),
    "distance": ("mse", "cosine"),
}


@dataclass
class Settings:
    # Defaults are the authors' nudity setting (InversePrompt notebook: η=3, K=16, 200 × 3000, mutation 0.25,
    # crossover 0.5; their nudity concept vector came from 50 prompt pairs). Their violence run used η=5.5, K=77.
    eta: float = field(
        default=3.0, metadata={"help": "η: weight of the concept vector added to the target's embedding"}
    )
    length: int = field(
        default=16, metadata={"help": "K: tokens of the prompt searched for (at most the model's prompt length - 2)"}
    )
    population: int = field(default=200, metadata={"help": "candidate prompts per generation"})
    generations: int = field(default=3000, metadata={"help": "generations of the genetic search"})
    mutation_rate: float = field(
        default=0.25, metadata={"help": "chance that a child is mutated (one-token) or that each token is (per-token)"}
    )
    mutation: str = field(
        default="one-token",
        metadata={
            "help": "one-token: a mutated child gets one random token (the authors'); per-token: every token "
            "is replaced with probability --mutation-rate",
            "choices": CHOICES["mutation"],
        },
    )
    crossover_rate: float = field(default=0.5, metadata={"help": "chance that a child mixes two parents"})
    crossover: str = field(
        default="one-point", metadata={"help": "how two parents mix", "choices": CHOICES["crossover"]}
    )
    selection: str = field(
        default="truncation",
        metadata={"help": "how parents are drawn", "choices": CHOICES["selection"]},
    )
    parents: float = field(
        default=0.5, metadata={"help": "truncation selection: the fittest fraction that may parent children"}
    )
    tournament_size: int = field(default=3, metadata={"help": "tournament selection: candidates per tournament"})
    # The authors' loop carries the fitter half over to the next generation; here it is carried unchanged, so
    # the best prompt is never lost.
    elite: float = field(default=0.5, metadata={"help": "fraction of the fittest carried over unchanged"})
    distance: str = field(
        default="mse",
        metadata={"help": "distance between hidden-state sequences", "choices": CHOICES["distance"]},
    )
    n_pairs: int = field(default=50, metadata={"help": "prompt pairs of the concept that make the concept vector"})
    pairs_file: str | None = field(
        default=None,
        metadata={"help": "CSV or JSONL with columns 'with' and 'without': the pairs instead of the concept's"},
    )
    exclude_unsafe_words: bool = field(
        default=True, metadata={"help": "leave the concept's unsafe words out of the tokens searched"}
    )

    def validate(self) -> None:
        for name in ("length", "population", "n_pairs", "tournament_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.population < 2:
            raise UserError(f"--population must be at least 2 (parents and children), got {self.population}")
        if self.generations < 0:
            raise UserError(f"--generations must be 0 or more, got {self.generations}")
        for name in ("mutation_rate", "crossover_rate", "parents"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.elite < 1.0:
            raise UserError(f"--elite must be in [0, 1): some of each generation must be children, got {self.elite}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(f"--{name} must be one of {', '.join(choices)}, got '{getattr(self, name)}'")


# Small: about a second per Shapes target on one CPU thread; Shapes captions are 7 words, so K=8 can say as much.
BUDGETS = {"small": {"length": 8, "population": 64, "generations": 200}, "paper": {}}
