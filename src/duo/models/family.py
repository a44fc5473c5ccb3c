"""Model families: `load_family` picks the adapter; `ModelFamily` (protocol.py) is all that callers may use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from duo.errors import UserError
from duo.models.loading import check_device, read_model_index, resolve_model_ref

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily

FAMILIES = {
    "StableDiffusionPipeline": "duo.models.sd:StableDiffusionFamily",
    "StableDiffusionImg2ImgPipeline": "duo.models.sd:StableDiffusionFamily",
    "StableDiffusionXLPipeline": "duo.models.sdxl:StableDiffusionXLFamily",
    "StableDiffusionXLImg2ImgPipeline": "duo.models.sdxl:StableDiffusionXLFamily",
    "StableDiffusion3Pipeline": "duo.models.sd3:StableDiffusion3Family",
    "StableDiffusion3Img2ImgPipeline": "duo.models.sd3:StableDiffusion3Family",
    "FluxPipeline": "duo.models.flux:FluxFamily",
    "FluxImg2ImgPipeline": "duo.models.flux:FluxFamily",
}
PLANNED: dict[str, str] = {}


def load_family(ref: str, dtype: str = "float32", device: str = "cpu", allow_pickle: bool = False) -> ModelFamily:
    """Load a pipeline and wrap it in the adapter of its family."""
    check_device(device)
    path = resolve_model_ref(ref)
    family_cls = family_class(ref)
    return family_cls.load(path, ref=ref, dtype=dtype, device=device, allow_pickle=allow_pickle)


def family_class(ref: str) -> type:
    """The adapter class of a model's family, read from its model_index.json without loading any weights."""
    import importlib

    cls_name = read_model_index(resolve_model_ref(ref)).get("_class_name", "")
    if cls_name not in FAMILIES:
        known = ", ".join(sorted(set(FAMILIES)))
        later = f" {PLANNED[cls_name]} support is planned but not there yet." if cls_name in PLANNED else ""
        raise UserError(
            f"model '{ref}' is a {cls_name or 'pipeline of unknown class'} (model_index.json's _class_name); "
            f"duo supports {known}.{later} Pass --model a pipeline of one of these families."
        )
    module, name = FAMILIES[cls_name].split(":")
    return getattr(importlib.import_module(module), name)


def load_with_loras(
    ref: str,
    lora_specs: list[str] | None,
    dtype: str = "float32",
    device: str = "cpu",
    allow_pickle: bool = False,
    threads: int | None = None,
) -> ModelFamily:
    """The model a command works on: the family with its `DIR[:W]` LoRAs loaded (and torch's CPU threads set)."""
    from duo.models.lora_spec import parse_lora_spec

    if threads:
        import torch

        torch.set_num_threads(threads)
    family = load_family(ref, dtype=dtype, device=device, allow_pickle=allow_pickle)
    family.load_loras([parse_lora_spec(s) for s in lora_specs or []])
    return family
