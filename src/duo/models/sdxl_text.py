"""The text side of Stable Diffusion XL: two CLIP encoders (ViT-L, then OpenCLIP bigG with a projection).

Both tokenizers share one BPE vocabulary, so the token API keeps the first tokenizer's ids and layout; only
padding differs (SDXL's tokenizer_2 pads with "!"), and `encode_ids` rewrites it for the second encoder.
Conditioning is what diffusers' `StableDiffusionXLPipeline.encode_prompt` builds (both encoders' penultimate
states side by side, the second's projected pooled output) packed into one tensor (`duo.models.packed`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from duo.models.packed import pack, unpack
from duo.models.sd_text import StableDiffusionText, add_tokens

CLIP_NAMES = ("clip_l", "clip_g")  # textual-inversion keys of SDXL files, in encoder order


class StableDiffusionXLText(StableDiffusionText):
    """Mixin of `StableDiffusionXLFamily`: SD's token API over one id space, both encoders and tables."""

    @property
    def pooled_dim(self) -> int:
        return int(self.pipe.text_encoder_2.config.projection_dim)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(prompts))

    @torch.no_grad()
    def prompt_states(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """The states the UNet's cross-attention reads (both encoders, 2048 wide for SDXL) and each text's last
        word position (the one before the first EOS)."""
        ids = self.tokenize(texts)
        states, _ = unpack(self.encode_ids(ids), self.pooled_dim)
        eos = self.pipe.tokenizer.eos_token_id
        return states.float(), [int((row == eos).nonzero()[0]) - 1 for row in ids.cpu()]

    @property
    def token_embeddings(self) -> tuple[torch.nn.Embedding, ...]:
        return tuple(encoder.get_input_embeddings() for encoder in self.text_encoders)

    def second_encoder_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids` as tokenizer_2 lays them out: everything after the first EOS is its own padding token."""
        first, second = self.pipe.tokenizer, self.pipe.tokenizer_2
        if second.pad_token_id == first.pad_token_id:
            return ids
        is_eos = (ids == first.eos_token_id).long()
        after_eos = (is_eos.cumsum(-1) - is_eos) > 0
        return ids.masked_fill(after_eos, second.pad_token_id)

    def encode_ids(self, ids: torch.Tensor, encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """Packed conditioning (N, L + 1, D_l + D_g); differentiable through both embedding tables."""
        ids = ids.to(self.device)
        # SDXL reads the penultimate layer of both encoders; the pooled vector is the second's projection
        out_l = (encoder or self.pipe.text_encoder)(ids, output_hidden_states=True)
        out_g = self.pipe.text_encoder_2(self.second_encoder_ids(ids), output_hidden_states=True)
        states = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        return pack(states, out_g.text_embeds)

    def add_placeholder_tokens(self, names: list[str]) -> list[int]:
        """Each name gets the same id in both tokenizers, so one id space serves both encoders."""
        pairs = zip((self.pipe.tokenizer, self.pipe.tokenizer_2), self.text_encoders)
        first, second = (add_tokens(tokenizer, encoder, names) for tokenizer, encoder in pairs)
        if first != second:
            raise ValueError(f"the two tokenizers of '{self.ref}' gave {names} different ids: {first} and {second}")
        return first

    # ---- textual inversion -------------------------------------------------------------------------------
    def save_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor) -> None:
        """{"clip_l": (n, D_l), "clip_g": (n, D_g)} safetensors, the SDXL file diffusers users load into each
        encoder with `pipe.load_textual_inversion(state["clip_g"], token=..., text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2)` and the same with "clip_l" for the first; `vectors` holds both side by side."""
        from safetensors.torch import save_file

        parts = vectors.detach().float().cpu().split(self._table_widths(), dim=-1)
        save_file({name: part.contiguous() for name, part in zip(CLIP_NAMES, parts)}, str(path))

    def load_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor | None = None) -> None:
        """`vectors`: (n, D_l + D_g) as an attack learns them; else the file's two tensors."""
        if vectors is None:
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            vectors = torch.cat([tensors[name] for name in CLIP_NAMES], dim=-1)
        names = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]  # diffusers' multi-vector names
        ids = self.add_placeholder_tokens(names)
        with torch.no_grad():
            for table, part in zip(self.token_embeddings, vectors.split(self._table_widths(), dim=-1)):
                table.weight[ids] = part.to(table.weight.device, table.weight.dtype)

    def _table_widths(self) -> list[int]:
        return [table.embedding_dim for table in self.token_embeddings]
