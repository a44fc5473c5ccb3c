"""What every `duo train` recipe shares: the claim on its folder, and the files a finished run leaves there.

A train folder holds run.json (duo.runs: config, the pairs folder with its hash, the outputs' hashes),
config.json (the flat resolved settings other stages and older tools read), the LoRA, its model card, and
per recipe metrics.jsonl (the loop) or uce.json (UCE). Folders from before run.json hold only config.json;
they still resume and may still be overwritten, because that file says they are ours.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from duo.data.files import atomic_write_text, os_error
from duo.data.pairs import PairSet
from duo.runs import RUN_FILE, RunFolder
from duo.train.card import write_model_card
from duo.train.config import RESUMABLE_CHANGES, TrainConfig

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
METRICS_FILE = "metrics.jsonl"
OUTPUTS = (LORA_FILE, CONFIG_FILE, CARD_FILE)  # what every recipe declares at finish; each adds its own
RUN_SHAPE = ("processes", "pairs_per_step")  # written to config.json, known only once accelerate started


def claim_folder(cfg: TrainConfig, resume: bool | None = None) -> RunFolder:
    """The train stage's claim on --out (writes nothing: the recipe calls .start() once the model loaded).
    resume: overrides cfg.resume (a check that a finished folder holds these settings, for any method)."""
    out = Path(cfg.out)
    return RunFolder.claim(
        out,
        "train",
        config=cfg.to_dict(),
        parents={"data": cfg.data},
        resume=cfg.resume if resume is None else resume,
        overwrite=cfg.overwrite,
        auto_resume=False,
        volatile=RESUMABLE_CHANGES,
        defaults=TrainConfig(method=cfg.method).to_dict(),
        legacy=legacy_config(out),
    )


def legacy_config(out: Path) -> dict | None:
    """The settings of a train folder written before run.json, from its config.json; None for any other."""
    path = out / CONFIG_FILE
    if (out / RUN_FILE).exists() or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(config, dict) or "method" not in config:
        return None  # some other tool's config.json: not ours to resume or delete
    return {k: v for k, v in config.items() if k not in RUN_SHAPE}


def write_config(out: Path, cfg: TrainConfig, **run_shape) -> None:
    atomic_write_text(out / CONFIG_FILE, json.dumps({**cfg.to_dict(), **run_shape}, indent=2))


def write_lora_folder(cfg: TrainConfig, pairs: PairSet, family, lora: dict, device: str) -> None:
    """The LoRA in the diffusers format, its model card, and with --fuse the full pipeline with it fused."""
    out = Path(cfg.out)
    save_lora_atomically(family, out, lora)
    write_model_card(out, cfg, pairs, family)
    if cfg.fuse:
        from duo.models.family import load_family

        fresh = load_family(cfg.model, allow_pickle=cfg.allow_pickle, device=device)
        fresh.load_loras([(str(out), 1.0)])
        fresh.save_fused(out / "fused")
    log.info("LoRA written to %s", out / LORA_FILE)


def save_lora_atomically(family, out: Path, lora: dict) -> None:
    """The family writes its LoRA file(s) into a temp folder inside --out, then each is renamed into place: a
    kill or a full disk mid-write leaves the previous file (or none), never half of one."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".lora.", suffix=".tmp") as tmp:
        try:
            family.save_lora(Path(tmp), lora)
        except Exception as exc:  # safetensors reports a full disk as its own error type
            error = os_error(exc, out / LORA_FILE)
            if error is None:
                raise
            raise error from exc
        for written in sorted(Path(tmp).iterdir()):
            os.replace(written, out / written.name)
