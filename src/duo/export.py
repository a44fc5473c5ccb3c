"""`duo export`: a trained LoRA in the layout another tool loads.

- `diffusers`: the LoRA file as `duo train` wrote it, with its model card (`pipe.load_lora_weights(DIR)`).
- `kohya`: one `.safetensors` in kohya's sd-scripts layout (`lora_unet_*`, `lora_te_*`, alphas), the file
  ComfyUI and AUTOMATIC1111 load; the model family's adapter names the layers (duo.models.kohya).
- `fused`: the whole pipeline with the LoRA baked into its weights (`save_pretrained`), for tools that take
  no LoRA at all.

The export folder is written beside --out under a temporary name and renamed into place when whole, with
export.json naming the train folder and the hash of the LoRA it was made from. An existing --out is replaced
only with --overwrite, and only if it is an export folder (it holds export.json).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from duo.data.files import _umask, atomic_write_bytes, sha256_file
from duo.errors import UserError
from duo.runs import now, package_versions, read_run

FORMATS = ("diffusers", "kohya", "fused")
LORA_FILE = "pytorch_lora_weights.safetensors"
CARD_FILE = "README.md"
EXPORT_FILE = "export.json"


@dataclass
class ExportConfig:
    run: str = field(metadata={"help": "a `duo train` --out folder (finished)"})
    out: str = field(metadata={"help": "the folder to write (must not exist, unless --overwrite)"})
    format: str = field(
        default="kohya",
        metadata={"help": "diffusers | kohya (ComfyUI, AUTOMATIC1111) | fused (a full pipeline)", "choices": FORMATS},
    )
    name: str | None = field(
        default=None, metadata={"help": "kohya: the file's name without .safetensors (default: the run folder's)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace --out if it is an earlier export folder"})
    device: str = field(default="cpu", metadata={"help": "fused: where the pipeline is loaded to fuse the LoRA"})
    allow_pickle: bool = field(default=False, metadata={"help": "fused: allow a base model stored as pickles"})


def export(cfg: ExportConfig) -> Path:
    """Check everything, write the export under a temporary name, move it into place; returns --out."""
    run, model, source = _train_folder(Path(cfg.run))
    out = Path(cfg.out)
    _check_out(out, run, cfg.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the export should read like any folder written here
    try:
        files = _write(cfg, run, model, tmp, source)
        record = {
            "format": cfg.format, "source": str(run), "model": model,
            "source_lora_sha256": source, "files": files,
            "versions": package_versions(), "written": now(),
        }  # fmt: skip
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2))
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _train_folder(run: Path) -> tuple[Path, str, str]:
    """(folder, base model, LoRA sha256) of a finished train folder, or a UserError naming the fault and the fix."""
    record = read_run(run)
    if record is None or record.get("kind") != "train":
        what = "does not exist" if not run.exists() else "is not a `duo train` folder (no train run.json)"
        raise UserError(f"'{run}' {what}. Pass the --out folder of a finished `duo train`.")
    if not record.get("finished") or not (run / LORA_FILE).is_file():
        raise UserError(
            f"'{run}' holds an unfinished training (no finished run.json / {LORA_FILE}). "
            "Finish it with `duo train ... --resume`, then export."
        )
    source = sha256_file(run / LORA_FILE)
    if record.get("outputs", {}).get(LORA_FILE) not in (None, source):
        raise UserError(
            f"'{run / LORA_FILE}' changed since `duo train` wrote it (its hash differs from run.json's). "
            "Export the LoRA as trained: retrain, or restore the file."
        )
    return run, record["config"]["model"], source


def _check_out(out: Path, run: Path, overwrite: bool) -> None:
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise UserError(f"--out '{out}' is the train folder or inside it; choose a folder of its own.")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise UserError(f"--out '{out}' already exists; choose another folder, or pass --overwrite to replace it.")
    if not (out / EXPORT_FILE).is_file():
        raise UserError(
            f"--out '{out}' is not an export folder (no {EXPORT_FILE}), so --overwrite will not delete it. "
            "Choose another --out."
        )


def _write(cfg: ExportConfig, run: Path, model: str, tmp: Path, source: str) -> dict[str, str]:
    """Write the format's files into tmp; {file: sha256} of what was written."""
    if cfg.format == "diffusers":
        shutil.copy2(run / LORA_FILE, tmp / LORA_FILE)
    elif cfg.format == "kohya":
        _write_kohya(run, model, tmp / f"{cfg.name or run.resolve().name}.safetensors", source)
    else:
        _write_fused(run, model, tmp, cfg.device, cfg.allow_pickle)
    if (run / CARD_FILE).is_file():
        shutil.copy2(run / CARD_FILE, tmp / CARD_FILE)
    return {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}


def _write_kohya(run: Path, model: str, path: Path, source: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save

    from duo.models.family import family_class
    from duo.models.kohya import read_layers

    state = family_class(model).kohya_state(read_layers(run / LORA_FILE))
    with safe_open(str(run / LORA_FILE), "pt") as f:
        metadata = dict(f.metadata() or {})
    metadata.update({"duo.format": "kohya", "duo.source_lora_sha256": source})
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}, metadata=metadata))


def _write_fused(run: Path, model: str, tmp: Path, device: str, allow_pickle: bool) -> None:
    from duo.models.family import load_family

    family = load_family(model, device=device, allow_pickle=allow_pickle)
    family.load_loras([(str(run), 1.0)])
    family.save_fused(tmp)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export to --out; an old export is set aside first and deleted only after the rename."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
