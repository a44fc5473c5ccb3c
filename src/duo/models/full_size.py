"""The real architectures of SD 1.5, SDXL base 1.0 and SD3-medium, with random weights (no download).

For checks that only full-size models can make: that the LoRA target patterns match the real layers, that
one DUO step fits in memory and how long it takes (tests/test_full_size.py, benchmarks/gpu_step.py). The
configurations below are the published `config.json` values of each component, copied by hand; only the
tokenizers are the toy vocabulary of `duo.models.tiny` (the embedding tables keep their real size), because
the real BPE files are not in the repository. The pipelines are assembled by the tiny builders
(`random_sd_pipeline`, `random_sdxl_pipeline`, `random_sd3_pipeline`), so a full-size folder is laid out,
saved and loaded exactly as a tiny one is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# ---- SD 1.5: stable-diffusion-v1-5/stable-diffusion-v1-5, unet/ vae/ text_encoder/ config.json --------------
SD15_UNET = {
    "sample_size": 64,  # latents of 512 px images
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# The KL-f8 autoencoder of SD 1.x (vae/config.json); SDXL's has the same layers, SD3's 16 latent channels.
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
# openai/clip-vit-large-patch14's text tower (SD 1.5 text_encoder/config.json; SDXL text_encoder, SD3
# text_encoder use the same). `projection_dim` is read only by the with-projection class SD3 uses.
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# ---- SDXL base 1.0: stabilityai/stable-diffusion-xl-base-1.0, unet/ vae/ text_encoder_2/ config.json -------
SDXL_UNET = {
    "sample_size": 128,  # latents of 1024 px images
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,  # CLIP-L 768 + OpenCLIP-bigG 1280, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size/crop numbers × 256 + bigG's pooled 1280
    "norm_num_groups": 32,
}
SDXL_VAE = {**SD_VAE, "scaling_factor": 0.13025, "force_upcast": True}
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k's text tower (SDXL text_encoder_2, SD3 text_encoder_2).
OPENCLIP_BIGG = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# ---- SD3-medium: stabilityai/stable-diffusion-3-medium-diffusers, transformer/ vae/ text_encoder_3/ ---------
SD3_MEDIUM_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL's width; without T5 the CLIP states are zero-padded to it
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}
SD3_VAE = {
    **SD_VAE,
    "latent_channels": 16,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# google/t5-v1_1-xxl's encoder (text_encoder_3/config.json): 4.76 B parameters, so off unless asked for.
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
}

FULL_SIZE = ("sd15", "sdxl", "sd3-medium")


@contextmanager
def building_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside are allocated and initialised directly on `device` in `dtype`.

    The fast init: no float32 copy on the CPU first (SDXL's UNet alone is 10 GB in float32), and on 'cuda'
    the random init runs on the GPU; on 'meta' nothing is allocated at all (parameter counting)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def full_size_pipeline(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", with_t5: bool = False):
    """The diffusers pipeline of `name` ('sd15', 'sdxl', 'sd3-medium') with random weights on `device`."""
    from duo.models.tiny import random_sd_pipeline
    from duo.models.tiny_sd3 import random_sd3_pipeline
    from duo.models.tiny_sdxl import random_sdxl_pipeline

    if name not in FULL_SIZE:
        raise ValueError(f"unknown full-size model '{name}'; one of {', '.join(FULL_SIZE)}")
    if with_t5 and name != "sd3-medium":
        raise ValueError("only SD3 has a T5 encoder")
    with building_on(device, dtype):
        if name == "sd15":
            pipe = random_sd_pipeline(SD15_UNET, SD_VAE, CLIP_L)
        elif name == "sdxl":
            pipe = random_sdxl_pipeline(SDXL_UNET, SDXL_VAE, CLIP_L, OPENCLIP_BIGG)
        else:
            pipe = random_sd3_pipeline(
                SD3_MEDIUM_TRANSFORMER, SD3_VAE, [CLIP_L, OPENCLIP_BIGG], T5_XXL if with_t5 else None
            )
    if device != "meta":
        _check_finite(pipe)
    return pipe


def _check_finite(pipe) -> None:
    # Random init in bf16 can round but never overflow; a NaN here would mean memory was left uninitialised.
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for key, p in module.named_parameters():
                if not torch.isfinite(p).all():
                    raise RuntimeError(f"{name}.{key} is not finite after the random init")


def build_full_size_pipeline(
    name: str, folder: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", with_t5: bool = False
) -> dict[str, int]:
    """Save a full-size pipeline with random weights to `folder` (read back by `load_family`); returns the
    parameter count of each component."""
    from duo.models.tiny import parameter_counts

    pipe = full_size_pipeline(name, dtype=dtype, device=device, with_t5=with_t5)
    pipe.save_pretrained(folder, safe_serialization=True)
    return parameter_counts(pipe)
