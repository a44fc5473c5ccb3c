"""The model card written beside every LoRA: what it was trained from and how."""

from __future__ import annotations

from pathlib import Path

from duo.data.files import atomic_write_text


def write_model_card(out: Path, cfg, pairs) -> None:
    c = cfg
    rows = [
        ("base model", c.model),
        ("concept", pairs.concept.name + (f" / part {c.part}" if c.part else "")),
        ("method", c.method),
        ("β", c.beta),
        ("λ", c.resolved_lam),
        ("lr", c.resolved_lr),
        ("steps", c.steps),
        ("pairs", len(pairs)),
        ("pairs per step", f"{c.batch_size} × {c.grad_accum} accumulation × processes"),
        ("conditioning", c.conditioning),
        ("keep term", c.keep),
        ("timesteps", c.timesteps),
        ("LoRA", f"rank {c.rank}, alpha {c.alpha}, targets {c.targets or 'UNet self-attention (attn1 q/k/v/out)'}"),
        ("seed", c.seed),
        ("data", str(pairs.folder)),
        ("data hash (sha256)", pairs.data_hash),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"""---
library_name: diffusers
base_model: {c.model}
tags: [lora, duo-unlearn, concept-erasure]
---
# DUO LoRA: {pairs.concept.name} removed

Trained with duo-unlearn (Direct Unlearning Optimization, Park et al., NeurIPS 2024).

| setting | value |
|---|---|
{table}

```python
pipe.load_lora_weights("{out.name}")
```
The full resolved configuration is in `config.json`; per-step metrics in `metrics.jsonl`.
"""
    atomic_write_text(out / "README.md", text)
