"""`duo train`: train the unlearning LoRA on a pairs folder, with DUO or a baseline (--method)."""

from __future__ import annotations

import os

from duo.cli.args import add_dataclass_flags, explicit_values
from duo.train.api import LORA_FILE, train_from_flags
from duo.train.config import TrainConfig, flag_groups


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="train the unlearning LoRA with the DUO objective (or a baseline: --method)",
        description="Train a LoRA on the UNet (or, with --lora-on, on the text encoder or on both) with DUO: "
        "L = −log σ(−β[Δ(x⁺) − Δ(x⁻)]) + λ‖ε_θ(x_T) − ε_ref(x_T)‖². "
        "Defaults are the authors' (SPEC §3), then the concept file's `train:` section (DUO only), then your "
        "flags. The flags of a method other than --method's are refused. "
        "An existing --out is never overwritten silently: use --resume or --overwrite.",
    )
    for title, config in flag_groups():
        group = parser.add_argument_group(title, (config.__doc__ or "").strip())
        add_dataclass_flags(group, config, suppress_defaults=True)
    parser.set_defaults(func=run)


def run(args) -> int:
    out = train_from_flags(explicit_values(TrainConfig, args))
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under accelerate launch
        print(f"LoRA: {out / LORA_FILE}")
    return 0
