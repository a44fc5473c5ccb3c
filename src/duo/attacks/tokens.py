"""Trainable token positions for white-box attacks, with every weight of the text encoder left as it is.

Placeholder tokens are added to the tokenizer once (and the embedding table grown to hold their ids); while
`TokenSlots.hooked()` is active, a forward hook on the token embedding swaps their output rows for
`slots.vectors`, so gradients reach those vectors and nothing else. The placeholders stay in the tokenizer
afterwards (reused by the next attack) but no prompt an attack returns contains them.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from duo.errors import UserError

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily

PLACEHOLDER = "<duo-slot-{}>"


class TokenSlots:
    """n placeholder tokens whose embeddings are `self.vectors` (n, dim) while `hooked()` is active."""

    def __init__(self, family: ModelFamily, n: int):
        if n < 1:
            raise UserError(f"at least one trainable token is needed, got {n}")
        self.family = family
        self.names = [PLACEHOLDER.format(i) for i in range(n)]
        self.ids = family.add_placeholder_tokens(self.names)
        self.vectors: torch.Tensor | None = None

    @property
    def text(self) -> str:
        """The placeholders as prompt text, in slot order."""
        return " ".join(self.names)

    @contextmanager
    def hooked(self):
        embedding = embedding_table(self.family)
        lookup = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=embedding.weight.device)
        lookup[torch.tensor(self.ids, device=lookup.device)] = torch.arange(len(self.ids), device=lookup.device)

        def swap_rows(module, args, output):
            slot = lookup[args[0]]
            rows = self.vectors.to(output.device, output.dtype)[slot.clamp(min=0)]
            return torch.where((slot >= 0).unsqueeze(-1), rows, output)

        handle = embedding.register_forward_hook(swap_rows)
        try:
            yield self
        finally:
            handle.remove()


def embedding_table(family: ModelFamily) -> torch.nn.Embedding:
    """The table token vectors are learned in; with several encoders each would need its own vector (not yet)."""
    tables = family.token_embeddings
    if len(tables) != 1:
        raise UserError(
            f"'{family.ref}' has {len(tables)} text encoders; the white-box attacks support models with one so far."
        )
    return tables[0]


def word_vectors(family: ModelFamily, word: str, n: int) -> torch.Tensor:
    """(n, dim) copies of a word's input embedding (the mean of its pieces if it is not one token)."""
    ids = family.text_token_ids(word)
    if not ids:
        raise UserError(f"init word '{word}' gives no tokens; pass a word such as 'a' or 'object'.")
    weight = embedding_table(family).weight.detach()
    return weight[ids].float().mean(0, keepdim=True).repeat(n, 1).clone()


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


def project(
    vectors: torch.Tensor, candidates: torch.Tensor, weight: torch.Tensor, metric: str = "cosine"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest candidate token of each vector: (ids, their embedding rows)."""
    rows = weight.detach()[candidates.to(weight.device)].float()
    v = vectors.detach().float().to(rows.device)
    if metric == "cosine":
        scores = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(rows, dim=-1).T
    elif metric == "l2":
        scores = -torch.cdist(v, rows)
    else:
        raise UserError(f"projection metric must be 'cosine' or 'l2', got '{metric}'")
    ids = candidates.to(rows.device)[scores.argmax(-1)]
    return ids, weight.detach()[ids].float()
