"""`duo sweep`: train over a β list (lr and λ follow β by the coupling), attack and evaluate each, one report.

Every β gets its own folder, out/beta{β}/ with lora/, attacks/{name}/ and eval/; each stage resumes, so a
rerun of a killed sweep continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from duo.errors import UserError


@dataclass
class SweepConfig:
    model: str = field(metadata={"help": "diffusers pipeline: hub id, local folder, or 'shapes'"})
    data: str = field(metadata={"help": "pairs folder written by `duo curate`"})
    out: str = field(metadata={"help": "sweep folder: beta{β}/ per point and report.html"})
    betas: list[float] = field(metadata={"help": "β values (lr = base_lr·100/β, λ coupled likewise)"})
    steps: int | None = field(default=None, metadata={"help": "training steps (default: the concept's)"})
    attacks: list[str] = field(default_factory=lambda: ["prompts"], metadata={"help": "attacks run on each β"})
    budget: str = field(default="small", metadata={"help": "attack budget: small or paper"})
    n_prompts: int | None = field(default=None, metadata={"help": "attack targets (default: the budget's)"})
    images_per_prompt: int | None = field(default=None, metadata={"help": "images per attack prompt"})
    eval_prompts: int = field(default=30, metadata={"help": "neutral prompts of the evaluation"})
    prompts_file: str | None = field(default=None, metadata={"help": "neutral prompts for `duo evaluate`"})
    lpips: str | None = field(default=None, metadata={"help": "LPIPS network for `duo evaluate`"})
    fid_features: str | None = field(default=None, metadata={"help": "FID features for `duo evaluate`"})
    seed: int = field(default=0, metadata={"help": "seed of training, attacks and evaluation"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})


def _concept_of(data: str) -> str:
    import json

    from duo.data.curate import CONFIG

    path = Path(data) / CONFIG
    if not path.is_file():
        raise UserError(f"'{data}' is not a pairs folder (no {CONFIG}). Make one with `duo curate`.")
    return json.loads(path.read_text())["settings"]["concept"]["source"]


def sweep(cfg: SweepConfig) -> list[dict]:
    from duo.attacks import ATTACKS, AttackConfig, run_attack
    from duo.evaluate import EvaluateConfig, evaluate
    from duo.report import build_report
    from duo.train.api import resolve_config
    from duo.train.loop import LORA_FILE, train

    if not cfg.betas or any(b <= 0 for b in cfg.betas):
        raise UserError("--betas needs positive values, e.g. --betas 25 50 100 500")
    unknown = set(cfg.attacks) - set(ATTACKS)
    if unknown:
        raise UserError(f"--attacks: unknown {sorted(unknown)}; choose from {', '.join(ATTACKS)}")
    concept = _concept_of(cfg.data)
    results = []
    for beta in cfg.betas:
        point = Path(cfg.out) / f"beta{beta:g}"
        lora = point / "lora"
        if not (lora / LORA_FILE).is_file():
            explicit = {"model": cfg.model, "data": cfg.data, "out": str(lora), "beta": beta, "seed": cfg.seed}
            explicit.update(resume=lora.exists(), device=cfg.device, **({"steps": cfg.steps} if cfg.steps else {}))
            train(resolve_config(**explicit))
        folders = []
        for name in cfg.attacks:
            folder = point / "attacks" / name
            attack = AttackConfig(
                model=cfg.model, concept=concept, out=str(folder), lora=[str(lora)], budget=cfg.budget,
                n_prompts=cfg.n_prompts, images_per_prompt=cfg.images_per_prompt, seed=cfg.seed, device=cfg.device,
            )  # fmt: skip
            run_attack(name, attack)
            folders.append(str(folder))
        evaluation = EvaluateConfig(
            model=cfg.model, concept=concept, out=str(point / "eval"), lora=[str(lora)], attacks=folders,
            n_prompts=cfg.eval_prompts, prompts_file=cfg.prompts_file, lpips=cfg.lpips,
            fid_features=cfg.fid_features, seed=cfg.seed, device=cfg.device, label=f"β={beta:g}",
        )  # fmt: skip
        results.append(evaluate(evaluation))
    build_report([str(Path(cfg.out) / f"beta{b:g}" / "eval") for b in cfg.betas], str(Path(cfg.out) / "report.html"))
    return results
