"""The loss every white-box prompt attack minimises: the attacked model's denoising error under a prompt.

With the negprompt guard the model samples ε_neg + g·(ε_cond − ε_neg), so a guard-aware attack scores that
guided prediction (the negative branch is fixed: no gradient flows through it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily


def denoising_loss(
    family: ModelFamily, ids: torch.Tensor, d: dict, negative: torch.Tensor | None = None, guidance: float = 1.0
) -> torch.Tensor:
    """MSE between the prediction for x_t = add_noise(d["x0"], d["noise"], d["t"]) under prompt ids and the
    family's training target; with `negative` (encoded negative prompt) the guided prediction at `guidance`."""
    x0, noise, t = d["x0"], d["noise"], d["t"]
    x_t = family.add_noise(x0, noise, t)
    pred = family.denoise(family.unet, x_t, t, family.encode_ids(ids)).float()
    if negative is not None:
        with torch.no_grad():
            neg = family.denoise(family.unet, x_t, t, negative.expand(len(t), -1, -1)).float()
        pred = neg + guidance * (pred - neg)
    return torch.nn.functional.mse_loss(pred, family.training_target(x0, noise, t).float())
