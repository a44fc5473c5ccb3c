"""The training loop: setup → steps → checkpoint → save. One loop; the objective is what plugs in."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from duo.data.files import append_jsonl, atomic_write_text, read_jsonl
from duo.data.pairs import PairSet, load_pairs
from duo.errors import UserError
from duo.models.lora import attach_lora, get_lora_state, lora_parameters, set_lora_state
from duo.train.card import write_model_card
from duo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from duo.train.config import RESUMABLE_CHANGES, TrainConfig
from duo.train.methods import check_method, make_method

log = logging.getLogger(__name__)
LORA_FILE = "pytorch_lora_weights.safetensors"


def train(cfg: TrainConfig) -> Path:
    """Train an unlearning LoRA with cfg.method; returns the output folder. Resumes with cfg.resume."""
    cfg.validate()
    if cfg.method == "uce":  # a closed form, not a loop
        from duo.train.uce import edit

        return edit(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pairs = load_pairs(cfg.data, cfg.part)
    out = Path(cfg.out)
    check_out_folder(cfg, out)

    from accelerate import Accelerator

    # Without cpu=True accelerate ignores a multi-process launch on a machine with no GPU.
    on_cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=on_cpu, log_with=cfg.tracker, project_dir=str(out)
    )
    from duo.models.family import load_family

    weight_dtype = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}[cfg.mixed_precision]
    family = load_family(cfg.model, dtype=weight_dtype, device=str(accelerator.device), allow_pickle=cfg.allow_pickle)
    check_method(cfg, family, pairs)
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
    attach_lora(family.unet, cfg.rank, cfg.alpha, cfg.targets or family.lora_targets(cfg.method))
    method = make_method(cfg, family, pairs, accelerator.device)
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

    run = _Run(cfg, method, accelerator, unet, optimizer, params)
    metrics_path = out / "metrics.jsonl"
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not accelerator.is_main_process
    )
    for step in bar:
        metrics = run.step(step)
        if accelerator.is_main_process:
            append_jsonl(metrics_path, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", **{method.shown: f"{metrics[method.shown]:.3g}"})
        if cfg.tracker:
            accelerator.log(metrics, step=step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _checkpoint(accelerator, out, step + 1, unet, optimizer)
    _save_outputs(cfg, pairs, family, accelerator, unet, out)
    accelerator.end_training()
    return out


def check_out_folder(cfg: TrainConfig, out: Path) -> None:
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
    # A key the earlier run did not write yet was a setting added later, at its default.
    defaults = TrainConfig(model=cfg.model, data=cfg.data, out=cfg.out, method=cfg.method).to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and previous.get(k, defaults[k]) != now[k])
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


class _Run:
    """One optimizer step: the method's draws for the global batch, sliced per process and micro-batch."""

    def __init__(self, cfg, method, accelerator, unet, optimizer, params):
        self.cfg, self.method = cfg, method
        self.acc, self.unet, self.optimizer, self.params = accelerator, unet, optimizer, params
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world

    def step(self, step: int) -> dict:
        cfg, started = self.cfg, time.perf_counter()
        draws = self.method.draw(step, self.global_batch)
        sums: dict[str, float] = {}
        for m in range(cfg.grad_accum):
            first = (m * self.world + self.rank) * cfg.batch_size
            micro = draws.slice(first, first + cfg.batch_size)
            sync = nullcontext() if m == cfg.grad_accum - 1 else self.acc.no_sync(self.unet)
            with sync:
                parts = self.method.micro_loss(self.unet, self.acc, micro)
                self.acc.backward(parts["loss"] / cfg.grad_accum)
            for name in self.method.metrics:
                sums[name] = sums.get(name, 0.0) + float(parts[name].detach()) / cfg.grad_accum
        reduced = self.acc.reduce(torch.tensor(list(sums.values()), device=self.acc.device), "mean")
        metrics = dict(zip(sums, reduced.tolist()))
        if not torch.isfinite(reduced).all():
            raise UserError(
                f"the loss became {metrics['loss']} at step {step + 1}. Earlier checkpoints in "
                f"'{cfg.out}' are intact. Lower --lr (or --beta for DUO), or train in fp32 (--mixed-precision no)."
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
