"""Benchmark: one DUO optimizer step, ours against the structure of the authors' trainer, at identical maths.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py              # the perf-anchor model (default)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py --size small # smoke check, < 60 s

Variants (benchmarks/step_fixtures.py), same objective, same draws, same LoRA init, the settings of
shared/perf-anchor/run_one.sh (β 500, 1 pair/step, 256 px, LoRA r 32 on self-attention, empty conditioning,
t < 750, fp32):

* authors — their `train/unlearn-sd.py` step: VAE-encode both images and text-encode the rows' prompts inside
            every step, then the policy forward (LoRA on) and the reference forward (adapters off, no_grad) over
            [x⁻; x⁺; x_T], DPO-sigmoid + λ·MSE, backward, clip, AdamW. Same `setup()`/`optimizer_step` as ours
            with this method plugged in (`setup(cfg, make=...)`).
* ours    — `duo.train.loop.optimizer_step` with `DuoMethod` exactly as `duo train` runs it: latent
            distributions and prompt embeddings computed once (`build_cache`) and reused every step.
* ours-cl — ours with the UNet in channels_last (a lever; not a `duo train` setting unless it pays).
* ours-compile — ours with the UNet's forward under torch.compile (inductor; opt-in: `--variants ... ours-compile`,
            compiled during the warm-up steps).

Each variant lives in its own child process (its own peak RSS); the parent alternates them, one idle while
another runs, in counterbalanced rounds because these machines drift by up to ±20 % within minutes. Warm-up
steps are discarded. Reported: median s/step, each variant's time as a fraction of the authors' (of the
medians, and the median of per-round ratios), peak RSS while stepping (VmHWM reset after setup) and over the
whole process. How the `authors` variant was checked against their real script: docs/performance.md.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).parent))
from step_fixtures import SIZES, build_pipeline, setup_run, write_pairs  # noqa: E402

VARIANTS = {
    "authors": "authors' structure (VAE + text encode every step)",
    "ours": "ours (cached latents + embeddings)",
    "ours-cl": "ours, UNet channels_last",
    "ours-compile": "ours, UNet torch.compile",
}
DEFAULT_VARIANTS = ["authors", "ours", "ours-cl"]  # compile: opt-in (minutes of compilation on a CPU)


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
    tmp = Path(tempfile.mkdtemp(prefix="duo-bench-"))
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` cleans up on kill
    children: dict[str, Child] = {}
    try:
        pipeline, data = tmp / "pipeline", tmp / "pairs"
        counts = build_pipeline(pipeline, args.size)
        latent = SIZES[args.size]["unet"]["sample_size"]
        write_pairs(data, args.n_data_pairs, latent * 8)
        print(
            f"[{args.size}] UNet {counts['unet'] / 1e6:.1f} M params at {latent}×{latent} latents "
            f"({latent * 8} px), VAE {counts['vae'] / 1e6:.1f} M, text encoder {counts['text_encoder'] / 1e6:.1f} M; "
            f"{args.pairs} pairs/step from {args.n_data_pairs}; torch threads {args.threads}; "
            f"fixtures built in {time.perf_counter() - t_start:.0f} s",
            flush=True,
        )
        for v in args.variants:
            children[v] = Child(v, args, pipeline, data, tmp)
        for v, c in children.items():
            ready = c.read()
            print(
                f"  {v}: setup {ready['setup_s']:.1f} s, RSS after setup {ready['rss_mb']:.0f} MB"
                + ("" if ready["hwm_reset"] else " (could not reset VmHWM: peak includes setup)"),
                flush=True,
            )
        _warm_up(children, args.warmup)
        times, round_ratios = _alternate(children, args)
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
    return _report(args, times, round_ratios, peaks, time.perf_counter() - t_start)


def _warm_up(children: dict, n: int) -> None:
    """Same LoRA init and draws: the objective is the same iff the variants' metrics agree (to float noise)."""
    if not n:
        return
    warm = {v: c.run(n)["metrics"][-1] for v, c in children.items()}
    print(
        f"  metrics of warm-up step {n}: "
        + "; ".join(
            f"{v} loss {m['loss']:.6g} pref {m['pref']:.6g} keep {m['keep']:.4g} grad_norm {m['grad_norm']:.4g}"
            for v, m in warm.items()
        ),
        flush=True,
    )


def _alternate(children: dict, args) -> tuple[dict, dict]:
    """Rounds in rotating order (round r starts with variant r mod n); per round, each variant's median
    as a fraction of the authors' median of the same round."""
    names = list(children)
    times = {v: [] for v in names}
    round_ratios = {v: [] for v in names if v != "authors"}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        medians = {}
        for v in order:
            got = children[v].run(args.steps_per_round)["times"]
            times[v] += got
            medians[v] = statistics.median(got)
        for v in round_ratios:
            round_ratios[v].append(medians[v] / medians["authors"])
        print(
            f"  round {r + 1}/{args.rounds} ({' '.join(order)}): "
            + ", ".join(f"{v} {medians[v]:.3f} s" for v in names),
            flush=True,
        )
    return times, round_ratios


def _report(args, times: dict, round_ratios: dict, peaks: dict, total_s: float) -> int:
    med = {v: statistics.median(t) for v, t in times.items()}
    rows = [("variant", "median s/step", "× authors", "peak RSS MB", "× authors", "min-max s/step", "incl. setup MB")]
    for v, t in times.items():
        peak = peaks[v]["peak_steps_mb"]
        rows.append(
            (
                VARIANTS[v],
                f"{med[v]:.3f}",
                f"{med[v] / med['authors']:.2f}",
                f"{peak:.0f}",
                f"{peak / peaks['authors']['peak_steps_mb']:.2f}",
                f"{min(t):.3f}-{max(t):.3f}",
                f"{peaks[v]['peak_process_mb']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    for v, ratios in round_ratios.items():
        print(
            f"{v}: step time {med[v] / med['authors']:.2f}× the authors' structure (median of per-round ratios "
            f"{statistics.median(ratios):.2f}; rounds {', '.join(f'{x:.2f}' for x in ratios)}); target ≤ 0.70"
        )
    print(f"{len(next(iter(times.values())))} timed steps per variant; total {total_s:.0f} s")
    best = min(med[v] / med["authors"] for v in round_ratios) if round_ratios else 1.0
    return 1 if args.fail_if_slower and best >= 1.0 else 0


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=list(SIZES), default="anchor", help="model sizes (step_fixtures.py)")
    p.add_argument("--small", action="store_true", help="same as --size small: a < 60 s smoke check")
    p.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS, help="authors always runs"
    )
    p.add_argument("--rounds", type=int, default=None, help="alternation rounds (default 6; small 4)")
    p.add_argument(
        "--steps-per-round", type=int, default=None, help="timed steps per variant per round (default 3; small 5)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--pairs", type=int, default=1, help="pairs per step (the anchor's: 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads in each process. While another "
        "process keeps a core busy, use 1: 2 threads then wait on each other (~7x slower steps) and "
        "the times measure the scheduler, not the step",
    )
    p.add_argument("--n-data-pairs", type=int, default=8, help="pairs in the generated data folder (anchor: 8)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the generated pipeline and pairs")
    p.add_argument("--fail-if-slower", action="store_true", help="exit 1 unless a variant of ours is faster")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return 0
    if args.small:
        args.size = "small"
    args.variants = ["authors"] + [v for v in dict.fromkeys(args.variants) if v != "authors"]
    small = args.size == "small"
    args.rounds = args.rounds or (4 if small else 6)
    args.steps_per_round = args.steps_per_round or (5 if small else 3)
    if min(args.rounds, args.steps_per_round, args.pairs, args.threads) < 1 or args.warmup < 0:
        p.error("--rounds, --steps-per-round, --pairs and --threads must be ≥ 1, --warmup ≥ 0")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
