"""Trainable token positions for white-box attacks, with every weight of the text encoder left as it is.

Placeholder tokens are added to the tokenizer once (and the embedding table grown to hold their ids); while
`TokenSlots.hooked()` is active, a forward hook on the token embedding swaps their output rows for
`slots.vectors`, so gradients reach those vectors and nothing else. The placeholders stay in the tokenizer
afterwards (reused by the next attack) but no prompt an attack returns contains them.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from duo.errors import UserError

PLACEHOLDER = "<duo-slot-{}>"
WORD_END = "</w>"  # CLIP BPE marks a token that ends a word
_REAL_WORDS: dict[tuple, torch.Tensor] = {}  # (tokenizer, size, excluded) -> ids; the SD scan takes seconds


class TokenSlots:
    """n placeholder tokens whose embeddings are `self.vectors` (n, dim) while `hooked()` is active."""

    def __init__(self, family, n: int):
        if n < 1:
            raise UserError(f"at least one trainable token is needed, got {n}")
        self.family = family
        self.names = [PLACEHOLDER.format(i) for i in range(n)]
        self.ids = _ensure_placeholders(family, self.names)
        self.vectors: torch.Tensor | None = None

    @property
    def text(self) -> str:
        """The placeholders as prompt text, in slot order."""
        return " ".join(self.names)

    @contextmanager
    def hooked(self):
        embedding = self.family.token_embedding
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


def _ensure_placeholders(family, names: list[str]) -> list[int]:
    tokenizer = family.pipe.tokenizer
    tokenizer.add_tokens([n for n in names if n not in tokenizer.get_vocab()])
    ids = tokenizer.convert_tokens_to_ids(names)
    if max(ids) >= family.token_embedding.num_embeddings:
        encoder = family.pipe.text_encoder
        # New rows are never read (the hook replaces them); fork the RNG so their init leaves seeds alone.
        with torch.random.fork_rng(devices=[]):
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        encoder.requires_grad_(False)
    return ids


def token_count(family, text: str) -> int:
    """Positions `text` takes in a prompt, BOS and EOS included, before any truncation."""
    return len(family.pipe.tokenizer(text).input_ids)


def word_vectors(family, word: str, n: int) -> torch.Tensor:
    """(n, dim) copies of a word's input embedding (the mean of its pieces if it is not one token)."""
    ids = family.pipe.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"init word '{word}' gives no tokens; pass a word such as 'a' or 'object'.")
    weight = family.token_embedding.weight.detach()
    return weight[ids].float().mean(0, keepdim=True).repeat(n, 1).clone()


def random_word_ids(candidates: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    return candidates[torch.randint(len(candidates), (n,), generator=generator)]


def real_word_ids(family, exclude_words: tuple[str, ...] = ()) -> torch.Tensor:
    """Ids of whole-word alphabetic tokens that tokenize back to themselves, minus the excluded words.

    The round trip matters: a projected prefix is returned as text, and only these ids survive being
    decoded and tokenized again, so the prompt generated with is the one that was optimised.
    """
    tokenizer = family.pipe.tokenizer
    excluded = tuple(sorted({w.lower() for phrase in exclude_words for w in re.findall(r"[A-Za-z]+", phrase)}))
    key = (id(tokenizer), tokenizer.name_or_path, len(tokenizer), excluded)
    if key not in _REAL_WORDS:
        _REAL_WORDS[key] = _scan_real_words(tokenizer, set(excluded))
    if len(_REAL_WORDS[key]) == 0:
        raise UserError("the tokenizer has no whole-word tokens to project onto; is it a CLIP BPE tokenizer?")
    return _REAL_WORDS[key]


def _scan_real_words(tokenizer, excluded: set[str]) -> torch.Tensor:
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    words, ids = [], []
    for token, idx in tokenizer.get_vocab().items():
        stem = token[: -len(WORD_END)]
        if token.endswith(WORD_END) and stem.isascii() and stem.isalpha() and idx not in special:
            if stem.lower() not in excluded:
                words.append(stem)
                ids.append(idx)
    encoded = tokenizer(words, add_special_tokens=False).input_ids if words else []
    kept = sorted(idx for idx, enc in zip(ids, encoded) if enc == [idx])
    return torch.tensor(kept, dtype=torch.long)


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
