"""`duo tune`: search β for the highest worst-case DSR with PP ≥ a floor; the chosen LoRA in --out/chosen."""

from __future__ import annotations

from pathlib import Path

from duo.cli.args import add_command, dataclass_from_args
from duo.tune import CHOSEN, TuneConfig, table, tune

# The search ran but no β met the floor: not bad input (2), but a script chaining `duo export OUT/chosen`
# must stop here, so not success either.
NO_FEASIBLE = 1


def add_parser(sub) -> None:
    add_command(
        sub,
        "tune",
        TuneConfig,
        run,
        help="choose β: highest worst-case DSR over --attacks with PP ≥ --min-pp; writes the chosen LoRA",
        description="A log-spaced grid of --grid β values over [--beta-min, --beta-max], then bisection in log β "
        "from the best point toward the neighbour that could hide a better one, at most --max-runs β values. "
        "Each β is a `duo sweep` point (--out/beta{β}/seed{s}/: train, --attacks, evaluate; every stage "
        "resumes, so a rerun with the same flags continues). Prints the table of points tried; copies the chosen "
        f"LoRA (first seed) to --out/{CHOSEN}/ (load it like any LoRA folder); tune.json and tune.md summarise. "
        f"Exit {NO_FEASIBLE} if no β reaches --min-pp (the table is still written, no {CHOSEN}/).",
    )


def run(args) -> int:
    cfg = dataclass_from_args(TuneConfig, args)

    def progress(point) -> None:
        dsr = ", ".join(f"{a} {v:.2f}" for a, v in point.dsr.items())
        print(f"β={point.beta:g} ({point.stage}): DSR {dsr}; worst {point.worst:.2f}; PP {point.pp:.3f}", flush=True)

    result = tune(cfg, on_point=progress)
    print()
    print(table(cfg, result))
    print(f"stopped: {result.stopped}")
    if result.chosen is None:
        print(f"no β tried reaches PP ≥ {cfg.min_pp:g}; no LoRA chosen. Lower --min-pp or widen --beta-min/--beta-max.")
        return NO_FEASIBLE
    print(f"chosen: β={result.chosen.beta:g} → {Path(cfg.out) / CHOSEN} (summary: {cfg.out}/tune.md)")
    return 0
