"""DUO with its LoRA on the UNet and the text encoder at once (`duo train --lora-on both`): one loss trains both
halves, one standard diffusers LoRA file holds them, a resume (with the average) is exact."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_train_tiny import assert_same_weights, lora_weights, trained_in_halves

from duo.errors import UserError
from duo.train.api import LORA_FILE, config_with_concept_defaults, resolve_config, train

BOTH = {"lora_on": "both"}
ADV = dict(adversarial="soft-prompt", adv_every=2, adv_steps=2, adv_batch=2)
PROMPT = "a naked white woman, realistic photo"  # an unsafe prompt of the test concept


def run(model, data, out, **kw):
    return train(resolve_config(model=model, data=data, out=str(out), **kw))


def test_both_halves_are_trained_saved_and_loaded(tiny_model, pairs_dir, tmp_path):
    from duo.models.family import load_family, load_with_loras

    out = run(tiny_model, pairs_dir, tmp_path / "both", steps=3, lr=1e-2, conditioning="concept", **BOTH, **ADV)
    lora = load_file(out / LORA_FILE)
    unet = {k: v for k, v in lora.items() if k.startswith("unet.")}
    text = {k: v for k, v in lora.items() if k.startswith("text_encoder.")}
    assert unet and text and len(unet) + len(text) == len(lora)
    layers = {k.split(".lora")[0].split(".")[-1] for k in text}
    assert layers == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert all(".attn1." in k for k in unet)  # DUO's default UNet layers: self-attention
    # B starts at zero: a non-zero up matrix in each half is a gradient that reached it
    for half in (unet, text):
        assert max(v.abs().max().item() for k, v in half.items() if ".up." in k or "lora_B" in k) > 0
    assert "| LoRA on | UNet and text encoder |" in (out / "README.md").read_text()

    original, ours = load_family(tiny_model), load_with_loras(tiny_model, [str(out)])
    ids = original.tokenize([PROMPT])
    with torch.no_grad():
        emb0, emb1 = original.encode_ids(ids), ours.encode_ids(ids)
        latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
        eps0 = original.denoise(original.unet, latents, t, emb0)
        eps1 = ours.denoise(ours.unet, latents, t, emb0)  # the same conditioning: only the UNet's LoRA differs
    assert (emb1 - emb0).abs().max() > 1e-4 and (eps1 - eps0).abs().max() > 1e-5


def test_resume_with_the_average_is_exact(tiny_model, pairs_dir, tmp_path):
    flags = dict(checkpoint_every=2, ema_decay=0.5, **BOTH, **ADV)
    straight, half = trained_in_halves(tiny_model, pairs_dir, tmp_path, 4, **flags)
    assert (half / LORA_FILE).read_bytes() == (straight / LORA_FILE).read_bytes()
    assert_same_weights(lora_weights(straight), lora_weights(half))
    losses = [[json.loads(x)["loss"] for x in (f / "metrics.jsonl").read_text().splitlines()] for f in (straight, half)]
    assert losses[0] == losses[1]


def test_targets_name_the_unets_layers_and_one_process_is_required(tiny_model):
    from duo.models.family import load_family
    from duo.train.loop import _attach

    unet_regex = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
    base = {"model": "m", "data": "d", "out": "o"}
    assert config_with_concept_defaults({**base, **BOTH}, {"targets": unet_regex}).targets == unet_regex
    assert config_with_concept_defaults({**base, **BOTH}, {"targets": "te", "lora_on": "text-encoder"}).targets is None
    cfg = config_with_concept_defaults({**base, **BOTH, "targets": r".*attn2\.to_k$"}, {})
    family = load_family(tiny_model)
    module = _attach(cfg, family, SimpleNamespace(num_processes=1))
    names = [n for n, _ in module.named_parameters() if "lora_A" in n]
    assert {n.split(".")[0] for n in names} == {"unet", "text_encoder"}
    assert all(".attn2.to_k." in n for n in names if n.startswith("unet."))  # the UNet's layers from --targets
    with pytest.raises(UserError, match="one process"):
        _attach(cfg, load_family(tiny_model), SimpleNamespace(num_processes=2))


def test_compile_wraps_both_halves(tiny_model, pairs_dir, tmp_path, monkeypatch):
    compiled = []

    def recording_compile(fn, **kwargs):  # stands in for inductor: the same function, its owner noted
        compiled.append(type(fn.__self__).__name__)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    run(tiny_model, pairs_dir, tmp_path / "c", steps=1, compile=True, **BOTH)
    assert sorted(compiled) == ["CLIPTextModel", "UNet2DConditionModel"]
