"""`duo train --ema-decay`: the saved LoRA is the moving average of the weights; training itself is unchanged."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_tiny import assert_same_weights, lora_weights, trained_in_halves

from duo.cli.main import main
from duo.models.lora import ADAPTER
from duo.train.api import resolve_config, train

DECAY = 0.6  # far from 1, so three steps move the average visibly


def run(model, data, out, **kw):
    return train(resolve_config(model=model, data=data, out=str(out), **kw))


def checkpoint(folder, step, name="lora.safetensors"):
    return load_file(folder / "checkpoints" / f"step-{step:07d}" / name)


def test_the_saved_lora_is_the_average_of_the_steps_and_training_is_unchanged(tiny_model, pairs_dir, tmp_path):
    plain = run(tiny_model, pairs_dir, tmp_path / "plain", steps=3, checkpoint_every=1)
    ema = run(tiny_model, pairs_dir, tmp_path / "ema", steps=3, checkpoint_every=1, ema_decay=DECAY)
    # the live weights follow the same trajectory: the average is read, never trained
    for step in (1, 2, 3):
        assert_same_weights(checkpoint(plain, step), checkpoint(ema, step))
    # shadow_3 = d³·w0 + d²(1−d)·w1 + d(1−d)·w2 + (1−d)·w3; LoRA's B starts at zero, so w0 drops out for B
    w1, w2, w3 = (checkpoint(plain, s) for s in (1, 2, 3))
    shadow = {k.replace(f".{ADAPTER}.", "."): v for k, v in checkpoint(ema, 3, "ema.safetensors").items()}
    assert shadow.keys() == w3.keys()
    d = DECAY
    b_keys = [k for k in w3 if "lora_B" in k]
    for k in b_keys:
        expected = d * d * (1 - d) * w1[k] + d * (1 - d) * w2[k] + (1 - d) * w3[k]
        torch.testing.assert_close(shadow[k], expected, rtol=1e-5, atol=1e-7)
    assert b_keys
    saved, last = lora_weights(ema), lora_weights(plain)
    assert saved.keys() == last.keys() and any(not torch.equal(saved[k], last[k]) for k in saved)
    sums = sorted(round(float(t.double().sum()), 5) for t in saved.values())
    assert sums == sorted(round(float(t.double().sum()), 5) for t in shadow.values())
    assert "| weights | moving average, decay 0.6 |" in (ema / "README.md").read_text()
    assert json.loads((ema / "config.json").read_text())["ema_decay"] == DECAY


def test_resume_continues_the_average_exactly(tiny_model, pairs_dir, tmp_path):
    flags = dict(checkpoint_every=2, ema_decay=DECAY)
    straight, half = trained_in_halves(tiny_model, pairs_dir, tmp_path, 4, **flags)
    assert_same_weights(lora_weights(straight), lora_weights(half))


def test_an_average_cannot_start_in_the_middle_of_a_run(tiny_model, pairs_dir, tmp_path, capsys):
    out = tmp_path / "plain"
    run(tiny_model, pairs_dir, out, steps=2, checkpoint_every=1)
    before = lora_weights(out)
    args = ["train", "--model", tiny_model, "--data", str(pairs_dir), "--out", str(out), "--steps", "3"]
    assert main([*args, "--resume", "--ema-decay", "0.9"]) == 2
    assert "differs in: ema_decay" in capsys.readouterr().err
    assert_same_weights(before, lora_weights(out))  # nothing written


@pytest.mark.parametrize("decay", ["1.0", "-0.1"])
def test_a_decay_outside_the_range_is_refused(tiny_model, pairs_dir, tmp_path, capsys, decay):
    assert main(["train", "--model", tiny_model, "--data", str(pairs_dir), "--out", str(tmp_path / "o"),
                 "--ema-decay", decay]) == 2  # fmt: skip
    assert "--ema-decay must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
