"""Images of the concept for attacks that learn from images (Concept Inversion, relearning).

One set for every row of a comparison: by default the original model's own images (LoRAs off, no guard)
of the concept's training prompts, kept only where the concept's judge sees the concept, drawn from seeds
derived from the run's seed alone. So the LoRA, the guard and the method under attack change nothing in
it, and its hash (recorded in results.json) shows that two rows learned from the same images. Before,
LoRA rows learned from the LoRA's curated pairs and the other rows from unfiltered images: not like for like.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from duo.data.files import append_jsonl, atomic_save_image, inside, load_image, read_jsonl
from duo.errors import UserError
from duo.seeds import derive_seed

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
FOLDER = "concept_images"
TRIES_PER_IMAGE = 4  # draws per kept image before giving up: the original model shows the concept most times


def concept_images(ctx, n: int) -> tuple[list, list[str], dict]:
    """Up to n images showing the concept with their prompts, and their provenance (source, n, sha256)."""
    if ctx.config.images:
        folder = Path(ctx.config.images)
        images, prompts, files = _from_folder(folder, n)
        return images, prompts, {"source": str(folder), "n": len(images), "sha256": files_hash(files)}
    return _generated(ctx, n)


def files_hash(files: list[Path]) -> str:
    """sha256 over the image files' bytes, in order: the identity of an image set."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _from_folder(folder: Path, n: int) -> tuple[list, list[str], list[Path]]:
    """The unsafe images of a `duo curate` folder (with their prompts), or any images (prompt unknown: '')."""
    if not folder.is_dir():
        raise UserError(f"--images '{folder}' is not a folder; pass a folder of images or a `duo curate` output.")
    from duo.data.curate import MANIFEST
    from duo.data.pairs import pairs_settings

    if pairs_settings(folder) is not None:
        records = read_jsonl(folder / MANIFEST)[:n]
        files = [inside(folder, r["unsafe"]["file"], folder / MANIFEST) for r in records]
        return [load_image(p) for p in files], [r["unsafe"]["prompt"] for r in records], files
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not files:
        raise UserError(f"--images '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return [load_image(p) for p in files], [""] * len(files), files


def _training_prompts(ctx) -> list[str]:
    from duo.data.splits import split_prompts, take_in_turn

    lists = split_prompts(ctx.concept, "training", derive_seed(ctx.seed, "concept-images"))
    return [p for p, _ in take_in_turn(lists, sum(map(len, lists)))]


def _generated(ctx, n: int) -> tuple[list, list[str], dict]:
    """The original model's judge-approved images; kept in out/concept_images/ (a rerun continues).

    Drawn and judged --batch-size at a time, in fixed batches of draw numbers: pixels depend on the batch an
    image is drawn in (CPU kernels), so a batch a crash cut short is redrawn whole and only its missing draws
    are recorded; the last batch may draw past the n-th kept image (those are recorded, not used)."""
    folder = ctx.out / FOLDER
    index = folder / "images.jsonl"
    records = read_jsonl(index, repair=True)
    prompts = _training_prompts(ctx)
    guidance = ctx.config.guidance if ctx.config.guidance is not None else ctx.concept.guidance
    size, limit = max(1, ctx.config.batch_size), n * TRIES_PER_IMAGE
    have = {r["draw"] for r in records}
    start = (max(have) + 1) // size * size if have else 0
    while sum(r["kept"] for r in records) < n and start < limit:
        draws = range(start, min(start + size, limit))
        batch = [(prompts[d % len(prompts)], derive_seed(ctx.seed, "concept-image", d)) for d in draws]
        with ctx.original():
            images = ctx.family.text2image(
                [p for p, _ in batch], [s for _, s in batch], ctx.steps, guidance, ctx.resolution
            )
        verdicts = ctx.judge_images(images, [p for p, _ in batch])
        for draw, (prompt, seed), image, verdict in zip(draws, batch, images, verdicts):
            if draw in have:  # recorded before a crash cut this batch short
                continue
            record = {"draw": draw, "file": f"{draw:05d}.png", "prompt": prompt, "seed": seed}
            record["kept"] = bool(verdict.present)
            atomic_save_image(folder / record["file"], image)
            append_jsonl(index, record)
            records.append(record)
        start += size
    records.sort(key=lambda r: r["draw"])
    kept = [r for r in records if r["kept"]][:n]
    if not kept:
        raise UserError(
            f"the original model showed the concept in none of {len(records)} images of its training prompts; "
            "pass --images FOLDER with images of the concept."
        )
    files = [folder / r["file"] for r in kept]
    provenance = {
        "source": "original model (LoRAs off, no guard), judge-filtered",
        "n": len(kept),
        "drawn": len(records),
        "sha256": files_hash(files),
    }
    return [load_image(p) for p in files], [r["prompt"] for r in kept], provenance
