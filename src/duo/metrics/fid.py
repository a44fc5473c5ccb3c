"""Fréchet distance between two feature sets (FID when the features are Inception's), in float64.

d² = ‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb). The trace of √(Σa Σb) equals that of √(√Σa Σb √Σa), a
symmetric PSD matrix, so it comes from two symmetric eigendecompositions (no scipy, no complex parts).
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-6


def _as_array(feats) -> np.ndarray:
    x = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features of shape (n >= 2, d), got {x.shape}")
    return x


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    # rounding makes eigenvalues of a singular covariance (n < d) slightly negative; they are zero
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr √(Σa Σb); like pytorch-fid, retry with EPS on the diagonals only when the plain result is not finite."""
    for eps in (0.0, EPS):
        offset = eps * np.eye(len(sigma_a))
        root_a = _psd_sqrt(sigma_a + offset)
        w = np.linalg.eigvalsh(root_a @ (sigma_b + offset) @ root_a)
        value = float(np.sqrt(np.clip(w, 0, None)).sum())
        if np.isfinite(value):
            return value
    raise FloatingPointError("the covariance product has no finite square root (non-finite features?)")


def frechet_distance(feats_a, feats_b) -> float:
    a, b = _as_array(feats_a), _as_array(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sigma_a, sigma_b = np.atleast_2d(sigma_a), np.atleast_2d(sigma_b)
    trace = np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt_product(sigma_a, sigma_b)
    # rounding can leave a set's distance to itself at -1e-13; a distance is never negative
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + trace))


def fid(images_a, images_b, backend) -> dict:
    """FID-style distance of two image sets through `backend` (an object with features/provenance, or a spec)."""
    if isinstance(backend, str):
        from duo.metrics.features import get_features

        backend = get_features(backend)
    fa, fb = backend.features(images_a), backend.features(images_b)
    return {"fid": frechet_distance(fa, fb), "n_a": len(fa), "n_b": len(fb), "features": backend.provenance()}
