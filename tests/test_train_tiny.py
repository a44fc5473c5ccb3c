"""DUO end to end on a tiny random pipeline: curate → train → a plain diffusers pipeline loads the LoRA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from duo.train.api import LORA_FILE, resolve_config, train


def run_train(model, data, out, **kw):
    return train(resolve_config(model=model, data=data, out=str(out), **kw))


def lora_weights(folder):
    return load_file(Path(folder) / LORA_FILE)


def trained_in_halves(model, data, tmp_path, steps: int, **flags):
    """(straight, halves): one run in one go, and the same run stopped at its first checkpoint and resumed."""
    straight = run_train(model, data, tmp_path / "straight", steps=steps, **flags)
    half = tmp_path / "halves"
    run_train(model, data, half, steps=flags["checkpoint_every"], **flags)
    run_train(model, data, half, steps=steps, resume=True, **flags)
    return straight, half


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-5)


def test_plain_diffusers_loads_the_lora_and_output_changes(tiny_model, pairs_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = run_train(tiny_model, pairs_dir, tmp_path / "lora", steps=20, lr=1e-2)
    assert (out / "README.md").read_text().count("data hash") == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert {"loss", "pref", "keep", "accuracy", "delta_win", "delta_lose", "grad_norm", "lr", "seconds"} <= metrics[
        0
    ].keys()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    kwargs = dict(prompt="a naked white woman, realistic photo", num_inference_steps=4, output_type="np")
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(out))
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(before, again)  # so any change below is the LoRA's
    assert np.abs(after - before).max() > 1e-3


def test_resume_gives_identical_weights(tiny_model, pairs_dir, tmp_path):
    straight, half = trained_in_halves(tiny_model, pairs_dir, tmp_path, 6, checkpoint_every=3)
    assert_same_weights(lora_weights(straight), lora_weights(half))
    losses = [json.loads(x)["loss"] for x in (half / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6


def test_accumulation_equals_larger_batch(tiny_model, pairs_dir, tmp_path, monkeypatch):
    """batch 1 × accumulation 4 and batch 4 × 1 apply the same gradient and follow the same loss curve.

    Weights are not compared after several steps: Adam divides by √v, which turns float-rounding
    differences of summation order into visible weight differences; the gradient is what accumulation decides.
    """
    grads, original_step = [], torch.optim.AdamW.step

    def capture(self, *args, **kwargs):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", capture)
    a = run_train(tiny_model, pairs_dir, tmp_path / "b1x4", steps=3, batch_size=1, grad_accum=4)
    b = run_train(tiny_model, pairs_dir, tmp_path / "b4x1", steps=3, batch_size=4, grad_accum=1)
    for ga, gb in zip(grads[0], grads[3]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
    curve = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    np.testing.assert_allclose(curve(a), curve(b), rtol=1e-4)


def test_noise_is_shared_within_a_pair(tiny_model, pairs_dir, tmp_path, monkeypatch):
    from duo.models.sd import StableDiffusionFamily

    seen = []
    original = StableDiffusionFamily.add_noise

    def spy(self, x0, noise, t):
        seen.append(noise.clone())
        return original(self, x0, noise, t)

    monkeypatch.setattr(StableDiffusionFamily, "add_noise", spy)
    run_train(tiny_model, pairs_dir, tmp_path / "spy", steps=1, keep="noise+retain")
    lose, win, retain = seen[:3]
    assert torch.equal(lose, win)
    assert not torch.equal(lose, retain)


@pytest.mark.parametrize(
    "variant",
    [
        {"conditioning": "concept", "timesteps": "shared"},
        {"conditioning": "mixed", "keep": "noise+retain", "retain_prompts": "neighbours"},
    ],
)
def test_variants_train(tiny_model, pairs_dir, tmp_path, variant):
    out = run_train(tiny_model, pairs_dir, tmp_path / "v", steps=2, **variant)
    config = json.loads((out / "config.json").read_text())
    assert all(config[k] == v for k, v in variant.items())
    assert (out / LORA_FILE).is_file()


def test_v_prediction_model_trains(tmp_path, pairs_dir):
    from duo.models.family import load_family
    from duo.models.tiny import build_tiny_pipeline

    model = str(build_tiny_pipeline(tmp_path / "vpred", prediction_type="v_prediction"))
    fam = load_family(model)
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    abar = fam.pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(fam.training_target(x0, noise, t), expected)
    assert (run_train(model, pairs_dir, tmp_path / "lora", steps=2) / LORA_FILE).is_file()


def test_fuse_writes_a_pipeline_equal_to_the_lora(tiny_model, pairs_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = run_train(tiny_model, pairs_dir, tmp_path / "lora", steps=3, lr=1e-3, fuse=True)
    kwargs = dict(prompt="a naked white woman", num_inference_steps=3, output_type="np")
    fused = StableDiffusionPipeline.from_pretrained(out / "fused")(**kwargs, generator=torch.Generator().manual_seed(0))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(out))
    loaded = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(fused.images, loaded.images, atol=1e-4)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny_model, pairs_dir, tmp_path):
    """DDP (gloo on CPU): 2 processes × 2 pairs follow the 1 process × 4 pairs loss curve."""
    accelerate = Path(sys.executable).parent / "accelerate"
    two = tmp_path / "ddp"
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),  # the default 29500 may be held by another job on a shared machine
        "-m",
        "duo",
        "train",
        "--model",
        tiny_model,
        "--data",
        pairs_dir,
        "--out",
        str(two),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--threads",
        "1",
    ]
    # One OpenMP thread a rank: two ranks × the default (all cores) oversubscribe a shared 2-core machine, and
    # spinning OpenMP workers then starve the other rank between collectives (the test ran past its timeout).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    one = run_train(tiny_model, pairs_dir, tmp_path / "one", steps=4, batch_size=4)
    curve = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(curve(two)) == 4
    np.testing.assert_allclose(curve(two), curve(one), rtol=1e-4)
