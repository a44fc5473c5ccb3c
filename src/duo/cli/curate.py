"""`duo curate`: make pairs (unsafe image, SDEdit safe edit) for a concept."""

from __future__ import annotations

from duo import shard
from duo.cli.args import add_command, dataclass_from_args
from duo.data.curate import CurateConfig, curate


def add_parser(sub) -> None:
    add_command(
        sub,
        "curate",
        CurateConfig,
        run,
        help="make image pairs that differ only in the concept",
        description=__doc__.split(":", 1)[1].strip() + " Rerunning with the same --out resumes; "
        "finished pairs are never redone. Concept YAML schema: see README.",
    )


def run(args) -> int:
    manifest = curate(dataclass_from_args(CurateConfig, args))
    if shard.is_main():  # one line, not one per process under accelerate launch
        print(f"pairs: {manifest}")
    return 0
