"""A tiny random Stable Diffusion 1.x pipeline built on the spot (tests and the no-weights demo).

Same diffusers classes as the real model, sizes shrunk so that everything runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

WORDS = (
    "a an the of on in with and photo realistic man woman person white black naked nude dressed "
    "clothed bleeding comfort suffering enjoying gun peace horror red blue green circle square cat dog "
    "painting picture portrait street city night day sky tree house car"
).split()


def write_tokenizer(folder: Path, words: list[str] = WORDS, max_length: int = 77) -> None:
    """A small CLIP-style BPE vocabulary: whole words plus single characters as a fallback."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-":
        for t in (ch, ch + "</w>"):
            vocab.setdefault(t, len(vocab))
    merges = []
    for word in words:
        # Merge left to right so that each listed word becomes one token.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merges.append(f"{a} {b}")
            parts = [a + b] + parts[2:]
            vocab.setdefault(a + b, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    unique = list(dict.fromkeys(merges))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(unique) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": max_length,
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )


# Sizes of the tiny pipeline (< 1 M parameters in the UNet); other sizes pass their own.
TINY_UNET = {
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE = {"block_out_channels": (8, 16, 32, 32), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def random_vae(vae: dict, latent_size: int):
    """A random AutoencoderKL of the given sizes for latents of `latent_size` pixels a side."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(vae["block_out_channels"]),
        sample_size=latent_size * 2 ** (len(vae["block_out_channels"]) - 1),
        **vae,
    )


def random_sd_pipeline(unet: dict, vae: dict, text: dict, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline of the given sizes with random weights (toy tokenizer; `text` may set the
    embedding table's `vocab_size`, wider than the toy vocabulary, as full-size builds do)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from duo.models.sd import assemble_pipeline

    # built in this order (UNet, VAE, text encoder) so that a seed gives the weights it always gave
    unet_model = UNet2DConditionModel(**unet)
    vae_model = random_vae(vae, unet["sample_size"])
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    ids = {"vocab_size": len(tokenizer), "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1}
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**ids, "pad_token_id": 1, **text}))
    return assemble_pipeline(unet_model, vae_model, text_encoder, tokenizer, prediction_type)


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of each torch module of a pipeline, by component name."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def build_random_pipeline(
    folder: str | Path, unet: dict, vae: dict, text: dict, seed: int = 0, prediction_type: str = "epsilon"
) -> dict[str, int]:
    """Save a randomly initialised SD 1.x pipeline of the given sizes; returns parameter counts."""
    torch.manual_seed(seed)
    pipe = random_sd_pipeline(unet, vae, text, prediction_type)
    pipe.save_pretrained(folder)
    return parameter_counts(pipe)


def build_tiny_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build, save and return a random tiny SD 1.x pipeline folder (64 px images, 8×8 latents)."""
    build_random_pipeline(folder, TINY_UNET, TINY_VAE, TINY_TEXT, seed=seed, prediction_type=prediction_type)
    return Path(folder)


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A random tiny CLIPModel + CLIPTokenizer + image processor saved as a hub-style folder (32-px images).

    Stands in for a user-supplied CLIP checkpoint in tests of the CLIP judge, CLIP score and CLIP features.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tok", model_max_length=77)
    config = CLIPConfig(
        text_config={
            **TINY_TEXT,
            "vocab_size": len(tokenizer),
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**TINY_TEXT, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    for f in (folder / "_tok").iterdir():
        f.unlink()
    (folder / "_tok").rmdir()
    return folder
