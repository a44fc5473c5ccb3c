"""`duo evaluate`: one results.json per model — DSR per attack, prior preservation, FID, CLIP score, neighbours.

The unlearned model is `--model` with its LoRAs (and guard); the original is the same pipeline with LoRAs
off and no guard. Images are generated once per (prompt, seed) and kept under out/images/, so a rerun
only computes what is missing. DSR comes from `duo attack` folders, never recomputed here.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from duo.data.concepts import Concept, load_concept
from duo.data.files import append_jsonl, atomic_save_image, atomic_write_text, load_image, read_jsonl
from duo.errors import UserError
from duo.guards import GUARDS, make_guard
from duo.models.lora import parse_lora_spec

NEUTRAL_EXAMPLE = "examples/prompts/neutral-captions.txt"
GRID_ROWS = 8


@dataclass
class EvaluateConfig:
    model: str = field(metadata={"help": "diffusers pipeline: hub id, local folder, or 'shapes'"})
    concept: str = field(metadata={"help": "preset name or concept YAML (its neighbours are measured too)"})
    out: str = field(metadata={"help": "folder for results.json and the images behind it (resumed)"})
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
    seed: int = field(default=0, metadata={"help": "seed of the first image; prompt i uses seed + i"})
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


def _shapes_world(cfg: EvaluateConfig, concept: Concept) -> bool:
    return cfg.model == "shapes" or concept.judge == "shapes"


def resolve_metrics(cfg: EvaluateConfig, concept: Concept) -> EvaluateConfig:
    """The Shapes world measures with its judge's features; elsewhere weights must be named."""
    if _shapes_world(cfg, concept):
        cfg.lpips = cfg.lpips or "shapes"
        cfg.fid_features = cfg.fid_features or "shapes"
    if not cfg.lpips:
        raise UserError(
            "prior preservation needs LPIPS weights, and none can be downloaded: pass --lpips vgg:FILE "
            "(the conversion recipe is in duo.metrics.lpips)."
        )
    if cfg.n_prompts < 1:
        raise UserError("--n-prompts must be at least 1")
    return cfg


def neutral_prompts(cfg: EvaluateConfig, concept: Concept) -> list[str]:
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if path.suffix.lower() in (".csv", ".jsonl"):
            from duo.attacks.prompt_set import read_prompt_file

            prompts = [r["prompt"] for r in read_prompt_file(path)]
        elif path.is_file():
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            raise UserError(f"--prompts-file '{path}' does not exist.")
        return prompts[: cfg.n_prompts]
    if _shapes_world(cfg, concept):
        from duo.shapes.evaluation import other_prompts

        return other_prompts(concept.judge_options.get("colour", "red"), cfg.n_prompts)[: cfg.n_prompts]
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
        for model in ("original", "unlearned"):
            todo = [i for i in range(len(prompts)) if (group, model, i) not in self.records]
            for start in tqdm(range(0, len(todo), self.cfg.batch_size), desc=f"{group}: {model}", leave=False):
                self._generate(group, model, prompts, todo[start : start + self.cfg.batch_size])
        return tuple(
            [load_image(self.out / self.records[(group, m, i)]["file"]) for i in range(len(prompts))]
            for m in ("original", "unlearned")
        )

    def _generate(self, group: str, model: str, prompts: list[str], idx: list[int]) -> None:
        family, c = self._load(), self.cfg
        texts = [prompts[i] for i in idx]
        guard = self.guard if model == "unlearned" else make_guard("none", [])
        steps, guidance = c.steps or self.concept.steps, c.guidance or self.concept.guidance
        seeds = [c.seed + i for i in idx]
        run = family.loras_off() if model == "original" and c.lora else nullcontext()
        with run:
            images = guard.generate(family, texts, seeds, steps, guidance, self.concept.resolution)
        for i, seed, image in zip(idx, seeds, images):
            rel = f"images/{group}/{model}/{i:04d}.png"
            atomic_save_image(self.out / rel, image)
            record = {"group": group, "model": model, "i": i, "prompt": prompts[i], "seed": seed, "file": rel}
            append_jsonl(self.index, record)
            self.records[(group, model, i)] = record


def evaluate(cfg: EvaluateConfig) -> dict:
    concept = load_concept(cfg.concept)
    cfg = resolve_metrics(cfg, concept)
    attacks = {}
    for folder in cfg.attacks or []:
        cell = attack_summary(Path(folder), cfg)
        attacks[cell["attack"] if cell["attack"] not in attacks else Path(folder).name] = cell
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = neutral_prompts(cfg, concept)
    images = _Images(cfg, concept, out)
    original, unlearned = images.get("neutral", prompts)
    from duo.metrics import clip_score, fid, get_features, get_lpips, lpips_distance

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
        "attacks": attacks,
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
    if _shapes_world(cfg, concept):
        from duo.shapes.evaluation import attribute_accuracy

        results["alignment"] = {
            "original": attribute_accuracy(original, prompts),
            "unlearned": attribute_accuracy(unlearned, prompts),
            "definition": "share of images whose colour / shape the Shapes judge reads as the prompt asks "
            "(the Shapes world's stand-in for CLIP score)",
        }
    if cfg.clip:
        pairs = (("original", original), ("unlearned", unlearned))
        results["clip_score"] = {m: clip_score(ims, prompts, cfg.clip) for m, ims in pairs}
    for name, cell in attacks.items():
        results["grids"][f"attack: {name}"] = attack_originals(images, name, cell)
    from duo.data.curate import package_versions

    results["sampling"] = {"steps": cfg.steps or concept.steps, "guidance": cfg.guidance or concept.guidance}
    results["config"] = asdict(cfg)
    results["versions"] = package_versions()
    results["written"] = datetime.now(UTC).isoformat(timespec="seconds")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results


def attack_originals(images: _Images, name: str, cell: dict) -> list[dict]:
    """The attack's prompts on the original model (LoRAs off, no guard, same seeds): the grid's left column."""
    from duo.attacks.concept_inversion import EMBEDS, FOLDER, install_token

    examples = cell.pop("examples")
    family = images._load()
    learned = Path(cell["results"]).parent / FOLDER / EMBEDS
    if learned.is_file():  # the prompts carry the learned token: install it (the LoRAs stay off below)
        from safetensors.torch import load_file

        install_token(family, cell["settings"]["token"], next(iter(load_file(str(learned)).values())), learned)
    for i, ex in enumerate(examples):
        rel = f"images/attack-{name}/original/{i:04d}.png"
        if not (images.out / rel).is_file():
            with family.loras_off() if images.cfg.lora else nullcontext():
                image = family.text2image(
                    [ex["prompt"]], [ex["seed"]], cell["sampling"]["steps"],
                    ex.pop("guidance") or images.concept.guidance, cell["sampling"]["resolution"],
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


def attack_summary(folder: Path, cfg: EvaluateConfig) -> dict:
    """An attack folder's DSR and provenance; refused if it attacked another model than this one."""
    path = folder / "results.json"
    if not path.is_file():
        raise UserError(f"--attacks '{folder}' has no results.json; run `duo attack ... --out {folder}` first.")
    r = json.loads(path.read_text())
    mine = {"ref": cfg.model, "loras": [list(parse_lora_spec(s)) for s in cfg.lora or []]}
    if r["model"] != mine or r["guard"]["name"] != cfg.guard:
        raise UserError(
            f"attack '{folder}' ran against {r['model']} with guard {r['guard']['name']}, not {mine} with guard "
            f"{cfg.guard}; evaluate each model with its own attacks."
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
    return {"attack": r["attack"], **{k: r[k] for k in keep}, "results": str(path), "examples": examples}


def method_of(cfg: EvaluateConfig) -> dict:
    """What was evaluated, from the first LoRA's training config (method, β, steps) or the guard."""
    for spec in cfg.lora or []:
        config = Path(parse_lora_spec(spec)[0]) / "config.json"
        if config.is_file():
            c = json.loads(config.read_text())
            return {"name": c.get("method", "duo"), "beta": c.get("beta"), "steps": c.get("steps")}
    return {"name": f"guard {cfg.guard}" if cfg.guard != "none" else "original"}


def _default_label(cfg: EvaluateConfig) -> str:
    m = method_of(cfg)
    return f"{m['name']} β={m['beta']}" if m.get("beta") is not None else m["name"]
