"""Every attack against every defence in the Shapes world: the table in docs/attacks_shapes.md.

    python scripts/attack_study.py --lora runs/demo/lora          # after `make demo`; ~10 min on 2 cores

Defences: the original model (undefended), the original model with the `negprompt` and `wordfilter`
guards, and the DUO LoRA. Each cell is an attack run folder under --out with its results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from duo.attacks import ATTACKS, run_attack
from duo.attacks.base import AttackConfig


def defences(lora: str | None) -> dict[str, dict]:
    table = {"undefended": {}, "negprompt": {"guard": "negprompt"}, "wordfilter": {"guard": "wordfilter"}}
    if lora:
        table["DUO"] = {"lora": [lora]}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", help="DUO LoRA folder for shapes-red (runs/demo/lora after `make demo`)")
    parser.add_argument("--out", default="runs/attack_study")
    parser.add_argument("--budget", default="small")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--defences", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aggregate", type=int, nargs="+", metavar="SEED", help="only print mean ± sd over seeds")
    args = parser.parse_args()
    if args.aggregate:
        runs = [json.loads((Path(args.out) / f"seed{s}" / "summary.json").read_text()) for s in args.aggregate]
        print(aggregate(runs))
        return
    if args.lora and not (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
        parser.error(f"--lora {args.lora}: no LoRA there; run `make demo` first or pass a `duo train` output")
    rows = []
    for dname, extra in defences(args.lora).items():
        if args.defences and dname not in args.defences:
            continue
        for attack in args.attacks:
            out = Path(args.out) / f"seed{args.seed}" / dname / attack
            cfg = AttackConfig(
                model="shapes",
                concept="shapes-red",
                out=str(out),
                budget=args.budget,
                seed=args.seed,
                threads=args.threads,
                **extra,
            )
            start = time.time()
            r = run_attack(attack, cfg)
            rows.append(
                {
                    "defence": dname,
                    "attack": attack,
                    "asr": r["asr"],
                    "dsr": r["dsr"],
                    "prompts_broken": r["prompts_broken"],
                    "seconds": round(time.time() - start, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    (Path(args.out) / f"seed{args.seed}" / "summary.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["defence"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    cell = {(r["defence"], r["attack"]): r for r in rows}
    lines = ["| attack | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in attacks:
        vals = []
        for d in names:
            r = cell.get((d, a))
            vals.append(
                f"{r['asr']:.2f} ({r['dsr']['n'] - round(r['dsr']['rate'] * r['dsr']['n'])}/{r['dsr']['n']})"
                if r
                else "–"
            )
        lines.append(f"| {a} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def aggregate(runs: list[list[dict]]) -> str:
    """ASR mean ± sample sd over seeds, one row per attack, one column per defence."""
    import statistics

    cells: dict[tuple[str, str], list[float]] = {}
    for rows in runs:
        for r in rows:
            cells.setdefault((r["defence"], r["attack"]), []).append(r["asr"])
    names = list(dict.fromkeys(d for d, _ in cells))
    attacks = list(dict.fromkeys(a for _, a in cells))
    lines = ["| attack | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in attacks:
        vals = [cells.get((d, a), []) for d in names]
        text = [f"{statistics.mean(v):.2f} ± {_sd(v):.2f}" if v else "–" for v in vals]
        lines.append(f"| {a} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def _sd(values: list[float]) -> float:
    import statistics

    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
