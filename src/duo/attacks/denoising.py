"""The loss every white-box prompt attack minimises: the attacked model's denoising error under a prompt.

With the negprompt guard the model samples ε_neg + g·(ε_cond − ε_neg), so a guard-aware attack scores that
guided prediction (the negative branch is fixed: no gradient flows through it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily


def denoising_prediction(
    family: ModelFamily, ids: torch.Tensor, d: dict, negative: torch.Tensor | None = None, guidance=1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, training target) for x_t = add_noise(d["x0"], d["noise"], d["t"]) under prompt ids; with
    `negative` (encoded negative prompt, one row or one per row) the guided prediction at `guidance` (a number,
    or a tensor broadcasting over the rows)."""
    x0, noise, t = d["x0"], d["noise"], d["t"]
    x_t = family.add_noise(x0, noise, t)
    pred = family.denoise(family.unet, x_t, t, family.encode_ids(ids)).float()
    if negative is not None:
        with torch.no_grad():
            neg = family.denoise(family.unet, x_t, t, negative.expand(len(t), -1, -1)).float()
        pred = neg + guidance * (pred - neg)
    return pred, family.training_target(x0, noise, t).float()


def denoising_loss(
    family: ModelFamily, ids: torch.Tensor, d: dict, negative: torch.Tensor | None = None, guidance: float = 1.0
) -> torch.Tensor:
    """MSE between `denoising_prediction`'s prediction and the family's training target."""
    return torch.nn.functional.mse_loss(*denoising_prediction(family, ids, d, negative, guidance))
