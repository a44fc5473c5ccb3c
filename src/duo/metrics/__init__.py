"""Metrics over judged images: defense success rate with its interval, preservation distances, FID, LPIPS, CLIP."""

from duo.metrics.clip_score import clip_score
from duo.metrics.features import ClipFeatures, get_features
from duo.metrics.fid import fid, frechet_distance
from duo.metrics.lpips import LpipsVgg, get_lpips, load_lpips, lpips_distance
from duo.metrics.rates import rate_with_interval
from duo.metrics.similarity import feature_preservation

__all__ = [
    "rate_with_interval",
    "feature_preservation",
    "frechet_distance",
    "fid",
    "ClipFeatures",
    "get_features",
    "LpipsVgg",
    "load_lpips",
    "get_lpips",
    "lpips_distance",
    "clip_score",
]
