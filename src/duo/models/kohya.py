"""The single-file LoRA layout of kohya's sd-scripts, which ComfyUI and AUTOMATIC1111 load.

Each adapted layer is `<prefix>_<module path, dots as underscores>` with `.lora_down.weight` (A),
`.lora_up.weight` (B) and `.alpha`. Loaders scale B·A by alpha / rank; our diffusers files already hold
α/r folded into B (duo.models.pipeline_loras), so alpha is written equal to the rank and the product is
unchanged. The family adapters say which prefix each component takes and, for FLUX, how separate q/k/v
layers become the fused projections of the original checkpoint; this module only reads and writes keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

# (down, up) suffixes of the diffusers file: `.lora.down/up` for SD UNets, peft's `lora_A/B` elsewhere
SUFFIXES = ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight"))


def read_layers(path: Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{component: {module path: (down, up)}} of a diffusers LoRA file (`unet.`, `transformer.`, `text_encoder.`
    prefixes); every down must have its up, or the file is not a whole LoRA."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in state:
        for down, up in SUFFIXES:
            if key.endswith(down):
                module = key[: -len(down)]
                if module + up not in state:
                    raise ValueError(f"{path.name}: '{key}' has no matching '{module + up}'")
                component, _, name = module.partition(".")
                layers.setdefault(component, {})[name] = (state[key], state[module + up])
    n_pairs = sum(len(v) for v in layers.values())
    if 2 * n_pairs != len(state):
        raise ValueError(f"{path.name}: {len(state) - 2 * n_pairs} tensors are not LoRA down/up pairs")
    return layers


def layer_entries(name: str, down: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
    """One kohya layer; alpha = rank, so a loader's alpha / rank is 1 and B·A is used as stored."""
    rank = torch.tensor(float(down.shape[0]), dtype=down.dtype)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": rank}


def kohya_name(prefix: str, module: str) -> str:
    return f"{prefix}_{module.replace('.', '_')}"


def text_module(module: str) -> str:
    """CLIP layer paths as kohya names them (`text_model.encoder...`): transformers 5 dropped the `text_model`
    wrapper from CLIPTextModel, and a file named after the new path would load nowhere else."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def fused_layer(parts: list[tuple[torch.Tensor, torch.Tensor] | None], out_dims: list[int]) -> tuple:
    """One LoRA on a fused projection (FLUX's qkv) from LoRAs on its slices: downs stacked, ups block-diagonal.

    Slice i of the output then sees only its own rank block, so the fused layer equals the separate ones
    exactly; a slice without a LoRA (None) gets a zero block of the same rank, which loaders that split the
    fused layer back (diffusers' kohya FLUX reader) recognise as block-diagonal and drop to zeros.
    """
    known = next(p for p in parts if p is not None)
    rank, in_dim = known[0].shape
    dtype = known[0].dtype
    downs, ups = [], torch.zeros(sum(out_dims), rank * len(parts), dtype=dtype)
    row = 0
    for i, (part, dim) in enumerate(zip(parts, out_dims, strict=True)):
        down, up = part if part is not None else (torch.zeros(rank, in_dim, dtype=dtype), None)
        if down.shape != (rank, in_dim):
            raise ValueError(f"fused slices differ in rank or input size: {tuple(down.shape)} vs {(rank, in_dim)}")
        downs.append(down)
        if up is not None:
            ups[row : row + dim, i * rank : (i + 1) * rank] = up
        row += dim
    return torch.cat(downs), ups
