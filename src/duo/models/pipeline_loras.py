"""LoRA files of a diffusers pipeline, shared by every family: splitting a trained state between the denoiser
and the first text encoder, loading several LoRAs with weights, switching them off, fusing them."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from duo.errors import UserError


class PipelineLoras:
    """Mixin over `self.pipe` (a diffusers pipeline with LoRA loading) and `self.unet` (its denoiser)."""

    # component of the diffusers file → kohya prefix (duo.models.kohya)
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}

    @classmethod
    def kohya_state(cls, layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """The kohya single-file state of a LoRA read by `duo.models.kohya.read_layers` (no model needed)."""
        from duo.models.kohya import kohya_name, layer_entries, text_module

        state = {}
        for component, modules in layers.items():
            prefix = cls.kohya_prefixes.get(component)
            if prefix is None:
                raise ValueError(f"a {cls.title} LoRA has no component '{component}' in the kohya layout")
            for module, (down, up) in modules.items():
                path = module if component in ("unet", "transformer") else text_module(module)
                state.update(layer_entries(kohya_name(prefix, path), down, up))
        return state

    def split_lora_state(self, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """(denoiser part, text-encoder part) of a LoRA state by module name, with B scaled by α/r.

        The file has no α: diffusers' loader (and others) then take α = r, so the attached adapter's α/r is
        folded into B here, or a LoRA trained with --alpha ≠ --rank would load at the wrong strength.
        """
        from duo.models.lora import lora_scale

        components = (self.unet, self.pipe.text_encoder)
        modules = [dict(m.named_modules()) for m in components]
        parts: tuple[dict, dict] = ({}, {})
        for key, value in state.items():
            owner = [i for i, names in enumerate(modules) if key.split(".lora_")[0] in names]
            if len(owner) != 1:
                raise ValueError(f"LoRA key '{key}' names no single module of the denoiser or the text encoder")
            scale = lora_scale(components[owner[0]]) if ".lora_B." in key else 1.0
            parts[owner[0]][key] = value * scale if scale != 1.0 else value
        return parts

    def load_loras(self, loras: list[tuple[str, float]]) -> None:
        """Load several LoRAs and combine them with weights (violence: four sub-concepts at 1.0)."""
        names = []
        for i, (folder, _) in enumerate(loras):
            _require_safetensors(Path(folder))
            name = f"lora{i}"
            try:
                self.pipe.load_lora_weights(folder, adapter_name=name)
            except (RuntimeError, ValueError) as exc:
                raise _foreign_lora(folder, exc) from None
            names.append(name)
        if names:
            self.pipe.set_adapters(names, adapter_weights=[w for _, w in loras])

    @contextmanager
    def loras_off(self):
        """Generate with the original model while LoRAs stay loaded (same pipeline, no reload)."""
        self.pipe.disable_lora()
        try:
            yield self
        finally:
            self.pipe.enable_lora()

    def save_fused(self, folder: Path) -> None:
        """Bake the loaded LoRAs into the weights and save a standalone pipeline."""
        self.pipe.fuse_lora()
        self.pipe.unload_lora_weights()
        self.pipe.save_pretrained(folder, safe_serialization=True)


def _require_safetensors(folder: Path) -> None:
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pth"))
    if pickled:
        raise UserError(
            f"LoRA folder '{folder}' holds only pickled weights ({', '.join(pickled)}), and LoRAs are loaded from "
            "safetensors only (a pickle can run code). Convert it once where you trust it: "
            "safetensors.torch.save_file(torch.load(FILE), 'pytorch_lora_weights.safetensors')."
        )
    raise UserError(
        f"LoRA folder '{folder}' has no pytorch_lora_weights.safetensors; pass the --out folder of `duo train`."
    )


def _foreign_lora(folder: str, exc: Exception) -> UserError:
    """diffusers' error lists every mismatched tensor; the user needs the first one and what it means."""
    first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
    return UserError(
        f"LoRA '{folder}' does not fit this model ({first}): it was trained on another base model. "
        "Pass the --model it was trained on (its run.json names it), or train a LoRA for this one."
    )
