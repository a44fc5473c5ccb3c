"""The targets of an attack: which prompts it starts from, which split they are, and a record that says so.

By default the targets are the concept's held-out prompts (`duo.data.splits`): prompts curation never used,
so a method that fits its training prompts is not measured on them. `--targets training` measures on the
prompts the LoRA was trained on (its pairs, where the lineage names them); a prompt file always wins.
Every results.json says which (`targets.split`), with counts and hashes of the prompt list.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from duo.attacks.base import AttackConfig, Target, target_id
from duo.data.concepts import Concept
from duo.data.splits import has_held_out, split_prompts, take_in_turn
from duo.seeds import derive_seed

log = logging.getLogger(__name__)


def build_targets(cfg: AttackConfig, concept: Concept, seen: set[str] | None = None) -> tuple[list[Target], dict]:
    """(targets, record) for cfg; `seen` is every prompt the LoRAs under attack were trained on, if known."""
    guidance = cfg.guidance if cfg.guidance is not None else concept.guidance
    if cfg.prompts_file:
        from duo.attacks.prompt_set import read_prompt_file

        rows = read_prompt_file(cfg.prompts_file)[: cfg.n_prompts]
        record = {"split": "file", "source": str(cfg.prompts_file), "file_sha256": _file_hash(cfg.prompts_file)}
    else:
        rows, record = _concept_rows(cfg, concept, seen)
    targets = [
        Target(
            id=target_id(i, r["prompt"]),
            prompt=r["prompt"],
            seed=int(r.get("seed", derive_seed(cfg.seed, "target", i))),
            guidance=float(r.get("guidance", guidance)),
            category=r.get("category", ""),
        )
        for i, r in enumerate(rows)
    ]
    distinct = sorted({t.prompt for t in targets})
    record |= {
        "n": len(targets),
        "distinct": len(distinct),
        "prompts_sha256": _hash(distinct),
        "targets_sha256": _hash([[t.prompt, t.seed, t.guidance] for t in targets]),
    }
    if seen is not None:
        record["seen_in_training"] = sum(p in seen for p in distinct)
    return targets, record


def _concept_rows(cfg: AttackConfig, concept: Concept, seen: set[str] | None) -> tuple[list[dict], dict]:
    split, note = cfg.targets, None
    if split == "held-out" and not has_held_out(concept.held_out):
        split = "training"
        note = f"concept '{concept.name}' declares no held_out prompts: the targets are its training prompts"
        log.warning("%s; add a held_out: section to the concept file to measure on prompts never trained on", note)
    lists = split_prompts(concept, split, derive_seed(cfg.seed, "targets"))
    dropped = 0
    if seen is not None:
        if split == "held-out":
            # a LoRA curated from another version of the concept may have seen some: they are not held out
            kept = [[x for x in part if x[0] not in seen] for part in lists]
            dropped = sum(map(len, lists)) - sum(map(len, kept))
            lists = kept
        elif any(x[0] in seen for part in lists for x in part):
            lists = [[x for x in part if x[0] in seen] for part in lists]  # what this LoRA actually trained on
    chosen = take_in_turn(lists, cfg.common("n_prompts"))
    if not chosen:
        from duo.errors import UserError

        raise UserError(
            f"concept '{concept.name}' has no {split} prompts left for targets; "
            "pass --prompts-file or --targets training."
        )
    record = {"split": split, "source": f"concept {concept.name}", "pool": sum(map(len, lists))}
    if dropped:
        record["dropped_seen"] = dropped
    if note:
        record["note"] = note
    return [{"prompt": p, "category": part} for p, part in chosen], record


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
