"""FLUX.1 dev and schnell (rectified flow, MMDiT with single-stream blocks): the only code that knows this family.

What differs from SD3 (`StableDiffusion3Family`, whose flow maths, VAE latents, LoRA files and UCE carry over):
- The transformer reads latents packed in 2×2 patches (16 channels → 64 per token) with position ids for the
  image tokens and (zero) ones for the text tokens; `denoise` packs and unpacks, so everything above still sees
  (N, 16, h, w) latents and targets.
- dev's scheduler shifts σ by the image's token count (dynamic shifting): `add_noise` and `denoise` take the
  shift from the latents they are given, i.e. from the training resolution, as sampling at that size would.
- dev is guidance-distilled: its transformer takes the guidance scale as an input. `denoise` feeds it
  `self.guidance` (3.5, dev's pipeline default) during training and attacks, since the family cannot know the
  scale a user will sample with; set it on the family to train for another. schnell has no such input.
- Generation: duo's `guidance` is FluxPipeline's `guidance_scale` (the distilled scale: dev only). Negative
  prompts need real classifier-free guidance, which FluxPipeline runs as `true_cfg_scale`; duo sets that to the
  same `guidance`, so a negative prompt steers as in SD (ε₋ + g·(ε₊ − ε₋)), on top of dev's distilled guidance,
  at twice the transformer calls. At guidance ≤ 1 a negative prompt is ignored, as in SD.
Text side and token API: `duo.models.flux_text` (learned token vectors reach CLIP's pooled vector only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duo.models.flow import FlowSchedule
from duo.models.flux_text import FluxText
from duo.models.packed import unpack
from duo.models.sd3 import CONTEXT_ATTENTION, StableDiffusion3Family

DEV_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale for dev

# Double-stream blocks (`transformer_blocks`) keep SD3's split: image-stream projections to_q/k/v, to_out.0, and
# context-stream add_*_proj, to_add_out. Single-stream blocks (`single_transformer_blocks`) attend over
# [text ; image] with one set of to_q/k/v (their output projection `proj_out` is shared with the MLP); the `.*`
# prefix takes them in: they are the only attention over image tokens in two thirds of FLUX's blocks.
IMAGE_ATTENTION = r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$"
# ESD-u: the image stream's attention and feed-forward, the single-stream blocks' MLP and output projection.
IMAGE_STREAM = r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_mlp|proj_out)$"


@dataclass
class FluxFamily(FluxText, StableDiffusion3Family):
    """The `ModelFamily` of FLUX.1 dev and schnell; `unet` is the FLUX transformer."""

    guidance: float = DEV_GUIDANCE  # the distilled guidance `denoise` gives dev's transformer

    pipeline_class_name = "FluxPipeline"
    img2img_class_name = "FluxImg2ImgPipeline"
    title = "FLUX.1"
    kohya_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1"}

    @classmethod
    def kohya_state(cls, layers: dict) -> dict[str, torch.Tensor]:
        """kohya's FLUX layout names the original checkpoint's fused layers (duo.models.flux_kohya)."""
        from duo.models.flux_kohya import flux_kohya_state

        return flux_kohya_state(layers)

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """CLIP-L, T5: a text-side LoRA goes on CLIP-L, which gives FLUX its pooled vector only."""
        return (self.pipe.text_encoder, self.pipe.text_encoder_2)

    @property
    def native_resolution(self) -> int:
        """The VAE's sample size: FLUX's transformer has none, and its pipeline's default (1024) is a constant."""
        return int(self.pipe.vae.config.sample_size)

    # ---- flow maths at the latents' size ---------------------------------------------------------
    def schedule_at(self, latents: torch.Tensor) -> FlowSchedule:
        """The σ table sampling uses at the size of (N, C, h, w) latents: one token per 2×2 patch."""
        h, w = latents.shape[-2:]
        return FlowSchedule.from_scheduler_config(self.pipe.scheduler.config, image_tokens=(h // 2) * (w // 2))

    @property
    def schedule(self) -> FlowSchedule:
        """The table at the native resolution; ranges of integer timesteps do not depend on the shift."""
        side = self.native_resolution // self.pipe.vae_scale_factor
        return self.schedule_at(torch.empty(0, 0, side, side))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule_at(x0).add_noise(x0, noise, t)

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) → (N, h/2 · w/2, 4C): each token a 2×2 patch, channels outermost (FluxPipeline's layout)."""
        n, c, h, w = latents.shape
        return type(self.pipe)._pack_latents(latents, n, c, h, w)

    def unpack_latents(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        scale = self.pipe.vae_scale_factor
        return type(self.pipe)._unpack_latents(tokens, h * scale, w * scale, scale)

    def denoise(self, unet, latents: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        states, pooled = unpack(emb.to(self.dtype), self.pooled_dim)
        n, _, h, w = latents.shape
        device = latents.device
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((n,), float(self.guidance), device=device)
        out = unet(
            hidden_states=self.pack_latents(latents.to(self.dtype)),
            # FluxPipeline passes the scheduler's timestep σ·N divided by 1000; the transformer multiplies back
            timestep=self.schedule_at(latents).model_timestep(t.to(device)) / 1000,
            guidance=guidance,
            encoder_hidden_states=states,
            pooled_projections=pooled,
            txt_ids=torch.zeros(states.shape[1], 3, device=device, dtype=self.dtype),
            img_ids=type(self.pipe)._prepare_latent_image_ids(n, h // 2, w // 2, device, self.dtype),
        ).sample
        return self.unpack_latents(out, h, w)

    def lora_targets(self, method: str, module: str | None = None) -> str:
        """DUO: the image stream's attention and the single-stream blocks' attention; ESD-x: the context stream's
        projections (SD3's `CONTEXT_ATTENTION`), where the prompt enters; ESD-u: `IMAGE_STREAM`; text-side LoRAs:
        CLIP-L's attention and MLP (which reach the pooled vector only)."""
        from duo.models.lora import TEXT_ENCODER_LAYERS

        if module == "text_encoder":
            return TEXT_ENCODER_LAYERS
        return {
            "duo": IMAGE_ATTENTION,
            "esd-x": CONTEXT_ATTENTION,
            "esd-u": IMAGE_STREAM,
            "advunlearn": TEXT_ENCODER_LAYERS,
        }[method]

    # ---- generation --------------------------------------------------------------------------
    def _guidance(self, guidance: float, negative_prompts: list[str] | None) -> dict:
        """duo's one guidance scale as FluxPipeline's two (see the module's docstring)."""
        if not negative_prompts:
            return {"guidance_scale": guidance}
        return {"guidance_scale": guidance, "true_cfg_scale": guidance,
                "negative_prompt": self.expand_tokens(negative_prompts)}  # fmt: skip
