"""Stable Diffusion 1.x / 2.x (ε- and v-prediction): the only code that knows this family."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from duo.errors import UserError
from duo.models.lora import SELF_ATTENTION
from duo.models.pipeline_loras import PipelineLoras
from duo.models.sd_text import StableDiffusionText

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# Stable Diffusion's noise schedule, shared by every pipeline this project builds itself.
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def assemble_pipeline(unet, vae, text_encoder, tokenizer, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline from components, with SD's DDIM sampler and no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def images_to_tensor(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images → float tensor in [-1, 1], (N, 3, H, W)."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if size and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def no_safe_latent_diffusion(ref: str, title: str) -> UserError:
    """SLD exists in diffusers for SD 1.x/2.x pipelines only: the guard is refused on any other family."""
    return UserError(
        f"Safe Latent Diffusion (the sld, sld-weak, sld-strong and sld-max guards) exists in diffusers for SD 1.x/2.x "
        f"pipelines only, and '{ref}' is {title}. Use --guard none, negprompt or wordfilter with this model, or run "
        "the SLD guard on an SD 1.x model."
    )


@torch.no_grad()
def latent_distribution(vae, images: list[Image.Image], resolution: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution, on the CPU in float32. The VAE encodes in float32 whatever
    the pipeline's dtype, as the authors' trainers keep it: under fp16 it overflows (SDXL's) or rounds the latents
    every later step reads."""
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        dist = vae.encode(images_to_tensor(images, resolution).to(device, torch.float32)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()
    finally:
        vae.to(dtype)


def release_encoders(modules: list[torch.nn.Module], device) -> None:
    """Once the trainer has cached the encoders' outputs: on an accelerator, move them to host memory; on a CPU
    there is nowhere to move them, so their weights are dropped (meta tensors; SD 1.x's VAE and CLIP text encoder
    hold 0.83 GB in fp32). Nothing reads them again in that process: a LoRA is saved from the denoiser's state
    and --fuse reloads the pipeline from disk."""
    on_cpu = torch.device(device).type == "cpu"
    for module in modules:
        module.to("meta" if on_cpu else "cpu")


@dataclass
class StableDiffusionFamily(StableDiffusionText, PipelineLoras):
    """The `ModelFamily` of SD 1.x/2.x; the text and token side lives in `StableDiffusionText`."""

    pipe: object
    ref: str
    device: str
    dtype: torch.dtype

    name = "sd"
    title = "Stable Diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    default_lora_targets = SELF_ATTENTION
    load_options = {"safety_checker": None, "requires_safety_checker": False}

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, ref: str, dtype: str = "float32", device: str = "cpu", allow_pickle: bool = False):
        import diffusers

        td = torch_dtype(dtype)
        try:
            pipe = getattr(diffusers, cls.pipeline_class_name).from_pretrained(
                path, dtype=td, **cls.load_options, use_safetensors=None if allow_pickle else True
            )
        except (OSError, ValueError) as exc:
            hint = (
                ""
                if allow_pickle
                else " If the weights are pickled (.bin/.ckpt) and you trust them, pass --allow-pickle."
            )
            raise UserError(f"could not load {cls.title} pipeline from '{ref}': {exc}.{hint}") from None
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        family = cls(pipe=pipe, ref=ref, device=device, dtype=td)
        for module in (pipe.unet, pipe.vae, *family.text_encoders):
            module.requires_grad_(False)
        return family

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return (self.pipe.text_encoder,)

    @property
    def native_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.prediction_type

    # ---- training maths ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std), unscaled; cached by the trainer, sampled each step."""
        return latent_distribution(self.pipe.vae, images, resolution, self.device)

    def latents_from_distribution(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (mean + std * noise) * self.pipe.vae.config.scaling_factor

    def offload_encoders(self) -> None:
        release_encoders([self.pipe.vae, *self.text_encoders], self.device)

    def _noise_scheduler(self):
        if not hasattr(self, "_ddpm"):
            from diffusers import DDPMScheduler

            self._ddpm = DDPMScheduler.from_config(self.pipe.scheduler.config)
        return self._ddpm

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε."""
        return self._noise_scheduler().add_noise(x0, noise, t)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """y of SPEC §3: ε for ε-prediction, v = √ᾱ·ε − √(1−ᾱ)·x₀ for v-prediction (SD 2.x)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self._noise_scheduler().get_velocity(x0, noise, t)
        raise UserError(
            f"prediction type '{self.prediction_type}' of '{self.ref}' is not supported (epsilon, v_prediction)"
        )

    def preference_timesteps(self, strength: float) -> tuple[int, int]:
        """[lo, hi): the noise levels SDEdit at this strength visits (authors: [0, 750) at 0.75)."""
        return 0, max(1, int(round(strength * self.num_train_timesteps)))

    def keep_timestep(self) -> int:
        """T: pure noise is the input at the last training step."""
        return self.num_train_timesteps - 1

    def denoise(self, unet, latents: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return unet(latents.to(self.dtype), t, encoder_hidden_states=emb.to(self.dtype)).sample

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
        """Images for prompts × seeds; `safe_guidance` = {"safety_concept": str, **SLD settings} samples with SLD."""
        res = resolution or self.native_resolution
        sampling = {
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "height": res,
            "width": res,
            "generator": self._generators(seeds),
        }
        if safe_guidance is not None:
            if prompt_embeds is not None:
                raise ValueError("Safe Latent Diffusion takes prompts, not prompt embeddings")
            return self._safe_text2image(prompts, negative_prompts, sampling, safe_guidance)
        kwargs = self._conditioning(prompts, prompt_embeds)
        return self.pipe(**kwargs, negative_prompt=negative_prompts, **sampling).images

    def _conditioning(self, prompts: list[str], prompt_embeds: torch.Tensor | None) -> dict:
        """The pipeline's arguments for the prompts, or for conditioning that `encode_ids` returned."""
        return {"prompt_embeds": prompt_embeds} if prompt_embeds is not None else {"prompt": prompts}

    def _safe_text2image(self, prompts, negative_prompts, sampling: dict, safe_guidance: dict):
        """SLD on the same components: LoRAs on the UNet and textual-inversion tokens apply here too."""
        import warnings

        from diffusers import StableDiffusionPipelineSafe

        if sampling["guidance_scale"] <= 1.0:
            raise UserError(
                "Safe Latent Diffusion steers classifier-free guidance, which is off at guidance "
                f"{sampling['guidance_scale']}; "
                "use a guidance scale above 1."
            )
        components = {**self.pipe.components, "safety_checker": None, "feature_extractor": None}
        sld = getattr(self, "_sld", None)
        if sld is None or any(getattr(sld, k, None) is not v for k, v in components.items() if v is not None):
            sld = self._sld = StableDiffusionPipelineSafe(**components, requires_safety_checker=False)
            sld.set_progress_bar_config(disable=True)
        settings = dict(safe_guidance)
        sld.safety_concept = settings.pop("safety_concept")
        # the safe pipeline lacks the textual-inversion loader: expand multi-vector tokens as the main one does
        convert = self.pipe.maybe_convert_prompt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its decode_latents is deprecated, not wrong
            out = sld(
                prompt=convert(list(prompts), self.pipe.tokenizer),
                negative_prompt=convert(list(negative_prompts), self.pipe.tokenizer) if negative_prompts else None,
                **sampling,
                **settings,
            )
        return out.images

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
            self._img2img = self._img2img_pipeline()
            self._img2img.set_progress_bar_config(disable=True)
        out = self._img2img(
            prompt=prompts,
            image=images,
            negative_prompt=negative_prompts,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=self._generators(seeds),
        )
        return out.images

    def _img2img_pipeline(self):
        """SDEdit on the loaded components, so LoRAs and learned tokens apply."""
        from diffusers import StableDiffusionImg2ImgPipeline

        return StableDiffusionImg2ImgPipeline(**self.pipe.components, requires_safety_checker=False)

    # ---- LoRA files --------------------------------------------------------------------------
    def save_lora(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        """Diffusers LoRA format (`unet.` and `text_encoder.` keys): loads with `pipe.load_lora_weights(folder)`."""
        from diffusers.utils import convert_state_dict_to_diffusers

        unet, text = self.split_lora_state(state)
        layers = {}
        if unet:
            # diffusers converts only attention projections, and its loader guesses the format from the first key:
            # name every layer (ResNet convolutions, feed-forward of ESD-u) the same way, or some are dropped.
            unet = convert_state_dict_to_diffusers(unet)
            unet = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in unet.items()}
            layers["unet_lora_layers"] = unet
        if text:
            layers["text_encoder_lora_layers"] = text  # peft names: what diffusers writes for a text encoder
        type(self.pipe).save_lora_weights(save_directory=str(folder), safe_serialization=True, **layers)

    # ---- baselines (ESD, UCE) ----------------------------------------------------------------------
    def lora_targets(self, method: str, module: str | None = None) -> str:
        """Which layers a method trains: DUO self-attention, ESD-x cross-attention, ESD-u all but it (UNet);
        AdvUnlearn, and any method whose LoRA sits on the text encoder, every attention and feed-forward layer
        of the text encoder."""
        from duo.models.lora import CROSS_ATTENTION, NON_CROSS_ATTENTION, TEXT_ENCODER_LAYERS

        if module == "text_encoder":
            return TEXT_ENCODER_LAYERS
        return {
            "duo": SELF_ATTENTION,
            "esd-x": CROSS_ATTENTION,
            "esd-u": NON_CROSS_ATTENTION,
            "advunlearn": TEXT_ENCODER_LAYERS,
        }[method]

    def cross_attention_projections(self, with_keys: bool = True) -> list[tuple[str, torch.nn.Linear]]:
        """The text-to-image projections UCE edits: every cross-attention's value (and key) matrix."""
        wanted = ("attn2.to_v", "attn2.to_k") if with_keys else ("attn2.to_v",)
        return [(n, m) for n, m in self.unet.named_modules() if n.endswith(wanted)]
