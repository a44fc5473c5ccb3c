"""The text side of Stable Diffusion 1.x / 2.x: one CLIP BPE tokenizer and one CLIP text encoder.

The only code that knows CLIP's token conventions (BOS/EOS/padding layout, the `</w>` end-of-word suffix,
diffusers' names for the extra vectors of a multi-vector textual-inversion token).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

WORD_END = "</w>"  # CLIP BPE marks a token that ends a word
# (tokenizer, its path, its size, excluded words, min length) -> ids; scanning SD's 49k tokens takes seconds
_WHOLE_WORDS: dict[tuple, torch.Tensor] = {}


class StableDiffusionText:
    """Mixin of `StableDiffusionFamily`: prompts, token ids, embedding tables and textual inversion."""

    pipe: object
    device: str

    # ---- prompts -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.pipe.text_encoder(self.tokenize(prompts))[0]

    @torch.no_grad()
    def prompt_states(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Text-encoder states (N, L, D) and, per text, the position of its last word token (BOS = 0)."""
        tok = self.pipe.tokenizer
        enc = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        states = self.pipe.text_encoder(enc.input_ids.to(self.device))[0].float()
        return states, [int(m.sum()) - 2 for m in enc.attention_mask]

    # ---- token ids ---------------------------------------------------------------------------------------
    @property
    def max_prompt_tokens(self) -> int:
        """Token positions of a prompt, BOS and EOS included (77 for SD, 16 for Shapes)."""
        return int(self.pipe.tokenizer.model_max_length)

    @property
    def token_embeddings(self) -> tuple[torch.nn.Embedding, ...]:
        return (self.pipe.text_encoder.get_input_embeddings(),)

    def vocabulary(self) -> dict[str, int]:
        return dict(self.pipe.tokenizer.get_vocab())

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        return tok(
            prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def text_token_ids(self, text: str) -> list[int]:
        return list(self.pipe.tokenizer(text, add_special_tokens=False).input_ids)

    def token_count(self, text: str) -> int:
        return len(self.pipe.tokenizer(text).input_ids)

    def decode_ids(self, ids: list[int]) -> str:
        return self.pipe.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode_ids(self, ids: torch.Tensor, encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """Text-encoder hidden states for token ids; differentiable (gradient attacks hook the embedding)."""
        return (encoder or self.pipe.text_encoder)(ids.to(self.device))[0]

    def prompt_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """[BOS] + K tokens + [EOS] + padding, on the CPU: the layout `tokenize` gives a prompt of K words."""
        tok = self.pipe.tokenizer
        n, k = tokens.shape
        ids = torch.full((n, self.max_prompt_tokens), tok.pad_token_id, dtype=torch.long)
        ids[:, 0] = tok.bos_token_id
        ids[:, 1 : k + 1] = tokens
        ids[:, k + 1] = tok.eos_token_id
        return ids

    def add_placeholder_tokens(self, names: list[str]) -> list[int]:
        return add_tokens(self.pipe.tokenizer, self.pipe.text_encoder, names)

    def whole_word_ids(self, exclude: Iterable[str] = (), min_length: int = 1) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        excluded = tuple(sorted({w.lower() for w in exclude}))
        key = (id(tokenizer), tokenizer.name_or_path, len(tokenizer), excluded, min_length)
        if key not in _WHOLE_WORDS:
            _WHOLE_WORDS[key] = _scan_whole_words(tokenizer, set(excluded), min_length)
        return _WHOLE_WORDS[key]

    def regular_token_ids(self) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        return torch.tensor(sorted(set(tokenizer.get_vocab().values()) - special), dtype=torch.long)

    # ---- textual inversion -------------------------------------------------------------------------------
    def save_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor) -> None:
        """{token: (n, dim)} safetensors: loads with `pipe.load_textual_inversion(path, token=token)`."""
        from safetensors.torch import save_file

        save_file({token: vectors.detach().float().cpu().contiguous()}, str(path))

    def load_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor | None = None) -> None:
        """A second load of the same token overwrites its rows, where diffusers' loader refuses."""
        vocab = self.vocabulary()
        if vectors is None:
            from safetensors.torch import load_file

            vectors = next(iter(load_file(str(path)).values()))
        names = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]  # diffusers' multi-vector names
        if not all(n in vocab for n in names):
            with torch.random.fork_rng(devices=[]):  # diffusers draws the new rows from the global RNG
                self.pipe.load_textual_inversion(str(path), token=token)
            return
        weight = self.token_embeddings[0].weight
        with torch.no_grad():
            weight[[vocab[n] for n in names]] = vectors.to(weight.device, weight.dtype)


def add_tokens(tokenizer, encoder, names: list[str]) -> list[int]:
    """Ids of `names` in `tokenizer`, added where missing, with `encoder`'s table grown to hold them."""
    tokenizer.add_tokens([n for n in names if n not in tokenizer.get_vocab()])
    ids = tokenizer.convert_tokens_to_ids(names)
    if max(ids) >= encoder.get_input_embeddings().num_embeddings:
        # New rows are never read (attacks replace them); fork the RNG so their init leaves seeds alone.
        with torch.random.fork_rng(devices=[]):
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # only the grown table is frozen: a LoRA on the encoder (AdvUnlearn) keeps training
        encoder.get_input_embeddings().requires_grad_(False)
    return ids


def _scan_whole_words(tokenizer, excluded: set[str], min_length: int) -> torch.Tensor:
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    words, ids = [], []
    for token, idx in tokenizer.get_vocab().items():
        stem = token[: -len(WORD_END)]
        if token.endswith(WORD_END) and stem.isascii() and stem.isalpha() and len(stem) >= min_length:
            if idx not in special and stem.lower() not in excluded:
                words.append(stem)
                ids.append(idx)
    encoded = tokenizer(words, add_special_tokens=False).input_ids if words else []
    kept = sorted(idx for idx, enc in zip(ids, encoded) if enc == [idx])
    return torch.tensor(kept, dtype=torch.long)
