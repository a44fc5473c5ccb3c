"""Feature networks behind FID-style distances, each saying which network and which weights it used.

`get_features("clip:<folder-or-hub-id>")`: CLIP's projected image embeddings from a user-supplied checkpoint.
`get_features("shapes")`: a world's own feature network (the Shapes judge's, its stand-in for Inception),
found through duo.worlds only when asked for. No weights are ever downloaded here; a hub id is only read from
the local cache when HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from duo.data.files import sha256_file
from duo.errors import UserError
from duo.worlds import WORLDS, world_named

HASH_PREFIX = 16


def sha256_prefix(path: str | Path | None) -> str | None:
    """A short content hash: enough to tell two weight files apart in a result file."""
    if path is None or not Path(path).is_file():
        return None
    return sha256_file(Path(path))[:HASH_PREFIX]


def image_batch(images) -> torch.Tensor:
    """PIL images, a uint8 array [N,H,W,3] or a float tensor [N,3,H,W] in [0,1] -> float [N,3,H,W] in [0,1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        return (x[None] if x.dim() == 3 else x).clamp(0, 1)
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0
    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    if len({a.shape for a in arrs}) > 1:
        raise ValueError(f"images of different sizes: {sorted({a.shape[:2] for a in arrs})}")
    if not arrs:
        return torch.zeros(0, 3, 1, 1)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def pil_images(images) -> list[Image.Image]:
    """The CLIP processor's own resize/crop works on PIL images, as CLIP's preprocessing always has."""
    if not isinstance(images, torch.Tensor | np.ndarray):
        return [im.convert("RGB") for im in images]
    x = (image_batch(images) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in x]


def _offline_hint(ref: str) -> str:
    folder = "a folder saved with CLIPModel.save_pretrained (config.json, model.safetensors, tokenizer files)"
    if Path(ref).exists():
        return f"It is not {folder}."
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        return f"No such folder, and not a hub id of the form 'owner/name': pass {folder}."
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return (
            "HF_HUB_OFFLINE is set, so only the local cache is searched: download it once on a machine with "
            f"network (`huggingface-cli download {ref}`) or pass a local folder."
        )
    return "Check the id and your network/token, or pass a local folder saved with save_pretrained."


def _weights_file(ref: str) -> Path | None:
    """The file whose hash identifies the checkpoint: the weights, or the shard index when sharded."""
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if Path(ref).is_dir():
        return next((Path(ref) / n for n in names if (Path(ref) / n).is_file()), None)
    from huggingface_hub import try_to_load_from_cache

    for n in names:
        hit = try_to_load_from_cache(ref, n)
        if isinstance(hit, str):
            return Path(hit)
    return None


class ClipFeatures:
    """A user-supplied CLIP checkpoint: projected image embeddings (features) and text embeddings."""

    name = "clip"

    def __init__(self, model: str | Path, batch_size: int = 32, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        self.ref = str(model)
        self.batch_size = batch_size
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(self.ref, use_safetensors=True).to(self.device).eval()
            self.processor = CLIPImageProcessorPil.from_pretrained(self.ref)
            self.tokenizer = CLIPTokenizer.from_pretrained(self.ref)
        except Exception as exc:  # missing folder, offline cache miss, wrong files: one message for the user
            raise UserError(
                f"could not load CLIP model '{self.ref}' ({type(exc).__name__}). {_offline_hint(self.ref)}"
            ) from None
        self.weights = _weights_file(self.ref)

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        ims = pil_images(images)
        out = [self._embed_images(ims[i : i + self.batch_size]) for i in range(0, len(ims), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        out = [self._embed_text(prompts[i : i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    def _embed_images(self, ims: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=ims, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model.get_image_features(pixel_values=pixels).pooler_output.float().cpu()

    def _embed_text(self, prompts: list[str]) -> torch.Tensor:
        # CLIP's text tower is causal and pools at the end token, so padding to the batch's longest is harmless
        max_len = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        return self.model.get_text_features(**tok).pooler_output.float().cpu()

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "network": f"CLIPModel projected image embedding ({self.model.config.projection_dim}-d)",
            "model": self.ref,
            "weights": str(self.weights) if self.weights else None,
            "sha256": sha256_prefix(self.weights),
        }


def get_features(spec: str):
    """'clip:<folder-or-hub-id>', or a world's network: 'shapes' or 'shapes:<judge weights>' -> a feature backend."""
    kind, _, arg = spec.partition(":")
    if kind == "clip" and arg:
        return ClipFeatures(arg)
    world = world_named(kind)
    if world is not None:
        return world.features(arg or None)
    worlds = ", ".join(f"'{w}'" for w in WORLDS)
    raise UserError(
        f"unknown feature network '{spec}'; use {worlds} (a built-in world's own network) or "
        "'clip:<folder-or-hub-id>' (e.g. clip:openai/clip-vit-large-patch14, downloaded beforehand). "
        "Inception weights are not shipped."
    )
