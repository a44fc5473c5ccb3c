"""What `duo train --adversarial` accepts: the inner attacks and the checks on their knobs (before anything loads).

The knobs themselves are DUO's settings (`duo.train.config.DuoConfig`, the `adv_*` fields); how each inner attack
places its vectors: `duo.train.adversary`.
"""

from __future__ import annotations

from dataclasses import fields

ADVERSARIES = ("none", "concept-inversion", "soft-prompt", "unlearndiff")


def adversary_checks(c) -> list[tuple[bool, str]]:
    """(ok, message) pairs over a TrainConfig `c`; `adv_*` values away from their defaults need an adversary."""
    adv = [f for f in fields(c) if f.name.startswith("adv_")]  # adv_init's choices: checked by validate
    changed = [f"--{f.name.replace('_', '-')}" for f in adv if getattr(c, f.name) != f.default]
    kinds = c.adversary_kinds
    return [
        (
            c.adversarial == "none" or (set(kinds) <= set(ADVERSARIES[1:]) and len(set(kinds)) == len(kinds)),
            f"--adversarial must be none or one or more of {list(ADVERSARIES[1:])} joined with '+', each once; "
            f"got {c.adversarial!r}",
        ),
        (c.adversarial != "none" or not changed, f"{', '.join(changed)} only apply with --adversarial; drop them"),
        (min(c.adv_every, c.adv_steps, c.adv_vectors, c.adv_batch) >= 1, "--adv-every/-steps/-vectors/-batch: ≥ 1"),
        (c.adv_lr > 0, "--adv-lr must be positive"),
        (c.adv_weight > 0, "--adv-weight must be positive"),
    ]
