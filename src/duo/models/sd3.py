"""Stable Diffusion 3 / 3.5 (rectified flow, MMDiT): the only code that knows this family.

Flow maths: `duo.models.flow` (integer t indexes the shifted σ table in ascending noise). Text side and
token API: `duo.models.sd3_text`. Conditioning is one packed tensor (`duo.models.packed`).

The losses carry over unchanged with the velocity v = ε − x₀ as target. ESD's negative guidance included:
at fixed x_t and σ, v = (ε − x_t)/(1 − σ) is an affine map of ε, and ESD's target ε(c∅) − η·(ε(c) − ε(c∅))
weighs its predictions by 1 + η and −η, which sum to 1, so for σ < 1 the same combination of velocities is
the same target (a sample's loss is its ε-space loss times 1/(1 − σ)²: the weighting flow matching trains with).
Not supported: Safe Latent Diffusion (diffusers has it for SD 1.x/2.x only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from duo.errors import UserError
from duo.models.flow import FlowSchedule
from duo.models.packed import unpack
from duo.models.pipeline_loras import PipelineLoras
from duo.models.sd import latent_distribution, no_safe_latent_diffusion, release_encoders, torch_dtype
from duo.models.sd3_text import StableDiffusion3Text

# LoRA targets of the joint attention. Each block attends over [image tokens ; text tokens]: the image stream's
# projections (to_q/k/v, to_out.0) play the role of SD's self-attention, the context stream's (add_*_proj,
# to_add_out) carry the prompt into the attention, as SD's cross-attention does. SD3.5's dual-attention blocks
# add `attn2`, an attention over image tokens alone: self-attention proper.
IMAGE_ATTENTION = r".*transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0)$"
CONTEXT_ATTENTION = r".*transformer_blocks\.\d+\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
JOINT_ATTENTION = (
    r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
)
# ESD-u: every layer of the image stream (attention and feed-forward), none of the context stream.
IMAGE_STREAM = r".*transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"


@dataclass
class StableDiffusion3Family(StableDiffusion3Text, PipelineLoras):
    """The `ModelFamily` of SD3 and SD3.5; `unet` is the MMDiT transformer (the protocol's name for the denoiser)."""

    pipe: object
    ref: str
    device: str
    dtype: torch.dtype

    pipeline_class_name = "StableDiffusion3Pipeline"
    img2img_class_name = "StableDiffusion3Img2ImgPipeline"
    title = "Stable Diffusion 3"

    @classmethod
    def kohya_state(cls, layers: dict) -> dict[str, torch.Tensor]:
        """SD3 has no kohya layout diffusers reads back (ComfyUI loads the diffusers file as it is)."""
        raise UserError(
            f"--format kohya: {cls.title} LoRAs have no kohya single-file layout that diffusers can read back, so "
            "an export could not be checked. Use --format diffusers (ComfyUI loads that file as it is) or "
            "--format fused."
        )

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, ref: str, dtype: str = "float32", device: str = "cpu", allow_pickle: bool = False):
        import diffusers

        from duo.models.loading import read_model_index

        td = torch_dtype(dtype)
        # a folder saved without T5 lists it as null, which from_pretrained refuses unless told so
        absent = {k: None for k, v in read_model_index(path).items() if isinstance(v, list) and v[0] is None}
        try:
            pipe = getattr(diffusers, cls.pipeline_class_name).from_pretrained(
                path, dtype=td, use_safetensors=None if allow_pickle else True, **absent
            )
        except (OSError, ValueError) as exc:
            hint = "" if allow_pickle else " If the weights are pickled (.bin) and you trust them, pass --allow-pickle."
            raise UserError(f"could not load {cls.title} pipeline from '{ref}': {exc}.{hint}") from None
        family = cls(pipe=pipe, ref=ref, device=device, dtype=td)
        _ = family.schedule  # refuse a schedule we cannot train on, now
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        for module in (pipe.transformer, pipe.vae, *family.text_encoders):
            module.requires_grad_(False)
        return family

    @property
    def unet(self):
        return self.pipe.transformer

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """CLIP-L, CLIP-G (and T5 when present): a text-side LoRA goes on CLIP-L, the first."""
        t5 = (self.pipe.text_encoder_3,) if self.pipe.text_encoder_3 is not None else ()
        return self._clips + t5

    @property
    def native_resolution(self) -> int:
        return int(self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def schedule(self) -> FlowSchedule:
        return FlowSchedule.from_scheduler_config(self.pipe.scheduler.config)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return "flow"

    # ---- training maths ----------------------------------------------------------------------
    def encode_images(self, images: list[Image.Image], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        return latent_distribution(self.pipe.vae, images, resolution, self.device)

    def latents_from_distribution(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """SD3's VAE latents are shifted before scaling (what its pipelines do to `latent_dist` samples)."""
        config = self.pipe.vae.config
        return (mean + std * noise - (config.shift_factor or 0.0)) * config.scaling_factor

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(x0, noise, t)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.target(x0, noise)

    def preference_timesteps(self, strength: float) -> tuple[int, int]:
        return self.schedule.preference_timesteps(strength)

    def keep_timestep(self) -> int:
        return self.schedule.keep_timestep()

    def denoise(self, unet, latents: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        states, pooled = unpack(emb.to(self.dtype), self.pooled_dim)
        return unet(
            hidden_states=latents.to(self.dtype),
            timestep=self.schedule.model_timestep(t.to(latents.device)),
            encoder_hidden_states=states,
            pooled_projections=pooled,
        ).sample

    def offload_encoders(self) -> None:
        release_encoders([self.pipe.vae, *self.text_encoders], self.device)

    def lora_targets(self, method: str, module: str | None = None) -> str:
        """DUO: the image stream's attention (SD's self-attention); ESD-x: the context stream's, the only layers
        that bring the prompt into attention; ESD-u: the image stream's attention and feed-forward; text-side
        LoRAs: CLIP-L's attention and feed-forward. `--targets` takes any regex, `CONTEXT_ATTENTION` or
        `JOINT_ATTENTION` of this module included."""
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
    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def text2image(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance: float,
        resolution: int | None = None,
        negative_prompts: list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        safe_guidance: dict | None = None,
    ) -> list[Image.Image]:
        if safe_guidance is not None:
            raise no_safe_latent_diffusion(self.ref, self.title)
        res = resolution or self.native_resolution
        if prompt_embeds is not None:
            states, pooled = unpack(prompt_embeds.to(self.device, self.dtype), self.pooled_dim)
            text = {"prompt_embeds": states, "pooled_prompt_embeds": pooled}
        else:
            text = {"prompt": self.expand_tokens(prompts)}
        out = self.pipe(
            **text,
            **self._guidance(guidance, negative_prompts),
            num_inference_steps=steps,
            height=res,
            width=res,
            generator=self._generators(seeds),
            max_sequence_length=self.t5_tokens,
        )
        return out.images

    def _guidance(self, guidance: float, negative_prompts: list[str] | None) -> dict:
        """The pipeline's guidance arguments for duo's one scale (FLUX maps it onto two)."""
        negative = self.expand_tokens(negative_prompts) if negative_prompts else None
        return {"guidance_scale": guidance, "negative_prompt": negative}

    def image2image(
        self,
        images: list[Image.Image],
        prompts: list[str],
        seeds: list[int],
        strength: float,
        steps: int,
        guidance: float,
        negative_prompts: list[str] | None = None,
    ) -> list[Image.Image]:
        if not hasattr(self, "_img2img"):
            import diffusers

            self._img2img = getattr(diffusers, self.img2img_class_name)(**self.pipe.components)
            self._img2img.set_progress_bar_config(disable=True)
        width, height = images[0].size  # FLUX's pipeline would otherwise resize to its default size
        out = self._img2img(
            prompt=self.expand_tokens(prompts),
            image=images,
            **self._guidance(guidance, negative_prompts),
            strength=strength,
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=self._generators(seeds),
            max_sequence_length=self.t5_tokens,
        )
        return out.images

    # ---- LoRA files --------------------------------------------------------------------------
    def save_lora(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        """Diffusers' SD3 LoRA format (`transformer.` and `text_encoder.` keys, peft names): what
        `StableDiffusion3Pipeline.load_lora_weights(folder)` reads, and FLUX's loader too."""
        parts = self.split_lora_state(state)
        layers = {"transformer_lora_layers": parts[0] or None, "text_encoder_lora_layers": parts[1] or None}
        type(self.pipe).save_lora_weights(save_directory=str(folder), safe_serialization=True, **layers)

    # ---- baselines (UCE) ---------------------------------------------------------------------
    def cross_attention_projections(self, with_keys: bool = True) -> list[tuple[str, torch.nn.Linear]]:
        """The context embedder: the one linear map that reads the text states (`prompt_states`) as they are.

        Each block's context projections (add_k_proj, add_v_proj) read those states only after the embedder,
        a timestep-modulated norm and the blocks before: no fixed text vectors exist for a closed-form edit
        of them. Every block's keys and values of the prompt come from the embedder's output, so `with_keys`
        has nothing to leave out here."""
        return [("context_embedder", self.unet.context_embedder)]
