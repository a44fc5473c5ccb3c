"""Stable Diffusion XL (ε- and v-prediction): what differs from SD 1.x/2.x, and nothing else.

The noise schedule, training target, latents, LoRA files and loaders are SD's (`StableDiffusionFamily`); SDXL
adds a second text encoder (`StableDiffusionXLText`) and micro-conditioning: its UNet also takes the pooled
text embedding and six numbers, the original size, crop corner and target size of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duo.models.packed import unpack
from duo.models.sd import StableDiffusionFamily, no_safe_latent_diffusion
from duo.models.sdxl_text import StableDiffusionXLText


@dataclass
class StableDiffusionXLFamily(StableDiffusionXLText, StableDiffusionFamily):
    """The `ModelFamily` of SDXL; conditioning is `duo.models.packed`'s (states, pooled) tensor."""

    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    # the invisible watermark would need its own package and changes every image we compare
    load_options = {"add_watermarker": False}
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1"}  # CLIP-L; OpenCLIP-G would be lora_te2

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return (self.pipe.text_encoder, self.pipe.text_encoder_2)

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL's micro-conditioning as the pipeline sets it when sampling at the latents' size: original size =
        target size = the image size, crop corner (0, 0); one row per latent."""
        height, width = (side * self.pipe.vae_scale_factor for side in latents.shape[-2:])
        row = torch.tensor([height, width, 0, 0, height, width], device=latents.device, dtype=self.dtype)
        return row.expand(len(latents), -1)

    def denoise(self, unet, latents: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        states, pooled = unpack(emb.to(self.dtype), self.pooled_dim)
        added = {"text_embeds": pooled, "time_ids": self.time_ids(latents)}
        return unet(latents.to(self.dtype), t, encoder_hidden_states=states, added_cond_kwargs=added).sample

    # ---- generation --------------------------------------------------------------------------
    def _conditioning(self, prompts: list[str], prompt_embeds: torch.Tensor | None) -> dict:
        if prompt_embeds is None:
            return {"prompt": prompts}
        states, pooled = unpack(prompt_embeds, self.pooled_dim)
        return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}

    def _safe_text2image(self, prompts, negative_prompts, sampling: dict, safe_guidance: dict):
        raise no_safe_latent_diffusion(self.ref, self.title)

    def _img2img_pipeline(self):
        from diffusers import StableDiffusionXLImg2ImgPipeline

        return StableDiffusionXLImg2ImgPipeline(**self.pipe.components)
