"""`duo evaluate`: one results.json per model — DSR per attack, prior preservation, FID, CLIP score, neighbours.

The unlearned model is `--model` with its LoRAs (and guard); the original is the same pipeline with LoRAs
off and no guard. Images are generated once per (prompt, seed) and kept under out/images/, so a rerun
only computes what is missing. DSR comes from `duo attack` folders, never recomputed here.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from duo.data.concepts import Concept
from duo.data.files import append_jsonl, atomic_save_image, atomic_write_text, load_image, read_jsonl
from duo.data.lineage import lora_lineage, lora_parents, resolve_inputs, same_model
from duo.data.text import check_prompt
from duo.errors import UserError
from duo.guards import GUARDS, make_guard
from duo.models.lora_spec import lora_dirs, parse_lora_spec
from duo.runs import RunFolder, content_hash, package_versions, read_run
from duo.seeds import derive_seed
from duo.worlds import world_for

NEUTRAL_EXAMPLE = "examples/prompts/neutral-captions.txt"
GRID_ROWS = 8


MIN_PROMPTS = 2  # FID needs two images or more per side


@dataclass
class EvaluateConfig:
    out: str = field(metadata={"help": "folder for results.json and the images behind it (resumed)"})
    model: str | None = field(
        default=None, metadata={"help": "diffusers pipeline: hub id, local folder, or 'shapes' (default: the LoRA's)"}
    )
    concept: str | None = field(
        default=None,
        metadata={"help": "preset name or concept YAML, its neighbours measured too (default: the LoRA's)"},
    )
    lora: list[str] | None = field(default=None, metadata={"help": "LoRA of the unlearned model, DIR or DIR:W"})
    guard: str = field(
        default="none",
        metadata={"help": "inference-time guard of the unlearned model", "choices": GUARDS},
    )
    attacks: list[str] | None = field(default=None, metadata={"help": "`duo attack` output folders to report"})
    prompts_file: str | None = field(
        default=None,
        metadata={"help": f"neutral prompts (COCO-style captions; text, CSV or JSONL), e.g. {NEUTRAL_EXAMPLE}"},
    )
    n_prompts: int = field(default=30, metadata={"help": "neutral prompts used (the first N)"})
    seed: int = field(default=0, metadata={"help": "base seed; image i of a group is seeded by hash(seed, group, i)"})
    lpips: str | None = field(
        default=None, metadata={"help": "LPIPS network: 'vgg:FILE' (see duo.metrics.lpips) or 'shapes'"}
    )
    fid_features: str | None = field(
        default=None, metadata={"help": "FID features: 'clip:PATH_OR_ID' or 'shapes' (default: none)"}
    )
    clip: str | None = field(default=None, metadata={"help": "CLIP model for CLIP score: folder or hub id"})
    reference: str | None = field(default=None, metadata={"help": "folder of reference images for a second FID"})
    label: str | None = field(default=None, metadata={"help": "name of this run in reports"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the concept's)"})
    guidance: float | None = field(default=None, metadata={"help": "guidance scale (default: the concept's)"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch"})
    override: list[str] | None = field(
        default=None,
        metadata={"help": "let --model / --concept contradict the LoRA's lineage: model, concept (recorded)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "delete the run in --out and start afresh"})


def resolve_metrics(cfg: EvaluateConfig, concept: Concept) -> EvaluateConfig:
    """A built-in world (Shapes) measures with its own networks; elsewhere weights must be named."""
    world = world_for(cfg.model, concept)
    if world is not None:  # get_lpips / get_features resolve a world's name to its own networks
        cfg.lpips = cfg.lpips or world.name
        cfg.fid_features = cfg.fid_features or world.name
    if not cfg.lpips:
        raise UserError(
            "prior preservation needs LPIPS weights, and none can be downloaded: pass --lpips vgg:FILE "
            "(the conversion recipe is in duo.metrics.lpips)."
        )
    if cfg.n_prompts < MIN_PROMPTS:
        raise UserError(f"--n-prompts must be at least {MIN_PROMPTS}: FID compares sets of images; raise it.")
    return cfg


def neutral_prompts(cfg: EvaluateConfig, concept: Concept) -> list[str]:
    prompts = _neutral_prompts(cfg, concept)
    if len(prompts) < MIN_PROMPTS:
        raise UserError(
            f"{len(prompts)} neutral prompt(s): FID compares sets of images, so at least {MIN_PROMPTS} are needed; "
            "add prompts to --prompts-file."
        )
    return prompts


def _neutral_prompts(cfg: EvaluateConfig, concept: Concept) -> list[str]:
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if path.suffix.lower() in (".csv", ".jsonl"):
            from duo.attacks.prompt_set import read_prompt_file

            prompts = [r["prompt"] for r in read_prompt_file(path)]
        elif path.is_file():
            lines = [line.strip() for line in path.read_text().split("\n") if line.strip()]
            prompts = [check_prompt(line, f"--prompts-file '{path}'") for line in lines]
        else:
            raise UserError(f"--prompts-file '{path}' does not exist.")
        return prompts[: cfg.n_prompts]
    world = world_for(cfg.model, concept)
    if world is not None:
        return world.neutral_prompts(concept, cfg.n_prompts)[: cfg.n_prompts]
    raise UserError(f"pass --prompts-file with neutral prompts (COCO-style captions), e.g. {NEUTRAL_EXAMPLE}.")


class _Images:
    """Original and unlearned images per (group, prompt, seed), generated once and kept on disk."""

    def __init__(self, cfg: EvaluateConfig, concept: Concept, out: Path):
        self.cfg, self.concept, self.out, self.family, self.guard = cfg, concept, out, None, None
        self.index = out / "images.jsonl"
        self.records = {(r["group"], r["model"], r["i"]): r for r in read_jsonl(self.index, repair=True)}

    def _load(self):
        if self.family is None:
            from duo.models.family import load_with_loras

            c = self.cfg
            self.family = load_with_loras(c.model, c.lora, c.dtype, c.device, threads=c.threads)
            self.guard = make_guard(self.cfg.guard, self.concept.unsafe_words)
        return self.family

    def get(self, group: str, prompts: list[str]) -> tuple[list, list]:
        size = self.cfg.batch_size
        for model in ("original", "unlearned"):
            # Batches of every prompt, not of those left: pixels depend on the batch an image is drawn in (CPU
            # kernels), so a batch a crash cut short is redrawn whole and only its missing images are recorded.
            batches = [range(start, min(start + size, len(prompts))) for start in range(0, len(prompts), size)]
            todo = [b for b in batches if any((group, model, i) not in self.records for i in b)]
            for batch in tqdm(todo, desc=f"{group}: {model}", leave=False):
                self._generate(group, model, prompts, list(batch))
        return tuple(
            [load_image(self.out / self.records[(group, m, i)]["file"]) for i in range(len(prompts))]
            for m in ("original", "unlearned")
        )

    def _generate(self, group: str, model: str, prompts: list[str], idx: list[int]) -> None:
        family, c = self._load(), self.cfg
        texts = [prompts[i] for i in idx]
        guard = self.guard if model == "unlearned" else make_guard("none", [])
        steps, guidance = c.steps or self.concept.steps, c.guidance or self.concept.guidance
        seeds = [derive_seed(c.seed, "evaluate", group, i) for i in idx]
        run = family.loras_off() if model == "original" and c.lora else nullcontext()
        with run:
            images = guard.generate(family, texts, seeds, steps, guidance, self.concept.resolution)
        for i, seed, image in zip(idx, seeds, images):
            if (group, model, i) in self.records:  # recorded before a crash cut this batch short
                continue
            rel = f"images/{group}/{model}/{i:04d}.png"
            atomic_save_image(self.out / rel, image)
            record = {"group": group, "model": model, "i": i, "prompt": prompts[i], "seed": seed, "file": rel}
            append_jsonl(self.index, record)
            self.records[(group, model, i)] = record


def evaluate(cfg: EvaluateConfig) -> dict:
    inputs = resolve_inputs(cfg.model, cfg.concept, lora_dirs(cfg.lora), cfg.override)
    cfg, concept = replace(cfg, model=inputs.model), inputs.concept
    cfg = resolve_metrics(cfg, concept)
    prompts = neutral_prompts(cfg, concept)
    run = RunFolder.claim(
        cfg.out,
        "evaluate",
        _run_config(cfg, concept, prompts),
        _parents(cfg),
        overwrite=cfg.overwrite,
        overrides=inputs.overrides,
        volatile=VOLATILE,
    )
    loras = [rec for role, rec in sorted(run.parents.items()) if role.startswith("lora")]
    attacks = {}
    for folder in cfg.attacks or []:
        cell = attack_summary(Path(folder), cfg, loras)
        key = attack_key(cell)
        attacks[key if key not in attacks else Path(folder).name] = cell
    run.start()
    images = _Images(cfg, concept, run.path)
    results = _measure(cfg, concept, images, prompts)
    results["attacks"] = attacks
    for name, cell in attacks.items():
        results["grids"][f"attack: {name}"] = attack_originals(images, cell)
    results.update(
        sampling={"steps": cfg.steps or concept.steps, "guidance": cfg.guidance or concept.guidance},
        config=asdict(cfg),
        lineage={**run.lineage(), "origin": inputs.origin},
        versions=package_versions(),
        written=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    atomic_write_text(run.path / "results.json", json.dumps(results, indent=2))
    run.finish(["results.json", "images.jsonl"])
    return results


# How image i of a prompt group is seeded; recorded so a folder made under `seed + i` (before 2026-12-07) is
# refused rather than resumed with other images.
IMAGE_SEEDS = "derive_seed(seed, 'evaluate', group, i)"

# Settings that change what is computed from the images, not the images: a rerun may change them.
VOLATILE = ("lpips", "fid_features", "clip", "reference", "label", "attacks", "attack:*", "reference_images")


def _run_config(cfg: EvaluateConfig, concept: Concept, prompts: list[str]) -> dict:
    config = {k: v for k, v in asdict(cfg).items() if k not in ("out", "batch_size", "device", "threads", "overwrite")}
    config.update(
        concept={k: v for k, v in concept.to_dict().items() if k != "source"},
        guard=make_guard(cfg.guard, concept.unsafe_words).provenance(),
        prompts=prompts,
        image_seeds=IMAGE_SEEDS,
    )
    return config


def _parents(cfg: EvaluateConfig) -> dict:
    parents = lora_parents(cfg.lora)
    parents.update({f"attack:{i}": folder for i, folder in enumerate(cfg.attacks or [])})
    return {**parents, "prompts_file": cfg.prompts_file, "reference_images": cfg.reference}


def _measure(cfg: EvaluateConfig, concept: Concept, images: _Images, prompts: list[str]) -> dict:
    """Everything measured on generated images: preservation, neighbours, FID, alignment, CLIP score."""
    from duo.metrics import clip_score, fid, get_features, get_lpips, lpips_distance

    original, unlearned = images.get("neutral", prompts)
    net = get_lpips(cfg.lpips)
    distances = lpips_distance(original, unlearned, net)
    results = {
        "kind": "duo-evaluate",
        "label": cfg.label or _default_label(cfg),
        "method": method_of(cfg),
        "model": {"ref": cfg.model, "loras": [list(parse_lora_spec(s)) for s in cfg.lora or []]},
        "guard": cfg.guard,
        "guard_settings": make_guard(cfg.guard, concept.unsafe_words).provenance(),  # SLD's preset values too
        "concept": {"name": concept.name, "source": concept.source},
        "preservation": {
            "pp": 1.0 - float(distances.mean()),
            "lpips": float(distances.mean()),
            "n": len(prompts),
            "network": net.provenance(),
            "definition": "1 − LPIPS(original, unlearned), same prompt and seed, neutral prompts",
        },
        "grids": {"neutral prompts": _grid(images, "neutral", prompts)},
    }
    if concept.neighbours:
        n_orig, n_unl = images.get("neighbours", concept.neighbours)
        d = lpips_distance(n_orig, n_unl, net)
        results["neighbours"] = {"lpips": float(d.mean()), "per_prompt": dict(zip(concept.neighbours, d.tolist()))}
        results["grids"]["neighbours"] = _grid(images, "neighbours", concept.neighbours)
    if cfg.fid_features:
        backend = get_features(cfg.fid_features)
        results["fid"] = {"original": fid(unlearned, original, backend)}
        if cfg.reference:
            results["fid"]["reference"] = fid(unlearned, _folder_images(Path(cfg.reference)), backend)
    results.update(_alignment(cfg, concept, original, unlearned, prompts))
    if cfg.clip:
        pairs = (("original", original), ("unlearned", unlearned))
        results["clip_score"] = {m: clip_score(ims, prompts, cfg.clip) for m, ims in pairs}
    return results


def _alignment(cfg: EvaluateConfig, concept: Concept, original, unlearned, prompts: list[str]) -> dict:
    world = world_for(cfg.model, concept)
    if world is None or world.alignment is None:
        return {}
    return {
        "alignment": {
            "original": world.alignment(original, prompts),
            "unlearned": world.alignment(unlearned, prompts),
            "definition": world.alignment_definition,
        }
    }


def attack_originals(images: _Images, cell: dict) -> list[dict]:
    """The attack's prompts on the original model (LoRAs off, no guard, same seeds): the grid's left column."""
    from duo.attacks.concept_inversion import EMBEDS, FOLDER, install_token

    examples = cell.pop("examples")
    family = images._load()
    learned = Path(cell["results"]).parent / FOLDER / EMBEDS
    if learned.is_file():  # the prompts carry the learned token: install it (the LoRAs stay off below)
        install_token(family, cell["settings"]["token"], None, learned)
    for i, ex in enumerate(examples):
        # Popped whether or not the image is drawn: a rerun that finds it on disk writes the same results.json.
        guidance = ex.pop("guidance") or images.concept.guidance
        rel = f"images/attack-{cell['hash'][:12]}/original/{i:04d}.png"  # keyed by content: never stale
        if not (images.out / rel).is_file():
            with family.loras_off() if images.cfg.lora else nullcontext():
                image = family.text2image(
                    [ex["prompt"]], [ex["seed"]], cell["sampling"]["steps"], guidance, cell["sampling"]["resolution"],
                )[0]  # fmt: skip
            atomic_save_image(images.out / rel, image)
        ex["original"] = rel
    return examples


def _grid(images: _Images, group: str, prompts: list[str]) -> list[dict]:
    return [
        {
            "prompt": p,
            "original": images.records[(group, "original", i)]["file"],
            "unlearned": images.records[(group, "unlearned", i)]["file"],
        }
        for i, p in enumerate(prompts[:GRID_ROWS])
    ]


def _folder_images(folder: Path) -> list:
    from duo.attacks.concept_images import IMAGE_SUFFIXES

    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(files) < 2:
        raise UserError(f"--reference '{folder}' needs at least 2 images for FID.")
    return [load_image(p) for p in files]


def attack_summary(folder: Path, cfg: EvaluateConfig, loras: list[dict]) -> dict:
    """An attack folder's DSR and provenance; refused unless it attacked this very model (LoRAs by hash) and guard."""
    path, run = folder / "results.json", read_run(folder)
    if not path.is_file() or run is None or run.get("kind") != "attack" or not run.get("finished"):
        raise UserError(
            f"--attacks '{folder}' is not a finished `duo attack` run (no results.json / run.json); "
            f"run `duo attack ... --out {folder}` first (folders from before run.json: rerun the attack)."
        )
    r = json.loads(path.read_text())
    theirs = [rec["hash"] for role, rec in sorted(run.get("parents", {}).items()) if role.startswith("lora")]
    weights = [w for _, w in map(parse_lora_spec, run["config"].get("lora") or [])]
    same = (
        same_model(run["config"]["model"], cfg.model)
        and theirs == [rec["hash"] for rec in loras]
        and weights == [w for _, w in map(parse_lora_spec, cfg.lora or [])]
        and r["guard"]["name"] == cfg.guard
    )
    if not same:
        mine = {"ref": cfg.model, "loras": [list(parse_lora_spec(s)) for s in cfg.lora or []]}
        raise UserError(
            f"attack '{folder}' ran against {r['model']} with guard {r['guard']['name']}, not {mine} with guard "
            f"{cfg.guard} (LoRAs are compared by content hash); evaluate each model with its own attacks."
        )
    examples = [
        {
            "prompt": p["prompt"],
            "seed": p["images"][0]["seed"],
            "guidance": p.get("guidance"),
            "original": None,
            "unlearned": str((folder / p["images"][0]["file"]).resolve()),
        }
        for p in r["prompts"][:GRID_ROWS]
        if p["images"]
    ]
    keep = ("dsr", "asr", "prompts_broken", "n_prompts", "judge", "budget", "settings", "sampling")
    optional = {k: r[k] for k in ("pre_asr", "post_asr") if k in r}
    # folders from before held-out targets drew them from the concept's own (training) prompts
    targets = r.get("targets", {"split": "training", "note": "attack run before targets were recorded"})
    images = (r.get("prepare") or {}).get("images")
    cell = {"attack": r["attack"], **{k: r[k] for k in keep}, **optional, "targets": targets}
    if isinstance(images, dict):
        cell["images"] = images  # what an attack that learns from images learned from, with its hash
    return {**cell, "results": str(path), "examples": examples, "hash": content_hash(folder)}


def attack_key(cell: dict) -> str:
    """An attack's name in results: the name for held-out (or file) targets, `name@training` for training ones,
    so that one evaluation can hold both splits side by side."""
    split = cell["targets"]["split"]
    return cell["attack"] if split in ("held-out", "file") else f"{cell['attack']}@{split}"


def method_of(cfg: EvaluateConfig) -> dict:
    """What was evaluated, from the first LoRA's training run (method, β, steps) or the guard."""
    for folder in lora_dirs(cfg.lora):
        method = lora_lineage(folder).method
        if method:
            return method
    return {"name": f"guard {cfg.guard}" if cfg.guard != "none" else "original"}


def _default_label(cfg: EvaluateConfig) -> str:
    m = method_of(cfg)
    return f"{m['name']} β={m['beta']}" if m.get("beta") is not None else m["name"]
