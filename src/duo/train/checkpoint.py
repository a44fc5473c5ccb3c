"""Checkpoints: LoRA and optimizer state as safetensors, written to a temp folder then renamed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from duo.data.files import atomic_write_text, named

LAST = "last"  # file in checkpoints/ naming the newest complete checkpoint
METHOD_FILE = "method.safetensors"
SCALER_FILE = "scaler.json"
EMA_FILE = "ema.safetensors"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(
    out: Path,
    step: int,
    lora: dict[str, torch.Tensor],
    optimizer_state: dict,
    method_state: dict | None = None,
    scaler_state: dict | None = None,
    ema_state: dict | None = None,
) -> Path:
    """LoRA, optimizer, the method's own state (adversarial DUO's inner attack), fp16's loss-scaler state and the
    LoRA's moving average (--ema-decay) at `step`, all or nothing."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_checkpoint(tmp, step, lora, optimizer_state, method_state, scaler_state)
        if ema_state:
            (tmp / EMA_FILE).write_bytes(save({k: v.contiguous() for k, v in ema_state.items()}))
    except BaseException as exc:  # a full disk: leave no half checkpoint (a kill's is deleted by the next save)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise named(exc, final) from exc
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_text(out / "checkpoints" / LAST, final.name)
    return final


def _write_checkpoint(tmp: Path, step: int, lora: dict, optimizer_state: dict, method_state, scaler_state) -> None:
    # Serialised here and written by Python: a full disk is then an OSError (the CLI's message), not safetensors'.
    (tmp / "lora.safetensors").write_bytes(save({k: v.contiguous() for k, v in lora.items()}))
    tensors, meta = _flatten_optimizer(optimizer_state)
    (tmp / "optimizer.safetensors").write_bytes(save(tensors))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    if method_state:
        (tmp / METHOD_FILE).write_bytes(save({k: v.contiguous() for k, v in method_state.items()}))
    if scaler_state is not None:
        (tmp / SCALER_FILE).write_text(json.dumps(scaler_state))
    (tmp / "state.json").write_text(json.dumps({"step": step}))


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / LAST
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    step = json.loads((path / "state.json").read_text())["step"]
    lora = load_file(path / "lora.safetensors")
    optimizer = _unflatten_optimizer(
        load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
    )
    method = load_file(path / METHOD_FILE) if (path / METHOD_FILE).is_file() else {}
    return step, lora, optimizer, method


def load_ema_state(path: Path) -> dict[str, torch.Tensor] | None:
    """The LoRA's moving average of a --ema-decay run's checkpoint; None for any other run."""
    return load_file(path / EMA_FILE) if (path / EMA_FILE).is_file() else None


def load_scaler_state(path: Path) -> dict | None:
    """The loss scaler's state (scale, growth tracker) of an fp16 run's checkpoint; None for any other run."""
    return json.loads((path / SCALER_FILE).read_text()) if (path / SCALER_FILE).is_file() else None


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
