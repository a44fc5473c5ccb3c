"""Exact resume under fp16: skipped updates are redone and not counted, the loss scaler travels with the
checkpoint, and a resume with another number of processes (another global batch) is refused.

CPUs run no fp16 loss scaler, so the scaler's two behaviours are played by stand-ins: an optimizer step that
reports an overflow without updating (what accelerate's scaled step does), and a scaler with a state dict.
"""

import json

import pytest
from test_train_tiny import assert_same_weights, lora_weights

from duo.errors import UserError
from duo.train.api import resolve_config, train


def run(model, data, out, **kw):
    return train(resolve_config(model=model, data=data, out=str(out), **kw))


def test_an_overflowed_update_is_redone_on_the_same_draws_and_not_counted(tiny_model, pairs_dir, tmp_path, monkeypatch):
    from accelerate.optimizer import AcceleratedOptimizer

    clean = run(tiny_model, pairs_dir, tmp_path / "clean", steps=3)
    pattern = iter([False, True, True, False, False])  # the second step overflows twice before it goes through
    original = AcceleratedOptimizer.step

    def step(self, closure=None):
        self._is_overflow = next(pattern)
        if not self._is_overflow:
            original(self, closure)

    monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    skipped = run(tiny_model, pairs_dir, tmp_path / "skipped", steps=3)
    assert_same_weights(lora_weights(clean), lora_weights(skipped))
    lines = [json.loads(x) for x in (skipped / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and [m.get("skipped", 0) for m in lines] == [0, 2, 0]


def test_endless_overflow_stops_with_a_message(tiny_model, pairs_dir, tmp_path, monkeypatch):
    from accelerate.optimizer import AcceleratedOptimizer

    monkeypatch.setattr(AcceleratedOptimizer, "step", lambda self, closure=None: setattr(self, "_is_overflow", True))
    with pytest.raises(UserError, match="overflowed 21 times in a row at step 1.*--mixed-precision bf16"):
        run(tiny_model, pairs_dir, tmp_path / "o", steps=2)


class Scaler:
    """The state-dict side of a loss scaler; scaling is the identity (the optimizer prepared before it ignores it)."""

    def __init__(self, state):
        self.state = dict(state)

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        pass

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def test_the_loss_scale_is_checkpointed_and_restored(tiny_model, pairs_dir, tmp_path, monkeypatch):
    from duo.train import loop

    cfg = resolve_config(model=tiny_model, data=pairs_dir, out=str(tmp_path / "r"), steps=2, checkpoint_every=1)
    state = loop.setup(cfg)
    state.accelerator.scaler = Scaler({"scale": 512.0, "_growth_tracker": 7})  # after prepare: the step ignores it
    loop.train(state)
    loop.cleanup(state)
    saved = json.loads((tmp_path / "r" / "checkpoints" / "step-0000002" / "scaler.json").read_text())
    assert saved == {"scale": 512.0, "_growth_tracker": 7}

    created = loop._accelerator

    def with_scaler(c):
        acc = created(c)
        acc.scaler = Scaler({"scale": 65536.0, "_growth_tracker": 0})
        return acc

    monkeypatch.setattr(loop, "_accelerator", with_scaler)
    resumed = loop.setup(resolve_config(model=tiny_model, data=pairs_dir, out=str(tmp_path / "r"), steps=3,
                                        checkpoint_every=1, resume=True))  # fmt: skip
    assert resumed.start == 2 and resumed.accelerator.scaler.state == saved


def test_a_resume_with_another_number_of_processes_is_refused(tiny_model, pairs_dir, tmp_path):
    out = run(tiny_model, pairs_dir, tmp_path / "p", steps=2, checkpoint_every=1)
    config = json.loads((out / "config.json").read_text())
    assert config["processes"] == 1
    (out / "config.json").write_text(json.dumps({**config, "processes": 2}))  # as if launched on two processes
    with pytest.raises(UserError, match="trained with 2 process.*this launch has 1.*Resume with 2"):
        run(tiny_model, pairs_dir, out, steps=3, resume=True)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_images_are_encoded_by_a_float32_vae_under_half_precision(family, tiny_model, tmp_path):
    """The authors keep the VAE in fp32 while the denoiser trains in fp16 (and SDXL's VAE overflows in fp16):
    every family encodes in fp32, returns fp32 latents, and leaves the VAE in the pipeline's dtype."""
    import torch
    from PIL import Image

    from duo.models.family import load_family
    from duo.models.tiny_sd3 import build_tiny_sd3_pipeline
    from duo.models.tiny_sdxl import build_tiny_sdxl_pipeline

    builders = {"sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline}
    model = tiny_model if family == "sd" else str(builders[family](tmp_path / family))
    half = load_family(model, dtype="float16")
    seen = []
    half.pipe.vae.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    mean, std = half.encode_images([Image.new("RGB", (64, 64), (200, 10, 10))], 64)
    assert seen == [torch.float32] and half.pipe.vae.dtype == torch.float16
    assert mean.dtype == torch.float32 and torch.isfinite(mean).all() and torch.isfinite(std).all()
