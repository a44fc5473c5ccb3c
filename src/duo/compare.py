"""`duo demo --compare` and `duo sweep`: methods side by side on the same pairs, attacks, judge and seeds.

Each (method, seed) is a point: out/{method}/seed{s}/ with lora/ (trained methods), attacks/{name}/ and
eval/. Every stage resumes, so a killed comparison continues where it stopped. The summary is the mean and
standard deviation over seeds of each attack's DSR, PP and FID: compare.json, compare.md and the report.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from duo.data.files import atomic_write_text
from duo.errors import UserError
from duo.runs import RunFolder
from duo.worlds import world_named


@dataclass(frozen=True)
class Method:
    """A trained method (train: flags of `duo train`) or an inference-time guard on the original model."""

    label: str
    train: dict | None = None
    guard: str = "none"
    folder: str = ""  # default: the label, lower-case, in file-name characters

    @property
    def slug(self) -> str:
        return self.folder or re.sub(r"[^a-z0-9.]+", "-", self.label.lower().replace("β=", "beta")).strip("-")


# The Shapes world's tuned comparison; why each setting was chosen is written beside it, in duo.shapes.world.
SHAPES_METHODS = tuple(Method(**m) for m in world_named("shapes").methods)


@dataclass
class PointConfig:
    """What every point of a comparison shares."""

    model: str
    concept: str
    attacks: list[str]
    budget: str = "small"
    n_prompts: int | None = None
    images_per_prompt: int | None = None
    eval_prompts: int = 30
    prompts_file: str | None = None
    lpips: str | None = None
    fid_features: str | None = None
    device: str = "cpu"
    # attacks also run on the training targets (the LoRA's own prompts), beside the held-out default
    training_attacks: tuple[str, ...] = ()
    # Fields of duo.attacks.AttackConfig / duo.evaluate.EvaluateConfig beyond the ones above (`duo benchmark`:
    # the user's target prompts, sampling steps), and each attack's Settings ({attack: {field: value}}).
    attack_config: dict = field(default_factory=dict)
    attack_settings: dict = field(default_factory=dict)
    evaluate_config: dict = field(default_factory=dict)

    def cells(self) -> list[str]:
        """The keys of evaluate's attacks (`duo.evaluate.attack_key`) this point reports, in table order."""
        return [*self.attacks, *(f"{a}@training" for a in self.training_attacks)]


def run_point(
    p: PointConfig, folder: Path, lora: str | list[str] | None, guard: str, seed: int, label: str, *,
    attack_root: Path | None = None, eval_folder: Path | None = None,
) -> dict:  # fmt: skip
    """Every attack against (model + lora, guard), then `duo evaluate` with those attack folders.

    The attacks go to attack_root/{name} and the evaluation to eval_folder, by default folder/attacks and
    folder/eval (a comparison point); `duo demo` places them in its own, documented layout.
    """
    from duo.attacks import AttackConfig, run_attack
    from duo.evaluate import EvaluateConfig, evaluate

    loras = [lora] if isinstance(lora, str) else list(lora) if lora else None  # several: combined at weight 1
    attack_root = folder / "attacks" if attack_root is None else attack_root
    eval_folder = folder / "eval" if eval_folder is None else eval_folder
    folders = []
    runs = [(a, "held-out", a) for a in p.attacks] + [(a, "training", f"{a}-training") for a in p.training_attacks]
    for name, split, folder_name in runs:
        attack_folder = attack_root / folder_name
        attack = AttackConfig(
            model=p.model, concept=p.concept, out=str(attack_folder), lora=loras, guard=guard, budget=p.budget,
            n_prompts=p.n_prompts, images_per_prompt=p.images_per_prompt, seed=seed, device=p.device, targets=split,
            **p.attack_config,
        )  # fmt: skip
        run_attack(name, attack, **p.attack_settings.get(name, {}))
        folders.append(str(attack_folder))
    evaluation = EvaluateConfig(
        model=p.model, concept=p.concept, out=str(eval_folder), lora=loras, guard=guard, attacks=folders,
        n_prompts=p.eval_prompts, prompts_file=p.prompts_file, lpips=p.lpips, fid_features=p.fid_features,
        seed=seed, device=p.device, label=label, **p.evaluate_config,
    )  # fmt: skip
    return evaluate(evaluation)


def train_point(model: str, data: str | list[str], lora: Path, flags: dict, seed: int, device: str) -> str:
    """Train (or resume, or reuse) the LoRA of one point."""
    from duo.train.api import LORA_FILE, resolve_config, train
    from duo.train.outputs import claim_folder

    explicit = {"model": model, "data": data, "out": str(lora), "device": device, **flags}
    if flags.get("method", "duo") != "uce":  # a closed form has no seed and nothing to resume
        explicit["seed"] = seed
    if (lora / LORA_FILE).is_file():
        # reused only if trained with these settings: a changed row or default must not pass off an old LoRA
        claim_folder(resolve_config(**explicit), resume=True)
        return str(lora)
    if explicit.get("method", "duo") == "uce":
        explicit["overwrite"] = lora.exists()
    else:
        explicit["resume"] = lora.exists()
    train(resolve_config(**explicit))
    return str(lora)


def concept_of(data: str) -> str:
    """The concept file a pairs folder was curated from."""
    from duo.data.pairs import require_pairs

    return require_pairs(data)["concept"]["source"]


def check_attacks(names: list[str], allow_none: bool = False) -> list[str]:
    """The attack names, each one known (`none` dropped where it may stand for no attack)."""
    from duo.attacks import ATTACKS

    kept = [a for a in names if not (allow_none and a == "none")]
    unknown = set(kept) - set(ATTACKS)
    if unknown:
        raise UserError(
            f"--attacks: unknown {sorted(unknown)}; choose from {', '.join(ATTACKS)}{' or none' if allow_none else ''}"
        )
    return kept


def compare(
    model: str, data: str, out: Path, methods: list[Method], seeds: list[int], p: PointConfig, title: str
) -> list[dict]:
    """Every method × seed, then the summary over seeds and one report; returns the summary rows."""
    from duo.report import build_report

    check_attacks([*p.attacks, *p.training_attacks])
    if not seeds:
        raise UserError("--seeds needs at least one seed")
    # Methods and seeds may grow between runs: each point claims (and checks) its own folders.
    config = {
        "model": model,
        "point": asdict(p),
        "title": title,
        "methods": [asdict(m) for m in methods],
        "seeds": seeds,
    }
    run = RunFolder.claim(out, "compare", config, {"data": data}, volatile=("methods", "seeds")).start()
    results: dict[str, list[dict]] = {}
    folders = []
    for m in methods:
        for seed in seeds:
            point = out / m.slug / f"seed{seed}"
            lora = train_point(model, data, point / "lora", m.train, seed, p.device) if m.train is not None else None
            results.setdefault(m.label, []).append(run_point(p, point, lora, m.guard, seed, f"{m.label} s{seed}"))
            folders.append(str(point / "eval"))
    rows = [summarise(label, runs, p.cells()) for label, runs in results.items()]
    atomic_write_text(out / "compare.json", json.dumps({"seeds": seeds, "rows": rows}, indent=2))
    atomic_write_text(out / "compare.md", markdown_table(rows, p.cells(), len(seeds)))
    # Grids of the first seed only: with every seed the page grows by ~0.3 MB a point and shows the same thing.
    first = [str(out / m.slug / f"seed{seeds[0]}" / "eval") for m in methods]
    build_report(folders, str(out / "report.html"), title=title, summary=rows, grid_folders=first)
    run.finish(["compare.json", "compare.md", "report.html"])
    return rows


def _mean_sd(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def summarise(label: str, runs: list[dict], attacks: list[str]) -> dict:
    """Mean ± sd over seeds of each attack's DSR, PP and FID vs the original."""
    return {
        "label": label,
        "method": runs[0].get("method", {}),
        "n_seeds": len(runs),
        "dsr": {a: _mean_sd([r["attacks"][a]["dsr"]["rate"] for r in runs]) for a in attacks},
        "pp": _mean_sd([r["preservation"]["pp"] for r in runs]),
        # FID only when evaluate had --fid-features (a real model without them has none)
        "fid": _mean_sd([r["fid"]["original"]["fid"] for r in runs]) if all("fid" in r for r in runs) else None,
    }


def markdown_table(rows: list[dict], attacks: list[str], n_seeds: int) -> str:
    head = "| method | " + " | ".join(f"DSR {column_name(a)}" for a in attacks) + " | PP | FID vs original |"
    lines = [f"Mean ± sd over {n_seeds} seed(s).", "", head, "|---" * (len(attacks) + 3) + "|"]
    for r in rows:
        cells = [f"{r['dsr'][a]['mean']:.2f} ± {r['dsr'][a]['sd']:.2f}" for a in attacks]
        pp, fid = r["pp"], r["fid"]
        lines.append(
            f"| {r['label']} | "
            + " | ".join(cells)
            + f" | {pp['mean']:.3f} ± {pp['sd']:.3f} | "
            + (f"{fid['mean']:.1f} ± {fid['sd']:.1f} |" if fid else "— |")
        )
    return "\n".join(lines) + "\n"


def column_name(cell: str) -> str:
    """`prompts` (held-out targets) → "prompts (held-out)"; `prompts@training` → "prompts (training)"."""
    name, _, split = cell.partition("@")
    return f"{name} ({split or 'held-out'})"


@dataclass(kw_only=True)
class PointFlags:
    """The attack and evaluation flags a command running comparison points shares (`duo sweep`, `duo tune`)."""

    budget: str = field(default="small", metadata={"help": "attack budget: small or paper"})
    n_prompts: int | None = field(default=None, metadata={"help": "attack targets (default: the budget's)"})
    images_per_prompt: int | None = field(default=None, metadata={"help": "images per attack prompt"})
    eval_prompts: int = field(default=30, metadata={"help": "neutral prompts of the evaluation"})
    prompts_file: str | None = field(default=None, metadata={"help": "neutral prompts for `duo evaluate`"})
    lpips: str | None = field(default=None, metadata={"help": "LPIPS network for `duo evaluate`"})
    fid_features: str | None = field(default=None, metadata={"help": "FID features for `duo evaluate`"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})

    def point(self, **extra) -> PointConfig:
        """Needs `model`, `data` and `attacks` on the subclass."""
        return PointConfig(
            model=self.model, concept=concept_of(self.data), attacks=self.attacks, budget=self.budget,
            n_prompts=self.n_prompts, images_per_prompt=self.images_per_prompt, eval_prompts=self.eval_prompts,
            prompts_file=self.prompts_file, lpips=self.lpips, fid_features=self.fid_features, device=self.device,
            **extra,
        )  # fmt: skip


@dataclass
class SweepConfig(PointFlags):
    model: str = field(metadata={"help": "diffusers pipeline: hub id, local folder, or 'shapes'"})
    data: str = field(metadata={"help": "pairs folder written by `duo curate`"})
    out: str = field(metadata={"help": "sweep folder: beta{β}/seed{s}/ per point, compare.md and report.html"})
    betas: list[float] = field(metadata={"help": "β values (lr = base_lr·100/β, λ coupled likewise)"})
    steps: int | None = field(default=None, metadata={"help": "training steps (default: the concept's)"})
    attacks: list[str] = field(default_factory=lambda: ["prompts"], metadata={"help": "attacks run on each β"})
    training_attacks: list[str] = field(
        default_factory=list,
        metadata={"help": "attacks also run on the training targets, beside the held-out ones (e.g. prompts)"},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "seeds of training, attacks, evaluation"})

    def point(self) -> PointConfig:
        return super().point(training_attacks=tuple(self.training_attacks))


def sweep(cfg: SweepConfig) -> list[dict]:
    """DUO over a β list (lr and λ follow β by the coupling): the DUO-only comparison."""
    if not cfg.betas or any(b <= 0 for b in cfg.betas):
        raise UserError("--betas needs positive values, e.g. --betas 25 50 100 500")
    steps = {"steps": cfg.steps} if cfg.steps else {}
    methods = [Method(f"β={b:g}", {"beta": b, **steps}, folder=f"beta{b:g}") for b in cfg.betas]
    return compare(cfg.model, cfg.data, Path(cfg.out), methods, cfg.seeds, cfg.point(), title="duo sweep")
