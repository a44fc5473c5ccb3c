"""Trainable token positions on any model family: the white-box attacks and adversarial training use them.

Placeholder tokens are added to the tokenizer once (and the embedding table grown to hold their ids); while
`TokenSlots.hooked()` is active, a forward hook on the token embedding swaps their output rows for
`slots.vectors`, so gradients reach those vectors and nothing else. The placeholders stay in the tokenizer
afterwards (reused by the next user) but no prompt an attack returns contains them.

A family with several text encoders (one id space, one table each) is handled the same way in a wider space:
a token vector is its rows of every table side by side (`token_weight`), so an attack learns one vector per
table, and each table's hook reads its own slice of the features.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from duo.errors import UserError

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily

PLACEHOLDER = "<duo-slot-{}>"


class TokenSlots:
    """n placeholder tokens whose embeddings are `self.vectors` while `hooked()` is active: (n, Σ table widths)
    for every prompt row alike, or (rows, n, Σ widths), one set per row of the batch being encoded."""

    def __init__(self, family: ModelFamily, n: int, first: int = 0):
        """`first`: the first placeholder's number; slots hooked at the same time need disjoint placeholders."""
        if n < 1:
            raise UserError(f"at least one trainable token is needed, got {n}")
        self.family = family
        self.names = [PLACEHOLDER.format(first + i) for i in range(n)]
        self.ids = family.add_placeholder_tokens(self.names)
        self.vectors: torch.Tensor | None = None

    @property
    def text(self) -> str:
        """The placeholders as prompt text, in slot order."""
        return " ".join(self.names)

    @contextmanager
    def hooked(self):
        handles, start = [], 0
        try:
            for embedding in self.family.token_embeddings:
                handles.append(embedding.register_forward_hook(self._swap_rows(embedding, start)))
                start += embedding.embedding_dim
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _swap_rows(self, embedding: torch.nn.Embedding, start: int):
        """The hook of one table: slot rows become features [start, start + width) of `self.vectors`."""
        lookup = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=embedding.weight.device)
        lookup[torch.tensor(self.ids, device=lookup.device)] = torch.arange(len(self.ids), device=lookup.device)
        end = start + embedding.embedding_dim

        def swap_rows(module, args, output):
            slot = lookup[args[0]]
            vectors = self.vectors[..., start:end].to(output.device, output.dtype)
            if vectors.dim() == 2:
                rows = vectors[slot.clamp(min=0)]
            else:  # one set of vectors per prompt row (several searches in one batch)
                rows = vectors[torch.arange(len(slot), device=slot.device).unsqueeze(-1), slot.clamp(min=0)]
            return torch.where((slot >= 0).unsqueeze(-1), rows, output)

        return swap_rows


def token_weight(family: ModelFamily) -> torch.Tensor:
    """(vocabulary, Σ widths): every table's rows side by side, the space token vectors are learned in; with one
    text encoder, its table's weight itself."""
    tables = family.token_embeddings
    if len(tables) == 1:
        return tables[0].weight
    if len({t.num_embeddings for t in tables}) != 1:
        raise ValueError(f"the token tables of '{family.ref}' differ in size: they do not share one id space")
    return torch.cat([t.weight for t in tables], dim=-1)


def word_vectors(family: ModelFamily, word: str, n: int) -> torch.Tensor:
    """(n, dim) copies of a word's input embedding (the mean of its pieces if it is not one token)."""
    ids = family.text_token_ids(word)
    if not ids:
        raise UserError(f"init word '{word}' gives no tokens; pass a word such as 'a' or 'object'.")
    weight = token_weight(family).detach()
    return weight[ids].float().mean(0, keepdim=True).repeat(n, 1).clone()


def random_vocabulary_vectors(family: ModelFamily, n: int, generator: torch.Generator, ids=None) -> torch.Tensor:
    """(n, dim) input embeddings of n tokens drawn uniformly from `ids` (default: the regular vocabulary)."""
    ids = family.regular_token_ids() if ids is None else ids
    weight = token_weight(family).detach()
    pick = ids[torch.randint(len(ids), (n,), generator=generator)]
    return weight[pick.to(weight.device)].float().clone()


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
