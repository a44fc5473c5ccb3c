"""Worlds: a miniature text-to-image world shipped with duo, and what measuring inside it means.

A world owns what evaluation, metrics and comparisons would otherwise special-case: the judge its concepts
name, its own LPIPS-style distance network and FID feature network (spec: the world's name, or
`name:<weights>`), the neutral prompts of a concept, an extra alignment metric, and its tuned methods.
Worlds are registered by "module:attr" and imported only when asked for, so that this module (and
duo.metrics, which resolves network specs through it) never pulls a world's code, or torch, in on import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

WORLDS = {"shapes": "duo.shapes.world:SHAPES"}


@dataclass(frozen=True)
class World:
    """One registered world. Networks and metrics are callables so that building them stays lazy."""

    name: str  # its registry key, and the spec of its networks for get_lpips / get_features
    model_ref: str  # the model reference that means this world's shipped pipeline
    judge: str  # the duo.judges name its concepts use
    lpips: Callable  # (weights: str | None) -> distance network: net(a, b) -> [N], net.provenance()
    features: Callable  # (weights: str | None) -> feature network: .features(images) -> [N, D], .provenance()
    neutral_prompts: Callable  # (concept, n) -> at most n prompts that unlearning must leave alone
    alignment: Callable | None = None  # (images, prompts) -> dict of scores; None: the world has none
    alignment_definition: str = ""
    methods: tuple[dict, ...] = ()  # duo.compare.Method fields of the comparison tuned for this world

    def claims(self, model_ref: str, concept) -> bool:
        """Measurements follow the world when either the model or the concept's judge is the world's."""
        return model_ref == self.model_ref or getattr(concept, "judge", None) == self.judge


_LOADED: dict[str, World] = {}


def world_named(name: str) -> World | None:
    """The registered world of that name (imported on first use), or None."""
    if name not in WORLDS:
        return None
    if name not in _LOADED:
        module, attr = WORLDS[name].split(":")
        world = getattr(importlib.import_module(module), attr)
        if not isinstance(world, World):
            raise TypeError(f"world '{name}' is registered as {WORLDS[name]}, which is not a duo.worlds.World.")
        _LOADED[name] = world
    return _LOADED[name]


def world_for(model_ref: str, concept) -> World | None:
    """The world a (model, concept) pair is measured in, or None for real checkpoints and their concepts."""
    for name in WORLDS:
        world = world_named(name)
        if world is not None and world.claims(model_ref, concept):
            return world
    return None
