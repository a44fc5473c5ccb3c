"""The training loop: setup → steps → checkpoint → save. One loop; the objective is what plugs in."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from duo.data.files import append_jsonl, atomic_write_text, read_jsonl
from duo.data.pairs import PairSet, load_pairs
from duo.errors import UserError
from duo.models.lora import adapters_disabled, attach_lora, get_lora_state, lora_parameters, set_lora_state
from duo.objectives import duo_loss
from duo.train.card import write_model_card
from duo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from duo.train.config import RESUMABLE_CHANGES, TrainConfig
from duo.train.draws import StepDraws, draw_step

log = logging.getLogger(__name__)
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class Cache:
    """What never changes during training: latent distributions and prompt embeddings, computed once."""

    mean: torch.Tensor  # (N, 2, C, H, W): x⁻ then x⁺
    std: torch.Tensor
    emb_empty: torch.Tensor  # (1, L, D)
    emb_unsafe: torch.Tensor  # (N, L, D)
    emb_retain: torch.Tensor  # (N or K, L, D)


def train(cfg: TrainConfig) -> Path:
    """Train a DUO LoRA; returns the output folder. Resumes with cfg.resume."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pairs = load_pairs(cfg.data, cfg.part)
    out = Path(cfg.out)
    _check_out_folder(cfg, out)

    from accelerate import Accelerator

    # Without cpu=True accelerate ignores a multi-process launch on a machine with no GPU.
    on_cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=on_cpu, log_with=cfg.tracker, project_dir=str(out)
    )
    from duo.models.family import load_family

    weight_dtype = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}[cfg.mixed_precision]
    family = load_family(cfg.model, dtype=weight_dtype, device=str(accelerator.device), allow_pickle=cfg.allow_pickle)
    preference_range(cfg, family, pairs)
    # Only now that the model loaded is anything written (or, with --overwrite, deleted).
    if accelerator.is_main_process:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        run_shape = {
            "processes": accelerator.num_processes,
            "pairs_per_step": cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
        }
        atomic_write_text(out / "config.json", json.dumps({**cfg.to_dict(), **run_shape}, indent=2))
    accelerator.wait_for_everyone()

    torch.manual_seed(cfg.seed)
    attach_lora(family.unet, cfg.rank, cfg.alpha, cfg.targets or family.default_lora_targets)
    cache = build_cache(family, pairs, cfg, accelerator.device)
    family.offload_encoders()  # only the UNet is needed from here on
    params = lora_parameters(family.unet)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.resolved_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
    )
    start = _restore(cfg, out, family.unet, optimizer)
    if accelerator.is_main_process:
        _truncate_metrics(out, start)  # a resumed run rewrites the steps after its checkpoint
    unet, optimizer = accelerator.prepare(family.unet, optimizer)
    if cfg.tracker:
        accelerator.init_trackers("duo", config={k: v for k, v in cfg.to_dict().items() if v is not None})

    run = _Run(cfg, pairs, family, cache, accelerator, unet, optimizer, params)
    metrics_path = out / "metrics.jsonl"
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not accelerator.is_main_process
    )
    for step in bar:
        metrics = run.step(step)
        if accelerator.is_main_process:
            append_jsonl(metrics_path, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
        if cfg.tracker:
            accelerator.log(metrics, step=step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _checkpoint(accelerator, out, step + 1, unet, optimizer)
    _save_outputs(cfg, pairs, family, accelerator, unet, out)
    accelerator.end_training()
    return out


def _check_out_folder(cfg: TrainConfig, out: Path) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    if cfg.overwrite:
        if not (out / "config.json").is_file():  # --overwrite deletes the folder: only ever one of ours
            raise UserError(f"--overwrite refuses to delete '{out}': it is not a `duo train` folder.")
        return
    if not cfg.resume:
        raise UserError(
            f"'{out}' already holds a run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out."
        )
    previous_path = out / "config.json"
    if not previous_path.is_file():
        raise UserError(f"'{out}' is not a `duo train` folder (no config.json); choose another --out.")
    previous, now = json.loads(previous_path.read_text()), cfg.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and previous.get(k) != now[k])
    if changed:
        raise UserError(
            f"--resume with other settings than the run in '{out}' ({', '.join(changed)} differ). "
            "Resume with the original settings, or train into a new --out."
        )


def _restore(cfg: TrainConfig, out: Path, unet, optimizer) -> int:
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is None:
        if cfg.resume:
            log.info("no checkpoint in %s: starting from step 0", out)
        return 0
    step, lora, opt_state = load_checkpoint(ckpt)
    if step > cfg.steps:
        raise UserError(f"the checkpoint in '{out}' is at step {step}, beyond --steps {cfg.steps}. Raise --steps.")
    set_lora_state(unet, lora)
    optimizer.load_state_dict(opt_state)
    log.info("resumed from %s (step %d)", ckpt, step)
    return step


def _truncate_metrics(out: Path, step: int) -> None:
    path = out / "metrics.jsonl"
    if path.exists():
        kept = [r for r in read_jsonl(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def build_cache(family, pairs: PairSet, cfg: TrainConfig, device) -> Cache:
    res = pairs.resolution
    means, stds = [], []
    for images in (pairs.unsafe_images, pairs.safe_images):
        chunks = [family.encode_images(images[i : i + 16], res) for i in range(0, len(images), 16)]
        means.append(torch.cat([m for m, _ in chunks]))
        stds.append(torch.cat([s for _, s in chunks]))
    retain_prompts = pairs.concept.neighbours if cfg.retain_prompts == "neighbours" else pairs.safe_prompts
    if cfg.keep == "noise+retain" and not retain_prompts:
        raise UserError("--retain-prompts neighbours needs a 'neighbours' list in the concept file.")
    encode = family.encode_prompts
    return Cache(
        mean=torch.stack(means, 1).to(device),
        std=torch.stack(stds, 1).to(device),
        emb_empty=encode([""]).to(device),
        emb_unsafe=encode(pairs.unsafe_prompts).to(device),
        emb_retain=encode(retain_prompts).to(device) if cfg.keep == "noise+retain" else encode([""]).to(device),
    )


def preference_range(cfg: TrainConfig, family, pairs: PairSet) -> tuple[int, int]:
    """[t_min, t_max) of the preference term: the flags, else what SDEdit at the pairs' strength visits."""
    lo, hi = family.preference_timesteps(pairs.strength)
    t_range = (cfg.t_min if cfg.t_min is not None else lo, cfg.t_max if cfg.t_max is not None else hi)
    if not 0 <= t_range[0] < t_range[1] <= family.num_train_timesteps:
        raise UserError(
            f"preference timesteps [{t_range[0]}, {t_range[1]}) are empty or outside the model's "
            f"{family.num_train_timesteps} steps; adjust --t-min / --t-max."
        )
    return t_range


class _Run:
    def __init__(self, cfg, pairs, family, cache, accelerator, unet, optimizer, params):
        self.cfg, self.pairs, self.family, self.cache = cfg, pairs, family, cache
        self.acc, self.unet, self.optimizer, self.params = accelerator, unet, optimizer, params
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        self.t_range = preference_range(cfg, family, pairs)

    def step(self, step: int) -> dict:
        cfg, started = self.cfg, time.perf_counter()
        draws = draw_step(
            cfg.seed,
            step,
            self.global_batch,
            len(self.pairs),
            tuple(self.cache.mean.shape[2:]),
            self.t_range,
            cfg.timesteps == "shared",
            cfg.conditioning,
            self.family.num_train_timesteps,
            self.cache.emb_retain.shape[0],
        )
        sums: dict[str, float] = {}
        for m in range(cfg.grad_accum):
            first = (m * self.world + self.rank) * cfg.batch_size
            micro = draws.slice(first, first + cfg.batch_size)
            sync = nullcontext() if m == cfg.grad_accum - 1 else self.acc.no_sync(self.unet)
            with sync:
                parts = self.micro_loss(micro)
                self.acc.backward(parts.loss / cfg.grad_accum)
            for name in ("loss", "pref", "keep", "retain", "delta_win", "delta_lose", "accuracy"):
                sums[name] = sums.get(name, 0.0) + float(getattr(parts, name).detach()) / cfg.grad_accum
        reduced = self.acc.reduce(torch.tensor(list(sums.values()), device=self.acc.device), "mean")
        metrics = dict(zip(sums, reduced.tolist()))
        if not torch.isfinite(reduced).all():
            raise UserError(
                f"the loss became {metrics['loss']} at step {step + 1}. Earlier checkpoints in "
                f"'{cfg.out}' are intact. Lower --lr or --beta, or train in fp32 (--mixed-precision no)."
            )
        grad_norm = self.acc.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "step": step + 1,
            **metrics,
            "grad_norm": float(grad_norm),
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - started, 4),
        }

    def micro_loss(self, d: StepDraws):
        """One batched forward over [x⁻_t ; x⁺_t ; x_T (; x⁺ at random t for retain)], policy and reference."""
        fam, c, dev = self.family, self.cache, self.acc.device
        d = StepDraws(**{k: v.to(dev) for k, v in d.__dict__.items()})
        idx, b = d.pair_index, d.pair_index.shape[0]
        x0 = fam.latents_from_distribution(c.mean[idx], c.std[idx], d.latent_noise)  # (b, 2, C, H, W)
        x_lose0, x_win0 = x0[:, 0], x0[:, 1]
        cond = torch.where(d.use_concept[:, None, None], c.emb_unsafe[idx], c.emb_empty.expand(b, -1, -1))
        T = torch.full((b,), fam.keep_timestep(), device=dev, dtype=torch.long)
        latents = [fam.add_noise(x_lose0, d.noise, d.t_lose), fam.add_noise(x_win0, d.noise, d.t_win), d.noise_T]
        ts, embs = [d.t_lose, d.t_win, T], [cond, cond, c.emb_empty.expand(b, -1, -1)]
        if self.cfg.keep == "noise+retain":
            retain_idx = idx if self.cfg.retain_prompts == "safe" else d.retain_prompt
            latents.append(fam.add_noise(x_win0, d.retain_noise, d.t_retain))
            ts.append(d.t_retain)
            embs.append(c.emb_retain[retain_idx])
        latents, ts, embs = torch.cat(latents), torch.cat(ts), torch.cat(embs)
        target = torch.cat(
            [fam.training_target(x_lose0, d.noise, d.t_lose), fam.training_target(x_win0, d.noise, d.t_win)]
        )
        base = self.acc.unwrap_model(self.unet)
        with self.acc.autocast():
            with torch.no_grad(), adapters_disabled(base):
                reference = fam.denoise(base, latents, ts, embs)
            policy = fam.denoise(self.unet, latents, ts, embs)
        return duo_loss(
            policy,
            reference,
            target,
            b,
            self.cfg.beta,
            self.cfg.resolved_lam,
            self.cfg.resolved_lam_retain if self.cfg.keep == "noise+retain" else 0.0,
        )


def _checkpoint(accelerator, out: Path, step: int, unet, optimizer) -> None:
    if accelerator.is_main_process:
        save_checkpoint(out, step, get_lora_state(accelerator.unwrap_model(unet)), optimizer.state_dict())
    accelerator.wait_for_everyone()


def _save_outputs(cfg: TrainConfig, pairs: PairSet, family, accelerator, unet, out: Path) -> None:
    if not accelerator.is_main_process:
        return
    family.save_lora(out, get_lora_state(accelerator.unwrap_model(unet)))
    write_model_card(out, cfg, pairs)
    if cfg.fuse:
        from duo.models.family import load_family

        fresh = load_family(cfg.model, allow_pickle=cfg.allow_pickle, device=str(accelerator.device))
        fresh.load_loras([(str(out), 1.0)])
        fresh.save_fused(out / "fused")
    log.info("LoRA written to %s", out / LORA_FILE)
