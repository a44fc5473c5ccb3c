"""Metrics over judged images: defense success rate with its interval, preservation distances."""

from duo.metrics.rates import rate_with_interval
from duo.metrics.similarity import feature_preservation

__all__ = ["rate_with_interval", "feature_preservation"]
