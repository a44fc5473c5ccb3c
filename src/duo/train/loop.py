"""The training recipe of the gradient methods (DUO, ESD-u, ESD-x): setup → train → save → cleanup.

    state = setup(cfg)     # pairs, model, LoRA, method, optimizer, checkpoint restored; the folder claimed
    train(state)           # the optimizer steps, metrics.jsonl, checkpoints
    save(state)            # the LoRA, its card, the fused pipeline (--fuse); run.json records the outputs
    cleanup(state)

One loop: the objective is what plugs in (`duo.train.methods`). UCE trains nothing and is its own recipe
(`duo.train.uce`); `duo.train.api.train(cfg)` runs whichever cfg.method needs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from duo.data.files import append_jsonl, atomic_write_text, read_jsonl
from duo.data.pairs import PairSet, load_pair_sets
from duo.errors import UserError
from duo.models.lora import LoraModules, attach_lora, get_lora_state, lora_parameters, lora_parts, set_lora_state
from duo.runs import RunFolder
from duo.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_ema_state,
    load_scaler_state,
    save_checkpoint,
)
from duo.train.config import TrainConfig
from duo.train.ema import LoraEma
from duo.train.methods import check_method, make_method
from duo.train.outputs import (
    CONFIG_FILE,
    LORA_FILE,
    METRICS_FILE,
    OUTPUTS,
    claim_folder,
    write_config,
    write_lora_folder,
)
from duo.train.placement import targets_for

log = logging.getLogger(__name__)
# LORA_FILE lives in duo.train.outputs; it stays importable here for callers written before that module.
__all__ = ["LORA_FILE", "TrainState", "cleanup", "optimizer_step", "save", "setup", "train"]


@dataclass
class TrainState:
    """Everything a run holds between the verbs."""

    cfg: TrainConfig
    pairs: PairSet
    folder: RunFolder
    accelerator: object
    family: object
    method: object  # a duo.train.methods method: draw(step, G) and micro_loss(unet, acc, draws)
    unet: torch.nn.Module  # the trained module(s) (cfg.lora_modules; LoraModules for both) as accelerate prepared
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    start: int  # the first step to run: 0, or that of the restored checkpoint
    ema: LoraEma | None = None  # --ema-decay: the LoRA's moving average, what save writes

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes


def setup(cfg: TrainConfig, make=make_method) -> TrainState:
    """Claim --out, load pairs and model, attach the LoRA, build the method and optimizer, restore a checkpoint.

    make(cfg, family, pairs, device) builds the method (default: cfg.method's). Nothing is written, or deleted
    with --overwrite, until the model loaded and the method accepted the pairs.
    """
    cfg.validate()
    if not cfg.spec.trained:
        raise ValueError(f"--method {cfg.method} is not trained by the loop; run it with duo.train.api.train")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pairs = load_pair_sets(cfg.data_folders, cfg.part)
    folder = claim_folder(cfg)
    accelerator = _accelerator(cfg)
    _check_processes(cfg, accelerator)
    from duo.models.family import load_family

    weight_dtype = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}[cfg.mixed_precision]
    family = load_family(cfg.model, dtype=weight_dtype, device=str(accelerator.device), allow_pickle=cfg.allow_pickle)
    check_method(cfg, family, pairs)
    torch.manual_seed(cfg.seed)
    module = _attach(cfg, family, accelerator)
    method = make(cfg, family, pairs, accelerator.device)
    if not getattr(method, "needs_text_encoder", False):
        family.offload_encoders()  # only the UNet is needed from here on
    _start(folder, cfg, accelerator)
    params = lora_parameters(module)
    for part in lora_parts(module) if cfg.compile else []:  # the bound forward, which every caller uses
        part.forward = torch.compile(part.forward)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.resolved_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
    )
    ema = LoraEma(module, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start = _restore(cfg, module, optimizer, method, accelerator, ema)
    if accelerator.is_main_process:
        _truncate_metrics(Path(cfg.out), start)  # a resumed run rewrites the steps after its checkpoint
    unet, optimizer = accelerator.prepare(module, optimizer)
    if cfg.tracker:
        accelerator.init_trackers("duo", config={k: v for k, v in cfg.to_dict().items() if v is not None})
    return TrainState(cfg, pairs, folder, accelerator, family, method, unet, optimizer, params, start, ema)


def _attach(cfg: TrainConfig, family, accelerator) -> torch.nn.Module:
    """Attach the method's LoRA where it sits and return the trained module: the UNet, the text encoder
    (AdvUnlearn, DUO --lora-on text-encoder), or both as one LoraModules (--targets then names the UNet's layers,
    the encoder takes its default)."""
    names = cfg.lora_modules
    if len(names) > 1 and accelerator.num_processes > 1:
        raise UserError("--lora-on both trains on one process; launch it without accelerate's processes.")
    modules = {n: family.text_encoders[0] if n == "text_encoder" else family.unet for n in names}
    for name, module in modules.items():
        own = targets_for(cfg.targets, names, name) or family.lora_targets(cfg.method, name)
        try:
            attach_lora(module, cfg.rank, cfg.alpha, own)
        except ValueError as exc:  # a --targets regex written for the other module (UNet vs text encoder)
            fix = "Fix --targets, or drop it for the method's default layers."
            raise UserError(f"{str(exc).rstrip('.')}. {fix}") from exc
    return LoraModules(modules) if len(modules) > 1 else modules[names[0]]


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    # Without cpu=True accelerate ignores a multi-process launch on a machine with no GPU.
    on_cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=on_cpu, log_with=cfg.tracker, project_dir=cfg.out)


def _start(folder: RunFolder, cfg: TrainConfig, accelerator) -> None:
    # Every process has claimed (read) the folder before the main one writes, or deletes, anything in it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.start()
        n = accelerator.num_processes
        write_config(folder.path, cfg, processes=n, pairs_per_step=cfg.batch_size * cfg.grad_accum * n)
    accelerator.wait_for_everyone()


def _restore(cfg: TrainConfig, unet, optimizer, method, accelerator, ema: LoraEma | None) -> int:
    out = Path(cfg.out)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is None:
        if cfg.resume:
            log.info("no checkpoint in %s: starting from step 0", out)
        return 0
    step, lora, opt_state, method_state = load_checkpoint(ckpt)
    if step > cfg.steps:
        raise UserError(f"the checkpoint in '{out}' is at step {step}, beyond --steps {cfg.steps}. Raise --steps.")
    set_lora_state(unet, lora)
    optimizer.load_state_dict(opt_state)
    if hasattr(method, "load_state_dict"):
        method.load_state_dict(method_state)
    if ema is not None:  # run.json's settings check already refused adding --ema-decay to a run mid-way
        ema.load_state_dict(load_ema_state(ckpt) or {})
    scaler = load_scaler_state(ckpt)
    if accelerator.scaler is not None and scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    log.info("resumed from %s (step %d)", ckpt, step)
    return step


def _check_processes(cfg: TrainConfig, accelerator) -> None:
    """A resumed run keeps its number of processes: another one is another global batch, so other draws."""
    if not cfg.resume or not (Path(cfg.out) / CONFIG_FILE).is_file():
        return
    before = json.loads((Path(cfg.out) / CONFIG_FILE).read_text()).get("processes")
    if before is not None and before != accelerator.num_processes:
        raise UserError(
            f"'{cfg.out}' was trained with {before} process(es) and this launch has {accelerator.num_processes}: "
            f"the global batch, and so every step's draws, would change. Resume with {before} process(es) "
            "(accelerate launch --num_processes), or start a new --out."
        )


def _truncate_metrics(out: Path, step: int) -> None:
    path = out / METRICS_FILE
    if path.exists():
        kept = [r for r in read_jsonl(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def train(state: TrainState) -> None:
    """The optimizer steps from state.start to cfg.steps: metrics every step, a checkpoint every few."""
    if isinstance(state, TrainConfig):  # the signature of train() before the recipes were split
        raise TypeError(
            "duo.train.loop.train takes the TrainState of setup(cfg); train a config with duo.train.api.train"
        )
    cfg, acc = state.cfg, state.accelerator
    shown = state.method.shown
    bar = tqdm(
        range(state.start, cfg.steps), initial=state.start, total=cfg.steps, desc="train",
        disable=not acc.is_main_process,
    )  # fmt: skip
    for step in bar:
        metrics = optimizer_step(state, step)
        if acc.is_main_process:
            append_jsonl(state.out / METRICS_FILE, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", **{shown: f"{metrics[shown]:.3g}"})
        if cfg.tracker:
            acc.log(metrics, step=step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _checkpoint(state, step + 1)


# fp16 updates in a row the loss scaler may skip (each halves the scale) before the step is given up
MAX_SKIPPED = 20


def optimizer_step(state: TrainState, step: int) -> dict:
    """One optimizer step: the method's draws for the global batch, sliced per process and micro-batch.

    Under fp16 the loss scaler skips an update whose gradients overflowed; the step is then redone on the same
    draws at the lowered scale, so `steps` counts updates made and a resumed run replays the same ones.
    """
    acc, method = state.accelerator, state.method
    started = time.perf_counter()
    if hasattr(method, "before_step"):
        method.before_step(state.unet, acc, step)
    draws = method.draw(step, state.global_batch)
    for skipped in range(MAX_SKIPPED + 1):
        metrics = _update(state, step, draws)
        if not acc.optimizer_step_was_skipped:
            if state.ema is not None:
                state.ema.update()
            extra = {"skipped": skipped} if skipped else {}
            return {"step": step + 1, **metrics, **extra, "seconds": round(time.perf_counter() - started, 4)}
    raise UserError(
        f"fp16 gradients overflowed {MAX_SKIPPED + 1} times in a row at step {step + 1}; earlier checkpoints in "
        f"'{state.cfg.out}' are intact. Train in bf16 or fp32 (--mixed-precision bf16 / no), or lower --lr."
    )


def _update(state: TrainState, step: int, draws) -> dict:
    """Gradients of the global batch's loss (this process's share), then one optimizer update."""
    cfg, acc, method = state.cfg, state.accelerator, state.method
    world, rank = acc.num_processes, acc.process_index
    sums: dict[str, torch.Tensor] = {}
    for m in range(cfg.grad_accum):
        first = (m * world + rank) * cfg.batch_size
        micro = draws.slice(first, first + cfg.batch_size)
        # Gradients are averaged across processes once per optimizer step, at its last micro-batch.
        sync = nullcontext() if m == cfg.grad_accum - 1 else acc.no_sync(state.unet)
        with sync:
            parts = method.micro_loss(state.unet, acc, micro)
            acc.backward(parts["loss"] / cfg.grad_accum)
        for name in method.metrics:  # kept on the device: one host sync per step, below
            sums[name] = sums.get(name, 0.0) + parts[name].detach().float() / cfg.grad_accum
    reduced = acc.reduce(torch.stack(list(sums.values())), "mean")
    grad_norm = acc.clip_grad_norm_(state.params, cfg.grad_clip)
    *values, norm = torch.cat([reduced, torch.as_tensor(grad_norm, device=reduced.device).reshape(1)]).tolist()
    metrics = dict(zip(sums, values))
    if not all(math.isfinite(v) for v in values):
        last = latest_checkpoint(Path(cfg.out))
        kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was written before it"
        raise UserError(
            f"the loss became {metrics['loss']} at step {step + 1}; {kept}. A transient overflow: rerun with "
            "--resume to continue from it. Otherwise lower --lr (or --beta for DUO) or train in fp32 "
            "(--mixed-precision no), into a new --out."
        )
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return {**metrics, "grad_norm": norm, "lr": state.optimizer.param_groups[0]["lr"]}


def _checkpoint(state: TrainState, step: int) -> None:
    acc = state.accelerator
    if acc.is_main_process:
        lora = get_lora_state(acc.unwrap_model(state.unet))
        method_state = state.method.state_dict() if hasattr(state.method, "state_dict") else {}
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None  # fp16's loss scale: resume exactly
        ema = state.ema.state_dict() if state.ema is not None else None
        save_checkpoint(state.out, step, lora, state.optimizer.state_dict(), method_state, scaler, ema)
    acc.wait_for_everyone()


def save(state: TrainState) -> Path:
    """The LoRA, its model card and (--fuse) the fused pipeline; then run.json records the outputs' hashes."""
    acc = state.accelerator
    if acc.is_main_process:
        with state.ema.in_place() if state.ema is not None else nullcontext():
            lora = get_lora_state(acc.unwrap_model(state.unet))
        write_lora_folder(state.cfg, state.pairs, state.family, lora, str(acc.device))
        state.folder.finish(outputs=[*OUTPUTS, METRICS_FILE])
    return state.out


def cleanup(state: TrainState) -> None:
    state.accelerator.end_training()
