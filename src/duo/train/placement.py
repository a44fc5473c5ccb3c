"""Where DUO's LoRA sits (`duo train --lora-on`), and which layers of each module `--targets` names."""

from __future__ import annotations

# DUO's `--lora-on` values and the modules each names (MethodSpec.module's values).
LORA_PLACEMENTS = {"unet": ("unet",), "text-encoder": ("text_encoder",), "both": ("unet", "text_encoder")}


def targets_for(targets: str | None, modules: tuple[str, ...], module: str) -> str | None:
    """--targets for one of the trained modules, None for the family's default layers: a single module takes it;
    with both, it names the UNet's layers (a concept file's targets are written for the UNet) and the text
    encoder takes its default."""
    return targets if len(modules) == 1 or module == "unet" else None


def targeted_module(lora_on: str) -> str:
    """The module --targets names under a placement (targets_for's rule)."""
    return "text_encoder" if lora_on == "text-encoder" else "unet"
