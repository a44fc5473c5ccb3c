"""The model card written beside every LoRA: what it was trained from and how."""

from __future__ import annotations

from pathlib import Path

from duo.data.files import atomic_write_text

METHOD_NAMES = {
    "duo": "DUO (Park et al., NeurIPS 2024)",
    "esd-u": "ESD-u (Gandikota et al., ICCV 2023), non-cross-attention layers",
    "esd-x": "ESD-x (Gandikota et al., ICCV 2023), cross-attention layers",
    "uce": "UCE (Gandikota et al., WACV 2024)",
    "advunlearn": "AdvUnlearn (Zhang et al., NeurIPS 2024), text-encoder LoRA",
}


def _adversary(c) -> str:
    if c.adversarial == "none":
        return "none"
    rounds = {"turns": " (rounds take turns)", "all": " (all refreshed each round)"}[c.adv_rounds]
    turns = rounds if "+" in c.adversarial else ""
    return (
        f"{c.adversarial}{turns}: {c.adv_vectors} vector(s), {c.adv_steps} steps at lr {c.adv_lr} every {c.adv_every} "
        f"({c.adv_init}), batch {c.adv_batch}, weight {c.adv_weight}"
    )


def _targets(c, family) -> str:
    if c.targets:
        return f"`{c.targets}`"
    if family is None:
        return "the method default"
    return f"`{family.lora_targets(c.method, c.lora_module)}` (the model family's default)"


def write_model_card(out: Path, cfg, pairs, family=None) -> None:
    """`family`, when given, resolves the method's default LoRA layers: they differ between model families."""
    c = cfg
    common = [("base model", c.model), ("concept", pairs.concept.name + (f" / part {c.part}" if c.part else ""))]
    if c.method == "uce":
        specific = [
            ("method", "UCE (Gandikota et al., WACV 2024), closed form"),
            ("erase", f"{c.uce_erase} → '{c.uce_guide}'" if c.uce_erase == "words" else "unsafe → safe prompts"),
            ("preserve", c.uce_preserve),
            ("λ / erase scale / preserve scale", f"{c.uce_lambda} / {c.erase_scale} / {c.preserve_scale}"),
            ("projections", "cross-attention values and keys" if c.uce_keys else "cross-attention values"),
        ]
    else:
        specific = [("method", METHOD_NAMES[c.method])]
        if c.method == "duo":
            specific += [
                ("β", c.beta),
                ("λ", c.resolved_lam),
                ("conditioning", c.conditioning),
                ("keep term", c.keep),
                ("timesteps", c.timesteps),
                ("LoRA on", "text encoder" if c.lora_on == "text-encoder" else "UNet"),
                ("unconditional anchor λ_u", c.lam_uncond),
                ("adversary", _adversary(c)),
            ]
        elif c.method == "advunlearn":
            specific += [("η", c.negative_guidance), ("retain weight", c.retain_weight)]
            specific += [("attack", f"{c.attack_tokens} token(s), {c.attack_steps} steps every {c.attack_every}")]
        else:
            specific += [("η", c.eta)]
        specific += [
            ("lr", c.resolved_lr),
            ("steps", c.steps),
            ("pairs per step", f"{c.batch_size} × {c.grad_accum} accumulation × processes"),
            ("LoRA", f"rank {c.rank}, alpha {c.alpha}, targets {_targets(c, family)}"),
            ("seed", c.seed),
        ]
    data = [("resolution", f"{pairs.resolution} px"), ("pairs", len(pairs)), ("data", str(pairs.folder))]
    rows = [*common, *specific, *data, ("data hash", pairs.data_hash)]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"""---
library_name: diffusers
base_model: {c.model}
tags: [lora, duo-unlearn, concept-erasure]
---
# {METHOD_NAMES[c.method].split(" (")[0]} LoRA: {pairs.concept.name} removed

Made with duo-unlearn.

| setting | value |
|---|---|
{table}

```python
pipe.load_lora_weights("{out.name}")
```
The full resolved configuration is in `config.json`; per-step metrics in `metrics.jsonl`.
"""
    atomic_write_text(out / "README.md", text)
