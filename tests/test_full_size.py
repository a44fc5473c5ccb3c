"""The real SD 1.5, SDXL and SD3-medium architectures (`duo.models.full_size`), with random weights.

Fast (default suite): the configurations, built on the meta device (nothing allocated), have the published
parameter counts, and DUO's LoRA patterns match exactly the layers they should in each real architecture.
Slow (`pytest -m slow -k sd15`, one at a time: SDXL needs ~12 GB): build at full size, load with
`load_family` inside `duo.train.loop.setup`, run one DUO optimizer step at 64 px on 1-2 random pairs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from duo.models.full_size import SD3_MEDIUM_TRANSFORMER, SD15_UNET, SDXL_UNET, full_size_pipeline
from duo.models.tiny import parameter_counts

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# Published totals (not what this code computes): SD 1.5 UNet 859,520,964 and its VAE 83,653,863 (the counts
# diffusers' loaders report for stable-diffusion-v1-5, "860 M" in the model card); SDXL's UNet 2,567,463,684
# ("2.6 B" in the SDXL paper, Podell et al. 2023, table 1); CLIP ViT-L/14's text tower 123.06 M and
# OpenCLIP ViT-bigG/14's (with its projection) 694.66 M (the counts of the open_clip / transformers
# checkpoints); T5 v1.1 XXL's encoder 4.762 B. Tolerance 0.1 %: a wrong width or layer count moves any of them
# by more than that (one CLIP-L layer is 5.8 % of it; one SDXL transformer block 0.5 % of the UNet).
PUBLISHED = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
    ("sd3-medium", "text_encoder_2"): 694_659_840,
}
TOLERANCE = 1e-3


def mmdit_parameters(cfg: dict) -> int:
    """SD3's MMDiT (Esser et al. 2024, fig. 2) counted by hand from its config: patch embedding, timestep and
    pooled-text embedders, context projection, per block the two adaLN-Zero modulations (the last block's
    context stream only a 2-way one, and no context output projection or feed-forward: its context is not
    read again), the 8 attention projections, the two 4× GELU MLPs; final adaLN and unpatchify projection.
    Layer norms inside blocks have no affine parameters."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p, c = cfg["patch_size"], cfg["in_channels"]

    def lin(a: int, b: int) -> int:
        return a * b + b

    mlp = lin(d, 4 * d) + lin(4 * d, d)
    embed = (c * p * p * d + d) + lin(256, d) + lin(d, d) + lin(cfg["pooled_projection_dim"], d) + lin(d, d)
    embed += lin(cfg["joint_attention_dim"], cfg["caption_projection_dim"])
    block = 2 * lin(d, 6 * d) + 8 * lin(d, d) + 2 * mlp
    last = lin(d, 6 * d) + lin(d, 2 * d) + 7 * lin(d, d) + mlp
    head = lin(d, 2 * d) + lin(d, p * p * cfg["out_channels"])
    return embed + (cfg["num_layers"] - 1) * block + last + head


def unet_transformer_blocks(cfg: dict) -> int:
    """Transformer blocks of a UNet2DConditionModel config: per cross-attention down block one per ResNet
    (`layers_per_block`), per up block one more, the mid block one, each `transformer_layers_per_block` deep."""
    n = len(cfg["down_block_types"])
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = (depth,) * n if isinstance(depth, int) else tuple(depth)
    down = sum(cfg["layers_per_block"] * d for t, d in zip(cfg["down_block_types"], depth) if "CrossAttn" in t)
    up_depth = depth[::-1]
    up = sum((cfg["layers_per_block"] + 1) * d for t, d in zip(cfg["up_block_types"], up_depth) if "CrossAttn" in t)
    return down + depth[-1] + up


# DUO's LoRA: the four projections (q, k, v, out) of every self-attention (SPEC §3); in SD3 the image stream's
# joint attention (and a second image-only attention in SD3.5's dual-attention layers: none in SD3-medium).
DUAL = "dual_attention_layers"
EXPECTED_DUO_LORA = {
    "sd15": 4 * unet_transformer_blocks(SD15_UNET),  # 16 blocks → 64
    "sdxl": 4 * unet_transformer_blocks(SDXL_UNET),  # 70 blocks → 280
    "sd3-medium": 4 * (SD3_MEDIUM_TRANSFORMER["num_layers"] + len(SD3_MEDIUM_TRANSFORMER.get(DUAL, ()))),
}


@pytest.fixture(scope="module")
def meta_pipelines():
    return {name: full_size_pipeline(name, device="meta") for name in EXPECTED_DUO_LORA}


def test_configs_have_the_published_parameter_counts(meta_pipelines):
    counts = {(name, comp): n for name, pipe in meta_pipelines.items() for comp, n in parameter_counts(pipe).items()}
    for key, published in PUBLISHED.items():
        assert abs(counts[key] - published) <= TOLERANCE * published, (key, counts[key], published)
    # SD3-medium's "2 B": the hand count of its config, 2,028,328,000 (1536 wide, 24 blocks); exact, since
    # both count the same layers
    assert counts[("sd3-medium", "transformer")] == mmdit_parameters(SD3_MEDIUM_TRANSFORMER) == 2_028_328_000
    # without T5 unless asked: a pipeline saved without it must work
    assert ("sd3-medium", "text_encoder_3") not in counts
    assert meta_pipelines["sd3-medium"].text_encoder_3 is None


def test_t5_xxl_is_an_option_with_its_published_size():
    counts = parameter_counts(full_size_pipeline("sd3-medium", device="meta", with_t5=True))
    assert abs(counts["text_encoder_3"] - 4_762_310_656) <= TOLERANCE * 4_762_310_656


def test_duo_targets_match_every_self_attention_projection_of_the_real_architectures(meta_pipelines):
    from duo.models.lora import CROSS_ATTENTION, SELF_ATTENTION
    from duo.models.sd3 import IMAGE_ATTENTION

    patterns = {"sd15": SELF_ATTENTION, "sdxl": SELF_ATTENTION, "sd3-medium": IMAGE_ATTENTION}
    for name, pattern in patterns.items():
        pipe = meta_pipelines[name]
        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        matched = [n for n, m in denoiser.named_modules() if re.fullmatch(pattern, n)]  # peft's matching rule
        assert len(matched) == EXPECTED_DUO_LORA[name], (name, len(matched))
        assert all(isinstance(denoiser.get_submodule(n), torch.nn.Linear) for n in matched)
    # the cross-attention of the UNets is as large (ESD-x's layers), and not among DUO's
    unet = meta_pipelines["sdxl"].unet
    assert sum(bool(re.fullmatch(CROSS_ATTENTION, n)) for n, _ in unet.named_modules()) == EXPECTED_DUO_LORA["sdxl"]


def test_gpu_benchmark_runs_on_the_cpu_with_smoke():
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_step.py"), "--smoke", "--steps", "1", "--warmup", "1"],
        capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", **_env()},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["model"] for r in rows] == list(EXPECTED_DUO_LORA)
    for row in rows:
        assert row["row_fwd_gflops"] > 0 and row["median_s"] > 0 and row["mfu"] is None
        # the FLOPs counted over a whole step agree with the accounting (3 passes per row) to within 25 %
        assert 0.75 < row["measured_over_accounted"] < 1.25, row
        assert torch.isfinite(torch.tensor(row["loss"]))
    print(f"smoke benchmark: {time.perf_counter() - started:.1f} s")


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


# ---- slow: full size, one DUO step ------------------------------------------------------------------------

BUILD = """
import json, sys, torch
from duo.models.full_size import build_full_size_pipeline
counts = build_full_size_pipeline(sys.argv[1], sys.argv[2], dtype=getattr(torch, sys.argv[3]))
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]
print(json.dumps({"counts": counts, "vmhwm_kb": int(hwm)}))
"""


def _vm_hwm_gb() -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, dtype, pairs",
    # SDXL with bf16 weights (fp32 LoRA, bf16 autocast): in fp32 it would need ~14 GB. SD3 in fp32 (~12 GB) and
    # one pair: on a CPU without AVX-512 bf16 the backward's bf16 matmuls fall back to a scalar GEMM, and SD3 at
    # 64 px still has 154 text tokens per row (killed after 18 min in bf16 with 2 pairs)
    [("sd15", "float32", 2), ("sdxl", "bfloat16", 2), ("sd3-medium", "float32", 1)],
)
def test_one_duo_step_at_full_size(name, dtype, pairs, tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from gpu_step import lora_layer_count, setup_duo, write_pairs

    from duo.models.lora import lora_parameters
    from duo.train.loop import optimizer_step

    torch.set_num_threads(2)
    started = time.perf_counter()
    # built in a child process, so that this process's peak memory is the loaded model and the step only
    proc = subprocess.run([sys.executable, "-c", BUILD, name, str(tmp_path / "pipe"), dtype],
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    build_s = time.perf_counter() - started
    write_pairs(tmp_path / "pairs", pairs, 64)
    mixed = "no" if dtype == "float32" else "bf16"
    state = setup_duo(tmp_path / "pipe", tmp_path / "pairs", tmp_path / "out", pairs, "cpu", mixed)
    setup_s = time.perf_counter() - started - build_s
    assert lora_layer_count(state.unet) == EXPECTED_DUO_LORA[name]
    before = [p.detach().clone() for p in lora_parameters(state.family.unet)]
    assert before and all(p.dtype == torch.float32 for p in before)  # LoRA in fp32, also over bf16 weights
    t0 = time.perf_counter()
    metrics = optimizer_step(state, 0)
    step_s = time.perf_counter() - t0
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
    after = lora_parameters(state.family.unet)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed > 0, "the optimizer step left every LoRA weight as it was"
    params = ", ".join(f"{k} {v:,}" for k, v in built["counts"].items())
    print(
        f"\n{name} ({dtype}): {params}\n  LoRA layers {lora_layer_count(state.unet)}, {changed}/{len(before)} "
        f"LoRA tensors changed, loss {metrics['loss']:.4f}; build {build_s:.0f} s "
        f"(peak {built['vmhwm_kb'] / 2**20:.1f} GB), load+cache {setup_s:.0f} s, step {step_s:.1f} s; "
        f"peak of this process (VmHWM) {_vm_hwm_gb():.1f} GB"
    )
