"""Phase 4 of the Shapes base training: text encoder and UNet jointly, from scratch.

DDPM with SD's scaled_linear schedule, epsilon prediction, 10 % caption dropout, min-SNR(5) loss weights;
the EMA weights are what is saved. Checkpoints (with the generator's state) every few minutes, so a killed
run resumes exactly where it was.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from duo.models.sd import SD_BETAS
from duo.shapes.architecture import build_pipeline, make_text_encoder, make_unet
from duo.shapes.render import BACKGROUNDS, COLOURS, SHAPES, caption_for
from duo.shapes.tokenizer import MAX_LENGTH
from duo.shapes.train_vae import encode_all
from duo.shapes.trainutil import atomic_copy, atomic_dir, atomic_torch_save

CAPTION_DROPOUT = 0.1
MIN_SNR = 5.0
EMA_MAX = 0.999
GRAD_CLIP = 1.0
LOG_EVERY = 100
QUICK_EVAL_PROMPTS = 120
QUICK_EVAL_SEED = 999


def caption_table(tokenizer):
    """token ids [6 colours, 3 synonyms, 5 shapes, 3 backgrounds, L] and the empty caption [L]."""
    caps = [caption_for(w, s, b) for c in COLOURS for w in COLOURS[c] for s in SHAPES for b in BACKGROUNDS]
    ids = tokenizer(caps, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    return ids.view(len(COLOURS), 3, len(SHAPES), len(BACKGROUNDS), MAX_LENGTH), empty


@dataclass
class Schedule:
    """Learning rate: warm-up, flat, then linear decay to 10 % over the last fifth of the run.

    The run's length is its steps, or its wall time under a `minutes` budget, whichever ends it first.
    """

    lr: float
    steps: int
    minutes: float | None
    warmup: int = 200
    t0: float = field(default_factory=time.time)

    def out_of_time(self) -> bool:
        return self.minutes is not None and (time.time() - self.t0) / 60 >= self.minutes

    def progress(self, s: int) -> float:
        p = s / self.steps
        if self.minutes is not None:
            p = max(p, (time.time() - self.t0) / 60 / self.minutes)
        return p

    def lr_at(self, s: int) -> float:
        if s < self.warmup:
            return self.lr * (s + 1) / self.warmup
        p = self.progress(s)
        if p >= 0.8:
            return self.lr * max(0.1, 1 - 0.9 * (p - 0.8) / 0.2)
        return self.lr


class Latents:
    """Training batches: VAE latents (sampled from each image's posterior) with one of their captions."""

    def __init__(self, vae, images: torch.Tensor, labels: torch.Tensor, tokenizer, log) -> None:
        from diffusers import DDPMScheduler

        t = time.time()
        self.mean, self.std = encode_all(vae, images)
        self.scale = vae.config.scaling_factor
        log(f"encoded {len(self.mean)} latents ({time.time() - t:.0f}s)")
        self.labels = labels
        self.cap_ids, self.empty_ids = caption_table(tokenizer)
        self.noise_sched = DDPMScheduler(**SD_BETAS, prediction_type="epsilon")
        alphas_cumprod = self.noise_sched.alphas_cumprod
        snr = alphas_cumprod / (1 - alphas_cumprod)
        self.loss_weight = torch.clamp(snr, max=MIN_SNR) / snr  # min-SNR, epsilon prediction

    def batch(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(noisy latents, timesteps, caption ids, noise); the draws' order is part of the seed's recipe."""
        idx = torch.randint(0, len(self.mean), (n,), generator=g)
        z0 = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g)) * self.scale
        lab = self.labels[idx]
        syn = torch.randint(0, 3, (n,), generator=g)
        ids = self.cap_ids[lab[:, 0], syn, lab[:, 1], lab[:, 2]]
        drop = torch.rand(n, generator=g) < CAPTION_DROPOUT
        ids = torch.where(drop[:, None], self.empty_ids[None].expand_as(ids), ids)
        noise = torch.randn(z0.shape, generator=g)
        ts = torch.randint(0, 1000, (n,), generator=g)
        return self.noise_sched.add_noise(z0, noise, ts), ts, ids, noise


class UnetTrainer:
    """The text encoder and UNet under training, their EMA copies, optimiser and generator: one checkpoint."""

    def __init__(self, tokenizer, lr: float, seed: int) -> None:
        torch.manual_seed(seed + 7)
        self.unet = make_unet()
        self.te = make_text_encoder(
            len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        self.params = list(self.unet.parameters()) + list(self.te.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-2)
        self.ema_unet, self.ema_te = copy.deepcopy(self.unet).eval(), copy.deepcopy(self.te).eval()
        self.ema_unet.requires_grad_(False)
        self.ema_te.requires_grad_(False)
        self.g = torch.Generator().manual_seed(seed + 11)
        self.step = 0
        self.history: list[dict] = []

    def state(self) -> dict:
        return dict(
            unet=self.unet.state_dict(),
            te=self.te.state_dict(),
            ema_unet=self.ema_unet.state_dict(),
            ema_te=self.ema_te.state_dict(),
            opt=self.opt.state_dict(),
            gen=self.g.get_state(),
            step=self.step,
            history=self.history,
        )

    def load(self, ck: dict) -> None:
        self.unet.load_state_dict(ck["unet"])
        self.te.load_state_dict(ck["te"])
        self.ema_unet.load_state_dict(ck["ema_unet"])
        self.ema_te.load_state_dict(ck["ema_te"])
        self.opt.load_state_dict(ck["opt"])
        self.g.set_state(ck["gen"])
        self.step, self.history = ck["step"], ck["history"]

    def train_step(self, data: Latents, batch: int, lr: float) -> float:
        for pg in self.opt.param_groups:
            pg["lr"] = lr
        zt, ts, ids, noise = data.batch(batch, self.g)
        cond = self.te(ids)[0]
        pred = self.unet(zt, ts, encoder_hidden_states=cond).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per * data.loss_weight[ts]).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()
        self.step += 1
        self._update_ema(min(EMA_MAX, (1 + self.step) / (10 + self.step)))
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self, decay: float) -> None:
        for src, dst in ((self.unet, self.ema_unet), (self.te, self.ema_te)):
            for p_ema, p in zip(dst.parameters(), src.parameters()):
                p_ema.lerp_(p, 1 - decay)

    def pipeline(self, vae, tokenizer):
        return build_pipeline(vae, self.ema_te, tokenizer, self.ema_unet)


@dataclass
class UnetRun:
    """Where the phase reads and writes, and how often it checks on itself."""

    out: Path
    work: Path
    vae: object
    tokenizer: object
    judge_path: Path
    judge_net: object
    log: object
    eval_every_min: float
    ckpt_every_min: float

    @property
    def ckpt_path(self) -> Path:
        return self.work / "unet_ckpt.pt"

    def save_pipeline(self, trainer: UnetTrainer, tag: str) -> None:
        pipe = trainer.pipeline(self.vae, self.tokenizer)
        atomic_dir(lambda p: pipe.save_pretrained(p, safe_serialization=True), self.out / "pipeline")
        atomic_copy(self.judge_path, self.out / "judge.safetensors")
        self.log(f"saved pipeline ({tag}) to {self.out / 'pipeline'}")

    def checkpoint(self, trainer: UnetTrainer) -> None:
        atomic_torch_save(trainer.state(), self.ckpt_path)
        self.save_pipeline(trainer, f"step {trainer.step}")

    def quick_eval(self, trainer: UnetTrainer) -> dict:
        from duo.shapes.quality import heldout_accuracy

        pipe = trainer.pipeline(self.vae, self.tokenizer)
        r = heldout_accuracy(pipe, self.judge_net, QUICK_EVAL_PROMPTS, QUICK_EVAL_SEED)
        r["step"] = trainer.step
        return r


def train_unet(run: UnetRun, data: Latents, steps: int, batch: int, lr: float, seed: int, minutes: float | None):
    """Train (or resume) to `steps` or the time budget -> the trainer; its last state is the caller's to save."""
    trainer = UnetTrainer(run.tokenizer, lr, seed)
    if run.ckpt_path.exists():
        trainer.load(torch.load(run.ckpt_path, weights_only=True))
        run.log(f"unet: resumed from checkpoint at step {trainer.step}")
    schedule = Schedule(lr, steps, minutes)
    last_ckpt = last_eval = time.time()
    trainer.unet.train()
    trainer.te.train()
    while trainer.step < steps:
        if schedule.out_of_time():
            run.log(f"unet: time budget of {minutes} min reached at step {trainer.step}")
            break
        loss = trainer.train_step(data, batch, schedule.lr_at(trainer.step))
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {trainer.step}")
        if trainer.step % LOG_EVERY == 0:
            run.log(
                f"unet step {trainer.step}/{steps} loss {loss:.4f} lr {schedule.lr_at(trainer.step):.2e} "
                f"({(time.time() - schedule.t0) / 60:.1f} min this run)"
            )
        if time.time() - last_eval >= run.eval_every_min * 60:
            trainer.history.append(run.quick_eval(trainer))
            run.log(f"quick eval ({QUICK_EVAL_PROMPTS} held-out prompts, EMA): {json.dumps(trainer.history[-1])}")
            last_eval = time.time()
        if time.time() - last_ckpt >= run.ckpt_every_min * 60:
            run.checkpoint(trainer)
            last_ckpt = time.time()
    return trainer
