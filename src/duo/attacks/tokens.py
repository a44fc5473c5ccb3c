"""Token vocabularies and projections of the white-box attacks; the trainable slots live in duo.models.token_slots.

Every weight of the text encoder is left as it is: only the slots' vectors (or a prefix's distribution) move.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from duo.errors import UserError

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily


def random_word_ids(candidates: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    return candidates[torch.randint(len(candidates), (n,), generator=generator)]


def real_word_ids(family: ModelFamily, exclude_words: tuple[str, ...] = ()) -> torch.Tensor:
    """Ids of whole-word alphabetic tokens that tokenize back to themselves, minus the excluded words.

    The round trip matters: a projected prefix is returned as text, and only these ids survive being
    decoded and tokenized again, so the prompt generated with is the one that was optimised.
    """
    # every alphabetic run of a phrase ("exposed breasts", "n-word"): the prefix could otherwise spell it out
    excluded = {w.lower() for phrase in exclude_words for w in re.findall(r"[A-Za-z]+", phrase)}
    ids = family.whole_word_ids(excluded)
    if len(ids) == 0:
        raise UserError(f"the vocabulary of '{family.ref}' has no whole-word tokens to project onto.")
    return ids


def full_vocabulary_ids(family: ModelFamily, banned: set[str] = frozenset()) -> torch.Tensor:
    """Every non-special token id (the published attacks' search space), less those that decode to a banned
    word (any case, surrounding spaces ignored)."""
    ids = family.regular_token_ids()
    if not banned:
        return ids
    words = {w.lower() for w in banned}
    keep = [i for i in ids.tolist() if family.decode_ids([i]).strip().lower() not in words]
    return torch.tensor(keep, dtype=torch.long)
