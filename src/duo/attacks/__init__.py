"""Red-teaming attacks: each finds prompts (or a token) that should bring an erased concept back.

`run_attack(config, **settings)` runs one attack end to end; see `duo.attacks.base` for the module contract.
"""

from __future__ import annotations

import importlib

from duo.attacks.base import AttackConfig
from duo.errors import UserError

__all__ = ["ATTACKS", "AttackConfig", "attack_module", "run_attack"]

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


def run_attack(name: str, config, **settings) -> dict:
    from duo.attacks.harness import run_attack as run

    return run(name, config, settings)
