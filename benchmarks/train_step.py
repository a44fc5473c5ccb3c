"""Benchmark: one DUO optimizer step, ours (cached latents + embeddings) against per-step encoding.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py            # 55 M UNet, 32×32 latents
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py --small    # smoke check, < 60 s

Two variants, same objective, same draws, same LoRA init:

* ours      — `duo.train.loop.optimizer_step` with `DuoMethod` on the state `duo.train.loop.setup()` returns,
              exactly as `duo train` runs it: the VAE latent distributions and the prompt embeddings are
              computed once (`build_cache`) and reused every step.
* baseline  — the structure of the authors' public trainer: a `DuoMethod` whose `micro_loss` first
              VAE-encodes the micro-batch's images and text-encodes its prompts, then calls the same `micro_loss`.
              Same `setup()` and `optimizer_step`, with this method plugged in (`setup(cfg, make=...)`). On CPU,
              where this benchmark runs, setup's `offload_encoders` moves nothing, so the encoders stay at hand.

A random SD 1.x-shaped pipeline (55 M UNet (128,256,256,256), SD-sized VAE, CLIP-L-sized text encoder)
and 4 random 256 px pairs are built in a temp folder at start; nothing is downloaded.

Each variant lives in its own child process (so each has its own peak RSS); the parent alternates them,
one idle while the other runs, in counterbalanced rounds (A B, B A, A B, ...) because these machines drift
by up to ±20 % within minutes. Warm-up steps are discarded. Reported: median s/step per variant, the ratio
baseline / ours (of the medians, and the median of the per-round ratios), and peak RSS (VmHWM) while
stepping (reset after setup) and over the whole process (setup included: load + build_cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from duo.models.tiny import TINY_TEXT, TINY_UNET, TINY_VAE, build_random_pipeline  # noqa: E402

VARIANTS = {
    "ours": "ours (cached latents + embeddings)",
    "baseline": "baseline (VAE + text encode every step)",
}

# UNet2DConditionModel / AutoencoderKL / CLIPTextConfig kwargs per size.
SIZES = {
    "full": {
        "unet": {
            "sample_size": 32,
            "block_out_channels": (128, 256, 256, 256),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    },
    "small": {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT},
}

PROMPTS = [  # (unsafe, safe); words from duo.models.tiny.WORDS so the toy tokenizer knows them
    ("a naked woman on the street", "a dressed woman on the street"),
    ("a nude man in the city at night", "a clothed man in the city at night"),
    ("a naked person with a dog", "a dressed person with a dog"),
    ("a nude woman portrait, realistic photo", "a clothed woman portrait, realistic photo"),
]


# ---- fixtures: a random pipeline and a pairs folder --------------------------------------------------


def build_pipeline(folder: Path, size: str, seed: int = 0) -> dict[str, int]:
    spec = SIZES[size]
    return build_random_pipeline(folder, spec["unet"], spec["vae"], spec["text"], seed=seed)


def write_pairs(folder: Path, n: int, resolution: int, seed: int = 0) -> None:
    """A pairs folder as `duo curate` writes it (curate.json + pairs.jsonl + images), random-noise images."""
    import numpy as np
    from PIL import Image

    from duo.data.concepts import concept_from_dict
    from duo.data.curate import CONFIG, MANIFEST
    from duo.data.files import append_jsonl, atomic_save_image, atomic_write_text

    concept = concept_from_dict(
        {
            "name": "bench",
            "parts": [
                {
                    "name": "bench",
                    "pairs": n,
                    "unsafe": "a naked {who}",
                    "safe": "a dressed {who}",
                    "vars": {"who": ["woman", "man"]},
                }
            ],
        },
        source="benchmarks/train_step.py",
    )
    settings = {
        "model": "random",
        "concept": concept.to_dict(),
        "seed": seed,
        "strength": 0.75,
        "steps": 1,
        "guidance": 7.5,
        "resolution": resolution,
        "judge": "none",
        "judge_options": {},
        "require_match": False,
        "dtype": "float32",
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG, json.dumps({"settings": settings}, indent=2))
    rng = np.random.default_rng(seed)
    for i in range(n):
        pid = f"bench-{i:05d}"
        files = {}
        for kind in ("unsafe", "safe"):
            files[kind] = f"images/{pid}-{kind}.png"
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            atomic_save_image(folder / files[kind], Image.fromarray(pixels))
        unsafe, safe = PROMPTS[i % len(PROMPTS)]
        append_jsonl(
            folder / MANIFEST,
            {
                "id": pid,
                "part": "bench",
                "index": i,
                "model": "random",
                "unsafe": {"file": files["unsafe"], "prompt": unsafe, "seed": i, "tries": 1, "judge": None},
                "safe": {
                    "file": files["safe"],
                    "prompt": safe,
                    "negative_prompt": unsafe,
                    "strength": 0.75,
                    "seed": i,
                    "tries": 1,
                    "judge": None,
                },
                "steps": 1,
                "guidance": 7.5,
                "resolution": resolution,
            },
        )


# ---- the two variants (child side) -------------------------------------------------------------------


def baseline_method_class():
    """`DuoMethod` with the public trainer's structure: encode images and prompts inside every micro-step."""
    import torch

    from duo.train.methods import Cache, DuoMethod

    class PerStepEncodingMethod(DuoMethod):
        def __init__(self, cfg, family, pairs, device):
            super().__init__(cfg, family, pairs, device)
            self.pairs = pairs

        def micro_loss(self, unet, acc, d):
            fam, pairs, dev, cfg = self.family, self.pairs, acc.device, self.cfg
            idx = d.pair_index.tolist()
            b = len(idx)
            # VAE: x⁻ and x⁺ of the micro-batch in one call → latent distributions, as build_cache computes them.
            images = [pairs.unsafe_images[i] for i in idx] + [pairs.safe_images[i] for i in idx]
            mean, std = fam.encode_images(images, pairs.resolution)
            # Text encoder: c∅, the unsafe prompts and the retain prompts, in one call.
            unsafe_prompts, safe_prompts = pairs.unsafe_prompts, pairs.safe_prompts
            prompts = [""] + [unsafe_prompts[i] for i in idx]
            if cfg.keep == "noise+retain":
                prompts += (
                    pairs.concept.neighbours if cfg.retain_prompts == "neighbours" else [safe_prompts[i] for i in idx]
                )
            emb = fam.encode_prompts(prompts).to(dev)
            cache = Cache(
                mean=torch.stack([mean[:b], mean[b:]], 1).to(dev),
                std=torch.stack([std[:b], std[b:]], 1).to(dev),
                emb_empty=emb[:1],
                emb_unsafe=emb[1 : 1 + b],
                emb_retain=emb[1 + b :] if cfg.keep == "noise+retain" else emb[:1],
            )
            # Rows of this per-step cache are the micro-batch's slots, in order.
            local = dataclasses.replace(d, pair_index=torch.arange(b))
            saved, self.cache = self.cache, cache
            try:
                return super().micro_loss(unet, acc, local)
            finally:
                self.cache = saved

    return PerStepEncodingMethod


def setup_run(variant: str, pipeline: str, data: str, n_pairs: int, out: str):
    """`duo.train.loop.setup()` exactly as `duo train` calls it, with the variant's method plugged in."""
    from duo.train.config import TrainConfig
    from duo.train.loop import setup
    from duo.train.methods import DuoMethod

    cfg = TrainConfig(
        model=pipeline, data=data, out=out, batch_size=n_pairs, grad_accum=1, device="cpu", mixed_precision="no"
    )
    return setup(cfg, make=DuoMethod if variant == "ours" else baseline_method_class())


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    """Return freed setup memory to the OS, then restart VmHWM from the current RSS (Linux ≥ 4.0)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_main(args) -> None:
    """Serve `run N` / `quit` on stdin; reply one JSON line each on the original stdout."""
    import resource

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter goes to stderr, never into the protocol
    sys.stdout = sys.stderr

    def reply(obj):
        proto.write(json.dumps(obj) + "\n")

    import torch

    from duo.train.loop import optimizer_step

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    state = setup_run(args.child, args.pipeline, args.data, args.pairs, args.out)
    setup_s = time.perf_counter() - started
    setup_peak_kb = _status_kb("VmHWM")  # clear_refs resets VmHWM and ru_maxrss alike: keep it
    reset = _reset_peak_rss()
    reply(
        {
            "ready": True,
            "setup_s": setup_s,
            "rss_mb": _status_kb("VmRSS") / 1024,
            "hwm_reset": reset,
            "threads": torch.get_num_threads(),
        }
    )
    step = 0
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            times, metrics = [], []
            for _ in range(int(cmd[1])):
                t0 = time.perf_counter()
                m = optimizer_step(state, step)
                times.append(time.perf_counter() - t0)
                metrics.append({k: m[k] for k in ("loss", "pref", "keep", "grad_norm")})
                step += 1
            reply({"times": times, "metrics": metrics})
        elif cmd[0] == "quit":
            steps_kb = _status_kb("VmHWM")
            process_kb = max(setup_peak_kb, steps_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            reply({"peak_steps_mb": steps_kb / 1024, "peak_process_mb": process_kb / 1024})
            return


# ---- parent: orchestrate, alternate, report ----------------------------------------------------------


class Child:
    def __init__(self, variant: str, args, pipeline: Path, data: Path, tmp: Path):
        self.variant = variant
        self.log_path = tmp / f"{variant}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in quit)
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            variant,
            "--pipeline",
            str(pipeline),
            "--data",
            str(data),
            "--pairs",
            str(args.pairs),
            "--threads",
            str(args.threads),
            "--out",
            str(tmp / f"out-{variant}"),
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1
        )

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = self.log_path.read_text()[-4000:]
            raise RuntimeError(f"{self.variant} child died (rc={self.proc.wait()}); its stderr ends:\n{tail}")
        return json.loads(line)

    def run(self, n: int) -> dict:
        time.sleep(0.5)  # let the other child's OpenMP workers stop spinning before this one starts
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return self.read()

    def quit(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self.read()
        self.proc.wait()
        self.log.close()
        return out


def parent_main(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    size = "small" if args.small else "full"
    tmp = Path(tempfile.mkdtemp(prefix="duo-bench-"))
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` cleans up on kill
    children: dict[str, Child] = {}
    try:
        pipeline, data = tmp / "pipeline", tmp / "pairs"
        counts = build_pipeline(pipeline, size)
        latent = SIZES[size]["unet"]["sample_size"]
        write_pairs(data, args.n_data_pairs, latent * 8)
        print(
            f"[{size}] UNet {counts['unet'] / 1e6:.1f} M params at {latent}×{latent} latents "
            f"({latent * 8} px), VAE {counts['vae'] / 1e6:.1f} M, text encoder {counts['text_encoder'] / 1e6:.1f} M; "
            f"{args.pairs} pairs/step from {args.n_data_pairs}; torch threads {args.threads}; "
            f"fixtures built in {time.perf_counter() - t_start:.0f} s",
            flush=True,
        )
        for v in VARIANTS:
            children[v] = Child(v, args, pipeline, data, tmp)
        for v, c in children.items():
            ready = c.read()
            print(
                f"  {v}: setup {ready['setup_s']:.1f} s, RSS after setup {ready['rss_mb']:.0f} MB"
                + ("" if ready["hwm_reset"] else " (could not reset VmHWM: peak includes setup)"),
                flush=True,
            )

        warm = {v: c.run(args.warmup)["metrics"][-1] for v, c in children.items() if args.warmup}
        if warm:  # same LoRA init and draws: the objective is the same iff these agree (to float noise)
            print(
                f"  metrics of warm-up step {args.warmup}: "
                + "; ".join(
                    f"{v} loss {m['loss']:.6g} pref {m['pref']:.6g} keep {m['keep']:.4g} grad_norm {m['grad_norm']:.4g}"
                    for v, m in warm.items()
                ),
                flush=True,
            )

        times = {v: [] for v in VARIANTS}
        round_ratios = []
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            medians = {}
            for v in order:
                got = children[v].run(args.steps_per_round)["times"]
                times[v] += got
                medians[v] = statistics.median(got)
            round_ratios.append(medians["baseline"] / medians["ours"])
            print(
                f"  round {r + 1}/{args.rounds} ({' '.join(order)}): "
                + ", ".join(f"{v} {medians[v]:.3f} s" for v in VARIANTS)
                + f", ratio {round_ratios[-1]:.2f}",
                flush=True,
            )
        peaks = {v: c.quit() for v, c in children.items()}
    finally:
        for c in children.values():
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
        if args.keep_tmp:
            print(f"fixtures kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    med = {v: statistics.median(times[v]) for v in VARIANTS}
    ratio = med["baseline"] / med["ours"]
    rows = [("variant", "median s/step", "peak RSS MB", "min-max s/step", "timed steps", "peak RSS MB incl. setup")]
    for v, label in VARIANTS.items():
        rows.append(
            (
                label,
                f"{med[v]:.3f}",
                f"{peaks[v]['peak_steps_mb']:.0f}",
                f"{min(times[v]):.3f}-{max(times[v]):.3f}",
                str(len(times[v])),
                f"{peaks[v]['peak_process_mb']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print(f"ratio (baseline / ours): {ratio:.2f}")
    print(
        f"median of per-round ratios: {statistics.median(round_ratios):.2f} "
        f"(rounds: {', '.join(f'{x:.2f}' for x in round_ratios)})"
    )
    faster = ratio > 1.0
    print(f"ours is {'faster' if faster else 'NOT faster'}; total {time.perf_counter() - t_start:.0f} s")
    return 0 if faster or not args.fail_if_slower else 1


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=None, help="alternation rounds (default 6; --small 4)")
    p.add_argument(
        "--steps-per-round", type=int, default=None, help="timed steps per variant per round (default 3; --small 5)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--pairs", type=int, default=2, help="pairs per step")
    p.add_argument("--small", action="store_true", help="tiny UNet/VAE/text encoder: a < 60 s smoke check")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads in each process. While another "
        "process keeps a core busy, use 1: 2 threads then wait on each other (~7x slower steps) and "
        "the times measure the scheduler, not the step",
    )
    p.add_argument("--n-data-pairs", type=int, default=4, help="pairs in the generated data folder")
    p.add_argument("--keep-tmp", action="store_true", help="keep the generated pipeline and pairs")
    p.add_argument("--fail-if-slower", action="store_true", help="exit 1 unless ours is faster")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return 0
    if args.rounds is None:
        args.rounds = 4 if args.small else 6
    if args.steps_per_round is None:
        args.steps_per_round = 5 if args.small else 3
    if min(args.rounds, args.steps_per_round, args.pairs, args.threads) < 1 or args.warmup < 0:
        p.error("--rounds, --steps-per-round, --pairs and --threads must be ≥ 1, --warmup ≥ 0")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
