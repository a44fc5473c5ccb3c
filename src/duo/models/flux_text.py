"""The text side of FLUX.1: CLIP-L for the pooled vector, T5-XXL for the sequence the transformer attends to.

Conditioning is built as diffusers' `FluxPipeline.encode_prompt` builds it: T5's last states of the prompt
padded to `t5_tokens` are the sequence, CLIP-L's pooled output is the pooled vector. It travels packed
(`duo.models.packed`): one (N, t5_tokens + 1, T5 width) tensor, CLIP's 768 values zero-padded in the last row.

Token ids are CLIP-L's (the token API searches and learns in CLIP's vocabulary and table). T5 has a vocabulary
of its own, so `encode_ids` decodes the ids to text and T5 reads that (SD3's way). **A learned token vector
therefore reaches the pooled vector only**: the sequence, FLUX's main conditioning, sees a placeholder's name
as plain text. Learning rows of T5's table as well would need one id space for both tokenizers, which they
do not share.
"""

from __future__ import annotations

from pathlib import Path

import torch

from duo.models.packed import pack
from duo.models.sd3_text import StableDiffusion3Text
from duo.models.sd_text import StableDiffusionText, add_tokens

DEV_T5_TOKENS, SCHNELL_T5_TOKENS = 512, 256  # the sequence lengths black-forest-labs trained dev and schnell at


class FluxText(StableDiffusion3Text):
    """Mixin of `FluxFamily`: SD3's T5 handling and CLIP token API with one CLIP (no second table)."""

    pipe: object
    device: str

    @property
    def _clips(self) -> tuple[torch.nn.Module, ...]:
        return (self.pipe.text_encoder,)

    @property
    def _t5(self) -> tuple:
        return self.pipe.text_encoder_2, self.pipe.tokenizer_2

    @property
    def t5_tokens(self) -> int:
        """512 for dev, 256 for schnell (the variant without guidance embedding), as their model cards say."""
        return DEV_T5_TOKENS if self.pipe.transformer.config.guidance_embeds else SCHNELL_T5_TOKENS

    def _encode(self, ids: torch.Tensor, texts: list[str], encoder=None) -> torch.Tensor:
        pooled = (encoder or self.pipe.text_encoder)(ids).pooler_output
        return pack(self._t5_states(texts), pooled)

    @torch.no_grad()
    def prompt_states(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """T5's states, what the context embedder reads, and per text the position of its last piece: T5 has no
        BOS and closes a text with EOS, so that is two before the padding starts (0 for an empty text)."""
        tok = self._t5[1]
        enc = tok(list(texts), padding="max_length", max_length=self.t5_tokens, truncation=True, return_tensors="pt")
        return self._t5_states(list(texts)).float(), [max(0, int(m.sum()) - 2) for m in enc.attention_mask]

    def add_placeholder_tokens(self, names: list[str]) -> list[int]:
        """Added to CLIP's tokenizer and table only: T5 reads the names as text."""
        return add_tokens(self.pipe.tokenizer, self.pipe.text_encoder, names)

    # ---- textual inversion -------------------------------------------------------------------------------
    def save_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor) -> None:
        """{token: (n, 768)}: what `FluxPipeline.load_textual_inversion(path, token=token)` loads into CLIP-L."""
        StableDiffusionText.save_textual_inversion(self, path, token, vectors)

    def load_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor | None = None) -> None:
        if vectors is None:
            from safetensors.torch import load_file

            vectors = next(iter(load_file(str(path)).values()))
        super().load_textual_inversion(path, token, vectors)
