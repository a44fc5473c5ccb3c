"""Where DUO's LoRA sits (`duo train --lora-on`), and which of the trained modules `--targets` names."""

from __future__ import annotations

# DUO's `--lora-on` values and the modules each names (MethodSpec.module's values), and how a model card says it.
LORA_PLACEMENTS = {"unet": ("unet",), "text-encoder": ("text_encoder",), "both": ("unet", "text_encoder")}
PLACEMENT_LABELS = {"unet": "UNet", "text-encoder": "text encoder", "both": "UNet and text encoder"}


def targeted_module(modules: tuple[str, ...]) -> str:
    """The module --targets names: the only one trained, or with both the UNet (a concept file's targets are
    written for it); the others take the family's default layers."""
    return modules[0] if len(modules) == 1 else "unet"


def targets_for(targets: str | None, modules: tuple[str, ...], module: str) -> str | None:
    """--targets for one of the trained modules, None for the family's default layers."""
    return targets if module == targeted_module(modules) else None
