"""Python entry points of training: resolve defaults from the pairs' concept, then train."""

from __future__ import annotations

import json
from pathlib import Path

from duo.data.curate import CONFIG
from duo.errors import UserError
from duo.train.config import TrainConfig, config_with_concept_defaults
from duo.train.loop import train


def resolve_config(**explicit) -> TrainConfig:
    """Authors' defaults < the concept's `train:` section (read from the pairs folder) < explicit values."""
    TrainConfig(**explicit).check_method_flags()  # a flag of another method fails before anything is read
    data = explicit.get("data")
    if not data:
        raise UserError("--data is required: the pairs folder written by `duo curate`")
    config_path = Path(data) / CONFIG
    if not config_path.is_file():
        raise UserError(f"'{data}' is not a pairs folder (no {CONFIG}). Make one with `duo curate`.")
    concept_train = json.loads(config_path.read_text())["settings"]["concept"].get("train", {}) or {}
    cfg = config_with_concept_defaults(explicit, concept_train)
    cfg.validate()
    return cfg


def train_from_flags(explicit: dict) -> Path:
    return train(resolve_config(**explicit))
