"""Rates of judged images with a 95 % Wilson interval (honest at n = 30 and at rates near 0 or 1)."""

from __future__ import annotations

import math


def rate_with_interval(successes: int, n: int, z: float = 1.96) -> dict:
    if n <= 0:
        raise ValueError("a rate needs at least one image")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"rate": p, "n": n, "ci95": [max(0.0, centre - half), min(1.0, centre + half)]}
