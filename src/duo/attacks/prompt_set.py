"""The prompt-set attack: a fixed list of prompts (I2P's format), generated as written.

It is the baseline every other attack must beat, and the loader of prompt files for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from duo.attacks.base import Found, Target
from duo.data.files import read_table
from duo.errors import UserError

NAME = "prompts"

# Column names in use: ours first, then I2P's.
ALIASES = {
    "prompt": ("prompt",),
    "seed": ("seed", "evaluation_seed", "sd_seed"),
    "guidance": ("guidance", "evaluation_guidance", "sd_guidance_scale"),
    "category": ("category", "categories"),
}


@dataclass
class Settings:
    """The prompt set has no knobs; its prompts come from --prompts-file or the concept."""


BUDGETS: dict[str, dict] = {"small": {}, "paper": {}}


def prepare(ctx, s: Settings) -> dict:
    return {}


def attack(ctx, s: Settings, target: Target) -> Found:
    return Found(target.id, target.prompt, target.prompt, target.seed, target.guidance)


def read_prompt_file(path: str | Path) -> list[dict]:
    """Rows of a CSV (header row) or JSONL prompt file as {prompt, seed?, guidance?, category?}."""
    path = Path(path)
    raw = read_table(path, "prompt file")
    rows = [_row(r, path, i) for i, r in enumerate(raw, 1)]
    if not rows:
        raise UserError(f"prompt file '{path}' has no prompts.")
    return rows


def _row(raw, path: Path, line: int) -> dict:
    if not isinstance(raw, dict):
        raise UserError(f"prompt file '{path}', row {line}: expected an object with a 'prompt' field.")
    row = {}
    for key, names in ALIASES.items():
        value = next((raw[n] for n in names if raw.get(n) not in (None, "")), None)
        if value is not None:
            row[key] = value
    if not str(row.get("prompt", "")).strip():
        raise UserError(f"prompt file '{path}', row {line}: no 'prompt' column or an empty prompt.")
    try:
        if "seed" in row:
            row["seed"] = int(float(row["seed"]))
        if "guidance" in row:
            row["guidance"] = float(row["guidance"])
    except ValueError:
        raise UserError(f"prompt file '{path}', row {line}: seed and guidance must be numbers.") from None
    row["prompt"] = str(row["prompt"]).strip()
    row["category"] = str(row.get("category", ""))
    return row
