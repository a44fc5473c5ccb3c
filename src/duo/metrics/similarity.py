"""Preservation as 1 − a perceptual-style distance between paired images' feature vectors."""

from __future__ import annotations

import torch


def feature_preservation(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 − mean cosine distance of paired non-negative features (ReLU outputs): 1 = same, 0 = unrelated.

    For images of the same prompt and seed from the original and the edited model; the Shapes world
    uses its judge's penultimate features, as LPIPS uses a classifier's.
    """
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    cos = torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)
    return float(cos.clamp(0, 1).mean())
