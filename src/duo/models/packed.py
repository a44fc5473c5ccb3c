"""Conditioning of families with a pooled text embedding (SDXL, SD3, FLUX), carried as one tensor.

Everything above the adapter treats a prompt's conditioning as one (N, L, D) tensor: it is cached, indexed by
pair, concatenated, expanded over a batch and passed back to `denoise` or `text2image(prompt_embeds=...)`.
Families whose denoiser also takes a pooled vector keep that contract by appending one row: positions 0..L-1
are the sequence states, row L holds the pooled embedding, zero-padded to D. Only the adapter packs and unpacks.
"""

from __future__ import annotations

import torch


def pack(states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(N, L, D) states and (N, P) pooled, P ≤ D, as one (N, L + 1, D) tensor (differentiable in both)."""
    n, _, d = states.shape
    if pooled.shape[0] != n or pooled.shape[-1] > d:
        raise ValueError(f"pooled {tuple(pooled.shape)} does not fit states {tuple(states.shape)}")
    row = torch.nn.functional.pad(pooled.to(states.dtype), (0, d - pooled.shape[-1]))
    return torch.cat([states, row[:, None, :]], dim=1)


def unpack(emb: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (states, pooled) that `pack` joined; `pooled_dim` is the family's pooled width."""
    return emb[:, :-1], emb[:, -1, :pooled_dim]
