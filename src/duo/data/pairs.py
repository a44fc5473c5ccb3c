"""The pairs written by `duo curate`, joined by id from the manifest (never by file order)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from duo.data.concepts import Concept, concept_from_dict, merge_concepts, words_pattern
from duo.data.curate import CONFIG, MANIFEST
from duo.data.files import inside, load_image, read_jsonl, sha256_file
from duo.errors import UserError
from duo.runs import RUN_FILE, read_run

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    folder: Path
    records: list[dict]
    concept: Concept
    unsafe_images: list[Image.Image]
    safe_images: list[Image.Image]
    data_hash: str
    # sizes of the consecutive blocks of pairs from each pairs folder (one block unless several were joined):
    # training draws the blocks in turn, so each concept gets the same share of steps whatever its pair count
    groups: tuple[int, ...] = ()
    sources: tuple[Path, ...] = ()

    def __post_init__(self):
        self.groups = self.groups or (len(self.records),)
        self.sources = self.sources or (Path(self.folder),)

    @property
    def unsafe_prompts(self) -> list[str]:
        return [r["unsafe"]["prompt"] for r in self.records]

    @property
    def safe_prompts(self) -> list[str]:
        return [r["safe"]["prompt"] for r in self.records]

    @property
    def strength(self) -> float:
        return max(r["safe"]["strength"] for r in self.records)

    @property
    def resolution(self) -> int:
        return int(self.records[0]["resolution"])

    def __len__(self) -> int:
        return len(self.records)


def pairs_settings(folder: str | Path) -> dict | None:
    """The settings a `duo curate` folder was made with (run.json, or a legacy curate.json), or None if it is
    not a pairs folder: the one test of "is this a pairs folder" every stage uses."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return None
    run = read_run(folder)
    if run is not None:
        if run.get("kind") != "curate":
            return None
        config = dict(run["config"])
        config["concept"] = {**config.get("concept", {}), **config.pop("concept_notes", {})}
        return config
    legacy = folder / CONFIG
    return json.loads(legacy.read_text())["settings"] if legacy.is_file() else None


def require_pairs(folder: str | Path) -> dict:
    settings = pairs_settings(folder)
    if settings is None:
        raise UserError(f"'{folder}' is not a pairs folder (no {MANIFEST} and run.json). Make one with `duo curate`.")
    return settings


def pairs_concept(folder: str | Path) -> Concept:
    """The concept the pairs were curated for, as it was then (not as the preset reads today)."""
    return concept_from_dict(_concept_fields(require_pairs(folder)["concept"]), str(Path(folder) / RUN_FILE))


def load_pair_sets(folders: str | Path | list, part: str | None = None) -> PairSet:
    """The pairs of one folder, or of several joined for one multi-concept LoRA (`duo train --data A B`).

    Joined, the sets keep their order as blocks (`groups`); the concept is `merge_concepts` of theirs and the
    data hash is over the sets' hashes in order. Every folder must be at the same resolution."""
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    sets = [load_pairs(f, part) for f in folders]
    if len(sets) == 1:
        return sets[0]
    sets = [_safe_for_others(s, [o.concept for o in sets if o is not s]) for s in sets]
    if len({s.resolution for s in sets}) != 1:
        sizes = ", ".join(f"{s.folder}: {s.resolution} px" for s in sets)
        raise UserError(f"--data folders differ in resolution ({sizes}); curate them at one resolution.")
    if len({s.data_hash for s in sets}) != len(sets):
        raise UserError("--data names the same pairs twice; give each pairs folder once.")
    return PairSet(
        sets[0].folder,
        [r for s in sets for r in s.records],
        merge_concepts([s.concept for s in sets]),
        [im for s in sets for im in s.unsafe_images],
        [im for s in sets for im in s.safe_images],
        hashlib.sha256("".join(s.data_hash for s in sets).encode()).hexdigest(),
        groups=tuple(len(s) for s in sets),
        sources=tuple(s.folder for s in sets),
    )


def _safe_for_others(pairs: PairSet, others: list[Concept]) -> PairSet:
    """The pairs whose safe prompt names none of the other concepts' unsafe words.

    shapes-circle's edit keeps the colour, so its "a red circle → a red square" pair prefers (and its retain term
    keeps) a red square: trained beside shapes-red, it teaches red back. Such pairs are dropped, not relabelled."""
    pattern = words_pattern([w for c in others for w in c.unsafe_words])
    keep = [i for i, r in enumerate(pairs.records) if pattern is None or not pattern.search(r["safe"]["prompt"])]
    if not keep:
        names = ", ".join(c.name for c in others)
        raise UserError(f"every pair of '{pairs.folder}' shows {names} on its safe side; curate pairs without it.")
    if len(keep) < len(pairs):
        log.info("%s: %d of %d pairs kept (the rest show another concept)", pairs.folder, len(keep), len(pairs))
    pick = lambda items: [items[i] for i in keep]  # noqa: E731
    subset = hashlib.sha256((pairs.data_hash + json.dumps([r["id"] for r in pick(pairs.records)])).encode())
    return PairSet(pairs.folder, pick(pairs.records), pairs.concept, pick(pairs.unsafe_images),
                   pick(pairs.safe_images), subset.hexdigest())  # fmt: skip


def load_pairs(folder: str | Path, part: str | None = None) -> PairSet:
    folder = Path(folder)
    manifest = folder / MANIFEST
    concept = pairs_concept(folder)
    _require_complete(manifest)
    records = sorted(read_jsonl(manifest), key=lambda r: r["id"])
    if part is not None:
        concept.part(part)  # fails clearly on an unknown part
        records = [r for r in records if r["part"] == part]
    if not records:
        raise UserError(f"'{folder}' holds no pairs{f' of part {part}' if part else ''}. Run `duo curate` first.")
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise UserError(f"{manifest} lists a pair id twice. Remove the duplicate line.")
    unsafe = [load_image(inside(folder, r["unsafe"]["file"], manifest)) for r in records]
    safe = [load_image(inside(folder, r["safe"]["file"], manifest)) for r in records]
    return PairSet(folder, records, concept, unsafe, safe, _data_hash(folder, records))


def _require_complete(manifest: Path) -> None:
    """A last line without its newline is a pair whose writing was cut off: training must not skip it silently."""
    raw = manifest.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raise UserError(
            f"the last line of {manifest} is incomplete (curation was cut off while writing it). Rerun "
            f"`duo curate` with the same settings and --out {manifest.parent}: it drops that line and redoes the pair."
        )


def _concept_fields(d: dict) -> dict:
    d = dict(d)
    d.pop("source", None)
    for p in d.get("parts", []):
        if p.get("strength") is None:
            p.pop("strength", None)
    return d


def _data_hash(folder: Path, records: list[dict]) -> str:
    """sha256 over the pair records and the bytes of every image: names the exact training data."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True).encode())
        h.update(sha256_file(folder / r["unsafe"]["file"]).encode())
        h.update(sha256_file(folder / r["safe"]["file"]).encode())
    return h.hexdigest()
