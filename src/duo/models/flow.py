"""Rectified flow (SD3, FLUX) behind the integer-timestep interface of `ModelFamily`.

Everything above the adapter speaks of integer timesteps t ∈ [0, N): larger t, more noise, as in DDPM. A flow
family maps t to the noise level σ_t of its scheduler's (shifted) table read in ascending order, so that the
preference range [0, strength·N) is the low-noise side image-to-image visits and t = N − 1 is pure noise
(σ = 1). The authors' SD3 script indexes diffusers' descending table instead, which inverts both (SPEC §3).

    σ_t = s·u / (1 + (s − 1)·u),  u = (t + 1) / N         (s: the scheduler's `shift`; s = 1 leaves u)
    x_t = (1 − σ_t)·x₀ + σ_t·ε                             (the straight path from data to noise)
    v   = dx_t/dσ = ε − x₀                                 (what the transformer predicts: the target)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duo.errors import UserError


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift: spends more of the schedule at high noise for large images (shift > 1)."""
    return shift * u / (1 + (shift - 1) * u)


def dynamic_shift(config, image_tokens: int) -> float:
    """The shift s of σ = s·u/(1 + (s − 1)·u) that diffusers' dynamic shifting applies to an image of
    `image_tokens` packed latent tokens: μ grows linearly in the token count between the config's two anchors
    (FluxPipeline's `calculate_shift`); the exponential time shift is then s = e^μ, the linear one s = μ."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = base + (top - base) * (image_tokens - lo) / (hi - lo)
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu


@dataclass(frozen=True)
class FlowSchedule:
    """The σ table of a flow-matching scheduler (at one image size, if it shifts dynamically), by integer timestep."""

    num_train_timesteps: int
    shift: float = 1.0

    @classmethod
    def from_scheduler_config(cls, config, image_tokens: int | None = None) -> FlowSchedule:
        """The table of a `FlowMatchEulerDiscreteScheduler` config; options that reshape it are refused, since
        training on another table than sampling uses would move DUO's ranges without a word.

        Dynamic shifting (FLUX.1-dev) picks the shift from the image's token count at sampling time; given the
        `image_tokens` of the latents trained on, it is the fixed shift those latents are sampled with."""
        reshaping = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas")
        reshaping += ("use_beta_sigmas",) + (() if image_tokens else ("use_dynamic_shifting",))
        used = [key for key in reshaping if config.get(key)]
        if used:
            raise UserError(
                f"the model's flow scheduler sets {', '.join(used)}; duo supports fixed-shift schedules and FLUX's "
                "resolution-dependent shift only. Use a scheduler config without these options."
            )
        shift = dynamic_shift(config, image_tokens) if config.get("use_dynamic_shifting") else config.get("shift", 1.0)
        return cls(int(config["num_train_timesteps"]), float(shift))

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t for t = 0 … N − 1, ascending; σ_{N−1} = 1."""
        n = self.num_train_timesteps
        return shifted_sigma(torch.arange(1, n + 1, dtype=torch.float64) / n, self.shift)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ_t broadcast against `like` (one value per sample), in its dtype and on its device."""
        s = self.sigmas.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return s.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t, x0)
        return (1 - sigma) * x0 + sigma * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity v = ε − x₀, whatever t: a straight path has one speed."""
        return noise - x0

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the transformer was trained to read: σ·N (diffusers' `scheduler.timesteps`)."""
        return (self.sigmas.to(t.device)[t.long()] * self.num_train_timesteps).float()

    def preference_timesteps(self, strength: float) -> tuple[int, int]:
        """[0, strength·N): image-to-image at `strength` starts from u ≈ strength, i.e. σ = shifted_sigma(strength),
        and denoises down from there; σ_t is increasing in u, so these are exactly the t with σ_t ≤ that σ."""
        return 0, max(1, int(round(strength * self.num_train_timesteps)))

    def keep_timestep(self) -> int:
        """σ = 1: the input is pure noise, as at the first step of sampling."""
        return self.num_train_timesteps - 1
