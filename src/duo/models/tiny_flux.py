"""A tiny random FLUX.1 pipeline built on the spot (tests): the real classes, sizes shrunk.

FLUX.1-dev's layout by default (guidance embedding, dynamic shifting); `guidance_embeds=False` gives
FLUX.1-schnell's (no guidance embedding, fixed shift 1). Both kinds of transformer block are present, so LoRAs
on the single-stream blocks are exercised too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from duo.models.tiny import TINY_TEXT, write_tokenizer

T5_WIDTH = 128  # stands in for T5-XXL's 4096: the width of the sequence states the context embedder reads
CLIP_WIDTH = 32  # stands in for CLIP-L's 768: the pooled vector
TINY_FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels × a 2×2 patch: FLUX packs latents before the transformer
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": T5_WIDTH,
    "pooled_projection_dim": CLIP_WIDTH,
    "axes_dims_rope": (2, 2, 4),  # sums to the head dim, as FLUX's (16, 56, 56) sums to 128
}
TINY_FLUX_VAE = {
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    # FLUX's VAE values, so that a wrong sign or order of shift and scale shows
    "shift_factor": 0.1159,
    "scaling_factor": 0.3611,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "sample_size": 64,  # the native resolution (FLUX.1's VAE says 1024)
}
# FLUX.1-dev's scheduler; schnell's is shift 1 without dynamic shifting
DEV_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096}  # fmt: skip


def build_tiny_flux_pipeline(folder: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Build, save and return a random tiny FLUX.1 pipeline folder (64 px images, 8×8×16 latents, 16 tokens)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from duo.models.tiny_sd3 import _t5

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tok", model_max_length=77)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **{**TINY_TEXT, "hidden_size": CLIP_WIDTH},
        )
    )
    t5, t5_tokenizer = _t5(T5_WIDTH)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **TINY_FLUX_VAE,
    )
    schedule = DEV_SCHEDULER if guidance_embeds else {"shift": 1.0}
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER, guidance_embeds=guidance_embeds),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **schedule),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
    )
    pipe.save_pretrained(folder)
    for f in (folder / "_tok").iterdir():
        f.unlink()
    (folder / "_tok").rmdir()
    return folder
