"""`duo evaluate`: one results.json per model — DSR per attack, prior preservation, FID, CLIP score, neighbours.

The unlearned model is `--model` with its LoRAs (and guard); the original is the same pipeline with LoRAs
off and no guard. Images are generated once per (prompt, seed) and kept under out/images/, so a rerun
only computes what is missing. DSR comes from `duo attack` folders, never recomputed here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from duo import shard
from duo.data.concepts import Concept
from duo.data.files import atomic_write_text, load_image
from duo.data.lineage import lora_lineage, lora_parents, resolve_inputs, same_model
from duo.data.text import check_prompt
from duo.errors import UserError
from duo.evaluate_images import Images, attack_originals
from duo.guards import GUARDS, make_guard
from duo.models.lora_spec import lora_dirs, parse_lora_spec
from duo.runs import RunFolder, content_hash, package_versions, read_run
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
    shard.init(cfg.device)
    shard.start(run)
    images = Images(cfg, concept, run.path)
    images.make([("neutral", prompts)] + ([("neighbours", concept.neighbours)] if concept.neighbours else []))
    if not shard.is_main():  # the metrics are main's: wait for its results.json
        shard.barrier()
        return json.loads((run.path / "results.json").read_text())
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
    shard.barrier()
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


def _measure(cfg: EvaluateConfig, concept: Concept, images: Images, prompts: list[str]) -> dict:
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


def _grid(images: Images, group: str, prompts: list[str]) -> list[dict]:
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
