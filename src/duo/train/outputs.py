"""What every `duo train` recipe shares: the claim on its folder, and the files a finished run leaves there.

A train folder holds run.json (duo.runs: config, the pairs folder with its hash, the outputs' hashes),
config.json (the flat resolved settings other stages and older tools read), the LoRA, its model card, and
per recipe metrics.jsonl (the loop) or uce.json (UCE). Folders from before run.json hold only config.json;
they still resume and may still be overwritten, because that file says they are ours.

The LoRA file's safetensors header carries where it came from, as strings under `duo.*` keys (see
`lora_metadata`), beside diffusers' own `format` and `lora_adapter_metadata`. The base model is named by its
reference; a local folder (the Shapes world included) also by `duo.runs.content_hash` of the folder (sha256
over the JSON {relative path: sha256} of every file but hidden ones), a hub id by the cached revision it
loaded (its files are not hashed: which of them a cache holds differs from machine to machine).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from duo.data.files import atomic_write_bytes, atomic_write_text, os_error
from duo.data.pairs import PairSet
from duo.models.loading import resolve_model_ref
from duo.runs import RUN_FILE, RunFolder, content_hash, package_versions
from duo.train.card import write_model_card
from duo.train.config import RESUMABLE_CHANGES, TrainConfig

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
METRICS_FILE = "metrics.jsonl"
# What every recipe declares at finish (each adds its own): the folder's hash, by which evaluations and attacks
# name the LoRA. Not the card: `duo card` rewrites it with evaluation results, and that must not make the LoRA
# another one to the runs built on it.
OUTPUTS = (LORA_FILE, CONFIG_FILE)
RUN_SHAPE = ("processes", "pairs_per_step")  # written to config.json, known only once accelerate started


def claim_folder(cfg: TrainConfig, resume: bool | None = None) -> RunFolder:
    """The train stage's claim on --out (writes nothing: the recipe calls .start() once the model loaded).
    resume: overrides cfg.resume (a check that a finished folder holds these settings, for any method)."""
    out = Path(cfg.out)
    return RunFolder.claim(
        out,
        "train",
        config=cfg.to_dict(),
        parents=data_parents(cfg.data_folders),
        resume=cfg.resume if resume is None else resume,
        overwrite=cfg.overwrite,
        auto_resume=False,
        volatile=RESUMABLE_CHANGES,
        defaults=TrainConfig(method=cfg.method).to_dict(),
        legacy=legacy_config(out),
    )


def data_parents(folders: list[str]) -> dict[str, str]:
    """The pairs a LoRA was trained on as run.json parents: data, then data1, data2, ... for a multi-concept one."""
    return {("data" if i == 0 else f"data{i}"): folder for i, folder in enumerate(folders)}


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
    save_lora_atomically(family, out, lora, lora_metadata(cfg, pairs))
    write_model_card(out, cfg, pairs, family)
    if cfg.fuse:
        from duo.models.family import load_family

        fresh = load_family(cfg.model, allow_pickle=cfg.allow_pickle, device=device)
        fresh.load_loras([(str(out), 1.0)])
        fresh.save_fused(out / "fused")
    log.info("LoRA written to %s", out / LORA_FILE)


def save_lora_atomically(family, out: Path, lora: dict, metadata: dict[str, str] | None = None) -> None:
    """The family writes its LoRA file(s) into a temp folder inside --out, `metadata` joins each safetensors
    header there, then each is renamed into place: a kill or a full disk mid-write leaves the previous file (or
    none), never half of one, nor one without its metadata."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".lora.", suffix=".tmp") as tmp:
        try:
            family.save_lora(Path(tmp), lora)
            for written in sorted(Path(tmp).glob("*.safetensors")) if metadata else []:
                atomic_write_bytes(written, with_metadata(written.read_bytes(), metadata))
        except Exception as exc:  # safetensors reports a full disk as its own error type
            error = os_error(exc, out / LORA_FILE)
            if error is None:
                raise
            raise error from exc
        for written in sorted(Path(tmp).iterdir()):
            os.replace(written, out / written.name)


def with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The same safetensors file with `metadata` added to its header's __metadata__ (the tensors untouched).

    The header is rewritten rather than the tensors reloaded and saved: no copy of the weights, and the keys
    diffusers wrote (`format`, `lora_adapter_metadata`) stay as they were."""
    if not all(isinstance(v, str) for v in metadata.values()):
        raise TypeError("safetensors metadata values must be strings")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the tensor data stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def lora_metadata(cfg: TrainConfig, pairs: PairSet) -> dict[str, str]:
    """What the LoRA file says of its origin (strings: safetensors takes nothing else). Nothing varies between
    two runs of the same settings, so a resumed run writes the same bytes."""
    meta = {
        "duo.base_model": str(cfg.model),
        **base_model_identity(cfg.model),
        "duo.concept": pairs.concept.name + (f"/{cfg.part}" if cfg.part else ""),
        "duo.method": cfg.method,
        "duo.data_hash": pairs.data_hash,
        "duo.version": package_versions().get("duo-unlearn", "unknown"),
    }
    if cfg.method == "duo":
        meta["duo.beta"] = str(cfg.beta)
    return meta


def base_model_identity(ref: str) -> dict[str, str]:
    """A local folder by the hash of its content; a hub id by the revision the local cache resolved it to."""
    folder = Path(resolve_model_ref(ref))
    if folder.is_dir():
        return {"duo.base_model_hash": "sha256:" + content_hash(folder)}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "model_index.json")
    # .../snapshots/<commit>/model_index.json when cached; None or a sentinel when not
    return {"duo.base_model_revision": Path(cached).parent.name} if isinstance(cached, str) else {}
