"""Train the Shapes world's base text-to-image model from scratch, and measure it.

Phases (each resumable from `out_dir/work/`):
  1. render the training images (held-out combinations excluded) and build the tokenizer;
  2. AutoencoderKL 32x32x3 -> 8x8x4 (MSE + 0.5 L1 + 1e-5 KL); scaling factor = 1 / latent std;
  3. the judge (clean renders, then a mix with VAE reconstructions);
  4. CLIPTextModel + UNet2DConditionModel jointly: DDPM SD scaled_linear schedule, epsilon prediction,
     10 % caption dropout, min-SNR(5) loss weights, EMA weights are what is saved;
  5. a standard diffusers StableDiffusionPipeline folder (DDIM scheduler) + judge weights + quality.json.
Everything is written atomically (temp file/folder, then rename); the UNet phase checkpoints every few
minutes and resumes after a crash. Deterministic from the seed for fixed step counts.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from duo.models.sd import SD_BETAS, assemble_pipeline
from duo.shapes.render import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    TRAIN_COMBOS,
    caption_for,
    colour_prompts,
    heldout_prompts,
    render_dataset,
)
from duo.shapes.tokenizer import MAX_LENGTH, build_tokenizer, load_tokenizer


class Logger:
    def __init__(self, path: Path | None):
        self.path = path
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{(time.time() - self.t0) / 60:5.1f}m] {msg}"
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_dir(save: Callable[[Path], None], final: Path) -> None:
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_text_encoder(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        projection_dim=128,
    )
    return CLIPTextModel(cfg)


def build_pipeline(vae, text_encoder, tokenizer, unet):
    return assemble_pipeline(unet, vae, text_encoder, tokenizer)


def _to_unit(x: torch.Tensor) -> torch.Tensor:  # [0,1] -> [-1,1]
    return x * 2 - 1


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def sample(
    pipe, prompts: list[str], seed: int = 0, steps: int = 20, guidance: float = 5.0, batch: int = 100
) -> torch.Tensor:
    """Images [N,3,32,32] in [0,1]; seed-fixed."""
    outs = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(
            prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt"
        )
        outs.append(out.images.float().cpu())
    return torch.cat(outs).clamp(0, 1)


def evaluate_base(pipe, judge_net=None, n: int = 200, seed: int = 0, steps: int = 20, guidance: float = 5.0) -> dict:
    """Base quality: colour/shape/background accuracy on n held-out-combination prompts; red rate on red prompts."""
    from duo.shapes.judge import classify
    from duo.shapes.render import parse_prompt

    pipe.set_progress_bar_config(disable=True)
    prompts = heldout_prompts(n)
    preds = classify(sample(pipe, prompts, seed=seed, steps=steps, guidance=guidance), judge_net)
    asked = [parse_prompt(p) for p in prompts]
    res = {k: sum(p[k] == a[k] for p, a in zip(preds, asked)) / n for k in ("colour", "shape", "background")}
    red = colour_prompts("red", n)
    rpreds = classify(sample(pipe, red, seed=seed + 100_000, steps=steps, guidance=guidance), judge_net)
    res["red_rate_on_red_prompts"] = sum(p["colour"] == "red" for p in rpreds) / n
    res.update(n=n, steps=steps, guidance=guidance, seed=seed)
    return res


# ------------------------------------------------------------------ phases
def train_vae(images: torch.Tensor, steps: int, seed: int, log, batch: int = 32):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=max(0.05, 3.0 / steps))
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = _to_unit(images[idx])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            log(
                f"vae step {step + 1}/{steps} loss {loss.item():.5f} kl {kl.item():.1f} "
                f"({(time.time() - t0) / (step + 1):.3f}s/step)"
            )
    vae.eval()
    return vae


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 500):
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(_to_unit(images[i : i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def caption_table(tokenizer):
    """token ids [6 colours, 3 synonyms, 5 shapes, 3 backgrounds, L] and the empty caption [L]."""
    caps = [caption_for(w, s, b) for c in COLOURS for w in COLOURS[c] for s in SHAPES for b in BACKGROUNDS]
    ids = tokenizer(caps, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    return ids.view(len(COLOURS), 3, len(SHAPES), len(BACKGROUNDS), MAX_LENGTH), empty


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
    from duo.shapes.judge import load_judge, train_judge

    out = Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = Logger(Path(log_path) if log_path else out / "train.log")
    torch.set_num_threads(max(1, threads))  # 1 thread measured 4x faster than 2 on a shared 2-core machine
    config = dict(
        seed=seed,
        n_images=n_images,
        vae_steps=vae_steps,
        judge_steps=judge_steps,
        judge_finetune_steps=judge_finetune_steps,
        unet_steps=unet_steps,
        minutes=minutes,
        batch=batch,
        lr=lr,
    )
    log(f"train_base {json.dumps(config)} -> {out}")
    t_start = time.time()
    timings: dict[str, float] = {}

    # 1. data + tokenizer
    t = time.time()
    scenes, imgs = render_dataset(n_images, seed=seed, combos=TRAIN_COMBOS)
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    labels = torch.tensor(
        [[list(COLOURS).index(s.colour), SHAPES.index(s.shape), BACKGROUNDS.index(s.background)] for s in scenes]
    )
    tok_dir = build_tokenizer(work / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    timings["data_s"] = time.time() - t
    log(f"rendered {n_images} training images, tokenizer {len(tokenizer)} tokens ({timings['data_s']:.0f}s)")

    # 2. VAE
    from diffusers import AutoencoderKL

    t = time.time()
    vae_dir = work / "vae"
    if (vae_dir / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
        log("vae: resumed from work/vae")
    else:
        vae = train_vae(images, vae_steps, seed, log)
        mean, std = encode_all(vae, images[:5000])
        lat = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
        sf = float(1.0 / lat.std())
        vae.register_to_config(scaling_factor=sf)
        _atomic_dir(lambda p: vae.save_pretrained(p), vae_dir)
        with torch.no_grad():
            rec = vae.decode(mean[:500]).sample
            mse = float(F.mse_loss((rec + 1) / 2, images[:500]))
        log(f"vae: scaling factor {sf:.4f}, reconstruction MSE {mse:.5f}")
    timings["vae_s"] = time.time() - t
    vae.requires_grad_(False)

    # 3. judge
    t = time.time()
    judge_path = work / "judge.safetensors"
    if judge_path.exists():
        log("judge: resumed from work/judge.safetensors")
        judge_acc = None
    else:

        @torch.no_grad()
        def reconstruct(x):
            return (vae.decode(vae.encode(_to_unit(x)).latent_dist.mean).sample + 1) / 2

        judge_acc = train_judge(
            judge_path,
            seed=seed,
            steps=judge_steps,
            finetune_steps=judge_finetune_steps,
            reconstruct=reconstruct,
            log=log,
        )
    judge_net = load_judge(judge_path)
    timings["judge_s"] = time.time() - t

    # 4. text encoder + UNet
    t = time.time()
    lat_mean, lat_std = encode_all(vae, images)
    sf = vae.config.scaling_factor
    log(f"encoded {len(lat_mean)} latents ({time.time() - t:.0f}s)")
    cap_ids, empty_ids = caption_table(tokenizer)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**SD_BETAS, prediction_type="epsilon")
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=5.0) / snr  # min-SNR(5), epsilon prediction

    torch.manual_seed(seed + 7)
    unet = make_unet()
    te = make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    ema_unet.requires_grad_(False)
    ema_te.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 11)
    step = 0
    history: list[dict] = []
    ckpt_path = work / "unet_ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(ck["unet"])
        te.load_state_dict(ck["te"])
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_te.load_state_dict(ck["ema_te"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["gen"])
        step, history = ck["step"], ck["history"]
        log(f"unet: resumed from checkpoint at step {step}")

    warmup = 200

    def progress(s: int) -> float:  # fraction of the run done: by steps, or by time under a budget
        p = s / unet_steps
        if minutes is not None:
            p = max(p, (time.time() - t_unet) / 60 / minutes)
        return p

    def lr_at(s: int) -> float:
        if s < warmup:
            return lr * (s + 1) / warmup
        p = progress(s)
        if p >= 0.8:  # linear decay to 10 % over the last fifth
            return lr * max(0.1, 1 - 0.9 * (p - 0.8) / 0.2)
        return lr

    def ema_decay(s: int) -> float:
        return min(0.999, (1 + s) / (10 + s))

    def save_pipeline(tag: str) -> None:
        pipe = build_pipeline(vae, ema_te, tokenizer, ema_unet)
        _atomic_dir(lambda p: pipe.save_pretrained(p, safe_serialization=True), out / "pipeline")
        shutil.copyfile(judge_path, out / "judge.safetensors.tmp")
        os.replace(out / "judge.safetensors.tmp", out / "judge.safetensors")
        log(f"saved pipeline ({tag}) to {out / 'pipeline'}")

    def checkpoint() -> None:
        _atomic_torch_save(
            dict(
                unet=unet.state_dict(),
                te=te.state_dict(),
                ema_unet=ema_unet.state_dict(),
                ema_te=ema_te.state_dict(),
                opt=opt.state_dict(),
                gen=g.get_state(),
                step=step,
                history=history,
            ),
            ckpt_path,
        )
        save_pipeline(f"step {step}")

    def quick_eval() -> dict:
        pipe = build_pipeline(vae, ema_te, tokenizer, ema_unet)
        pipe.set_progress_bar_config(disable=True)
        prompts = heldout_prompts(120)
        from duo.shapes.judge import classify
        from duo.shapes.render import parse_prompt

        preds = classify(sample(pipe, prompts, seed=999), judge_net)
        asked = [parse_prompt(p) for p in prompts]
        r = {
            k: sum(p[k] == a[k] for p, a in zip(preds, asked)) / len(prompts) for k in ("colour", "shape", "background")
        }
        r["step"] = step
        return r

    t_unet = time.time()
    last_ckpt = last_eval = time.time()
    unet.train()
    te.train()
    while step < unet_steps:
        if minutes is not None and (time.time() - t_unet) / 60 >= minutes:
            log(f"unet: time budget of {minutes} min reached at step {step}")
            break
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step)
        idx = torch.randint(0, len(lat_mean), (batch,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        lab = labels[idx]
        syn = torch.randint(0, 3, (batch,), generator=g)
        ids = cap_ids[lab[:, 0], syn, lab[:, 1], lab[:, 2]]
        drop = torch.rand(batch, generator=g) < 0.1
        ids = torch.where(drop[:, None], empty_ids[None].expand_as(ids), ids)
        noise = torch.randn(z0.shape, generator=g)
        ts = torch.randint(0, 1000, (batch,), generator=g)
        zt = noise_sched.add_noise(z0, noise, ts)
        cond = te(ids)[0]
        pred = unet(zt, ts, encoder_hidden_states=cond).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per * loss_weight[ts]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        d = ema_decay(step)
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (te, ema_te)):
                for p_ema, p in zip(dst.parameters(), src.parameters()):
                    p_ema.lerp_(p, 1 - d)
        if not math.isfinite(float(loss)):
            raise RuntimeError(f"non-finite loss at step {step}")
        if step % 100 == 0:
            el = time.time() - t_unet
            log(
                f"unet step {step}/{unet_steps} loss {float(loss):.4f} lr {lr_at(step):.2e} "
                f"({el / 60:.1f} min this run)"
            )
        if time.time() - last_eval >= eval_every_min * 60:
            r = quick_eval()
            history.append(r)
            log(f"quick eval (120 held-out prompts, EMA): {json.dumps(r)}")
            last_eval = time.time()
        if time.time() - last_ckpt >= ckpt_every_min * 60:
            checkpoint()
            last_ckpt = time.time()
    timings["unet_s"] = time.time() - t
    checkpoint()

    # 5. final pipeline + evaluation
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    quality = evaluate_base(pipe, judge_net)
    timings["total_s"] = time.time() - t_start
    result = dict(
        quality=quality, judge=judge_acc, unet_steps_done=step, history=history, timings=timings, config=config
    )
    tmp = out / "quality.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "quality.json")
    log(f"final quality: {json.dumps(quality)}; total {timings['total_s'] / 60:.1f} min")
    return result


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
    _atomic_dir(lambda p: shutil.copytree(out / "pipeline", p), ASSETS / "pipeline")
    shutil.copyfile(out / "judge.safetensors", ASSETS / "judge.safetensors.tmp")
    os.replace(ASSETS / "judge.safetensors.tmp", ASSETS / "judge.safetensors")
    if (out / "quality.json").is_file():
        shutil.copyfile(out / "quality.json", ASSETS / "quality.json")
    _VERIFIED.clear()
    return write_sums(ASSETS)
