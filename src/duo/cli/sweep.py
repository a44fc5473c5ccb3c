"""`duo sweep`: train, attack and evaluate over a β list, then one report."""

from __future__ import annotations

from duo.cli.args import add_command, dataclass_from_args
from duo.sweep import SweepConfig, sweep


def add_parser(sub) -> None:
    add_command(
        sub,
        "sweep",
        SweepConfig,
        run,
        help="DUO over a β list: train, attack, evaluate each; report.html with the DSR-vs-PP figure",
        description="For each β and seed: `duo train` (lr and λ coupled to β), the --attacks at --budget, "
        "`duo evaluate`; then the mean ± sd over seeds (compare.md) and `duo report` over all of them in "
        "--out/report.html. Every stage resumes.",
    )


def run(args) -> int:
    for r in sweep(dataclass_from_args(SweepConfig, args)):
        dsr = ", ".join(f"{k} {v['mean']:.3f}" for k, v in r["dsr"].items())
        print(f"{r['label']}: PP {r['pp']['mean']:.3f}, DSR {dsr} (mean of {r['n_seeds']} seed(s))")
    print(f"report: {args.out}/report.html; table: {args.out}/compare.md")
    return 0
