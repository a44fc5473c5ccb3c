"""Python entry points of training: resolve defaults from the pairs' concept, then run the method's recipe.

    cfg = resolve_config(model=..., data=..., out=..., method="esd-x", steps=500)
    out = train(cfg)   # the LoRA folder

The gradient methods share one recipe (duo.train.loop: setup → train → save); UCE is a closed form with
its own (duo.train.uce). Neither imports the other: this module is where the method picks its recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from duo.data.pairs import require_pairs
from duo.errors import UserError
from duo.train.config import TrainConfig
from duo.train.outputs import LORA_FILE
from duo.train.placement import LORA_PLACEMENTS, targeted_module

__all__ = ["LORA_FILE", "RECIPES", "resolve_config", "train", "train_from_flags"]


def resolve_config(**explicit) -> TrainConfig:
    """Authors' defaults < the concept's `train:` section (read from the pairs folder) < explicit values."""
    early = TrainConfig(**explicit)  # a flag of another method, or a value out of its choices, fails before
    early.check_method_flags()  # anything is read
    early.check_choices()
    data = early.data_folders
    if not data:
        raise UserError("--data is required: the pairs folder written by `duo curate`")
    concept_train = concepts_train_section(data, explicit)
    cfg = config_with_concept_defaults(explicit, concept_train)
    cfg.validate()
    return cfg


def config_with_concept_defaults(explicit: dict, concept_train: dict) -> TrainConfig:
    """Authors' defaults, then the concept file's `train:` section (DUO's settings), then explicit flags."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(concept_train) - known
    if unknown:
        raise UserError(f"the concept's train section has unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    if explicit.get("method", concept_train.get("method", "duo")) != "duo":
        concept_train = {}  # the section tunes DUO; a baseline runs with its own authors' settings
    if explicit.get("recipe") == "authors":
        concept_train = {}
    own = concept_train.get("lora_on", "unet")
    # its targets name layers of the module its placement targets (the UNet for unet and both)
    if targeted_module(LORA_PLACEMENTS[explicit.get("lora_on", own)]) != targeted_module(LORA_PLACEMENTS[own]):
        concept_train = {k: v for k, v in concept_train.items() if k != "targets"}
    if explicit.get("adversarial") == "none":  # the inner attack's knobs go with it
        concept_train = {k: v for k, v in concept_train.items() if not k.startswith("adv")}
    return TrainConfig(**{**concept_train, **explicit})


def concepts_train_section(folders: list[str], explicit: dict) -> dict:
    """The concept file's `train:` section; with several pairs folders, the sections must agree on every key not
    given as a flag (a multi-concept LoRA has one recipe)."""
    sections = [require_pairs(f)["concept"].get("train", {}) or {} for f in folders]
    keys = {k for s in sections for k in s} - set(explicit)
    differ = sorted(k for k in keys if len({repr(s.get(k)) for s in sections}) > 1)
    if differ:
        raise UserError(
            f"the --data folders' concepts set different training defaults for {', '.join(differ)}; pass "
            f"{' '.join('--' + k.replace('_', '-') + ' ...' for k in differ)} to choose one for the joint LoRA."
        )
    return sections[0]


def run_loop(cfg: TrainConfig) -> Path:
    from duo.train import loop  # torch and diffusers load only when something is trained

    state = loop.setup(cfg)
    try:
        loop.train(state)
        return loop.save(state)
    finally:
        loop.cleanup(state)


def run_uce(cfg: TrainConfig) -> Path:
    from duo.train import uce

    return uce.edit(cfg)


RECIPES: dict[str, Callable[[TrainConfig], Path]] = {
    "duo": run_loop,
    "esd-u": run_loop,
    "esd-x": run_loop,
    "advunlearn": run_loop,
    "uce": run_uce,
}


def train(cfg: TrainConfig) -> Path:
    """Train (or, for UCE, compute) the unlearning LoRA of cfg.method into cfg.out; returns that folder."""
    cfg.validate()
    return RECIPES[cfg.method](cfg)


def train_from_flags(explicit: dict) -> Path:
    return train(resolve_config(**explicit))
