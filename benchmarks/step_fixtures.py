"""Fixtures of benchmarks/train_step.py: random pipelines of set sizes, a pairs folder, and the two step structures.

Sizes:

* anchor  — the model of `shared/perf-anchor/build_model.py`, the one the authors' real `train/unlearn-sd.py` was
            timed with beside `duo train` (55.6 M UNet (128,256,256,256) at 32×32 latents, a small VAE
            (32,64,128,128) encoding 256 px images, a 2-layer CLIP-width text encoder). The default: the
            benchmark's baseline is checked against their script on this model (docs/performance.md).
* sd-enc  — the same UNet with SD-sized encoders (SD 1.x VAE widths, CLIP-L-sized text encoder): what caching
            the encoders saves a user of a real SD 1.x, whose VAE is ~6× the anchor's.
* small   — tiny modules: a smoke check.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from duo.models.tiny import TINY_TEXT, TINY_UNET, TINY_VAE, build_random_pipeline

UNET_55M = {
    "sample_size": 32,
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# UNet2DConditionModel / AutoencoderKL / CLIPTextConfig kwargs per size.
SIZES = {
    "anchor": {
        "unet": UNET_55M,
        "vae": {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "latent_channels": 4},
        "text": {"hidden_size": 768, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 12},
    },
    "sd-enc": {
        "unet": UNET_55M,
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    },
    "small": {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT},
}

PROMPTS = [  # (unsafe, safe); words from duo.models.tiny.WORDS so the toy tokenizer knows them
    ("a naked woman on the street", "a dressed woman on the street"),
    ("a nude man in the city at night", "a clothed man in the city at night"),
    ("a naked person with a dog", "a dressed person with a dog"),
    ("a nude woman portrait, realistic photo", "a clothed woman portrait, realistic photo"),
]

# shared/perf-anchor/run_one.sh's settings for both trainers: β 500, lr 3e-4·100/β, λ 1e6·β/100, t < 750,
# t⁺ and t⁻ independent, empty conditioning, keep term at x_T only, LoRA r 32 (α 32) on self-attention, fp32,
# clip 1.0, AdamW weight decay 0.01, seed 42.
ANCHOR_SETTINGS = {
    "beta": 500.0,
    "base_lr": 3e-4,
    "base_lambda": 1e6,
    "t_min": 0,
    "t_max": 750,
    "timesteps": "independent",
    "conditioning": "empty",
    "keep": "noise",
    "rank": 32,
    "alpha": 32.0,
    "grad_clip": 1.0,
    "weight_decay": 0.01,
    "seed": 42,
    "mixed_precision": "no",
}


def build_pipeline(folder: Path, size: str, seed: int = 0) -> dict[str, int]:
    spec = SIZES[size]
    return build_random_pipeline(folder, spec["unet"], spec["vae"], spec["text"], seed=seed)


def write_pairs(folder: Path, n: int, resolution: int, seed: int = 0) -> None:
    """A pairs folder as `duo curate` writes it (curate.json + pairs.jsonl + images), random-noise images."""
    import numpy as np
    from PIL import Image

    from duo.data.concepts import concept_from_dict
    from duo.data.curate import CONFIG, MANIFEST
    from duo.data.files import append_jsonl, atomic_save_image, atomic_write_text

    part = {"name": "bench", "pairs": n, "unsafe": "a naked {who}", "safe": "a dressed {who}"}
    concept = concept_from_dict(
        {"name": "bench", "parts": [{**part, "vars": {"who": ["woman", "man"]}}]}, source="benchmarks/step_fixtures.py"
    )
    settings = {
        "model": "random",
        "concept": concept.to_dict(),
        "seed": seed,
        "strength": 0.75,
        "steps": 1,
        "guidance": 7.5,
        "resolution": resolution,
        "judge": "none",
        "judge_options": {},
        "require_match": False,
        "dtype": "float32",
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG, json.dumps({"settings": settings}, indent=2))
    rng = np.random.default_rng(seed)
    for i in range(n):
        pid = f"bench-{i:05d}"
        files = {}
        for kind in ("unsafe", "safe"):
            files[kind] = f"images/{pid}-{kind}.png"
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            atomic_save_image(folder / files[kind], Image.fromarray(pixels))
        unsafe, safe = PROMPTS[i % len(PROMPTS)]
        common = {"seed": i, "tries": 1, "judge": None}
        record = {
            "id": pid,
            "part": "bench",
            "index": i,
            "model": "random",
            "unsafe": {"file": files["unsafe"], "prompt": unsafe, **common},
            "safe": {"file": files["safe"], "prompt": safe, "negative_prompt": unsafe, "strength": 0.75, **common},
            "steps": 1,
            "guidance": 7.5,
            "resolution": resolution,
        }
        append_jsonl(folder / MANIFEST, record)


def authors_method_class():
    """`DuoMethod` with the structure of the authors' `train/unlearn-sd.py` step: before the two UNet forwards
    (policy; reference with adapters off — as ours), the micro-batch's images are VAE-encoded (their
    `latent_dist.sample()`; ours samples the same distribution) and one prompt per UNet row is text-encoded
    (their `encode_prompt` of the three rows' prompts: empty under empty conditioning)."""
    import torch

    from duo.train.methods import Cache, DuoMethod

    class PerStepEncodingMethod(DuoMethod):
        needs_text_encoder = True  # and the VAE: both stay resident, as in their script

        def __init__(self, cfg, family, pairs, device):
            super().__init__(cfg, family, pairs, device)
            self.pairs = pairs

        def micro_loss(self, unet, acc, d):
            fam, pairs, dev, cfg = self.family, self.pairs, acc.device, self.cfg
            idx = d.pair_index.tolist()
            b = len(idx)
            images = [pairs.unsafe_images[i] for i in idx] + [pairs.safe_images[i] for i in idx]
            mean, std = fam.encode_images(images, pairs.resolution)
            row_prompt = [pairs.unsafe_prompts[i] if cfg.conditioning == "concept" else "" for i in idx]
            emb = fam.encode_prompts(row_prompt + row_prompt + [""] * b).to(dev)  # rows x⁻, x⁺, x_T
            if cfg.keep != "noise" or cfg.conditioning == "mixed":
                raise SystemExit("the authors' structure is modelled for keep=noise, empty/concept conditioning")
            cache = Cache(
                mean=torch.stack([mean[:b], mean[b:]], 1).to(dev),
                std=torch.stack([std[:b], std[b:]], 1).to(dev),
                emb_empty=emb[2 * b : 2 * b + 1],
                emb_unsafe=emb[:b],
                emb_retain=emb[2 * b : 2 * b + 1],
            )
            # Rows of this per-step cache are the micro-batch's slots, in order.
            local = dataclasses.replace(d, pair_index=torch.arange(b))
            saved, self.cache = self.cache, cache
            try:
                return super().micro_loss(unet, acc, local)
            finally:
                self.cache = saved

    return PerStepEncodingMethod


def setup_run(variant: str, pipeline: str, data: str, n_pairs: int, out: str):
    """`duo.train.loop.setup()` exactly as `duo train` calls it (anchor settings), with the variant's method."""
    import torch

    from duo.train.config import TrainConfig
    from duo.train.loop import setup
    from duo.train.methods import DuoMethod

    cfg = TrainConfig(
        model=pipeline, data=data, out=out, batch_size=n_pairs, grad_accum=1, device="cpu", **ANCHOR_SETTINGS
    )
    state = setup(cfg, make=authors_method_class() if variant == "authors" else DuoMethod)
    if variant == "ours-cl":  # a lever, measured: NHWC convolutions (oneDNN on CPU, cuDNN on GPU)
        state.unet.to(memory_format=torch.channels_last)
    if variant == "ours-compile":  # a lever, measured: inductor; policy and reference (adapters off) both compiled
        state.unet.forward = torch.compile(state.unet.forward)
    return state
