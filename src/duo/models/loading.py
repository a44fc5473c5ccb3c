"""Resolve a model reference (alias, local folder or hub id) and load it, with messages a user can act on."""

from __future__ import annotations

import json
import os
from pathlib import Path

from duo.errors import UserError

ALIASES = {"shapes": "duo.shapes:pipeline_path"}


def resolve_model_ref(ref: str) -> str:
    """Turn an alias into a folder; leave local folders and hub ids as they are."""
    if ref in ALIASES:
        module, func = ALIASES[ref].split(":")
        import importlib

        return str(getattr(importlib.import_module(module), func)())
    return ref


def read_model_index(ref: str) -> dict:
    """The pipeline's model_index.json, from a folder or the local hub cache (never downloads offline)."""
    path = Path(ref)
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(
                f"'{ref}' is a folder but has no model_index.json, so it is not a diffusers pipeline. "
                "Point --model at the folder written by `pipe.save_pretrained(...)`, or at a hub id."
            )
        return json.loads(index.read_text())
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise UserError(
            f"model '{ref}' was not found: no such folder, and it is not a hub id of the form 'owner/name'. "
            "Check the path, or pass a hub id such as CompVis/stable-diffusion-v1-4."
        )
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(ref, "model_index.json")).read_text())
    except Exception as exc:  # offline, missing, gated: all mean the same to the user
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            "HF_HUB_OFFLINE is set, so only the local cache is searched: download it once on a machine "
            "with network (`huggingface-cli download " + ref + "`) or pass a local folder."
            if offline
            else "Check the id and your network/token, or pass a local folder saved with save_pretrained."
        )
        raise UserError(f"could not get model '{ref}' ({type(exc).__name__}). {hint}") from None


def check_device(device: str) -> None:
    """Refuse a device this machine does not have before a pipeline is loaded (torch would fail deep inside)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device '{device}' is not a device name; use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine (or this torch build) has no CUDA GPU; pass --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(
            f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices; pick one of cuda:0 ..."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here; pass --device cpu.")
