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
    if path.suffix == ".safetensors":
        data = canonical_safetensors(data)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # a read-only or full folder: name the file we meant to write, not the temp file
        raise named(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should read like any written file
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise named(exc, path) from exc
        raise


def named(exc: OSError, path: Path) -> OSError:
    """The same error naming `path`: a failed write or fsync names no file, so the CLI could not say which."""
    return OSError(exc.errno, exc.strerror, str(path)) if exc.errno else exc


def os_error(exc: Exception, path: Path | None) -> OSError | None:
    """The OSError inside another library's error (safetensors: '... No space left on device (os error 28)'), or
    None: the CLI turns a full or read-only disk into a message, whoever wrote."""
    import re

    code = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(code[1]), os.strerror(int(code[1])), path and str(path)) if code else None


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes the metadata in hash-map
    order, another in every process, so equal tensors and metadata would not be equal bytes (resume checks)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # not the compact form safetensors writes: leave it as it is
        return data
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size :]


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_image(path: Path, image: Image.Image) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def append_jsonl(path: Path, record: dict) -> None:
    """One whole line or none: a write the disk refuses part of (full) is cut off again, so the manifest is as
    it was (a line cut by a kill is dropped by read_jsonl)."""
    line = memoryview((json.dumps(record, sort_keys=True) + "\n").encode())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise named(exc, path) from exc
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        while line:  # unbuffered: nothing is left in a buffer to be flushed after the cut
            line = line[os.write(fd, line) :]
        os.fsync(fd)
    except OSError as exc:
        os.ftruncate(fd, end)
        raise named(exc, path) from exc
    finally:
        os.close(fd)


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


def inside(folder: Path, rel: str, manifest: Path) -> Path:
    """folder/rel, refused unless it stays inside folder: a manifest must not make us read files elsewhere."""
    path = Path(folder) / str(rel)
    if Path(str(rel)).is_absolute() or not path.resolve().is_relative_to(Path(folder).resolve()):
        raise UserError(
            f"{manifest} lists '{rel}', which is outside '{folder}'; a manifest may only name files inside its "
            "own folder. Delete that line (or the folder) and rerun `duo curate`."
        )
    return path


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
