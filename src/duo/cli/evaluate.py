"""`duo evaluate`: DSR per attack, prior preservation (1 − LPIPS), FID, CLIP score, neighbour damage."""

from __future__ import annotations

from duo import shard
from duo.cli.args import add_command, dataclass_from_args
from duo.evaluate import EvaluateConfig, evaluate


def add_parser(sub) -> None:
    add_command(
        sub,
        "evaluate",
        EvaluateConfig,
        run,
        help="measure an unlearned model: DSR per attack, preservation, FID, CLIP score",
        description="Generate neutral and neighbour prompts with the original model (LoRAs off, no guard) and "
        "the unlearned one (LoRAs, guard), compare them, collect the DSR of `duo attack` folders, and write "
        "results.json in --out (what `duo report` reads). The Shapes world measures with its judge's features; "
        "elsewhere pass --lpips vgg:FILE, --fid-features clip:ID and --clip ID (weights are never downloaded).",
    )


def run(args) -> int:
    r = evaluate(dataclass_from_args(EvaluateConfig, args))
    dsr = ", ".join(f"{k} {v['dsr']['rate']:.3f}" for k, v in r["attacks"].items()) or "no attacks given"
    fid = r.get("fid", {}).get("original", {}).get("fid")
    if shard.is_main():  # one line, not one per process under accelerate launch
        print(
            f"{r['label']}: PP {r['preservation']['pp']:.3f} (n={r['preservation']['n']}), DSR {dsr}"
            + (f", FID vs original {fid:.2f}" if fid is not None else "")
            + f"\nresults: {args.out}/results.json"
        )
    return 0
