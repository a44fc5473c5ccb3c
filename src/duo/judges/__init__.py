"""Judges: does an image show the concept? Every result records the judge's provenance."""

from __future__ import annotations

from duo.errors import UserError

JUDGES = {"nudenet": "duo.judges.nudenet:NudeNetJudge", "shapes": "duo.judges.shapes:ShapesJudge"}


def get_judge(name: str, options: dict | None = None):
    """A judge by name, or None for 'none'."""
    if name in ("none", "", None):
        return None
    if name not in JUDGES:
        raise UserError(f"unknown judge '{name}'; choose one of none, {', '.join(JUDGES)}")
    import importlib

    module, cls = JUDGES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)(**(options or {}))
    except TypeError as exc:
        raise UserError(f"judge '{name}' does not take options {options}: {exc}") from None
