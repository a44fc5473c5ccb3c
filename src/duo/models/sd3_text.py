"""The text side of Stable Diffusion 3: CLIP-L and CLIP-G (one BPE vocabulary) plus an optional T5.

Conditioning is built as diffusers' `StableDiffusion3Pipeline.encode_prompt` builds it: both CLIPs'
penultimate states concatenated on features and zero-padded to the joint attention width, T5's states (zeros
when the folder has no T5) appended on the sequence axis; pooled = both CLIPs' projected pooled outputs. It
travels packed (`duo.models.packed`): one (N, 77 + T5 length + 1, joint width) tensor.

Token ids are CLIP-L's (CLIP-G shares the vocabulary, only its padding token differs). T5 has a vocabulary of
its own, so `encode_ids` decodes the ids to text and tokenizes that for T5: a learned token vector acts on
the CLIP encoders only, and T5 reads its placeholder name as plain text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from duo.models.packed import pack
from duo.models.sd_text import StableDiffusionText

T5_TOKENS = 256  # diffusers' default max_sequence_length: generation from prompts uses it too
T5_CACHE = 64  # texts whose T5 states are kept (each 256 × 4096 values for SD3)


class StableDiffusion3Text(StableDiffusionText):
    """Mixin of `StableDiffusion3Family`; the CLIP-L token API (vocabulary, tokenize, ...) is inherited."""

    pipe: object
    device: str

    @property
    def _clips(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return (self.pipe.text_encoder, self.pipe.text_encoder_2)

    t5_tokens = T5_TOKENS

    @property
    def _t5(self) -> tuple:
        """T5 and its tokenizer; (None, None) for a folder saved without T5."""
        return self.pipe.text_encoder_3, self.pipe.tokenizer_3

    @property
    def pooled_dim(self) -> int:
        return int(self.pipe.transformer.config.pooled_projection_dim)

    # ---- prompts -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self._encode(self.tokenize(prompts), self.expand_tokens(prompts))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return super().tokenize(self.expand_tokens(prompts))

    def expand_tokens(self, prompts: list[str]) -> list[str]:
        """A multi-vector learned token written once stands for all its vectors (diffusers' TI convention;
        SD3's pipeline has no textual-inversion loader to do it)."""
        out = list(prompts)
        for token, names in getattr(self, "_multi_vector", {}).items():
            out = [p.replace(token, " ".join(names)) for p in out]
        return out

    def encode_ids(self, ids: torch.Tensor, encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """Packed conditioning of CLIP-L ids; differentiable through both CLIP embedding tables."""
        ids = ids.to(self.device)
        t5_reads = self._t5[0] is not None  # without T5 the text only sets how many zero rows
        return self._encode(ids, [self.decode_ids(row.tolist()) if t5_reads else "" for row in ids], encoder)

    def _encode(self, ids: torch.Tensor, texts: list[str], encoder=None) -> torch.Tensor:
        states, pooled = [], []
        for clip, clip_ids in zip((encoder or self._clips[0], self._clips[1]), (ids, self._second_clip_ids(ids))):
            out = clip(clip_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # SD3 reads the penultimate layer, as SDXL does
            pooled.append(out.text_embeds)
        t5 = self._t5_states(texts)
        clip_states = torch.cat(states, dim=-1)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
        return pack(torch.cat([clip_states, t5.to(clip_states.dtype)], dim=1), torch.cat(pooled, dim=-1))

    def _second_clip_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """CLIP-L's layout re-padded for CLIP-G: same ids up to the first EOS, CLIP-G's padding after it."""
        eos, pad = self.pipe.tokenizer.eos_token_id, self.pipe.tokenizer_2.pad_token_id
        position = torch.arange(ids.shape[1], device=ids.device)
        first_eos = torch.where(ids == eos, position, ids.shape[1]).min(dim=1, keepdim=True).values
        return torch.where(position > first_eos, torch.full_like(ids, pad), ids)

    def _t5_states(self, texts: list[str]) -> torch.Tensor:
        (t5, tok), width = self._t5, self.pipe.transformer.config.joint_attention_dim
        if t5 is None:  # diffusers feeds zeros in T5's place: the sequence keeps its length
            return torch.zeros(len(texts), self.t5_tokens, width, device=self.device, dtype=self._clips[0].dtype)
        # T5 never trains (no LoRA loader reaches it), so its states of a text can be kept: attacks re-encode
        # the same prompts every step, and a T5-XXL forward costs more than both CLIPs'.
        cache = self.__dict__.setdefault("_t5_cache", {})
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            enc = tok(missing, padding="max_length", max_length=self.t5_tokens, truncation=True, return_tensors="pt")
            with torch.no_grad():
                states = t5(enc.input_ids.to(self.device))[0]
            if len(cache) + len(missing) > T5_CACHE:
                cache.clear()
            cache.update(zip(missing, states))
        return torch.stack([cache[t] for t in texts])

    @torch.no_grad()
    def prompt_states(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """The unpacked sequence states (what the transformer's context embedder reads) and, per text, the
        position of its last word token (BOS = 0; the CLIP part comes first)."""
        tok = self.pipe.tokenizer
        enc = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        states = self._encode(enc.input_ids.to(self.device), list(texts))[:, :-1].float()
        return states, [int(m.sum()) - 2 for m in enc.attention_mask]

    # ---- tokens ------------------------------------------------------------------------------------------
    @property
    def token_embeddings(self) -> tuple[torch.nn.Embedding, ...]:
        return tuple(clip.get_input_embeddings() for clip in self._clips)

    def add_placeholder_tokens(self, names: list[str]) -> list[int]:
        """Added to both CLIP tokenizers, which share a vocabulary, so each name gets one id in both."""
        ids = []
        for tokenizer in (self.pipe.tokenizer, self.pipe.tokenizer_2):
            tokenizer.add_tokens([n for n in names if n not in tokenizer.get_vocab()])
            ids.append(tokenizer.convert_tokens_to_ids(names))
        if ids[0] != ids[1]:
            raise ValueError(f"the CLIP tokenizers of '{self.ref}' gave {names} different ids: {ids}")
        for clip in self._clips:
            if max(ids[0]) >= clip.get_input_embeddings().num_embeddings:
                with torch.random.fork_rng(devices=[]):  # new rows are overwritten before use: keep seeds
                    clip.resize_token_embeddings(len(self.pipe.tokenizer), mean_resizing=False)
                clip.get_input_embeddings().requires_grad_(False)
        return ids[0]

    # ---- textual inversion -------------------------------------------------------------------------------
    def save_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor) -> None:
        """{"clip_l": (n, d_L), "clip_g": (n, d_G)} safetensors, the two-CLIP layout of SDXL/SD3 embeddings;
        `vectors` holds both tables' rows side by side."""
        from safetensors.torch import save_file

        parts = self._split_vectors(vectors)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in zip(("clip_l", "clip_g"), parts)}, str(path))

    def load_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor | None = None) -> None:
        """`token` (and `token_1`, … for several vectors) added to both tokenizers, rows set in both tables."""
        if vectors is None:
            from safetensors.torch import load_file

            saved = load_file(str(path))
            vectors = torch.cat([saved["clip_l"], saved["clip_g"]], dim=-1)
        parts = self._split_vectors(vectors)
        names = [token] + [f"{token}_{i}" for i in range(1, len(parts[0]))]
        ids = self.add_placeholder_tokens(names)
        if len(names) > 1:
            self._multi_vector = {**getattr(self, "_multi_vector", {}), token: names}
        with torch.no_grad():
            for table, rows in zip(self.token_embeddings, parts):
                table.weight[ids] = rows.to(table.weight.device, table.weight.dtype)

    def _split_vectors(self, vectors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(n, d_L + d_G), the two tables' rows side by side as attacks learn them, into one part per table."""
        return tuple(vectors.split([t.embedding_dim for t in self.token_embeddings], dim=-1))
