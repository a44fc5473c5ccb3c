"""`duo sample`: generate images, optionally with LoRAs combined with weights."""

from __future__ import annotations

from duo import shard
from duo.cli.args import add_command, dataclass_from_args
from duo.sample import SampleConfig, sample


def add_parser(sub) -> None:
    add_command(
        sub,
        "sample",
        SampleConfig,
        run,
        help="generate images with a model and LoRAs",
        description="Generate every prompt × seed. --lora DIR[:WEIGHT] may be repeated to "
        "combine LoRAs (the violence preset: four parts at weight 1).",
    )


def run(args) -> int:
    records = sample(dataclass_from_args(SampleConfig, args))
    if shard.is_main():  # one line, not one per process under accelerate launch
        print(f"{len(records)} images in {args.out}")
    return 0
