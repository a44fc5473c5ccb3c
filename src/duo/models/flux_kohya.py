"""FLUX.1 LoRAs in kohya's layout: the original checkpoint's block names, where diffusers' separate q, k, v (and,
in the single-stream blocks, the MLP input) are one fused projection.

A LoRA on the separate layers becomes one LoRA on the fused layer (`duo.models.kohya.fused_layer`: ranks
stacked, ups block-diagonal), the form diffusers' own kohya FLUX reader splits back exactly.
"""

from __future__ import annotations

import re

import torch

from duo.models.kohya import fused_layer, layer_entries, text_module

MLP_RATIO = 4  # FLUX.1's single-stream MLP width over the attention width (3072 → 12288)

# diffusers layer of a double-stream block → kohya name of the block's layer
DOUBLE = {
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp_0",
    "ff.net.2": "img_mlp_2",
    "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2",
    "norm1.linear": "img_mod_lin",
    "norm1_context.linear": "txt_mod_lin",
}
DOUBLE_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def flux_kohya_state(layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    blocks: dict[tuple[str, int], dict[str, tuple]] = {}
    for module, pair in layers.get("transformer", {}).items():
        match = BLOCK.fullmatch(module)
        if match is None:
            raise ValueError(f"FLUX LoRA layer '{module}' is outside the transformer blocks: no kohya name for it")
        kind, index, layer = match.groups()
        blocks.setdefault((kind, int(index)), {})[layer] = pair
    for (kind, index), block in sorted(blocks.items()):
        prefix = "lora_unet_double_blocks" if kind == "transformer_blocks" else "lora_unet_single_blocks"
        plain, fused = (DOUBLE, DOUBLE_FUSED) if kind == "transformer_blocks" else (SINGLE, SINGLE_FUSED)
        state.update(_block(f"{prefix}_{index}", block, plain, fused, f"{kind}.{index}"))
    for module, (down, up) in layers.get("text_encoder", {}).items():
        state.update(layer_entries(f"lora_te1_{text_module(module).replace('.', '_')}", down, up))
    unknown = set(layers) - {"transformer", "text_encoder"}
    if unknown:
        raise ValueError(f"a FLUX LoRA has components {sorted(unknown)} the kohya layout has no prefix for")
    return state


def _block(name: str, block: dict, plain: dict, fused: dict, where: str) -> dict[str, torch.Tensor]:
    state = {}
    for layer, pair in block.items():
        if layer in plain:
            state.update(layer_entries(f"{name}_{plain[layer]}", *pair))
        elif not any(layer in slices for slices in fused.values()):
            raise ValueError(f"FLUX LoRA layer '{where}.{layer}' has no kohya name")
    for target, slices in fused.items():
        parts = [block.get(s) for s in slices]
        if any(p is not None for p in parts):
            state.update(layer_entries(f"{name}_{target}", *fused_layer(parts, _out_dims(parts))))
    return state


def _out_dims(parts: list) -> list[int]:
    """Output width of each slice: q, k, v share the attention width; the single blocks' MLP input is 4× it."""
    attention = [p[1].shape[0] for p in parts[:3] if p is not None]
    width = attention[0] if attention else parts[3][1].shape[0] // MLP_RATIO
    dims = [width] * 3
    if len(parts) == 4:
        dims.append(parts[3][1].shape[0] if parts[3] is not None else MLP_RATIO * width)
    return dims
