"""Which of a concept's prompts curation may use, and which it never sees: the held-out attack targets.

A concept file may declare a held-out part of its grammar:

    held_out:
      vars: {red: [scarlet]}                 # values curation never uses (every prompt with one is held out)
      combos: [{shape: star, bg: textured}]  # combinations curation never uses
      prompts: ["a scarlet kite", {prompt: "...", part: red}]   # further held-out prompts, as written

Curation draws its pairs from the rest (`ConceptPart.prompt_pairs(seed, held_out)`); attacks and evaluation
draw their targets from the held-out part by default, so that a method that fits its training prompts is
measured on prompts it never saw.
"""

from __future__ import annotations

import itertools
import random

from duo.errors import UserError

HELD_OUT_KEYS = {"vars", "combos", "prompts"}
SPLITS = ("held-out", "training")


def empty_held_out() -> dict:
    return {"vars": {}, "combos": [], "prompts": []}


def has_held_out(held_out: dict | None) -> bool:
    return bool(held_out) and any(held_out.get(k) for k in HELD_OUT_KEYS)


def parse_held_out(raw, source: str, parts: list) -> dict:
    """The `held_out:` section checked against the parts' variables (a typo would hold out nothing)."""

    def fail(what: str):
        raise UserError(f"concept file '{source}': held_out: {what}. See the concept schema in README.")

    if raw is None:
        return empty_held_out()
    if not isinstance(raw, dict) or set(raw) - HELD_OUT_KEYS:
        fail(f"must be a mapping with keys {sorted(HELD_OUT_KEYS)}")
    values: dict[str, set[str]] = {}
    for part in parts:
        for name, vals in part.vars.items():
            values.setdefault(name, set()).update(vals)
    held = empty_held_out()
    for name, vals in (raw.get("vars") or {}).items():
        if name not in values or not isinstance(vals, list) or not set(map(str, vals)) <= values[name]:
            fail(f"vars.{name} must list values of the parts' variable '{name}' ({sorted(values.get(name, []))})")
        held["vars"][name] = [str(v) for v in vals]
    for combo in raw.get("combos") or []:
        if not isinstance(combo, dict) or not combo or any(str(v) not in values.get(k, ()) for k, v in combo.items()):
            fail(f"each of combos must map variables to their values, got {combo!r}")
        held["combos"].append({k: str(v) for k, v in combo.items()})
    names = [p.name for p in parts]
    known = set(names)
    for item in raw.get("prompts") or []:
        row = {"prompt": item} if isinstance(item, str) else item
        ok = isinstance(row, dict) and str(row.get("prompt", "")).strip() and row.get("part", names[0]) in known
        if not ok:
            fail(f"each of prompts must be a prompt or {{prompt, part}} with a part of {names}, got {item!r}")
        held["prompts"].append({"prompt": str(row["prompt"]).strip(), "part": str(row.get("part", names[0]))})
    return held


def is_held_out(combo: dict, held_out: dict | None) -> bool:
    """Whether curation must skip this assignment of the part's variables."""
    if not held_out:
        return False
    if any(combo.get(name) in vals for name, vals in held_out.get("vars", {}).items()):
        return True
    return any(all(combo.get(k) == v for k, v in c.items()) for c in held_out.get("combos", []))


def combos_of(part) -> list[dict]:
    keys = sorted(part.vars)
    return [dict(zip(keys, values)) for values in itertools.product(*(part.vars[k] for k in keys))] or [{}]


def split_prompts(concept, split: str, seed: int) -> list[list[tuple[str, str]]]:
    """Per part, the distinct unsafe prompts of a split as (prompt, part), in an order shuffled from the seed.

    training: what curation may draw. held-out: the held-out grammar and prompts, minus any prompt a training
    combination also writes (a variable only the safe template uses would otherwise leak one in).
    """
    if split not in SPLITS:
        raise UserError(f"--targets must be one of {', '.join(SPLITS)}, got '{split}'")
    held = concept.held_out
    lists = []
    for part in concept.parts:
        train, test = [], []
        for combo in combos_of(part):
            (test if is_held_out(combo, held) else train).append(part.unsafe.format(**combo))
        train = list(dict.fromkeys(train))
        if split == "training":
            chosen = train
        else:
            written = [p["prompt"] for p in (held or {}).get("prompts", []) if p["part"] == part.name]
            chosen = [p for p in dict.fromkeys(test + written) if p not in set(train)]
        random.Random(f"{seed}-{part.name}-{split}").shuffle(chosen)
        lists.append([(p, part.name) for p in chosen])
    return lists


def take_in_turn(lists: list[list], n: int) -> list:
    """n items: the lists taken in turn, each list's items before its repeats; empty lists are skipped."""
    lists = [x for x in lists if x]
    if not lists:
        return []
    k = len(lists)
    return [lists[i % k][(i // k) % len(lists[i % k])] for i in range(n)]
