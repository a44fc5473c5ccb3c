"""SneakyPrompt's knobs and budgets (no torch: `duo attack sneakyprompt --help` reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from duo.errors import UserError

NAME = "sneakyprompt"

CHOICES = {
    "vocabulary": ("subword", "words"),
    "no_sensitive_word": ("salient", "skip"),
}


@dataclass
class Settings:
    # Defaults are the authors' README command (Yuchen413/text2image_safety: --method rl --reward_mode clip
    # --len_subword 10 --q_limit 60) and the agent main.py builds (actor-critic, lr 0.1, 1000 steps, 3 pieces).
    max_queries: int = field(
        default=60, metadata={"help": "queries of the system under attack per target, the plain prompt included"}
    )
    max_steps: int = field(
        default=1000,
        metadata={"help": "policy updates per target (a prompt asked before is answered from memory, not queried)"},
    )
    num_subword: int = field(default=3, metadata={"help": "vocabulary pieces that make one replacement"})
    len_subword: int = field(
        default=10, metadata={"help": "pieces have fewer letters than this (the authors' --len_subword)"}
    )
    vocabulary: str = field(
        default="subword",
        metadata={
            "help": "subword: any token of the vocabulary, letters only, pieces glued into one new word (the "
            "authors' default); words: whole-word tokens joined by spaces (their English-words option)",
            "choices": CHOICES["vocabulary"],
        },
    )
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate of the policy"})
    hidden: int = field(default=30, metadata={"help": "width of the policy's token embeddings and LSTM"})
    max_perturb_rate: float = field(
        default=0.3,
        metadata={
            "help": "stop after 4 samples when more than this share of the prompt's words is replaced (the "
            "authors' early stop; 1 turns it off)"
        },
    )
    # The authors stop when the last three rewards lie on a line within 1e-4 ("network not update"); with a judge
    # score that saturates at 0 any three failures do, so here the policy must repeat itself instead.
    converge_repeats: int = field(
        default=3,
        metadata={"help": "stop when the policy samples the same prompt this many times in a row (0 turns it off)"},
    )
    no_sensitive_word: str = field(
        default="salient",
        metadata={
            "help": "a target without the concept's words: replace its most concept-laden word (the authors ask "
            "a text classifier; here the text encoder) or skip it (only the plain prompt is queried)",
            "choices": CHOICES["no_sensitive_word"],
        },
    )

    def validate(self) -> None:
        for name in ("max_queries", "max_steps", "num_subword", "hidden"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.len_subword < 2:
            raise UserError(f"--len-subword must be at least 2 (pieces of one letter or more), got {self.len_subword}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.max_perturb_rate <= 0 or self.converge_repeats < 0:
            raise UserError("--max-perturb-rate must be positive and --converge-repeats 0 or more")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got '{getattr(self, name)}'"
                )


# Small: a third of the published queries (a Shapes query is one 20-step 32 px image, ~0.3 s on one thread).
BUDGETS = {"small": {"max_queries": 20, "max_steps": 200}, "paper": {}}
