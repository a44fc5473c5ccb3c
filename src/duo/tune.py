"""`duo tune`: choose DUO's β automatically — the highest worst-case DSR over the attacks with PP ≥ a floor.

A coarse log-spaced grid over [--beta-min, --beta-max], then bisection in log β from the best point toward
its promising neighbour, at most --max-runs β values in all. Each β is a `duo sweep` point,
out/beta{β}/seed{s}/ with lora/, attacks/ and eval/, so every stage resumes: a killed `duo tune` rerun with
the same flags retraces the same β values (the search is deterministic given the results) and only
computes what is missing. The chosen point's LoRA (its first seed's) is copied to out/chosen/, a plain LoRA
folder that loads, samples and exports on its own; tune.json (with "chosen": β, seed, source folder) and
tune.md hold the table of every point tried. If no β meets the floor there is no chosen/ and the CLI exits 1.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from duo.compare import Method, PointConfig, PointFlags, check_attacks, column_name, run_point, train_point
from duo.data.files import atomic_write_text
from duo.errors import UserError
from duo.runs import RunFolder

CHOSEN = "chosen"  # out/chosen/: a self-contained copy of the chosen LoRA folder


@dataclass
class TuneConfig(PointFlags):
    model: str = field(metadata={"help": "diffusers pipeline: hub id, local folder, or 'shapes'"})
    data: str = field(metadata={"help": "pairs folder written by `duo curate`"})
    out: str = field(metadata={"help": "tune folder: beta{β}/seed{s}/ per point, tune.json, tune.md, chosen/"})
    min_pp: float = field(
        default=0.95, metadata={"help": "prior-preservation floor: a β is feasible if its PP (mean over seeds) ≥ it"}
    )
    attacks: list[str] = field(
        default_factory=lambda: ["prompts"],
        metadata={"help": "attacks run on each β; the objective is the worst (lowest) DSR among them"},
    )
    # One grid point per decade by default: DUO's useful β spans two decades across models (Shapes 25–100 in
    # the README sweep, SD 250–1000 in the paper), so 10/100/1000 brackets either, and bisection refines.
    beta_min: float = field(default=10.0, metadata={"help": "smallest β of the grid (strongest erasure)"})
    beta_max: float = field(default=1000.0, metadata={"help": "largest β of the grid (gentlest)"})
    grid: int = field(default=3, metadata={"help": "points of the coarse grid, log-spaced over the β range"})
    max_runs: int = field(
        default=4, metadata={"help": "β values evaluated in all, grid included (each: train + attacks + evaluate)"}
    )
    steps: int | None = field(default=None, metadata={"help": "training steps (default: the concept's)"})
    seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "seeds per β (DSR and PP are their means); chosen/ is the first"}
    )

    def check(self) -> None:
        """Every flag a user can get wrong, before any model loads."""
        if not (0 < self.min_pp <= 1):
            raise UserError(f"--min-pp {self.min_pp} is not a PP: give a number in (0, 1], e.g. --min-pp 0.95")
        check_attacks(self.attacks)
        if not self.attacks:
            raise UserError("--attacks needs at least one attack, e.g. --attacks prompts ring-a-bell")
        if not (0 < self.beta_min and math.isfinite(self.beta_max)):
            raise UserError(f"--beta-min {self.beta_min} / --beta-max {self.beta_max}: β must be positive and finite")
        if self.beta_min >= self.beta_max:
            raise UserError(
                f"--beta-min {self.beta_min:g} is not below --beta-max {self.beta_max:g}: the range is reversed or "
                "empty; swap them (e.g. --beta-min 10 --beta-max 1000)"
            )
        if self.grid < 2:
            raise UserError(f"--grid {self.grid}: the coarse grid needs at least 2 points to bracket the optimum")
        if self.max_runs < self.grid:
            raise UserError(
                f"--max-runs {self.max_runs} is below --grid {self.grid}: the grid alone needs {self.grid} runs; "
                f"raise --max-runs or lower --grid"
            )
        if not self.seeds:
            raise UserError("--seeds needs at least one seed, e.g. --seeds 0")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps {self.steps}: give a positive number of training steps")


# ---- the search: pure functions of the results seen, tested with a synthetic evaluator ----


@dataclass(frozen=True)
class Point:
    """One β's measurement: DSR per attack and PP (means over seeds)."""

    beta: float
    dsr: dict[str, float]
    pp: float
    stage: str = "grid"  # grid | bisect

    @property
    def worst(self) -> float:
        return min(self.dsr.values())

    def feasible(self, min_pp: float) -> bool:
        return self.pp >= min_pp


@dataclass
class Search:
    points: list[Point]
    chosen: Point | None
    stopped: str  # why the search ended, in words


def round_beta(beta: float) -> float:
    """Two significant figures: folder names stay readable (beta32, beta320), and a bisection whose midpoint
    rounds onto a β already tried has reached the resolution worth a training run (~10 % in β)."""
    return float(f"{beta:.2g}")


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """n log-spaced β from lo to hi, ends included, rounded; duplicates from rounding dropped."""
    values = [round_beta(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]
    return sorted(set(values))


def choose(points: list[Point], min_pp: float) -> Point | None:
    """The highest worst-case DSR among feasible points; ties → the larger PP, then the larger β."""
    feasible = [p for p in points if p.feasible(min_pp)]
    return max(feasible, key=lambda p: (p.worst, p.pp, p.beta), default=None)


def promising(best: Point, other: Point, min_pp: float) -> bool:
    """Could a β between best and this neighbour beat best, if DSR and PP each move monotonically in between?

    Two ways, whichever the direction of β: the neighbour has a higher DSR but misses the floor (the floor's
    boundary lies between, with DSR above best's on the feasible side), or it has a lower DSR and a higher PP
    (best's DSR may hold for part of the way, with more PP: the tie-break). Anything else cannot win.
    """
    if other.worst > best.worst:
        return not other.feasible(min_pp)
    return other.worst < best.worst and other.pp > best.pp


def next_beta(points: list[Point], min_pp: float) -> tuple[float | None, str]:
    """The next β to try, from the results seen, or None and why the search ends."""
    best = choose(points, min_pp)
    if best is None:
        return None, f"no β tried reaches PP ≥ {min_pp:g}: lower --min-pp or widen the β range"
    ordered = sorted(points, key=lambda p: p.beta)
    i = ordered.index(best)
    neighbours = [ordered[j] for j in (i - 1, i + 1) if 0 <= j < len(ordered)]
    candidates = [n for n in neighbours if promising(best, n, min_pp)]
    if not candidates:
        return None, f"converged: no β beside β={best.beta:g} can beat it"
    # A higher DSR is worth more than a higher PP (DSR is the objective, PP the tie-break).
    toward = max(candidates, key=lambda n: (n.worst, n.pp))
    mid = round_beta(math.sqrt(best.beta * toward.beta))
    if mid in {p.beta for p in points}:
        return None, f"converged: β={best.beta:g}..{toward.beta:g} holds no untried β at 2 significant figures"
    return mid, ""


def search(
    measure: Callable[[float], tuple[dict[str, float], float]],
    grid: list[float],
    max_runs: int,
    min_pp: float,
    on_point: Callable[[Point], None] | None = None,
) -> Search:
    """The grid, then bisection, within max_runs calls of measure(β) → (DSR per attack, PP)."""
    points: list[Point] = []

    def run(beta: float, stage: str) -> None:
        dsr, pp = measure(beta)
        points.append(Point(beta, dict(dsr), pp, stage))
        if on_point:
            on_point(points[-1])

    for beta in grid[:max_runs]:
        run(beta, "grid")
    stopped = f"budget: --max-runs {max_runs} reached"
    while len(points) < max_runs:
        beta, why = next_beta(points, min_pp)
        if beta is None:
            stopped = why
            break
        run(beta, "bisect")
    if len(points) >= max_runs and choose(points, min_pp) is None:
        stopped = next_beta(points, min_pp)[1]
    return Search(points, choose(points, min_pp), stopped)


# ---- the command: points as sweep points, the table, the chosen LoRA ----


def beta_folder(beta: float) -> str:
    return f"beta{beta:g}"


def measure_point(cfg: TuneConfig, p: PointConfig, beta: float) -> tuple[dict[str, float], float]:
    """Train, attack and evaluate one β on every seed (each stage resumes); the means over seeds."""
    steps = {"steps": cfg.steps} if cfg.steps else {}
    method = Method(f"β={beta:g}", {"beta": beta, **steps}, folder=beta_folder(beta))
    runs = []
    for seed in cfg.seeds:
        point = Path(cfg.out) / method.slug / f"seed{seed}"
        lora = train_point(cfg.model, cfg.data, point / "lora", method.train, seed, cfg.device)
        runs.append(run_point(p, point, lora, method.guard, seed, f"{method.label} s{seed}"))
    dsr = {a: statistics.fmean(r["attacks"][a]["dsr"]["rate"] for r in runs) for a in cfg.attacks}
    return dsr, statistics.fmean(r["preservation"]["pp"] for r in runs)


def tune(cfg: TuneConfig, on_point: Callable[[Point], None] | None = None) -> Search:
    """Search β, write tune.json / tune.md and (if a point is feasible) the chosen LoRA to out/chosen/."""
    cfg.check()
    out = Path(cfg.out)
    p = cfg.point()  # reads the pairs folder: a wrong --data fails here, before any model loads
    # --max-runs may grow between runs (a rerun with a larger budget continues the same search).
    run = RunFolder.claim(out, "tune", asdict(cfg), {"data": cfg.data}, volatile=("max_runs",)).start()
    result = search(
        lambda b: measure_point(cfg, p, b),
        log_grid(cfg.beta_min, cfg.beta_max, cfg.grid),
        cfg.max_runs,
        cfg.min_pp,
        on_point,
    )
    outputs = write_summary(cfg, result)
    run.finish(outputs, chosen_beta=result.chosen.beta if result.chosen else None)
    return result


def write_summary(cfg: TuneConfig, result: Search) -> list[str]:
    """tune.json, tune.md and chosen/; returns the files to record in run.json."""
    from duo.train.outputs import LORA_FILE

    out = Path(cfg.out)
    chosen = None
    if result.chosen is not None:
        source = Path(beta_folder(result.chosen.beta)) / f"seed{cfg.seeds[0]}" / "lora"
        copy_lora(out / source, out / CHOSEN)
        chosen = {"beta": result.chosen.beta, "seed": cfg.seeds[0], "folder": CHOSEN, "source": str(source)}
    elif (out / CHOSEN).exists():
        shutil.rmtree(out / CHOSEN)  # a previous run's choice must not outlive a search that found none
    record = {
        "min_pp": cfg.min_pp,
        "attacks": cfg.attacks,
        "seeds": cfg.seeds,
        "max_runs": cfg.max_runs,
        "points": [{**asdict(pt), "worst": pt.worst, "feasible": pt.feasible(cfg.min_pp)} for pt in result.points],
        "chosen": chosen,
        "stopped": result.stopped,
    }
    atomic_write_text(out / "tune.json", json.dumps(record, indent=2))
    atomic_write_text(out / "tune.md", markdown(cfg, result))
    return ["tune.json", "tune.md"] + ([f"{CHOSEN}/{LORA_FILE}"] if chosen else [])


def copy_lora(source: Path, target: Path) -> None:
    """A copy, not a link: out/chosen/ loads, exports and uploads on its own, after beta*/ folders are deleted.
    Training checkpoints stay behind (resume state, many times the LoRA's size)."""
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("checkpoints"))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def table(cfg: TuneConfig, result: Search) -> str:
    """The points in the order tried: β, DSR per attack, worst case, PP, feasible, which was chosen."""
    head = "| # | stage | β | " + " | ".join(f"DSR {column_name(a)}" for a in cfg.attacks)
    lines = [head + " | worst DSR | PP | feasible |", "|---" * (len(cfg.attacks) + 6) + "|"]
    for i, pt in enumerate(result.points, 1):
        cells = " | ".join(f"{pt.dsr[a]:.2f}" for a in cfg.attacks)
        mark = " ← chosen" if pt is result.chosen else ""
        feasible = "yes" if pt.feasible(cfg.min_pp) else "no"
        lines.append(f"| {i} | {pt.stage} | {pt.beta:g} | {cells} | {pt.worst:.2f} | {pt.pp:.3f} | {feasible}{mark} |")
    return "\n".join(lines) + "\n"


def markdown(cfg: TuneConfig, result: Search) -> str:
    seeds = ", ".join(map(str, cfg.seeds))
    intro = f"PP floor {cfg.min_pp:g}; DSR and PP are means over seed(s) {seeds}; stopped: {result.stopped}."
    if result.chosen is None:
        verdict = f"No β tried is feasible (PP ≥ {cfg.min_pp:g}); no LoRA was chosen."
    else:
        verdict = f"Chosen: β={result.chosen.beta:g}, copied to {CHOSEN}/ (seed {cfg.seeds[0]}'s LoRA)."
    return f"{intro}\n\n{table(cfg, result)}\n{verdict}\n"
