"""Lineage: the model and concept a stage works on, read from the folders it builds on.

A LoRA made by `duo train` names its pairs folder in its run.json, and the pairs folder names the model
and the concept it was curated for. So `duo attack NAME --lora runs/x/lora` needs neither --model nor
--concept; when they are given and contradict the LoRA's lineage, that is an error unless the key is listed
in `--override` (recorded in the stage's run.json), because a number measured on another concept than
the one the LoRA learned answers another question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from duo.data.concepts import Concept, load_concept
from duo.data.curate import NOTES_FIELDS
from duo.data.pairs import pairs_concept, pairs_settings
from duo.errors import UserError
from duo.runs import read_run

OVERRIDABLE = ("model", "concept")


@dataclass
class Lineage:
    """What a LoRA folder says about where it came from (empty for a LoRA made elsewhere)."""

    lora: str
    model: str | None = None
    pairs: str | None = None
    method: dict = field(default_factory=dict)
    more_pairs: tuple[str, ...] = ()  # the other pairs folders of a multi-concept LoRA (`duo train --data A B`)

    @property
    def concept(self) -> Concept | None:
        return pairs_concept(self.pairs) if self.pairs else None

    @property
    def concepts(self) -> list[Concept]:
        """Every concept the LoRA was trained to erase."""
        return [pairs_concept(p) for p in self.all_pairs]

    @property
    def all_pairs(self) -> list[str]:
        return [self.pairs, *self.more_pairs] if self.pairs else []


def lora_lineage(folder: str | Path) -> Lineage:
    """The training run of a LoRA folder: its run.json, or the config.json of folders from before run.json."""
    folder = Path(folder)
    run = read_run(folder)
    if run is not None and run.get("kind") == "train":
        parents = run.get("parents", {})
        config, data = run["config"], parents.get("data", {}).get("path")
        more = tuple(parents[k]["path"] for k in sorted(parents, key=_data_order) if k != "data" and _is_data(k))
    elif (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        data, more = config.get("data"), ()
    else:
        return Lineage(str(folder))
    pairs = data if data and pairs_settings(data) is not None else None
    method = {"name": config.get("method", "duo"), "beta": config.get("beta"), "steps": config.get("steps")}
    more = tuple(p for p in more if pairs_settings(p) is not None) if pairs else ()
    return Lineage(str(folder), config.get("model"), pairs, method, more)


def _is_data(role: str) -> bool:
    return role.startswith("data") and role[4:].isdigit()


def _data_order(role: str) -> int:
    return int(role[4:] or 0) if _is_data(role) else -1


def seen_prompts(folders: list[str]) -> set[str] | None:
    """Every prompt (unsafe and safe) of the pairs the LoRAs were trained on; None if none has a lineage."""
    from duo.data.curate import MANIFEST
    from duo.data.files import read_jsonl

    pairs = [p for x in map(lora_lineage, folders) for p in x.all_pairs]
    if not pairs:
        return None
    records = [r for folder in pairs for r in read_jsonl(Path(folder) / MANIFEST)]
    return {r[side]["prompt"] for r in records for side in ("unsafe", "safe")}


def lora_parents(specs: list[str] | None) -> dict[str, str]:
    """The LoRAs of `DIR[:W]` specs as parents of a run folder: lora0, lora1, ... in order."""
    from duo.models.lora_spec import lora_dirs

    return {f"lora{i}": d for i, d in enumerate(lora_dirs(specs))}


@dataclass
class Inputs:
    """The resolved model and concept of a stage, where each came from, and the overrides used."""

    model: str
    concept: Concept | None
    origin: dict
    overrides: list[str]


def resolve_inputs(
    model: str | None,
    concept: str | None,
    lora_dirs: list[str],
    overrides: list[str] | None = None,
    need_concept: bool = True,
) -> Inputs:
    """Model and concept from the flags, checked against (or, when left out, read from) the LoRAs' lineage."""
    overrides = sorted(set(overrides or []))
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise UserError(f"--override takes {', '.join(OVERRIDABLE)}; got {', '.join(sorted(unknown))}.")
    lineages = [lora_lineage(d) for d in lora_dirs]
    parent_model = _agreed([x.model for x in lineages if x.model], "model")
    parent_pairs = [x for x in lineages if x.pairs]
    parent_concepts = [c for x in parent_pairs for c in x.concepts]
    parent_concept = _agreed_concept(parent_concepts)
    origin = {}
    resolved_model = _pick("model", model, parent_model, same_model, overrides, origin, lineages)
    resolved_concept = _pick(
        "concept", load_concept(concept) if concept else None, parent_concept, same_concept, overrides, origin, lineages
    )
    if concept and parent_concept is None and parent_concepts and "concept" not in overrides:
        _check_among(resolved_concept, parent_concepts, lineages)
    if resolved_model is None:
        raise UserError("--model is required: no --lora made by `duo train` names the model it was trained on.")
    if resolved_concept is None and need_concept and parent_concepts:
        names = ", ".join(dict.fromkeys(c.name for c in parent_concepts))
        raise UserError(f"--concept is required: the LoRAs learned several concepts ({names}); pass the one to test.")
    if resolved_concept is None and need_concept:
        raise UserError(
            "--concept is required: no --lora made by `duo train` (from `duo curate` pairs) names its concept. "
            "Pass a preset name (nudity, shapes-red, ...) or a concept YAML file."
        )
    return Inputs(resolved_model, resolved_concept, origin, overrides)


def _pick(key, flag, parent, same, overrides: list[str], origin: dict, lineages: list[Lineage]):
    if flag is None:
        origin[key] = "lineage" if parent is not None else "none"
        return parent
    origin[key] = "flag"
    if parent is not None and not same(flag, parent):
        if key not in overrides:
            shown = parent.name if isinstance(parent, Concept) else parent
            given = flag.name if isinstance(flag, Concept) else flag
            raise UserError(
                f"--{key} {given} contradicts the LoRA ({lineages[0].lora}), which was trained on {key} {shown}. "
                f"Drop --{key} (it is read from the LoRA's lineage), or pass --override {key} if you mean to "
                "measure it on another one (recorded in run.json)."
            )
        origin[key] = "override"
    return flag


def _check_among(concept: Concept, learned: list[Concept], lineages: list[Lineage]) -> None:
    """LoRAs of several concepts (combined, or one multi-concept LoRA): --concept must be one of them."""
    if not any(same_concept(concept, c) for c in learned):
        names = ", ".join(dict.fromkeys(c.name for c in learned))
        raise UserError(
            f"--concept {concept.name} is none of the concepts the LoRAs ({', '.join(x.lora for x in lineages)}) "
            f"learned ({names}). Pass one of them, or --override concept to measure another (recorded in run.json)."
        )


def _agreed(values: list, key: str):
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else None


def _agreed_concept(concepts: list[Concept]) -> Concept | None:
    if not concepts or any(not same_concept(c, concepts[0]) for c in concepts[1:]):
        return None  # LoRAs of different concepts combined: the stage must be told which one it measures
    return concepts[0]


def same_concept(a: Concept, b: Concept) -> bool:
    """Same prompts, parts, judge and sampling: the notes (description, words, neighbours) may differ."""

    def core(c: Concept) -> dict:
        return {k: v for k, v in c.to_dict().items() if k not in NOTES_FIELDS}

    return core(a) == core(b)


def same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
