"""Erasing red and circles together in the Shapes world: one joint LoRA, or the two single LoRAs combined, against
each concept's own LoRA.

    python scripts/multi_concept_study.py --red runs/demo/pairs --circle runs/circle/pairs --seeds 0 --out runs/multi

Each LoRA is the shapes preset's recipe (the two concepts' `train:` sections are the same); the joint one is
`duo train --data RED CIRCLE` (balanced draws, joint retain prompts). Every (LoRA set, concept) cell is a
`duo.compare` point: the concept's attacks on its held-out targets, then `duo evaluate` (PP on the concept's
neutral prompts). The table (interference.md) gives, per concept, DSR per attack and PP of each LoRA set.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

CONCEPTS = ("shapes-red", "shapes-circle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--red", required=True, help="shapes-red pairs folder")
    parser.add_argument("--circle", required=True, help="shapes-circle pairs folder")
    parser.add_argument("--out", default="runs/multi")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--attacks", nargs="+", default=["prompts"])
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--joint-steps", type=int, nargs="+", default=[0], help="joint LoRA training steps (0: the preset's)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from duo.compare import PointConfig, run_point, train_point

    out, data = Path(args.out), {"shapes-red": args.red, "shapes-circle": args.circle}
    rows: dict[tuple[str, str], list[dict]] = {}
    for seed in args.seeds:
        single = {c: train_point("shapes", data[c], out / f"seed{seed}" / c, {}, seed, "cpu") for c in CONCEPTS}
        sets = {"own LoRA": None}
        for steps in args.joint_steps:  # the preset's steps share them between the concepts; 2× gives each as many
            name, flags = ("joint", {}) if not steps else (f"joint-steps{steps}", {"steps": steps})
            joint = train_point("shapes", [data[c] for c in CONCEPTS], out / f"seed{seed}" / name, flags, seed, "cpu")
            sets[f"joint LoRA{f', {steps} steps' if steps else ''} (--data red circle)"] = [joint]
        sets["both LoRAs combined"] = list(single.values())
        for concept in CONCEPTS:
            point = PointConfig("shapes", concept, args.attacks, n_prompts=8, images_per_prompt=args.images_per_prompt)
            for label, loras in sets.items():
                folder = out / f"seed{seed}" / "eval" / concept / slug(label)
                result = run_point(point, folder, loras or single[concept], "none", seed, label)
                rows.setdefault((concept, label), []).append(result)
    table = interference_table(rows, args.attacks, len(args.seeds))
    (out / "interference.md").write_text(table)
    (out / "interference.json").write_text(json.dumps({f"{c} | {s}": v for (c, s), v in summary(rows).items()}))
    print(table)


def slug(label: str) -> str:
    return label.split(" (")[0].replace(",", "").replace(" ", "-").lower()


def summary(rows: dict) -> dict:
    out = {}
    for key, runs in rows.items():
        out[key] = {
            "dsr": {a: [r["attacks"][a]["dsr"]["rate"] for r in runs] for a in runs[0]["attacks"]},
            "pp": [r["preservation"]["pp"] for r in runs],
        }
    return out


def interference_table(rows: dict, attacks: list[str], n_seeds: int) -> str:
    def cell(values: list[float], digits: int = 2) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f}" + (f" ± {sd:.{digits}f}" if len(values) > 1 else "")

    head = "| concept | LoRAs | " + " | ".join(f"DSR {a}" for a in attacks) + " | PP |"
    lines = [f"{n_seeds} seed(s).", "", head, "|---|---|" + "---|" * (len(attacks) + 1)]
    for (concept, label), s in summary(rows).items():
        dsr = " | ".join(cell(s["dsr"][a]) for a in attacks)
        lines.append(f"| {concept} | {label} | {dsr} | {cell(s['pp'], 3)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
