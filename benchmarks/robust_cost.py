"""Benchmark: the training cost of DUO-adv (robust DUO) against plain DUO, side by side on one machine.

    .venv/bin/python benchmarks/robust_cost.py --pairs runs/demo/pairs                 # preset steps, 2 rounds
    .venv/bin/python benchmarks/robust_cost.py --pairs runs/demo/pairs --steps 100     # quicker
    .venv/bin/python benchmarks/robust_cost.py --pairs runs/demo/pairs --variants DUO "DUO-adv soft+ud all"

Both variants are the whole `duo train` command on the same Shapes pairs, seed and thread count: plain DUO
is the pairs' concept preset (shapes-red), DUO-adv the preset plus make compare's DUO-adv flags
(`duo.shapes.world.DUO_ADV`: soft-prompt and unlearndiff inner attacks splitting the batch, 40 steps every 20,
10 vectors, the unconditional anchor, a text-encoder LoRA, its weights averaged), "DUO-adv te all" the row before
it (every pair under both adversaries, 20 steps every 20, 5 vectors), "DUO-adv unet" the study's first finalist
(soft-prompt adversary and anchor on the UNet), the soft+ud variants those of docs/robust_duo.md's two-adversary
rows on the UNet (rounds taking turns, or both refreshed every round, `--adv-rounds all`), "DUO-adv both" and
"DUO-adv 1000 steps" two of the circle levers of 2026-12-08 (DUO-adv with a UNet LoRA beside the encoder's;
twice the steps and rounds), so start-up,
encoding caches and checkpointing are in both. Rounds alternate the order (A B, B A, ...) because these
machines drift by ±20 % within minutes; one runs while the other is idle. Reported: each variant's median
wall seconds and the median of the per-round ratios DUO-adv / DUO (the issue's target: ≤ 3×).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from duo.shapes.world import DUO_ADV, DUO_ADV_TE_ALL, DUO_ADV_UNET

BOTH = {**DUO_ADV_UNET, "adversarial": "soft-prompt+unlearndiff"}
VARIANTS = {
    "DUO": {},
    "DUO-adv": DUO_ADV,  # make compare's row
    "DUO-adv te all": DUO_ADV_TE_ALL,  # make compare's row until 2026-12-08: the s20e20 pair on the text encoder
    "DUO-adv unet": DUO_ADV_UNET,
    "DUO-adv soft+ud turns": BOTH,
    "DUO-adv soft+ud all": {**BOTH, "adv_rounds": "all"},
    # the same inner-attack steps in half as many, stronger rounds (docs/robust_duo.md, 20 every 20)
    "DUO-adv soft+ud all s20e20": {**BOTH, "adv_rounds": "all", "adv_steps": 20, "adv_every": 20},
    # stop 28's circle levers: a UNet LoRA beside the encoder's; twice the steps (and so twice the rounds)
    "DUO-adv both": {**DUO_ADV, "lora_on": "both"},
    "DUO-adv 1000 steps": {**DUO_ADV, "steps": 1000},
}


def flags(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def run(pairs: str, out: Path, extra: list[str], steps: int | None, threads: int) -> float:
    cmd = [sys.executable, "-m", "duo", "train", "--model", "shapes", "--data", pairs]
    cmd += ["--out", str(out), "--threads", str(threads), *extra] + (["--steps", str(steps)] if steps else [])
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", required=True, help="a Shapes pairs folder (`duo curate` / make demo)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps (both variants)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["DUO", "DUO-adv"])
    args = parser.parse_args()
    variants = {name: flags(VARIANTS[name]) for name in dict.fromkeys(["DUO", *args.variants])}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                out = Path(tmp) / f"{name}-{r}"
                seconds[name].append(run(args.pairs, out, variants[name], args.steps, args.threads))
                print(f"round {r} {name}: {seconds[name][-1]:.1f} s", flush=True)
    for name, values in seconds.items():
        print(f"{name:22s} median {statistics.median(values):.1f} s over {len(values)} runs")
    for name in list(variants)[1:]:
        ratios = [a / b for a, b in zip(seconds[name], seconds["DUO"], strict=True)]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"{name} / DUO: median per-round ratio {statistics.median(ratios):.2f} ({each})")


if __name__ == "__main__":
    main()
