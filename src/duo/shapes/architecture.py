"""The Shapes world's networks: Stable Diffusion's own diffusers/transformers classes at tiny sizes.

AutoencoderKL 32x32x3 -> 8x8x4, a three-level UNet2DConditionModel on 8x8 latents, a three-layer
CLIPTextModel over the Shapes tokenizer; assembled into a standard StableDiffusionPipeline (DDIM).
"""

from __future__ import annotations

import torch

from duo.models.sd import assemble_pipeline
from duo.shapes.tokenizer import MAX_LENGTH


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_text_encoder(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        projection_dim=128,
    )
    return CLIPTextModel(cfg)


def build_pipeline(vae, text_encoder, tokenizer, unet):
    return assemble_pipeline(unet, vae, text_encoder, tokenizer)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to the VAE's [-1, 1]."""
    return x * 2 - 1
