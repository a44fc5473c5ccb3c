"""The Shapes world: a miniature text-to-image world shipped with the project (renderer, tokenizer,
tiny Stable Diffusion-architecture pipeline, judge). See DESIGN.md, "The Shapes world"."""

from __future__ import annotations

import hashlib
from pathlib import Path

from duo.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
SUMS = ASSETS / "SHA256SUMS"
_VERIFIED: set[str] = set()  # cache keys of verified asset states


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def asset_files(root: Path = ASSETS) -> list[Path]:
    """Every file under the assets folder except SHA256SUMS itself, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS" and "__pycache__" not in p.parts)


def write_sums(root: Path = ASSETS) -> Path:
    """(Re)write SHA256SUMS for every file under root."""
    lines = [f"{_sha256(p)}  {p.relative_to(root).as_posix()}" for p in asset_files(root)]
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return root / "SHA256SUMS"


_FIX = (
    "Reinstall duo-unlearn (or `git checkout src/duo/shapes/assets`), or retrain with `duo shapes train-base --ship`."
)


def verify_assets(root: Path = ASSETS) -> None:
    """Check every file listed in SHA256SUMS; raise UserError naming the cause and the fix."""
    sums = root / "SHA256SUMS"
    # cache by path + size + mtime of every file, so a changed or removed file is checked again
    key = repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [sums, *asset_files(root)] if p.is_file()])
    if key in _VERIFIED:
        return
    if not sums.is_file():
        raise UserError(f"The Shapes world's weights are missing: {sums} does not exist. {_FIX}")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, rel = line.split(maxsplit=1)
        path = root / rel.strip()
        if not path.is_file():
            raise UserError(f"The Shapes world's weights are incomplete: {path} is missing. {_FIX}")
        if _sha256(path) != digest:
            raise UserError(
                f"The Shapes world's weights are corrupted: {path} does not match its SHA-256 in {sums}. {_FIX}"
            )
    _VERIFIED.add(key)


def pipeline_path() -> Path:
    """The shipped diffusers pipeline folder, after verifying every asset's hash."""
    verify_assets()
    path = ASSETS / "pipeline"
    if not (path / "model_index.json").is_file():
        raise UserError(f"The Shapes world's pipeline is missing at {path}. {_FIX}")
    return path
