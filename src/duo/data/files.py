"""Atomic writes and the append-only JSONL manifests that are each stage's source of truth."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from PIL import Image

from duo.errors import UserError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should read like any written file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_image(path: Path, image: Image.Image) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Records of a JSONL file. A last line cut by a crash (no newline yet) is dropped, and cut off if repair."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]  # a line counts once its newline is written
    records = []
    for i, line in enumerate(complete.split(b"\n")):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}, line {i + 1}, is not valid JSON. Fix or delete that line and rerun.") from None
    if repair and len(complete) < len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return records


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image, or fail with a message saying which file and what to do."""
    if not path.is_file():
        raise UserError(
            f"image '{path}' listed in the manifest is missing. Delete its line from the "
            f"manifest and rerun `duo curate` on that folder to regenerate the pair."
        )
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:  # PIL raises several types for corrupt files
        raise UserError(
            f"image '{path}' is corrupt ({exc}). Delete it and its manifest line, then rerun "
            "`duo curate` on that folder to regenerate the pair."
        ) from None


def sha256_file(path: Path) -> str:
    """Streamed: weight files can be gigabytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_table(path: Path, what: str) -> list:
    """Rows of a CSV file with a header row, or of a JSONL file (one object a line); `what` names it in errors."""
    import csv

    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist.")
    try:
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"{what} '{path}' cannot be read ({exc}); use CSV with a header row or JSONL.") from None
