"""`duo benchmark NAME`: a paper's protocol in one resumable command, on the user's model and prompt files.

    curate (the concept preset) ─► for the original model and each β: train, every attack, evaluate ─► report

The machinery is the comparison's (duo.compare): DIR/pairs/ and DIR/compare/{original,beta250,...}/seed42/
with lora/, attacks/{name}/ and eval/, compare.md and report.html; DIR/benchmark.json names the inputs by sha256.
DIR is a `benchmark` run folder (duo.runs): a rerun resumes, a changed setting or input file is refused.
`--dry-run` runs the same pipeline at duo.benchmark_spec.DRY_RUN's sizes in DIR/dry-run, its own run folder.
Everything is checked (names, files, model family, weights) before anything is written or loaded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from duo.benchmark_spec import BENCHMARKS, DRY_RUN, BenchmarkSpec, benchmark_named, estimate, format_estimate
from duo.data.files import atomic_write_text, sha256_file
from duo.errors import UserError
from duo.runs import RunFolder, jsonable, parent_record, read_run

KIND = "benchmark"
DRY_FOLDER = "dry-run"


@dataclass
class BenchmarkConfig:
    name: str = field(metadata={"help": "the benchmark", "choices": list(BENCHMARKS)})
    model: str = field(metadata={"help": "diffusers pipeline of the benchmark's family: local folder or hub id"})
    prompts_file: str = field(
        metadata={"help": "attack targets: I2P-style CSV (prompt[, sd_seed, sd_guidance_scale, categories]) or JSONL"}
    )
    coco_captions: str = field(metadata={"help": "neutral captions for PP/FID/CLIP: text (one a line), CSV or JSONL"})
    out: str = field(metadata={"help": "benchmark folder (resumed when rerun with the same settings)"})
    lpips: str | None = field(default=None, metadata={"help": "LPIPS weights for PP: vgg:FILE (see duo.metrics.lpips)"})
    fid_features: str | None = field(default=None, metadata={"help": "FID features: clip:PATH_OR_ID"})
    clip: str | None = field(default=None, metadata={"help": "CLIP model for CLIP score: folder or hub id"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, ... (auto: cuda when there is one)"})
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "print the plan, then run every stage at tiny sizes into OUT/dry-run: 2 pairs, 2 training steps "
            "a β, 2 sampling steps, the first prompt and 2 captions, each attack at its smallest settings, curation "
            "unjudged, the Shapes networks standing in for LPIPS/FID and no CLIP score (mechanics, not results)"
        },
    )
    allow_other_model: bool = field(
        default=False,
        metadata={"help": "run on a model outside the benchmark's family (recorded; its numbers are not the paper's)"},
    )


def run_benchmark(cfg: BenchmarkConfig, echo=print) -> dict:
    """Check everything, print the plan and estimate, then run (or resume) every stage; returns benchmark.json."""
    spec = benchmark_named(cfg.name)
    inputs = check_inputs(cfg, spec)
    out = Path(cfg.out) / DRY_FOLDER if cfg.dry_run else Path(cfg.out)
    echo(format_plan(cfg, spec, inputs, out))
    device = resolve_device(cfg.device)
    run = claim(
        out, run_config(cfg, spec, device), {"prompts_file": cfg.prompts_file, "coco_captions": cfg.coco_captions}
    )
    run.start()
    started = time.perf_counter()
    rows = _pipeline(cfg, spec, inputs, out, device)
    result = {
        "kind": "duo-benchmark",
        "benchmark": asdict(spec),
        "dry_run": cfg.dry_run,
        "model": cfg.model,
        "family_checked": not cfg.allow_other_model,
        "inputs": inputs,
        "rows": rows,
        "table": str(out / "compare" / "compare.md"),
        "report": str(out / "compare" / "report.html"),
        "seconds_this_run": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(out / "benchmark.json", json.dumps(result, indent=2))
    run.finish(["benchmark.json", "compare/compare.md", "compare/report.html"], inputs=inputs)
    return result


def _pipeline(cfg: BenchmarkConfig, spec: BenchmarkSpec, inputs: dict, out: Path, device: str) -> list[dict]:
    from duo.compare import Method, compare
    from duo.data.curate import CurateConfig, curate

    pairs = out / "pairs"
    shrink = {"pairs": DRY_RUN.pairs, "steps": DRY_RUN.sampling_steps, "judge": "none"} if cfg.dry_run else {}
    curate(CurateConfig(model=cfg.model, concept=spec.concept, out=str(pairs), seed=spec.seed, device=device, **shrink))
    flags = {**spec.train, **(DRY_RUN.train if cfg.dry_run else {})}
    if device.startswith("cuda"):
        flags["mixed_precision"] = "bf16"  # the authors' half-precision training, LoRA weights in fp32
    methods = [Method("original")]
    methods += [Method(f"β={b:g}", {**flags, "beta": b}, folder=f"beta{b:g}") for b in spec.betas]
    point = point_config(cfg, spec, inputs, pairs, device)
    return compare(cfg.model, str(pairs), out / "compare", methods, [spec.seed], point, title=spec.title)


def point_config(cfg: BenchmarkConfig, spec: BenchmarkSpec, inputs: dict, pairs: Path, device: str):
    """What every model of the benchmark is attacked and evaluated with: the whole files, or the dry run's share."""
    from duo.compare import PointConfig

    attack = {"prompts_file": cfg.prompts_file}
    evaluation = {"clip": cfg.clip} if cfg.clip else {}
    targets, captions = inputs["prompts_file"]["rows"], inputs["coco_captions"]["rows"]
    lpips, fid = cfg.lpips, cfg.fid_features
    settings: dict = {}
    if cfg.dry_run:
        attack |= {"steps": DRY_RUN.sampling_steps, "images": str(pairs)}
        evaluation = {"steps": DRY_RUN.sampling_steps}
        targets, captions = DRY_RUN.targets, DRY_RUN.captions
        lpips, fid, settings = DRY_RUN.networks, DRY_RUN.networks, DRY_RUN.attack_settings
    return PointConfig(
        model=cfg.model, concept=spec.concept, attacks=list(spec.attacks), budget=spec.budget, n_prompts=targets,
        eval_prompts=captions, prompts_file=cfg.coco_captions, lpips=lpips, fid_features=fid, device=device,
        attack_config=attack, attack_settings=settings, evaluate_config=evaluation,
    )  # fmt: skip


def run_config(cfg: BenchmarkConfig, spec: BenchmarkSpec, device: str) -> dict:
    """What decides the folder's content: the spec, the model, the settings (files by hash, as parents)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in ("out", "prompts_file", "coco_captions", "device")}
    return {**config, "device": device, "spec": asdict(spec), "dry_run_sizes": asdict(DRY_RUN) if cfg.dry_run else None}


def claim(out: Path, config: dict, parents: dict) -> RunFolder:
    """DIR as a benchmark run folder; a real run may move into a DIR that holds nothing but a dry run."""
    only_dry = out.is_dir() and read_run(out) is None and [p.name for p in out.iterdir()] == [DRY_FOLDER]
    if only_dry:
        return RunFolder(out, KIND, jsonable(config), {role: parent_record(p) for role, p in parents.items()})
    try:
        return RunFolder.claim(out, KIND, config, parents)
    except UserError as exc:
        raise UserError(
            f"{exc} (`duo benchmark` resumes a folder only with the same settings and input files.)"
        ) from None


def resolve_device(device: str) -> str:
    if device != "auto":
        from duo.models.loading import check_device

        check_device(device)
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_inputs(cfg: BenchmarkConfig, spec: BenchmarkSpec) -> dict:
    """Both files readable and in a format the stages read, the model of the benchmark's family, the weights
    the evaluation needs: each failure a UserError before anything is written. Returns the inputs' record."""
    targets = _prompt_rows(cfg.prompts_file, "--prompts-file")
    captions = _captions(cfg.coco_captions, spec)
    check_family(cfg.model, spec, cfg.allow_other_model)
    if not cfg.dry_run:
        check_weights(cfg)
    return {
        "prompts_file": _record(cfg.prompts_file, len(targets)),
        "coco_captions": _record(cfg.coco_captions, len(captions)),
    }


def _record(path: str, rows: int) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(Path(path)), "rows": rows}


def _readable(path: str, flag: str, fix: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} '{path}' is not a file. {fix}")
    if not os.access(p, os.R_OK):
        raise UserError(f"{flag} '{path}' cannot be read (permissions); make it readable or copy it somewhere it is.")
    return p


def _prompt_rows(path: str, flag: str) -> list[dict]:
    from duo.attacks.prompt_set import read_prompt_file

    fix = "Pass the I2P prompts as CSV with a 'prompt' column (I2P's own columns are read) or as JSONL; duo ships none."
    p = _readable(path, flag, fix)
    if p.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"{flag} '{path}' must be a .csv or .jsonl file. {fix}")
    return read_prompt_file(p)


def _captions(path: str, spec: BenchmarkSpec) -> list[str]:
    from duo.data.concepts import load_concept
    from duo.evaluate import EvaluateConfig, neutral_prompts

    fix = "Pass COCO captions as text (one a line), CSV with a 'prompt' column, or JSONL; duo ships none."
    _readable(path, "--coco-captions", fix)
    try:
        config = EvaluateConfig(out="", prompts_file=path, n_prompts=10**9)
        return neutral_prompts(config, load_concept(spec.concept))
    except UserError as exc:
        raise UserError(f"--coco-captions: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"--coco-captions '{path}' is not text (UTF-8). {fix}") from None


def check_family(model: str, spec: BenchmarkSpec, allow_other: bool) -> None:
    """The pipeline class and the UNet's cross-attention width, read from config files (no weights loaded)."""
    from duo.models.loading import read_model_index, resolve_model_ref

    index = read_model_index(resolve_model_ref(model))
    width = _unet_config(model).get("cross_attention_dim")
    found = f"{index.get('_class_name')} with cross_attention_dim {width}"
    if (index.get("_class_name"), width) == (spec.pipeline_class, spec.cross_attention_dim) or allow_other:
        return
    raise UserError(
        f"benchmark '{spec.name}' is defined on {spec.family}: a {spec.pipeline_class} with cross_attention_dim "
        f"{spec.cross_attention_dim}; '{model}' is a {found}. Pass such a model, or --allow-other-model to run "
        "the protocol on this one anyway (recorded; its numbers are then not the paper's setting)."
    )


def _unet_config(model: str) -> dict:
    from duo.models.loading import resolve_model_ref

    local = Path(resolve_model_ref(model)) / "unet" / "config.json"
    try:
        if local.parent.parent.exists():
            return json.loads(local.read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "unet/config.json")).read_text())
    except Exception as exc:  # missing, offline, malformed: the same fix
        raise UserError(
            f"cannot read the UNet config of '{model}' ({type(exc).__name__}); pass a complete diffusers pipeline "
            "folder (with unet/config.json) or a hub id in the local cache."
        ) from None


def check_weights(cfg: BenchmarkConfig) -> None:
    """The evaluation's networks, required up front: without them the run would stop hours in, at evaluate."""
    if not cfg.lpips or not cfg.fid_features:
        raise UserError(
            "the benchmark measures PP with LPIPS and FID on your captions: pass --lpips vgg:FILE (conversion recipe "
            "in duo.metrics.lpips) and --fid-features clip:PATH_OR_ID (and --clip for CLIP score); nothing is "
            "downloaded. --dry-run needs neither."
        )
    kind, _, path = cfg.lpips.partition(":")
    if kind == "vgg" and not Path(path).is_file():
        raise UserError(f"--lpips '{cfg.lpips}': no file '{path}'; convert the LPIPS weights (see duo.metrics.lpips).")
    for flag, value in (("--fid-features", cfg.fid_features.partition(":")[2]), ("--clip", cfg.clip)):
        if value and value.startswith((".", "/", "~")) and not Path(value).expanduser().exists():
            raise UserError(f"{flag}: no folder '{value}'; pass a local CLIP folder or a hub id in the local cache.")


def format_plan(cfg: BenchmarkConfig, spec: BenchmarkSpec, inputs: dict, out: Path) -> str:
    """The stages, folders and counts, and the estimate of the full protocol (printed before any work)."""
    from duo.data.concepts import load_concept

    targets, captions = inputs["prompts_file"]["rows"], inputs["coco_captions"]["rows"]
    neighbours = len(load_concept(spec.concept).neighbours)
    betas = ", ".join(f"{b:g}" for b in spec.betas)
    lines = [
        f"duo benchmark {spec.name}: {spec.title}" + ("  [DRY RUN: tiny sizes, mechanics only]" if cfg.dry_run else ""),
        f"  model     {cfg.model}" + ("  (family not checked: --allow-other-model)" if cfg.allow_other_model else ""),
        f"  targets   {targets} prompts of {cfg.prompts_file} (sha256 {inputs['prompts_file']['sha256'][:16]}…)",
        f"  captions  {captions} captions of {cfg.coco_captions} (sha256 {inputs['coco_captions']['sha256'][:16]}…)",
        f"  1 curate  concept '{spec.concept}' → {out / 'pairs'}",
        f"  2 train   DUO at β {betas} (authors' recipe, seed {spec.seed}) → {out / 'compare'}/beta{{β}}/…/lora",
        f"  3 attack  {', '.join(spec.attacks)} at --budget {spec.budget}, against the original model and each β",
        f"  4 eval    DSR per attack; PP, FID{', CLIP score' if cfg.clip else ' (no --clip: no CLIP score)'} on the "
        "captions → …/eval/results.json",
        f"  5 report  {out / 'compare' / 'compare.md'}, {out / 'compare' / 'report.html'}, {out / 'benchmark.json'}",
    ]  # fmt: skip
    if cfg.dry_run:
        lines.append(f"  dry run sizes: {json.dumps(asdict(DRY_RUN))}")
        lines.append("  The estimate below is for the full protocol, not for this dry run.")
    lines.append(format_estimate(estimate(spec, targets, captions, neighbours)))
    return "\n".join(lines)
