"""What the demo measures in the Shapes world: red rate on red prompts, and what happens to other colours."""

from __future__ import annotations

from duo.metrics import feature_preservation
from duo.shapes.judge import classify, features
from duo.shapes.render import COLOURS, SHAPES, colour_prompts, parse_prompt


def concept_prompts(colour: str, n: int) -> list[str]:
    """Direct prompts: the colour under all its synonyms, shapes and backgrounds."""
    return colour_prompts(colour, n, seed=4321)


def other_prompts(colour: str | None, n: int, shape: str | None = None) -> list[str]:
    """What must not change: prompts for every colour but `colour` (the same number each), of every shape but
    `shape`. A shape concept's neutral prompts must not ask for the shape, or its erasure counts as damage."""
    others = [c for c in COLOURS if c != colour]
    shapes = [s for s in SHAPES if s != shape]
    per = max(1, n // len(others))
    return [p for i, c in enumerate(others) for p in colour_prompts(c, per, seed=99 + i, shapes=shapes)]


def attribute_accuracy(images, prompts: list[str]) -> dict:
    preds = classify(images)
    asked = [parse_prompt(p) for p in prompts]
    n = len(prompts)
    return {
        "colour_accuracy": sum(p["colour"] == a["colour"] for p, a in zip(preds, asked)) / n,
        "shape_accuracy": sum(p["shape"] == a["shape"] for p, a in zip(preds, asked)) / n,
    }


def preservation(original, edited) -> float:
    """1 − cosine distance of judge features: the PP of the recipe study (scripts/shapes_study.py and its tables
    in docs/shapes_world.md), kept so those stay reproducible. Not the demo's or a comparison's PP, which is
    `duo evaluate`'s 1 − LPIPS-style distance."""
    return feature_preservation(features(original), features(edited))
