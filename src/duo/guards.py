"""Inference-time guards: defences that change how a model is asked, not its weights.

A guard turns the prompts a user (or an attacker) sends into what the model generates from.
`negprompt` is the simplest defence of the field: the concept's unsafe words as negative prompt.
`wordfilter` is the blocklist every hosted service starts with: unsafe words are deleted from the prompt.
`sld`, `sld-weak`, `sld-strong`, `sld-max` are Safe Latent Diffusion (Schramowski et al., CVPR 2023): the
prompt is left alone, and at every sampling step after a warm-up the prediction is pushed away from a
safety concept (here the concept's unsafe words joined with ", ") wherever the prompt's and the safety
concept's predictions agree. `sld` is the paper's Hyp-Medium; the four presets are the authors'
hyper-parameter configurations (diffusers' `SafetyConfig` ships the same but for Hyp-Weak's scale).

Generation goes through `Guard.generate`, so every command samples a guarded model the same way.
White-box attacks can follow negprompt and wordfilter exactly; SLD's guidance is not differentiated through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from duo.errors import UserError

# diffusers' SafetyConfig (pipelines/deprecated/stable_diffusion_safe), the paper's symbols in brackets:
# sld_warmup_steps [δ]: sampling steps before the safety guidance is applied (momentum builds up meanwhile);
# sld_guidance_scale [s_S]: scale of the safety guidance, clamped to 1 per latent element;
# sld_threshold [λ]: elements where ε_prompt − ε_safety ≥ λ are left alone;
# sld_momentum_scale [s_m], sld_mom_beta [β_m]: momentum of the safety guidance.
# The presets assume the paper's 50 sampling steps; δ counts steps, so fewer steps shorten the guided part.
# Weak: the authors' table (ml-research/safe-latent-diffusion) has s_S = 200; diffusers' SafetyConfig.WEAK has 20.
SLD_PRESETS = {
    "sld-weak": {
        "sld_guidance_scale": 200.0,
        "sld_warmup_steps": 15,
        "sld_threshold": 0.0,
        "sld_momentum_scale": 0.0,
        "sld_mom_beta": 0.0,
    },
    "sld": {
        "sld_guidance_scale": 1000.0,
        "sld_warmup_steps": 10,
        "sld_threshold": 0.01,
        "sld_momentum_scale": 0.3,
        "sld_mom_beta": 0.4,
    },
    "sld-strong": {
        "sld_guidance_scale": 2000.0,
        "sld_warmup_steps": 7,
        "sld_threshold": 0.025,
        "sld_momentum_scale": 0.5,
        "sld_mom_beta": 0.7,
    },
    "sld-max": {
        "sld_guidance_scale": 5000.0,
        "sld_warmup_steps": 0,
        "sld_threshold": 1.0,
        "sld_momentum_scale": 0.5,
        "sld_mom_beta": 0.7,
    },
}
SLD_PAPER_NAMES = {"sld-weak": "Hyp-Weak", "sld": "Hyp-Medium", "sld-strong": "Hyp-Strong", "sld-max": "Hyp-Max"}

GUARDS = ("none", "negprompt", "wordfilter", *SLD_PRESETS)


@dataclass(frozen=True)
class Guard:
    name: str
    words: tuple[str, ...] = ()

    def apply(self, prompts: list[str]) -> tuple[list[str], list[str] | None]:
        """(prompts sent, negative prompts or None): what the guard does to the text."""
        if self.name == "negprompt":
            return list(prompts), [" ".join(self.words)] * len(prompts)
        if self.name == "wordfilter":
            return [self._strip(p) for p in prompts], None
        return list(prompts), None

    def _strip(self, prompt: str) -> str:
        pattern = r"\b(" + "|".join(re.escape(w) for w in self.words) + r")\b"
        return re.sub(r"\s+", " ", re.sub(pattern, " ", prompt, flags=re.IGNORECASE)).strip()

    @property
    def safe_guidance(self) -> dict | None:
        """SLD's safety concept and settings (the keyword of `family.text2image`), or None for other guards."""
        if self.name not in SLD_PRESETS:
            return None
        return {"safety_concept": ", ".join(self.words), **SLD_PRESETS[self.name]}

    def generate(
        self,
        family,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance: float,
        resolution: int | None = None,
        negative_prompts: list[str] | None = None,
    ) -> list:
        """Images of the guarded model: the prompt transform, then the family's sampler (with SLD if any).

        `negative_prompts` are the user's own; a guard that sets negative prompts refuses them.
        """
        sent, negatives = self.apply(prompts)
        if negatives is not None and negative_prompts is not None:
            raise UserError(f"guard '{self.name}' sets the negative prompt itself; drop the other negative prompt.")
        extra = {"safe_guidance": self.safe_guidance} if self.safe_guidance else {}
        return family.text2image(
            sent, seeds, steps, guidance, resolution, negative_prompts=negatives or negative_prompts, **extra
        )

    def provenance(self) -> dict:
        record = {"name": self.name, "words": list(self.words)}
        if self.safe_guidance:
            record["sld"] = {"preset": SLD_PAPER_NAMES[self.name], **self.safe_guidance}
        return record


def make_guard(name: str | None, unsafe_words: list[str]) -> Guard:
    """The guard `name` built from a concept's unsafe words."""
    name = name or "none"
    if name not in GUARDS:
        raise UserError(f"unknown guard '{name}'; choose one of {', '.join(GUARDS)}")
    if name != "none" and not unsafe_words:
        raise UserError(f"guard '{name}' needs the concept's unsafe_words; add them to the concept file.")
    return Guard(name, tuple(unsafe_words) if name != "none" else ())
