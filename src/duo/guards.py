"""Inference-time guards: defences that change what is asked of a model, not its weights.

A guard turns the prompts a user (or an attacker) sends into (prompts, negative prompts) for the model.
`negprompt` is the simplest defence of the field: the concept's unsafe words as negative prompt.
`wordfilter` is the blocklist every hosted service starts with: unsafe words are deleted from the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from duo.errors import UserError

GUARDS = ("none", "negprompt", "wordfilter")


@dataclass(frozen=True)
class Guard:
    name: str
    words: tuple[str, ...] = ()

    def apply(self, prompts: list[str]) -> tuple[list[str], list[str] | None]:
        if self.name == "negprompt":
            return list(prompts), [" ".join(self.words)] * len(prompts)
        if self.name == "wordfilter":
            return [self._strip(p) for p in prompts], None
        return list(prompts), None

    def _strip(self, prompt: str) -> str:
        pattern = r"\b(" + "|".join(re.escape(w) for w in self.words) + r")\b"
        return re.sub(r"\s+", " ", re.sub(pattern, " ", prompt, flags=re.IGNORECASE)).strip()

    def provenance(self) -> dict:
        return {"name": self.name, "words": list(self.words)}


def make_guard(name: str | None, unsafe_words: list[str]) -> Guard:
    """The guard `name` built from a concept's unsafe words."""
    name = name or "none"
    if name not in GUARDS:
        raise UserError(f"unknown guard '{name}'; choose one of {', '.join(GUARDS)}")
    if name != "none" and not unsafe_words:
        raise UserError(f"guard '{name}' needs the concept's unsafe_words; add them to the concept file.")
    return Guard(name, tuple(unsafe_words) if name != "none" else ())
