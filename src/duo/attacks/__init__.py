"""Red-teaming attacks: each finds prompts (or a token) that should bring an erased concept back.

`run_attack(config, **settings)` runs one attack end to end; see `duo.attacks.base` for the module contract.
"""

from __future__ import annotations

from duo.attacks.base import AttackConfig
from duo.attacks.registry import ATTACKS, attack_module

__all__ = ["ATTACKS", "AttackConfig", "attack_module", "run_attack"]


def run_attack(name: str, config, **settings) -> dict:
    from duo.attacks.harness import run_attack as run

    return run(name, config, settings)
