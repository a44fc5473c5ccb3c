"""`duo train`: train the DUO LoRA on a pairs folder."""

from __future__ import annotations

import os

from duo.cli.args import add_command, explicit_values
from duo.train.api import train_from_flags
from duo.train.config import TrainConfig


def add_parser(sub) -> None:
    add_command(
        sub,
        "train",
        TrainConfig,
        run,
        help="train the unlearning LoRA with the DUO objective",
        description="Train a LoRA on the UNet with DUO: L = −log σ(−β[Δ(x⁺) − Δ(x⁻)]) + λ‖ε_θ(x_T) − ε_ref(x_T)‖². "
        "Defaults are the authors' (SPEC §3), then the concept file's `train:` section, then your flags. "
        "An existing --out is never overwritten silently: use --resume or --overwrite.",
        suppress_defaults=True,
    )


def run(args) -> int:
    out = train_from_flags(explicit_values(TrainConfig, args))
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under accelerate launch
        print(f"LoRA: {out / 'pytorch_lora_weights.safetensors'}")
    return 0
