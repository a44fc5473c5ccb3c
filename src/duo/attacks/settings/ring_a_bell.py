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
    "vocabulary": ("full", "whole-words"),
}


@dataclass
class Settings:
    # Defaults are the authors' nudity setting (InversePrompt notebook: η=3, K=16, 200 × 3000, mutation 0.25,
    # crossover 0.5, any token id, nothing banned; their concept vectors came from tens to hundreds of diverse
    # with/without prompt pairs). Their violence run used η=5.5, K=77.
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
    # The authors' loop keeps the fitter half and then mutates it in place along with the children, so the best
    # prompt can be lost; here the elite is carried unchanged and only children (copies or crossovers) mutate.
    elite: float = field(default=0.5, metadata={"help": "fraction of the fittest carried over unchanged"})
    distance: str = field(
        default="mse",
        metadata={"help": "distance between hidden-state sequences", "choices": CHOICES["distance"]},
    )
    # The concept vector's pairs, first found wins: --pairs-file; the preset's shipped file
    # (duo/concepts/ring_a_bell/<concept>.csv: nudity, violence, ~60 diverse pairs each, like the authors' 50-200);
    # else n_pairs pairs of the concept's own grammar (Shapes).
    n_pairs: int = field(
        default=50,
        metadata={"help": "pairs drawn from the concept's grammar when neither --pairs-file nor a shipped file exists"},
    )
    pairs_file: str | None = field(
        default=None,
        metadata={"help": "CSV or JSONL with columns 'with' and 'without': the pairs instead of the shipped/concept's"},
    )
    # The authors draw from every token id (their mutation picks any id but BOS/EOS) and ban nothing: their
    # prompts may spell the concept out, and sub-word pieces may merge when the decoded text is tokenized again
    # (each found prompt records whether it does, and the distance its text really reaches).
    vocabulary: str = field(
        default="full",
        metadata={
            "help": "full: every non-special token, sub-word pieces included (the authors'); whole-words: whole "
            "alphabetic words that survive decode and tokenize unchanged (the text sent is what was searched)",
            "choices": CHOICES["vocabulary"],
        },
    )
    exclude_unsafe_words: bool = field(
        default=False,
        metadata={
            "help": "leave out of the searched tokens every word of the concept's unsafe phrases, any case (not "
            "the authors'; stricter: the prompt found never names a banned word as a single token)"
        },
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


# Small: a few seconds per Shapes target on one CPU thread; Shapes captions are 7 words, so K=8 can say as much.
# Whole words at small: measured on Shapes (16 targets x 2 images, seeds 0-2), a 64 x 200 search gets closer to
# its goal among Shapes' 560 whole words than among its 990 tokens (MSE 2.32 vs 2.75, no exclusion), its text is
# what it searched, and it is as strong or stronger against no guard and the negative prompt (ASR 0.99 vs 0.93,
# 0.88 vs 0.38; with --exclude-unsafe-words 0.83 vs 0.65, 0.00 vs 0.00). Only against the word filter without
# the exclusion do the full vocabulary's sub-word spellings slip past more often (0.47 vs 0.09).
BUDGETS = {"small": {"length": 8, "population": 64, "generations": 200, "vocabulary": "whole-words"}, "paper": {}}
