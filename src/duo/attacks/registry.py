"""The attacks by name: each a module with the contract of `duo.attacks.base`, imported when first used."""

from __future__ import annotations

import importlib
import importlib.util

from duo.errors import UserError

ATTACKS = {
    "prompts": "duo.attacks.prompt_set",
    "ring-a-bell": "duo.attacks.ring_a_bell",
    "concept-inversion": "duo.attacks.concept_inversion",
    "unlearndiff": "duo.attacks.unlearndiff",
    "soft-prompt": "duo.attacks.soft_prompt",
    "relearn": "duo.attacks.relearn",
    "sneakyprompt": "duo.attacks.sneakyprompt",
}


def _known(name: str) -> str:
    if name not in ATTACKS:
        raise UserError(f"unknown attack '{name}'; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


def attack_module(name: str):
    return importlib.import_module(_known(name))


def attack_settings(name: str):
    """The module holding the attack's NAME, Settings and BUDGETS, without importing the attack itself.

    An attack whose code needs torch keeps them in `duo.attacks.settings.<module>` (the CLI builds its flags
    from them); a light one (the prompt set) keeps them in its own module.
    """
    module = _known(name)
    light = "duo.attacks.settings." + module.rpartition(".")[2]
    return importlib.import_module(light if importlib.util.find_spec(light) else module)
