"""A tiny random Stable Diffusion 3 pipeline built on the spot (tests): the real classes, sizes shrunk.

The two CLIP encoders get different widths (32 and 48) so that a mix-up of their roles shows up as a shape
error, and the second tokenizer pads with "!" as SD3's CLIP-G tokenizer does. T5 is optional, as it is for a
real SD3 folder saved with `text_encoder_3=None`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from duo.models.tiny import TINY_TEXT, WORDS, write_tokenizer

CLIP_WIDTHS = (32, 48)  # CLIP-L, CLIP-G stand-ins; their pooled outputs together are the pooled projection
JOINT_DIM = 96  # ≥ sum of CLIP widths: the concatenated CLIP states are zero-padded up to T5's width
TINY_TRANSFORMER = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": JOINT_DIM,
    "caption_projection_dim": 32,  # = heads × head dim: the context stream has the image stream's width
    "pooled_projection_dim": sum(CLIP_WIDTHS),
    "pos_embed_max_size": 16,
    # SD3.5 Medium's layout, a superset of SD3's: the first block also attends over image tokens alone (attn2),
    # and queries and keys are RMS-normalised
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
TINY_T5 = {"d_model": JOINT_DIM, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4}
TINY_SD3_VAE = {
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    # SD3's VAE values: a wrong sign or order of shift and scale would move every latent
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def build_tiny_sd3_pipeline(folder: str | Path, seed: int = 0, with_t5: bool = False) -> Path:
    """Build, save and return a random tiny SD3 pipeline folder (64 px images, 8×8×16 latents, shift 3)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    clips = [{**TINY_TEXT, "hidden_size": width, "projection_dim": width} for width in CLIP_WIDTHS]
    random_sd3_pipeline(TINY_TRANSFORMER, TINY_SD3_VAE, clips, TINY_T5 if with_t5 else None).save_pretrained(folder)
    return folder


def random_sd3_pipeline(transformer: dict, vae: dict, clips: list[dict], t5: dict | None = None):
    """A StableDiffusion3Pipeline of the given sizes with random weights (toy tokenizers); T5 only if `t5`.

    The VAE's sample size is the transformer's latent side × 8, the factor of its four blocks."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tokenizer_2 = _clip_tokenizers(Path(tmp))
    encoders = [_clip_encoder(len(tokenizer), text) for text in clips]
    t5_encoder, t5_tokenizer = _t5(config=t5) if t5 else (None, None)
    vae_model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=transformer["sample_size"] * 8,
        **vae,
    )
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae_model,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder,
        tokenizer_3=t5_tokenizer,
    )


def _clip_tokenizers(tok_dir: Path):
    from transformers import CLIPTokenizer

    write_tokenizer(tok_dir)
    return (
        CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77),
        CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77, pad_token="!"),
    )


def _clip_encoder(vocab_size: int, text: dict):
    """`text` may set `vocab_size` (a full-size table wider than the toy vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    ids = {"vocab_size": vocab_size, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1}
    return CLIPTextModelWithProjection(CLIPTextConfig(**{**ids, "pad_token_id": 1, **text}))


def _t5(width: int = JOINT_DIM, config: dict | None = None):
    """A T5 encoder and a unigram T5 tokenizer built from a list of pieces (no sentencepiece model needed);
    `config` (T5Config sizes, `vocab_size` included if the table should be wider) replaces the tiny sizes."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-<>":
        pieces += [(ch, -5.0), ("▁" + ch, -4.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    sizes = config or {**TINY_T5, "d_model": width}
    t5 = T5Config(**{"vocab_size": len(tokenizer), "is_encoder_decoder": False, **sizes})
    return T5EncoderModel(t5), tokenizer
