"""The model card written beside every LoRA: what it was trained from and how, with the Hub's front matter.

The folder uploads to the Hugging Face Hub as it is, so the front matter holds only what the Hub accepts:
`base_model` must be a Hub model id (a commit naming a local path is refused), and `license` one of its
license ids. The evaluation section between the EVAL_* markers is `duo card`'s to rewrite (duo.report.card).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from duo.data.files import atomic_write_text
from duo.train.placement import PLACEMENT_LABELS, targets_for

METHOD_NAMES = {
    "duo": "DUO (Park et al., NeurIPS 2024)",
    "esd-u": "ESD-u (Gandikota et al., ICCV 2023), non-cross-attention layers",
    "esd-x": "ESD-x (Gandikota et al., ICCV 2023), cross-attention layers",
    "uce": "UCE (Gandikota et al., WACV 2024)",
    "advunlearn": "AdvUnlearn (Zhang et al., NeurIPS 2024), text-encoder LoRA",
}


EVAL_START, EVAL_END = "<!-- duo card: evaluation -->", "<!-- /duo card: evaluation -->"
NOT_EVALUATED = (
    "## Evaluation\n\nNot evaluated yet. Run `duo evaluate --lora {folder} ... --out EVAL`, then "
    "`duo card {folder} --eval EVAL` to put its DSR / PP / FID table here."
)

PROJECT_LICENSE = "apache-2.0"  # pyproject.toml: duo-unlearn, the Shapes world's weights included, is Apache-2.0
# A LoRA of a model is bound by the model's license. Only ids whose license we know; anything else is "other".
HUB_LICENSES = {
    "CompVis/stable-diffusion-v1-": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(model: str) -> bool:
    """'owner/name' that is not a folder here: what the Hub accepts as a base_model."""
    return bool(HUB_ID.match(model)) and not Path(model).exists()


def base_license(model: str) -> str:
    """The Hub license id this LoRA inherits from its base model: ours for Shapes, known SD 1.x ids, else other."""
    from duo.shapes import ASSETS

    if model == "shapes" or (Path(model).is_dir() and Path(model).resolve() == ASSETS / "pipeline"):
        return PROJECT_LICENSE
    return next((lic for prefix, lic in HUB_LICENSES.items() if model.startswith(prefix)), "other")


def front_matter(model: str, concept: str) -> str:
    """The Hub's YAML block; yaml.safe_dump quotes whatever a concept name holds."""
    meta = {"library_name": "diffusers", "license": base_license(model), "pipeline_tag": "text-to-image"}
    if is_hub_id(model):
        meta["base_model"] = model
    tags = ["lora", "diffusers", "text-to-image", "concept-erasure", "duo-unlearn", concept]
    meta["tags"] = list(dict.fromkeys(tags))
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _base_note(model: str) -> str:
    if is_hub_id(model):
        return ""
    license = base_license(model)
    note = f"\n\nBase model: `{model}` (not a Hub model id, so the front matter names no base_model)."
    if license == "other":
        note += " Its license binds this LoRA: state it before you share the LoRA."
    return note


def _adversary(c) -> str:
    if c.adversarial == "none":
        return "none"
    rounds = {"turns": " (rounds take turns)", "all": " (all refreshed each round)"}[c.adv_rounds]
    split = ", pairs split among them" if c.adv_pairs == "split" else ""
    turns = rounds + split if "+" in c.adversarial else ""
    return (
        f"{c.adversarial}{turns}: {c.adv_vectors} vector(s), {c.adv_steps} steps at lr {c.adv_lr} every {c.adv_every} "
        f"({c.adv_init}), batch {c.adv_batch}, weight {c.adv_weight}"
    )


def _targets(c, family) -> str:
    return " and ".join(_module_targets(c, family, m) for m in c.lora_modules)


def _module_targets(c, family, module: str) -> str:
    own = targets_for(c.targets, c.lora_modules, module)
    if own:
        return f"`{own}`"
    if family is None:
        return "the method default"
    return f"`{family.lora_targets(c.method, module)}` (the model family's default)"


def _data_rows(pairs) -> list[tuple[str, object]]:
    sources = ", ".join(map(str, pairs.sources))  # several for a multi-concept LoRA
    return [
        ("resolution", f"{pairs.resolution} px"),
        ("pairs", len(pairs)),
        ("data", sources),
        ("data hash", pairs.data_hash),
    ]


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
                ("keep term", c.keep + (f", text-encoder retain λ {c.lam_text_retain}" if c.lam_text_retain else "")),
                ("timesteps", c.timesteps),
                ("LoRA on", PLACEMENT_LABELS[c.lora_on]),
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
            ("weights", f"moving average, decay {c.ema_decay}" if c.ema_decay else "the last step's"),
            ("pairs per step", f"{c.batch_size} × {c.grad_accum} accumulation × processes"),
            ("LoRA", f"rank {c.rank}, alpha {c.alpha}, targets {_targets(c, family)}"),
            ("seed", c.seed),
        ]
    rows = [*common, *specific, *_data_rows(pairs)]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    title = f"{METHOD_NAMES[c.method].split(' (')[0]} LoRA: {pairs.concept.name} removed"
    text = f"""{front_matter(str(c.model), pairs.concept.name)}# {title}

Made with duo-unlearn.{_base_note(str(c.model))}

| setting | value |
|---|---|
{table}

```python
pipe.load_lora_weights("{out.name}")
```
The full resolved configuration is in `config.json`; per-step metrics in `metrics.jsonl`. The LoRA file's
safetensors metadata (`duo.*` keys) names its base model, concept, method and training pairs too.

{EVAL_START}
{NOT_EVALUATED.format(folder=out.name)}
{EVAL_END}
"""
    atomic_write_text(out / "README.md", text)
