"""CLIP score of images against their prompts, on both scales the literature uses.

"cosine": the cosine similarity of CLIP's projected image and text embeddings, averaged over images.
"x100": torchmetrics' CLIPScore convention, 100 × max(cosine, 0) per image, averaged. Papers quote either
(≈0.31 vs ≈31 for SD 1.4 on COCO with ViT-L/14), so both are reported along with the model that made them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from duo.metrics.features import ClipFeatures

SCALES = {
    "cosine": "mean over images of cos(image embedding, text embedding), projected CLIP embeddings",
    "x100": "mean over images of 100 * max(cos, 0) (torchmetrics CLIPScore convention)",
}


def clip_score(images, prompts: list[str], model: str | Path | ClipFeatures) -> dict:
    """Image i is scored against prompt i; `model` is a CLIP folder, a hub id already cached, or ClipFeatures."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    clip = model if isinstance(model, ClipFeatures) else ClipFeatures(model)
    cos = torch.nn.functional.cosine_similarity(clip.features(images), clip.text_features(prompts), dim=1)
    x100 = 100 * cos.clamp(min=0)
    return {
        "cosine": float(cos.mean()) if len(cos) else float("nan"),
        "x100": float(x100.mean()) if len(cos) else float("nan"),
        "n": len(cos),
        "per_image": {"cosine": cos.tolist(), "x100": x100.tolist()},
        "provenance": {**clip.provenance(), "scales": SCALES},
    }
