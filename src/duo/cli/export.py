"""`duo export`: a trained LoRA as diffusers, kohya (ComfyUI, AUTOMATIC1111) or a fused pipeline."""

from __future__ import annotations

from duo.cli.args import add_dataclass_flags, dataclass_from_args
from duo.export import ExportConfig, export


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "export",
        help="write a trained LoRA for another tool: diffusers, kohya (ComfyUI, AUTOMATIC1111) or fused",
        description="Export the LoRA of a finished `duo train` folder RUN. kohya writes one .safetensors in "
        "sd-scripts' layout (lora_unet_*/lora_te_* with alphas) that ComfyUI and AUTOMATIC1111 load (SD 1.x/2.x, "
        "SDXL, FLUX.1; not SD3); diffusers copies the LoRA and its card; fused saves the whole pipeline with the "
        "LoRA baked in. The folder appears only when whole; export.json names the source and its hash.",
    )
    add_dataclass_flags(parser, ExportConfig, positional=("run",))
    parser.set_defaults(func=run)


def run(args) -> int:
    out = export(dataclass_from_args(ExportConfig, args))
    print(f"exported to {out}")
    return 0
