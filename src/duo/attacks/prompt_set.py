"""The prompt-set attack: a fixed list of prompts (I2P's format), generated as written.

It is the baseline every other attack must beat, and the loader of prompt files for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from duo.attacks.base import Found, Target
from duo.data.files import read_table
from duo.data.text import check_prompt
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
    if not raw:
        raise UserError(
            f"prompt file '{path}' has no prompts; add rows (CSV with a header row naming a 'prompt' column, "
            'as I2P\'s, or JSONL with one {"prompt": ...} object a line).'
        )
    _require_prompt_column(raw, path)
    return [_row(r, path, i) for i, r in enumerate(raw, 1)]


def _require_prompt_column(raw: list, path: Path) -> None:
    """A CSV without a prompt column fails once, naming the columns it has (not once per row)."""
    first = raw[0]
    if isinstance(first, dict) and not any(n in first for n in ALIASES["prompt"]):
        raise UserError(
            f"prompt file '{path}' has no 'prompt' column (its columns: {', '.join(map(str, first)) or 'none'}); "
            "rename the column holding the prompts to 'prompt' (optional: seed or evaluation_seed, guidance or "
            "evaluation_guidance, category or categories)."
        )


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
        raise UserError(
            f"prompt file '{path}', row {line}: seed and guidance must be numbers; fix or delete that row."
        ) from None
    row["prompt"] = check_prompt(str(row["prompt"]).strip(), f"prompt file '{path}', row {line}")
    row["category"] = str(row.get("category", ""))
    return row
