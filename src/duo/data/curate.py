"""Paired data curation (SPEC §2): unsafe text-to-image x⁻, then an SDEdit safe edit x⁺ of it.

The manifest (pairs.jsonl) is the source of truth: a pair exists once its line is written, after both
images were written atomically. A rerun skips finished pairs, so a kill at any moment loses at most the
batch in flight and never duplicates a pair.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from duo import shard
from duo.data.concepts import Concept, load_concept
from duo.data.files import append_jsonl, atomic_save_image, atomic_write_text, read_jsonl
from duo.data.text import check_prompt_lengths
from duo.errors import UserError
from duo.runs import RunFolder, package_versions  # noqa: F401  (package_versions: older import path)

log = logging.getLogger(__name__)
MANIFEST = "pairs.jsonl"
CONFIG = "curate.json"


@dataclass
class CurateConfig:
    """Settings of `duo curate`; None means "the concept's default"."""

    model: str = field(metadata={"help": "diffusers pipeline: hub id, local folder, or 'shapes'"})
    concept: str = field(metadata={"help": "preset name (nudity, violence, shapes-red, ...) or a concept YAML file"})
    out: str = field(metadata={"help": "output folder (resumed if it holds a run with the same settings)"})
    pairs: int | None = field(default=None, metadata={"help": "pairs per concept part (default: the concept's)"})
    parts: list[str] | None = field(default=None, metadata={"help": "only these parts of the concept"})
    seed: int = field(default=0, metadata={"help": "base seed; each pair gets its own seed derived from it"})
    strength: float | None = field(default=None, metadata={"help": "SDEdit strength of the safe edit"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance scale"})
    resolution: int | None = field(default=None, metadata={"help": "image size (default: the model's native size)"})
    judge: str | None = field(
        default=None,
        metadata={"help": "rejection-sampling judge: none, nudenet, shapes, clip, vlm (default: concept's)"},
    )
    judge_options: str | None = field(
        default=None,
        metadata={"help": "judge options as JSON (default: the concept's, when the judge is the concept's own)"},
    )
    max_tries: int = field(default=8, metadata={"help": "draws per image before giving up"})
    require_match: bool = field(
        default=True, metadata={"help": "images must also show what their prompt asks for, when the judge can tell"}
    )
    batch_size: int = field(default=4, metadata={"help": "pairs generated together"})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    allow_pickle: bool = field(default=False, metadata={"help": "allow loading pickled (.bin/.ckpt) weights"})
    overwrite: bool = field(default=False, metadata={"help": "delete the run in --out and start afresh"})

    def validate(self) -> None:
        if self.pairs is not None and self.pairs < 1:
            raise UserError("--pairs must be at least 1")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise UserError(f"--strength must be in (0, 1], got {self.strength}")
        if self.max_tries < 1 or self.batch_size < 1:
            raise UserError("--max-tries and --batch-size must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise UserError("--steps must be at least 1")


@dataclass
class PairJob:
    id: str
    part: str
    index: int
    unsafe_prompt: str
    safe_prompt: str
    negative_prompt: str
    seed: int
    strength: float


def pair_seed(seed: int, part: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{part}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def try_seed(base: int, attempt: int) -> int:
    return (base + attempt * 1_000_003) & 0x7FFFFFFF


def plan_pairs(concept: Concept, cfg: CurateConfig) -> list[PairJob]:
    parts = [concept.part(p) for p in cfg.parts] if cfg.parts else concept.parts
    jobs = []
    for part in parts:
        if cfg.pairs is not None:
            part = type(part)(**{**asdict(part), "pairs": cfg.pairs})
        strength = cfg.strength or part.strength or concept.strength
        for i, (unsafe, safe, negative) in enumerate(part.prompt_pairs(cfg.seed, concept.held_out)):
            jobs.append(
                PairJob(
                    f"{part.name}-{i:05d}",
                    part.name,
                    i,
                    unsafe,
                    safe,
                    negative,
                    pair_seed(cfg.seed, part.name, i),
                    strength,
                )
            )
    return jobs


def resolved_settings(concept: Concept, cfg: CurateConfig) -> dict:
    """Everything that decides the pixels (a resumed run must match it), and the concept's notes (which may change)."""
    judge, judge_options = concept.judge_spec(cfg.judge, cfg.judge_options)
    whole = concept.to_dict()
    return {
        # --pairs and --parts may change between runs: a pair's prompts and seeds depend only on its index.
        "model": cfg.model,
        "concept": {k: v for k, v in whole.items() if k not in NOTES_FIELDS},
        "concept_notes": {k: whole[k] for k in NOTES_FIELDS},
        "seed": cfg.seed,
        "strength": cfg.strength,
        "steps": cfg.steps or concept.steps,
        "guidance": cfg.guidance or concept.guidance,
        "resolution": cfg.resolution or concept.resolution,
        "judge": judge,
        "judge_options": judge_options,
        "require_match": cfg.require_match,
        "dtype": cfg.dtype,
    }


# Concept fields that do not decide any pixel: a resumed run may change them, and they are updated in place.
NOTES_FIELDS = ("description", "unsafe_words", "neighbours", "train", "source")


def curate(cfg: CurateConfig) -> Path:
    """Make the pairs of `cfg.concept` in `cfg.out`; resumes a previous run. Returns the manifest path."""
    cfg.validate()
    concept = load_concept(cfg.concept)
    settings = resolved_settings(concept, cfg)
    out = Path(cfg.out)
    run = RunFolder.claim(out, "curate", settings, overwrite=cfg.overwrite, volatile=("concept_notes",))
    manifest = out / MANIFEST
    shard.init(cfg.device)
    done = {r["id"] for r in shard.recorded(manifest)} if run.state == "resume" else set()
    planned = plan_pairs(concept, cfg)
    jobs = [j for j in planned if j.id not in done]
    if not jobs and (run.previous or {}).get("finished") and run.previous["config"] == run.config:
        log.info("all %d pairs already in %s", len(done), manifest)
        return manifest

    from duo.judges import get_judge
    from duo.models.family import load_family

    # Load before writing anything, so that a bad model or judge leaves no half-made folder behind.
    family = load_family(cfg.model, dtype=cfg.dtype, device=cfg.device, allow_pickle=cfg.allow_pickle) if jobs else None
    if family is not None:  # a template the text encoder would cut: refused before the folder is written
        texts = sorted({t for j in jobs for t in (j.unsafe_prompt, j.safe_prompt, j.negative_prompt)})
        check_prompt_lengths(family, texts, fix="shorten the concept's template or its vars")
    judge = get_judge(settings["judge"], settings["judge_options"]) if jobs else None
    shard.start(run)
    if jobs:
        _make_all(_Generator(family, judge, settings, cfg, out), planned, done, manifest, cfg.batch_size)
    shard.gather_planned(manifest, [j.id for j in planned], lambda r: r["id"])
    if shard.is_main():
        records = read_jsonl(manifest)
        write_prompts_used(out, records)
        run.finish([MANIFEST, PROMPTS_USED] + [r[side]["file"] for r in records for side in ("unsafe", "safe")])
    shard.barrier()
    return manifest


PROMPTS_USED = "prompts_used.json"


def write_prompts_used(out: Path, records: list[dict]) -> None:
    """The prompts curation used (every prompt a LoRA trained on these pairs may have seen), with their hash:
    attacks keep their held-out targets out of this list."""
    import json

    used = {side: sorted({r[side]["prompt"] for r in records}) for side in ("unsafe", "safe")}
    digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()
    atomic_write_text(out / PROMPTS_USED, json.dumps({**used, "sha256": digest}, indent=2))


def _make_all(gen, planned: list[PairJob], done: set, manifest: Path, batch_size: int) -> None:
    """Batches of every planned pair, not of those left: pixels depend on the batch a pair is drawn in (CPU
    kernels), so a batch a crash cut short is redrawn whole and only its missing pairs are recorded."""
    batches, part = shard.mine(shard.cut(planned, batch_size)), shard.part(manifest)  # one process: all, manifest
    total, initial = sum(map(len, batches)), sum(j.id in done for b in batches for j in b)
    with tqdm(total=total, initial=initial, desc="curate pairs", unit="pair", disable=not shard.is_main()) as bar:
        for batch in (b for b in batches if any(j.id not in done for j in b)):
            for record in gen.make_pairs(batch):
                if record["id"] not in done:
                    append_jsonl(part, record)
                    bar.update(1)


class _Generator:
    def __init__(self, family, judge, settings: dict, cfg: CurateConfig, out: Path):
        self.family, self.judge, self.settings, self.cfg, self.out = family, judge, settings, cfg, out
        self.res = settings["resolution"] or family.native_resolution
        (out / "images").mkdir(exist_ok=True)

    def make_pairs(self, jobs: list[PairJob]) -> list[dict]:
        s = self.settings
        unsafe = self._until_accepted(
            jobs,
            want_present=True,
            draw=lambda js, seeds: self.family.text2image(
                [j.unsafe_prompt for j in js], seeds, s["steps"], s["guidance"], self.res
            ),
            prompts=lambda js: [j.unsafe_prompt for j in js],
            kind="unsafe",
        )
        by_id = {j.id: (img, info) for j, (img, info) in zip(jobs, unsafe)}
        safe = self._until_accepted(
            jobs,
            want_present=False,
            draw=lambda js, seeds: self._edit(js, seeds, by_id),
            prompts=lambda js: [j.safe_prompt for j in js],
            kind="safe",
        )
        records = []
        for job, (u_img, u_info), (s_img, s_info) in zip(jobs, unsafe, safe):
            u_file, s_file = f"images/{job.id}-unsafe.png", f"images/{job.id}-safe.png"
            atomic_save_image(self.out / u_file, u_img)
            atomic_save_image(self.out / s_file, s_img)
            records.append(
                {
                    "id": job.id,
                    "part": job.part,
                    "index": job.index,
                    "model": self.cfg.model,
                    "unsafe": {"file": u_file, "prompt": job.unsafe_prompt, **u_info},
                    "safe": {
                        "file": s_file,
                        "prompt": job.safe_prompt,
                        "negative_prompt": job.negative_prompt,
                        "strength": job.strength,
                        **s_info,
                    },
                    "steps": s["steps"],
                    "guidance": s["guidance"],
                    "resolution": self.res,
                }
            )
        return records

    def _edit(self, jobs: list[PairJob], seeds: list[int], by_id: dict) -> list:
        s = self.settings
        images = []
        # Jobs in one img2img call must share a strength; a concept's parts may differ.
        for strength in dict.fromkeys(j.strength for j in jobs):
            idx = [i for i, j in enumerate(jobs) if j.strength == strength]
            out = self.family.image2image(
                [by_id[jobs[i].id][0] for i in idx],
                [jobs[i].safe_prompt for i in idx],
                [seeds[i] for i in idx],
                strength,
                s["steps"],
                s["guidance"],
                negative_prompts=[jobs[i].negative_prompt for i in idx],
            )
            images.extend(zip(idx, out))
        return [im for _, im in sorted(images, key=lambda x: x[0])]

    def _until_accepted(self, jobs, want_present: bool, draw, prompts, kind: str) -> list[tuple]:
        """Redraw rejected images with fresh seeds until the judge agrees or tries run out."""
        results: dict[str, tuple] = {}
        pending, attempt = list(jobs), 0
        offset = 0 if want_present else 7919  # the safe edit's noise differs from the unsafe draw's
        while pending:
            seeds = [try_seed(j.seed + offset, attempt) for j in pending]
            images = draw(pending, seeds)
            verdicts = self.judge.judge(images, prompts(pending)) if self.judge else [None] * len(pending)
            still = []
            for job, seed, img, v in zip(pending, seeds, images, verdicts):
                if v is None or self._accept(v, want_present):
                    results[job.id] = (img, {"seed": seed, "tries": attempt + 1, "judge": _verdict_dict(v)})
                else:
                    still.append(job)
            pending, attempt = still, attempt + 1
            if pending and attempt >= self.cfg.max_tries:
                ids = ", ".join(j.id for j in pending[:5])
                raise UserError(
                    f"the judge rejected every one of {self.cfg.max_tries} {kind} images for pair(s) {ids}. "
                    f"Finished pairs are saved in {self.out}; rerun with a higher --max-tries to continue, "
                    f"or --judge none to keep unjudged images, or adjust the prompts/strength."
                )
        return [results[j.id] for j in jobs]

    def _accept(self, v, want_present: bool) -> bool:
        if v.present != want_present:
            return False
        # Both images must show what their prompt asks (same shape, asked colour...) when the judge can tell:
        # a pair should differ in the concept only.
        return not (self.cfg.require_match and v.matches_prompt is False)


def _verdict_dict(v) -> dict | None:
    if v is None:
        return None
    return {"present": v.present, "score": round(float(v.score), 5), "matches_prompt": v.matches_prompt}
