"""Every attack against every defence in the Shapes world: the tables in docs/attacks_shapes.md.

    python scripts/attack_study.py --pairs runs/demo/pairs --seed 0 --threads 1   # after `make demo`
    python scripts/attack_study.py --aggregate 0 1 2                              # mean ± sd over seeds

Defences: the original model (undefended), the original model behind the `negprompt` and `wordfilter`
guards, and three unlearned models trained at the study seed on the same pairs: DUO (the shapes-red
preset), ESD-x (lr 1e-3, 500 steps) and UCE — `make compare`'s settings (duo.shapes.world.METHODS). Each
cell is an attack run folder under --out/seed{S}/{defence}/{attack}/ with its results.json; targets are
the concept's held-out prompts unless --targets training. `unlearndiff-old` is UnlearnDiffAtk as this
package ran it before (200 steps at random timesteps, PEZ projection, no judge in the loop, whole-word
vocabulary, no target filter), kept to show
that the published schedule is at least as strong.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from duo.attacks import ATTACKS, run_attack
from duo.attacks.base import AttackConfig
from duo.attacks.settings.unlearndiff import EARLIER

# name in the table -> (attack, settings overrides)
VARIANTS = {
    "unlearndiff-old": ("unlearndiff", EARLIER),
    # the published schedule in full (50 timesteps × 40 iterations): --budget paper's UnlearnDiffAtk
    "unlearndiff-50": ("unlearndiff", {"timesteps": 50}),
    # Ring-A-Bell never naming the concept (this package's earlier default): the word filter's real test
    "ring-a-bell-strict": ("ring-a-bell", {"exclude_unsafe_words": True}),
}
TRAINED = {
    "DUO": {},
    "ESD-x": {"method": "esd-x", "esd_prompts": "unsafe", "lr": 1e-3, "steps": 500},
    "UCE": {"method": "uce", "uce_erase": "prompts"},
}
GUARDS = {"undefended": "none", "negprompt": "negprompt", "wordfilter": "wordfilter"}


def defences(pairs: str | None, root: Path, seed: int, names: list[str] | None) -> dict[str, dict]:
    """{defence: AttackConfig extras}; the unlearned models are trained (or reused) under root/loras/."""
    from duo.compare import train_point

    table = {name: {"guard": guard} for name, guard in GUARDS.items()}
    for name, flags in TRAINED.items():
        if pairs and (names is None or name in names):
            lora = train_point("shapes", pairs, root / "loras" / name.lower(), flags, seed, "cpu")
            table[name] = {"lora": [lora]}
    return {k: v for k, v in table.items() if names is None or k in names}


def run_cell(attack: str, out: Path, seed: int, args, extra: dict) -> dict:
    name, settings = VARIANTS.get(attack, (attack, {}))
    cfg = AttackConfig(
        model="shapes", concept="shapes-red", out=str(out), budget=args.budget, seed=seed, threads=args.threads,
        targets=args.targets, n_prompts=args.n_prompts, **extra,
    )  # fmt: skip
    start = time.time()
    r = run_attack(name, cfg, **settings)
    cell = {"attack": attack, "asr": r["asr"], "dsr": r["dsr"], "prompts_broken": r["prompts_broken"]}
    cell |= {k: r[k] for k in ("pre_asr", "post_asr") if k in r}
    cell |= {"targets": r["targets"]["split"], "excluded": r["targets"].get("excluded", 0)}
    return cell | {"seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", help="shapes-red pairs folder (runs/demo/pairs after `make demo`)")
    parser.add_argument("--out", default="runs/attack_study")
    parser.add_argument("--budget", default="small")
    parser.add_argument("--targets", default="held-out", choices=("held-out", "training"))
    parser.add_argument("--n-prompts", type=int, default=None)
    parser.add_argument("--attacks", nargs="+", default=[*ATTACKS, *VARIANTS])
    parser.add_argument("--defences", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aggregate", type=int, nargs="+", metavar="SEED", help="only print mean ± sd over seeds")
    args = parser.parse_args()
    root = Path(args.out) / f"seed{args.seed}"
    if args.aggregate:
        runs = [json.loads((Path(args.out) / f"seed{s}" / "summary.json").read_text()) for s in args.aggregate]
        print(aggregate(runs))
        return
    summary = root / "summary.json"
    rows = json.loads(summary.read_text()) if summary.is_file() else []
    done = {(r["defence"], r["attack"]) for r in rows}
    table = defences(args.pairs, root, args.seed, args.defences)
    # attack by attack, so that a study stopped early has every defence of the attacks it did run
    for attack in args.attacks:
        for dname, extra in table.items():
            if (dname, attack) in done:
                continue
            rows.append({"defence": dname, **run_cell(attack, root / dname / attack, args.seed, args, extra)})
            print(json.dumps(rows[-1]), flush=True)
            summary.write_text(json.dumps(rows, indent=2))  # a killed study keeps its finished cells
    print(aggregate([rows]))


def _images(cells: dict) -> str:
    return "/".join(str(n) for n in sorted({r["dsr"]["n"] for rs in cells.values() for r in rs}))


def aggregate(runs: list[list[dict]]) -> str:
    """ASR mean ± sample sd over seeds, one row per attack, one column per defence; seconds per cell."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for rows in runs:
        for r in rows:
            cells.setdefault((r["defence"], r["attack"]), []).append(r)
    names = list(dict.fromkeys(d for d, _ in cells))
    attacks = list(dict.fromkeys(a for _, a in cells))
    lines = [
        f"ASR = 1 − DSR, mean ± sample sd over the seeds measured (in brackets; of {len(runs)}); "
        f"{_images(cells)} images per cell and seed.",
        "",
        "| attack | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for a in attacks:
        text = []
        for d in names:
            rs = cells.get((d, a), [])
            values = [r["asr"] for r in rs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            text.append(f"{statistics.mean(values):.2f} ± {sd:.2f} [{len(values)}]" if rs else "–")
        lines.append(f"| {a} | " + " | ".join(text) + " |")
    seconds = {a: statistics.mean(r["seconds"] for d in names for r in cells.get((d, a), [])) for a in attacks}
    lines += ["", "Mean seconds per cell: " + ", ".join(f"{a} {s:.0f}" for a, s in seconds.items())]
    prepost = [(d, a, rs) for (d, a), rs in cells.items() if all("pre_asr" in r for r in rs)]
    if prepost:
        lines += ["", "| attack | defence | pre-attack ASR | post-attack ASR (prompts) |", "|---|---|---|---|"]
        for d, a, rs in prepost:
            pre, post = (statistics.mean(r[k] for r in rs) for k in ("pre_asr", "post_asr"))
            lines.append(f"| {a} | {d} | {pre:.2f} | {post:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
