"""Benchmark: one DUO optimizer step of the full-size models on one GPU — time, peak memory, MFU.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_step.py            # SD 1.5 @512, SDXL @1024, SD3-medium @1024
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_step.py --smoke    # tiny pipelines on the CPU, seconds

Each model runs in its own child process (its own CUDA peak; one running out of memory leaves the others):
random full-size weights are initialised on the GPU in bf16 (`duo.models.full_size`), saved, loaded back
through `load_family` by `duo.train.loop.setup` exactly as `duo train --mixed-precision bf16` loads them
(LoRA weights fp32), and random image pairs at the model's native resolution are cached. Warm-up steps are
discarded; the median of the timed `optimizer_step` calls is reported.

FLOPs. `torch.utils.flop_counter.FlopCounterMode` counts one denoiser forward of ONE latent row (matmuls,
convolutions, attention). A DUO step on b pairs denoises R = 3b rows (x⁻_t, x⁺_t, x_T; default --keep noise):
  step FLOPs = R × F_row × 3   — 1 reference forward (LoRA off, no grad) + 1 policy forward + 1 backward.
The backward counts as ONE forward, not two: the base weights are frozen, so it computes input gradients only
(no weight-gradient GEMMs; LoRA's are negligible). The first warm-up step also runs under FlopCounterMode, and
its count over this accounting is printed as a check (attention's backward costs more than its forward).
MFU = step FLOPs / median step time / the GPU's dense bf16 peak (table below; unknown GPU → n/a).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_fixtures.py's pairs writer, also when imported

from step_fixtures import write_pairs  # noqa: E402

# Native resolution and default pairs per step: SD 1.5 2 pairs (6 rows of 64×64 latents), SDXL and SD3 one
# (3 rows of 128×128 latents), so that the activations kept for the backward fit an 80 GB H100 without
# gradient checkpointing (not measured: no GPU was at hand when this was written).
MODELS = {"sd15": (512, 2), "sdxl": (1024, 1), "sd3-medium": (1024, 1)}
SMOKE_RESOLUTION = 64
# Dense bf16 tensor-core peak in TFLOP/s (NVIDIA data sheets, without sparsity), by device-name substring;
# the first match wins, so the PCIe and NVL variants come before the plain "H100" of the SXM part.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0))
PASSES_PER_ROW = 3  # reference forward + policy forward + backward (input gradients only), see above


def peak_tflops(device_name: str) -> float | None:
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def build(name: str, folder: Path, smoke: bool, device: str) -> dict[str, int]:
    """The model folder: the full-size architecture in bf16 on `device`, or (smoke) the tiny one."""
    import torch

    if not smoke:
        from duo.models.full_size import build_full_size_pipeline

        return build_full_size_pipeline(name, folder, dtype=torch.bfloat16, device=device)
    from duo.models.tiny import build_tiny_pipeline
    from duo.models.tiny_sd3 import build_tiny_sd3_pipeline
    from duo.models.tiny_sdxl import build_tiny_sdxl_pipeline

    tiny = {"sd15": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline, "sd3-medium": build_tiny_sd3_pipeline}
    tiny[name](folder)
    return {}


def setup_duo(pipeline: Path, data: Path, out: Path, pairs: int, device: str, mixed_precision: str, compile=False):
    """`duo.train.loop.setup()` as `duo train --method duo` calls it: the state `optimizer_step` runs on."""
    from duo.train.config import TrainConfig
    from duo.train.loop import setup

    cfg = TrainConfig(
        model=str(pipeline), data=str(data), out=str(out), batch_size=pairs, grad_accum=1, device=device,
        mixed_precision=mixed_precision, steps=1000, compile=compile,
    )  # fmt: skip
    return setup(cfg)


def forward_flops_per_row(state) -> int:
    """FLOPs of one denoiser forward on one latent row at the pairs' resolution, as training calls it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cache, acc = state.method.cache, state.accelerator
    latents = torch.randn(cache.mean.shape[2:], device=acc.device)[None]
    t = torch.tensor([state.family.num_train_timesteps // 2], device=acc.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), acc.autocast():
        state.family.denoise(state.unet, latents, t, cache.emb_empty)
    return counter.get_total_flops()


def lora_layer_count(module) -> int:
    """Layers that carry a LoRA (peft tuner layers), whatever the family."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(state, device: str, warmup: int, steps: int) -> tuple[list[float], int, dict]:
    """(seconds of each timed step, FLOPs FlopCounterMode saw in the first warm-up step, last metrics)."""
    from torch.utils.flop_counter import FlopCounterMode

    from duo.train.loop import optimizer_step

    step_flops, times, metrics = 0, [], {}
    for i in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        if i == 0:
            with FlopCounterMode(display=False) as counter:
                metrics = optimizer_step(state, i)
            step_flops = counter.get_total_flops()
        else:
            metrics = optimizer_step(state, i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times, step_flops, metrics


def _vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_model(name: str, args) -> dict:
    """Build, load, cache, step: one model's row of the report."""
    import torch

    device = "cpu" if args.smoke else "cuda"
    resolution, default_pairs = MODELS[name]
    resolution = SMOKE_RESOLUTION if args.smoke else resolution
    pairs = args.pairs or default_pairs
    with tempfile.TemporaryDirectory(prefix=f"duo-gpu-{name}-") as tmp:
        t0 = time.perf_counter()
        counts = build(name, Path(tmp) / "pipe", args.smoke, device)
        if device == "cuda":
            gc.collect()  # the build's copy (a pipeline holds reference cycles) must leave the GPU: the loaded
            torch.cuda.empty_cache()  # one is what the step uses
        write_pairs(Path(tmp) / "pairs", pairs, resolution)
        state = setup_duo(Path(tmp) / "pipe", Path(tmp) / "pairs", Path(tmp) / "out", pairs, device,
                          "no" if args.smoke else "bf16", args.compile == "on")  # fmt: skip
        setup_s = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row_flops = forward_flops_per_row(state)
        times, measured_step_flops, metrics = time_steps(state, device, args.warmup, args.steps)
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else _vm_hwm_gb()
        rows = 3 * pairs
        step_flops = rows * row_flops * PASSES_PER_ROW
        median = statistics.median(times)
        gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        peak = peak_tflops(gpu) if device == "cuda" else None
        return {
            "model": name, "compile": args.compile, "device": gpu, "resolution": resolution, "pairs": pairs,
            "rows": rows,
            "params": counts, "lora_layers": lora_layer_count(state.unet), "setup_s": setup_s,
            "median_s": median, "times": times, "peak_gb": peak_gb, "peak_is": "cuda" if device == "cuda" else "VmHWM",
            "row_fwd_gflops": row_flops / 1e9, "step_tflops": step_flops / 1e12,
            "measured_over_accounted": measured_step_flops / step_flops if step_flops else float("nan"),
            "loss": metrics.get("loss"),
            "mfu": step_flops / median / (peak * 1e12) if peak else None,
        }  # fmt: skip


def child(name: str, args) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter goes to stderr, never into the one JSON line
    sys.stdout = sys.stderr
    proto.write(json.dumps(run_model(name, args)) + "\n")
    return 0


def run_in_child(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--compile", args.compile]  # fmt: skip
    cmd += ["--pairs", str(args.pairs)] if args.pairs else []
    timeout = args.model_timeout * (2 if args.compile == "on" else 1)  # compilation happens in the warm-up
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # the other models still run
        return {"model": name, "error": f"killed after {timeout} s: {str(exc.stderr or '')[-1500:]}"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"model": name, "error": f"rc={proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1])


def report(row: dict) -> str:
    if "error" in row:
        return f"{row['model']}: FAILED {row['error']}"
    params = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in row["params"].items())
    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f} %"
    return (
        f"{row['model']} @ {row['resolution']} px on {row['device']}, compile {row['compile']}: "
        f"{row['pairs']} pairs = {row['rows']} rows, "
        f"{row['lora_layers']} LoRA layers; median {row['median_s']:.3f} s/step "
        f"(min {min(row['times']):.3f}, max {max(row['times']):.3f}, {len(row['times'])} timed), "
        f"peak {row['peak_gb']:.2f} GB ({row['peak_is']}); forward {row['row_fwd_gflops']:.4g} GFLOP/row, "
        f"step {row['step_tflops']:.4g} TFLOP (counted step / accounting {row['measured_over_accounted']:.2f}); "
        f"MFU {mfu}; loss {row['loss']:.4g}; setup {row['setup_s']:.0f} s"
        + (f"\n    params: {params}" if params else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny pipelines on the CPU at 64 px, in this process")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (default: sd15 2, sdxl 1, sd3 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first also counts FLOPs)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--model-timeout", type=int, default=150, help="seconds before a model's child is killed")
    p.add_argument(
        "--compile", choices=["off", "on", "both"], default="both",
        help="duo train --compile: off, on, or both (each model twice; --smoke: off unless asked)",
    )  # fmt: skip
    p.add_argument("--child", choices=list(MODELS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = {"both": ["off", "on"]}.get(args.compile, [args.compile])
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be ≥ 1")
    if args.child:
        return child(args.child, args)
    if args.smoke:
        import torch

        torch.set_num_threads(1)
        args.steps = min(args.steps, 2)
        modes = ["off"] if "--compile" not in (argv if argv is not None else sys.argv) else modes
        rows = [
            run_model(name, argparse.Namespace(**{**vars(args), "compile": m})) for name in args.models for m in modes
        ]
    else:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --smoke on a CPU")
        rows = []
        for name in args.models:
            for mode in modes:
                rows.append(run_in_child(name, argparse.Namespace(**{**vars(args), "compile": mode})))
                print(report(rows[-1]), flush=True)
    if args.smoke:
        for row in rows:
            print(report(row), flush=True)
    print(json.dumps(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
