"""Images of the concept for attacks that learn from images (Concept Inversion's training set)."""

from __future__ import annotations

from pathlib import Path

from duo.data.files import append_jsonl, atomic_save_image, load_image, read_jsonl
from duo.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def concept_images(ctx, n: int) -> tuple[list, list[str], dict]:
    """From --images, else the pairs the (first) LoRA was trained on, else the original model's own images."""
    folder = ctx.config.images or _lora_pairs_folder(ctx.config.lora)
    if folder:
        images, prompts = _from_folder(Path(folder), n)
        return images, prompts, {"source": str(folder), "n": len(images)}
    return _generated(ctx, n)


def _lora_pairs_folder(loras: list[str] | None) -> str | None:
    """The pairs folder the first LoRA with a `duo train` lineage was trained on."""
    from duo.data.lineage import lora_lineage
    from duo.models.lora_spec import lora_dirs

    return next((x.pairs for x in map(lora_lineage, lora_dirs(loras)) if x.pairs), None)


def _from_folder(folder: Path, n: int) -> tuple[list, list[str]]:
    """The unsafe images of a `duo curate` folder (with their prompts), or any images (prompt unknown: '')."""
    if not folder.is_dir():
        raise UserError(f"--images '{folder}' is not a folder; pass a folder of images or a `duo curate` output.")
    from duo.data.curate import MANIFEST
    from duo.data.pairs import pairs_settings

    if pairs_settings(folder) is not None:
        records = read_jsonl(folder / MANIFEST)[:n]
        return [load_image(folder / r["unsafe"]["file"]) for r in records], [r["unsafe"]["prompt"] for r in records]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not files:
        raise UserError(f"--images '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return [load_image(p) for p in files], [""] * len(files)


def _generated(ctx, n: int) -> tuple[list, list[str], dict]:
    """The original model (LoRAs off, no guard) on the targets' prompts; kept in out/concept_images/."""
    folder = ctx.out / "concept_images"
    index = folder / "images.jsonl"
    records = read_jsonl(index, repair=True)
    prompts = [t.prompt for t in ctx.targets]
    for i in range(len(records), n):
        prompt, seed = prompts[i % len(prompts)], ctx.seed + 100_000 + i
        with ctx.original():
            image = ctx.family.text2image([prompt], [seed], ctx.steps, ctx.targets[0].guidance, ctx.resolution)[0]
        atomic_save_image(folder / f"{i:05d}.png", image)
        append_jsonl(index, {"file": f"{i:05d}.png", "prompt": prompt, "seed": seed})
        records.append({"file": f"{i:05d}.png", "prompt": prompt, "seed": seed})
    records = records[:n]
    images = [load_image(folder / r["file"]) for r in records]
    return images, [r["prompt"] for r in records], {"source": "original model (LoRAs off)", "n": len(images)}
