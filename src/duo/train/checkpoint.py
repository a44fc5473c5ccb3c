"""Checkpoints: LoRA and optimizer state as safetensors, written to a temp folder then renamed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from duo.data.files import atomic_write_text

LAST = "last"  # file in checkpoints/ naming the newest complete checkpoint
METHOD_FILE = "method.safetensors"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(
    out: Path, step: int, lora: dict[str, torch.Tensor], optimizer_state: dict, method_state: dict | None = None
) -> Path:
    """LoRA, optimizer and the method's own state (adversarial DUO's inner attack) at `step`, all or nothing."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in lora.items()}, tmp / "lora.safetensors")
    tensors, meta = _flatten_optimizer(optimizer_state)
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    if method_state:
        save_file({k: v.contiguous() for k, v in method_state.items()}, tmp / METHOD_FILE)
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_text(out / "checkpoints" / LAST, final.name)
    return final


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
