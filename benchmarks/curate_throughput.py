"""Benchmark: pair curation, images per second, `duo curate` against the structure of the authors' script.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/curate_throughput.py               # anchor model, 8 pairs
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/curate_throughput.py --size small  # smoke check

* authors — the structure of naver-ai/DUO `datasets/SD/generate_datasets.py`: a `StableDiffusionPipeline` makes
            one unsafe image per call (`num_images_per_prompt=1`), saved as JPEG; then, per image, the JPEG is
            read back and a `StableDiffusionImg2ImgPipeline` makes its safe edit (safe prompt, unsafe prompt as
            the negative, strength 0.75, guidance 7.5), one per call. Both pipelines loaded from the same folder,
            as their script does. Judge: none on both sides (theirs rejection-samples with NudeNet one image at
            a time; ours judges a batch at once — left out so that only generation is compared).
* ours    — `duo.data.curate.curate` (what `duo curate` runs) with --batch-size pairs generated per call.

Same model, prompts, resolution, steps, guidance and strength. Each run is a whole run (pipelines loaded,
every pair made, files written) into a fresh folder; runs alternate (A B, B A, ...) on one machine. Reported:
images per second (unsafe + safe) and ours ÷ authors. The published setting is 50 steps; the default here is
10 so that a CPU run ends in minutes — the per-step cost is the UNet's either way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # diffusers' loading bars and curate's: the table is the output
sys.path.insert(0, str(Path(__file__).parent))
from step_fixtures import SIZES, build_pipeline  # noqa: E402

CONCEPT = """name: bench
unsafe_words: [naked]
judge: none
parts:
  - name: bench
    pairs: {n}
    unsafe: "a naked {{who}}"
    safe: "a dressed {{who}}"
    vars: {{who: [woman, man, person]}}
"""


def authors(pipeline: Path, out: Path, jobs: list, args) -> None:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from PIL import Image

    common = {"safety_checker": None, "requires_safety_checker": False}
    base = StableDiffusionPipeline.from_pretrained(pipeline, **common)
    edit = StableDiffusionImg2ImgPipeline.from_pretrained(pipeline, **common)
    for p in (base, edit):
        p.set_progress_bar_config(disable=True)
    out.mkdir(parents=True)
    for i, (unsafe, _, seed) in enumerate(jobs):
        g = torch.Generator().manual_seed(seed)
        image = base(
            unsafe,
            num_images_per_prompt=1,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            height=args.resolution,
            width=args.resolution,
            generator=g,
        ).images[0]
        image.save(out / f"{i:02d}-unsafe.jpg")
    for i, (unsafe, safe, seed) in enumerate(jobs):
        image = Image.open(out / f"{i:02d}-unsafe.jpg")
        g = torch.Generator().manual_seed(seed)
        safe_image = edit(
            prompt=safe,
            negative_prompt=unsafe,
            image=image,
            strength=0.75,
            guidance_scale=7.5,
            num_inference_steps=args.steps,
            generator=g,
        ).images[0]
        safe_image.save(out / f"{i:02d}-safe.jpg")


def ours(pipeline: Path, out: Path, concept: Path, args) -> None:
    from duo.data.curate import CurateConfig, curate

    cfg = CurateConfig(
        model=str(pipeline),
        concept=str(concept),
        out=str(out),
        steps=args.steps,
        guidance=7.5,
        strength=0.75,
        resolution=args.resolution,
        judge="none",
        batch_size=args.batch_size,
    )
    curate(cfg)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="anchor", help="model sizes (step_fixtures.py)")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="sampling steps (published: 50)")
    p.add_argument("--batch-size", type=int, default=8, help="ours: pairs per call")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if min(args.pairs, args.steps, args.batch_size, args.rounds, args.threads) < 1:
        p.error("--pairs, --steps, --batch-size, --rounds and --threads must be ≥ 1")
    import logging

    import torch

    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="duo-curate-bench-"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args, tmp: Path) -> int:
    from duo.data.concepts import load_concept
    from duo.data.curate import CurateConfig, plan_pairs

    pipeline = tmp / "pipeline"
    counts = build_pipeline(pipeline, args.size)
    args.resolution = SIZES[args.size]["unet"]["sample_size"] * 8
    concept = tmp / "bench.yaml"
    concept.write_text(CONCEPT.format(n=args.pairs))
    plan = plan_pairs(load_concept(str(concept)), CurateConfig(model="", concept="", out="", steps=args.steps))
    jobs = [(j.unsafe_prompt, j.safe_prompt, j.seed) for j in plan]  # ours' prompts and seeds, for theirs too
    print(
        f"[{args.size}] UNet {counts['unet'] / 1e6:.1f} M, {args.resolution} px, {args.pairs} pairs, "
        f"{args.steps} steps, ours --batch-size {args.batch_size}, torch threads {args.threads}",
        flush=True,
    )
    rates = {"authors": [], "ours": []}
    for r in range(args.rounds):
        order = ["authors", "ours"] if r % 2 == 0 else ["ours", "authors"]
        for who in order:
            out = tmp / f"{who}-{r}"
            t0 = time.perf_counter()
            if who == "authors":
                authors(pipeline, out, jobs, args)
            else:
                ours(pipeline, out, concept, args)
            rates[who].append(2 * args.pairs / (time.perf_counter() - t0))
            print(f"  round {r + 1}: {who} {rates[who][-1]:.3f} images/s", flush=True)
    a, o = statistics.median(rates["authors"]), statistics.median(rates["ours"])
    per_round = [y / x for x, y in zip(rates["authors"], rates["ours"])]
    print(
        f"authors' structure {a:.3f} images/s, ours {o:.3f} images/s: ours {o / a:.2f}× "
        f"(rounds {', '.join(f'{x:.2f}' for x in per_round)}); target ≥ 3.00"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
