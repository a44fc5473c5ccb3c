"""A tiny random Stable Diffusion XL pipeline built on the spot (tests): SDXL's classes at toy sizes.

The two text encoders get different widths (32 and 48) so that code mixing up their tables or their feature
slices fails, and the second tokenizer pads with "!" as SDXL's tokenizer_2 does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from duo.models.sd import SD_BETAS
from duo.models.tiny import TINY_VAE, random_vae, write_tokenizer

TEXT_L = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
TEXT_G = {"hidden_size": 48, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
POOLED = 32  # the second encoder's projection width: SDXL's pooled embedding
TIME_EMBED = 8  # width of each of the six size/crop numbers of SDXL's micro-conditioning
TINY_SDXL_UNET = {
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED + POOLED,
    "cross_attention_dim": TEXT_L["hidden_size"] + TEXT_G["hidden_size"],
    "norm_num_groups": 8,
}


def _text_encoders(vocab_size: int, text_l: dict, text_g: dict):
    """`text_l`/`text_g` may set `vocab_size` (a full-size table wider than the toy vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = {"vocab_size": vocab_size, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1}
    first = CLIPTextModel(CLIPTextConfig(**{**ids, "pad_token_id": 1, **text_l}))
    second = CLIPTextModelWithProjection(CLIPTextConfig(**{**ids, **text_g}))
    return first, second


def build_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build, save and return a random tiny SDXL pipeline folder (64 px images, 8×8 latents, Euler sampler)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    text_g = {**TEXT_G, "projection_dim": POOLED}
    random_sdxl_pipeline(TINY_SDXL_UNET, TINY_VAE, TEXT_L, text_g, prediction_type).save_pretrained(folder)
    return folder


def random_sdxl_pipeline(unet: dict, vae: dict, text_l: dict, text_g: dict, prediction_type: str = "epsilon"):
    """A StableDiffusionXLPipeline of the given sizes with random weights (toy tokenizers)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token="!")
    # built in this order (text encoders, VAE, UNet) so that a seed gives the weights it always gave
    text_encoder, text_encoder_2 = _text_encoders(len(tokenizer), text_l, text_g)
    with torch.device("cpu"):  # its tables are copied to the CPU when made: not on 'meta' (full_size.py)
        scheduler = EulerDiscreteScheduler(
            **SD_BETAS, steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type
        )
    return StableDiffusionXLPipeline(
        vae=random_vae(vae, unet["sample_size"]),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**unet),
        scheduler=scheduler,
        add_watermarker=False,
    )
