"""The attacks by name: each a module with the contract of `duo.attacks.base`, imported when first used."""

from __future__ import annotations

import importlib

from duo.errors import UserError

ATTACKS = {
    "prompts": "duo.attacks.prompt_set",
    "ring-a-bell": "duo.attacks.ring_a_bell",
    "concept-inversion": "duo.attacks.concept_inversion",
    "unlearndiff": "duo.attacks.unlearndiff",
}


def attack_module(name: str):
    if name not in ATTACKS:
        raise UserError(f"unknown attack '{name}'; choose one of {', '.join(ATTACKS)}")
    return importlib.import_module(ATTACKS[name])


# What the CLI needs of an attack (NAME, Settings, BUDGETS) lives apart from its torch code.
SETTINGS = {
    "prompts": "duo.attacks.prompt_set",
    "ring-a-bell": "duo.attacks.settings.ring_a_bell",
    "concept-inversion": "duo.attacks.settings.concept_inversion",
    "unlearndiff": "duo.attacks.settings.unlearndiff",
}


def attack_settings(name: str):
    """The module holding the attack's NAME, Settings and BUDGETS, without importing the attack itself."""
    if name not in SETTINGS:
        raise UserError(f"unknown attack '{name}'; choose one of {', '.join(ATTACKS)}")
    return importlib.import_module(SETTINGS[name])
