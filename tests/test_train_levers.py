"""Levers of the train loop: `--compile` (the trained module's forward through torch.compile, the maths the same)
and, on a CPU, the encoders' weights dropped once their outputs are cached."""

import pytest
import torch
from test_train_tiny import assert_same_weights, lora_weights, run_train


def test_compile_wraps_the_forward_every_row_goes_through(tiny_model, pairs_dir, tmp_path, monkeypatch):
    calls = []

    def recording_compile(fn, **kwargs):  # stands in for inductor (minutes on a CPU): same function, counted
        def compiled(*args, **kw):
            calls.append(args[0].shape[0] if args else None)
            return fn(*args, **kw)

        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    compiled = run_train(tiny_model, pairs_dir, tmp_path / "compiled", steps=2, batch_size=2, compile=True)
    # Per step one reference forward (adapters off) and one policy forward, both on [x⁻; x⁺; x_T] of 2 pairs.
    assert calls == [6, 6] * 2
    monkeypatch.undo()
    eager = run_train(tiny_model, pairs_dir, tmp_path / "eager", steps=2, batch_size=2)
    assert_same_weights(lora_weights(compiled), lora_weights(eager))


@pytest.mark.slow
def test_inductor_trains_the_same_lora(tiny_model, pairs_dir, tmp_path):
    compiled = run_train(tiny_model, pairs_dir, tmp_path / "compiled", steps=3, compile=True)
    eager = run_train(tiny_model, pairs_dir, tmp_path / "eager", steps=3)
    assert_same_weights(lora_weights(compiled), lora_weights(eager), atol=1e-4)


def test_cpu_training_drops_the_encoders_it_no_longer_reads(tiny_model, pairs_dir, tmp_path):
    from duo.train.config import TrainConfig
    from duo.train.loop import optimizer_step, setup

    def devices(family):
        return {p.device.type for m in (family.pipe.vae, *family.text_encoders) for p in m.parameters()}

    state = setup(TrainConfig(model=tiny_model, data=pairs_dir, out=str(tmp_path / "duo"), device="cpu", steps=1))
    assert devices(state.family) == {"meta"}  # nothing reads them after build_cache
    assert {p.device.type for p in state.family.unet.parameters()} == {"cpu"}
    optimizer_step(state, 0)
    # An adversary encodes its prompts every round: the text encoder (and the VAE) stay.
    adv = TrainConfig(model=tiny_model, data=pairs_dir, out=str(tmp_path / "adv"), device="cpu", steps=1,
                      adversarial="soft-prompt")  # fmt: skip
    assert devices(setup(adv).family) == {"cpu"}
