"""Train the Shapes world's base text-to-image model from scratch, and measure it.

Phases (each resumable from `out_dir/work/`):
  1. render the training images (held-out combinations excluded) and build the tokenizer;
  2. AutoencoderKL 32x32x3 -> 8x8x4 (MSE + 0.5 L1 + 1e-5 KL); scaling factor = 1 / latent std (train_vae);
  3. the judge (clean renders, then a mix with VAE reconstructions; judge.train_judge);
  4. CLIPTextModel + UNet2DConditionModel jointly: DDPM SD scaled_linear schedule, epsilon prediction,
     10 % caption dropout, min-SNR(5) loss weights, EMA weights are what is saved (train_unet);
  5. a standard diffusers StableDiffusionPipeline folder (DDIM scheduler) + judge weights + quality.json.
Everything is written atomically (temp file/folder, then rename); the UNet phase checkpoints every few
minutes and resumes after a crash. Deterministic from the seed for fixed step counts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from duo.shapes.architecture import to_unit
from duo.shapes.quality import evaluate_base
from duo.shapes.render import BACKGROUNDS, COLOURS, SHAPES, TRAIN_COMBOS, render_dataset
from duo.shapes.tokenizer import build_tokenizer, load_tokenizer
from duo.shapes.train_unet import Latents, UnetRun, train_unet
from duo.shapes.train_vae import vae_phase
from duo.shapes.trainutil import Logger, atomic_copy, atomic_dir

__all__ = ["train_base", "ship", "evaluate_base"]
JUDGE_FILE = "judge.safetensors"


def render_training_data(n_images: int, seed: int, work: Path, log) -> tuple[torch.Tensor, torch.Tensor, object, float]:
    """Phase 1: images [N,3,32,32] in [0,1], their (colour, shape, background) indices, the tokenizer, seconds."""
    t = time.time()
    scenes, imgs = render_dataset(n_images, seed=seed, combos=TRAIN_COMBOS)
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    labels = torch.tensor(
        [[list(COLOURS).index(s.colour), SHAPES.index(s.shape), BACKGROUNDS.index(s.background)] for s in scenes]
    )
    tokenizer = load_tokenizer(build_tokenizer(work / "tokenizer"))
    seconds = time.time() - t
    log(f"rendered {n_images} training images, tokenizer {len(tokenizer)} tokens ({seconds:.0f}s)")
    return images, labels, tokenizer, seconds


def judge_phase(work: Path, vae, seed: int, steps: int, finetune_steps: int, log) -> tuple[object, dict | None]:
    """Phase 3: the judge network, resumed from work/ or trained there (its accuracies, or None if resumed)."""
    from duo.shapes.judge import load_judge, train_judge

    judge_path = work / JUDGE_FILE
    if judge_path.exists():
        log("judge: resumed from work/judge.safetensors")
        judge_acc = None
    else:

        @torch.no_grad()
        def reconstruct(x):
            return (vae.decode(vae.encode(to_unit(x)).latent_dist.mean).sample + 1) / 2

        judge_acc = train_judge(
            judge_path, seed=seed, steps=steps, finetune_steps=finetune_steps, reconstruct=reconstruct, log=log
        )
    return load_judge(judge_path), judge_acc


def write_quality(out: Path, judge_net, result: dict, t_start: float, log) -> dict:
    """Phase 5: measure the saved pipeline and write quality.json next to it."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", use_safetensors=True)
    quality = evaluate_base(pipe, judge_net)
    result["timings"]["total_s"] = time.time() - t_start
    result = {"quality": quality, **result}
    tmp = out / "quality.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "quality.json")
    log(f"final quality: {json.dumps(quality)}; total {result['timings']['total_s'] / 60:.1f} min")
    return result


def train_base(
    out_dir: str | Path,
    seed: int = 0,
    n_images: int = 60_000,
    vae_steps: int = 2000,
    judge_steps: int = 1000,
    judge_finetune_steps: int = 400,
    unet_steps: int = 8400,
    minutes: float | None = None,
    batch: int = 64,
    lr: float = 5e-4,
    eval_every_min: float = 6.0,
    ckpt_every_min: float = 4.0,
    log_path: str | Path | None = None,
    threads: int = 1,
) -> dict:
    """Train everything into out_dir; returns the final quality dict.

    Output: out_dir/pipeline (diffusers StableDiffusionPipeline), out_dir/judge.safetensors,
    out_dir/quality.json, out_dir/train.log; out_dir/work holds resumable intermediate state.
    `minutes` caps the UNet phase's wall time (the run is then no longer reproducible step-for-step).
    """
    out = Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = Logger(Path(log_path) if log_path else out / "train.log")
    torch.set_num_threads(max(1, threads))  # 1 thread measured 4x faster than 2 on a shared 2-core machine
    config = dict(
        seed=seed, n_images=n_images, vae_steps=vae_steps, judge_steps=judge_steps,
        judge_finetune_steps=judge_finetune_steps, unet_steps=unet_steps, minutes=minutes, batch=batch, lr=lr,
    )  # fmt: skip
    log(f"train_base {json.dumps(config)} -> {out}")
    t_start = time.time()
    images, labels, tokenizer, data_s = render_training_data(n_images, seed, work, log)
    timings = {"data_s": data_s}
    t = time.time()
    vae = vae_phase(work, images, vae_steps, seed, log)
    timings["vae_s"] = time.time() - t
    t = time.time()
    judge_net, judge_acc = judge_phase(work, vae, seed, judge_steps, judge_finetune_steps, log)
    timings["judge_s"] = time.time() - t
    t = time.time()
    judge_path = work / JUDGE_FILE
    run = UnetRun(out, work, vae, tokenizer, judge_path, judge_net, log, eval_every_min, ckpt_every_min)
    trainer = train_unet(run, Latents(vae, images, labels, tokenizer, log), unet_steps, batch, lr, seed, minutes)
    timings["unet_s"] = time.time() - t
    run.checkpoint(trainer)
    result = dict(judge=judge_acc, unet_steps_done=trainer.step, history=trainer.history, timings=timings)
    return write_quality(out, judge_net, {**result, "config": config}, t_start, log)


def ship(out_dir: str | Path) -> Path:
    """Install out_dir's pipeline and judge as the package's shipped assets; rewrite SHA256SUMS."""
    from duo.errors import UserError
    from duo.shapes import _VERIFIED, ASSETS, write_sums

    out = Path(out_dir)
    if not (out / "pipeline" / "model_index.json").is_file() or not (out / "judge.safetensors").is_file():
        raise UserError(
            f"{out} holds no finished training (pipeline/ and judge.safetensors); run `duo shapes train-base` first."
        )
    ASSETS.mkdir(parents=True, exist_ok=True)
    atomic_dir(lambda p: shutil.copytree(out / "pipeline", p), ASSETS / "pipeline")
    atomic_copy(out / "judge.safetensors", ASSETS / "judge.safetensors")
    if (out / "quality.json").is_file():
        shutil.copyfile(out / "quality.json", ASSETS / "quality.json")
    _VERIFIED.clear()
    return write_sums(ASSETS)
