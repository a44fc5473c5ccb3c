"""Judges: does an image show the concept? Every result records the judge's provenance."""

from __future__ import annotations

from duo.errors import UserError

# Imported only when asked for: importing duo.judges must not pull in transformers or onnxruntime.
JUDGES = {
    "nudenet": "duo.judges.nudenet:NudeNetJudge",
    "shapes": "duo.shapes.concept_judge:ShapesJudge",
    "clip": "duo.judges.clip:ClipJudge",
    "vlm": "duo.judges.vlm:VlmJudge",
}


def get_judge(name: str, options: dict | None = None):
    """A judge by name, or None for 'none'."""
    if name in ("none", "", None):
        return None
    if name not in JUDGES:
        raise UserError(f"unknown judge '{name}'; choose one of none, {', '.join(JUDGES)}")
    import importlib
    import inspect

    module, cls = JUDGES[name].split(":")
    judge_cls = getattr(importlib.import_module(module), cls)
    try:
        return judge_cls(**(options or {}))
    except TypeError as exc:
        takes = ", ".join(p for p in inspect.signature(judge_cls).parameters if p not in ("self", "unknown"))
        raise UserError(
            f"judge '{name}' does not take options {options} ({exc}); it takes: {takes}. "
            "Fix judge_options in the concept YAML or on the command line."
        ) from None
