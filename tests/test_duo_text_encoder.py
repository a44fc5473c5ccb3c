"""DUO with its LoRA on the text encoder (`duo train --lora-on text-encoder`): a frozen UNet, the policy's prompts
encoded live through the LoRA, a standard diffusers text-encoder LoRA out, an exact resume, flags refused early."""

import json
import math
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_tiny import assert_same_weights, lora_weights, trained_in_halves

from duo.cli.main import main
from duo.errors import UserError
from duo.train.api import LORA_FILE, config_with_concept_defaults, resolve_config, train

TE = {"lora_on": "text-encoder"}
ADV = dict(adversarial="concept-inversion", adv_every=2, adv_steps=2, adv_batch=2)
PROMPT = "a naked white woman, realistic photo"  # an unsafe prompt of the test concept


def run(model, data, out, **kw):
    return train(resolve_config(model=model, data=data, out=str(out), **kw))


def metrics(folder):
    return [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def _encode(text_encoder, ids):
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_unet_untouched_and_a_text_encoder_lora_every_loader_reads(tiny_model, pairs_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from duo.models.family import load_with_loras

    out = run(tiny_model, pairs_dir, tmp_path / "te", steps=3, lr=1e-2, conditioning="concept", fuse=True, **TE)
    keys = load_file(out / LORA_FILE).keys()
    assert keys and all(k.startswith("text_encoder.") for k in keys)  # nothing of the UNet was trained
    layers = {k.split(".lora")[0].split(".")[-1] for k in keys}  # AdvUnlearn's: attention and feed-forward
    assert layers == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert "| LoRA on | text encoder |" in (out / "README.md").read_text()
    # the fused pipeline (LoRA baked in) has the original UNet, bit for bit
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    assert_same_weights(load_file(Path(tiny_model) / unet_file), load_file(out / "fused" / unet_file))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)  # a plain diffusers pipeline, nothing of ours
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids  # fmt: skip
    original = _encode(pipe.text_encoder, ids)
    pipe.load_lora_weights(str(out))
    reloaded = _encode(pipe.text_encoder, ids)
    assert (reloaded - original).abs().max() > 1e-3  # the LoRA is live after the reload
    ours = load_with_loras(tiny_model, [str(out)])  # what `duo sample`, `duo attack` and `duo evaluate` load
    torch.testing.assert_close(_encode(ours.text_encoders[0], ids), reloaded, rtol=0, atol=1e-5)


def test_first_step_is_the_unet_placements_and_its_gradient_reaches_only_the_encoder(tiny_model, pairs_dir, tmp_path):
    """Step 1: LoRA B = 0 in both placements, so policy = reference, Δ = 0, pref = log 2, keep = 0, the same loss.
    A gradient at all, and a keep term from step 2, prove that the policy's prompts went through the LoRA: had
    the policy read the cached (original) embeddings, the loss would not depend on the encoder's LoRA."""
    flags = dict(steps=2, lr=1e-2, conditioning="mixed", keep="noise+retain")
    unet = metrics(run(tiny_model, pairs_dir, tmp_path / "unet", **flags))
    te = metrics(run(tiny_model, pairs_dir, tmp_path / "te", **flags, **TE))
    for first in (unet[0], te[0]):
        assert first["pref"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["keep"] == pytest.approx(0.0, abs=1e-12) and first["retain"] == pytest.approx(0.0, abs=1e-12)
        assert first["delta_win"] == pytest.approx(0.0, abs=1e-9) and first["grad_norm"] > 0
    assert te[0]["loss"] == pytest.approx(unet[0]["loss"], abs=1e-6)
    assert te[1]["keep"] > 0 and te[1]["retain"] > 0  # after one step the encoder's LoRA moved the policy


@pytest.mark.parametrize(
    "adversarial, adv_pairs",
    [
        ("concept-inversion", "all"),
        ("concept-inversion+soft-prompt", "all"),
        ("concept-inversion+soft-prompt", "split"),
    ],
)
def test_policy_rows_are_encoded_live_and_reference_rows_by_the_original_encoder(
    tiny_model, pairs_dir, monkeypatch, adversarial, adv_pairs
):
    """The conditioning each UNet forward reads, row by row, against the prompts encoded by hand: LoRA on for the
    policy (with grad), off for the reference; the adversarial rows with each inner attack's vectors in place
    (--adv-pairs split: one group of rows, slot k under adversary k mod 2)."""
    from accelerate import Accelerator

    from duo.data.pairs import load_pairs
    from duo.models.family import load_family
    from duo.models.lora import adapters_disabled, attach_lora, lora_parameters
    from duo.train import methods

    cfg = resolve_config(model=tiny_model, data=pairs_dir, out="unused", conditioning="mixed", keep="noise+retain",
                         retain_prompts="neighbours", **{**ADV, "adversarial": adversarial, "adv_pairs": adv_pairs},
                         **TE)  # fmt: skip
    family, pairs = load_family(tiny_model), load_pairs(pairs_dir)
    encoder = family.text_encoders[0]
    attach_lora(encoder, 4, 4.0, family.lora_targets("duo", cfg.lora_module))
    with torch.no_grad():  # a LoRA that changes the encoder, so that live and cached differ
        for p in lora_parameters(encoder):
            p.normal_(0, 0.3)
    seen = {}

    def spy(fam, unet, acc, latents, ts, embs, policy_rows=None, policy_embs=None):
        seen.update(unet=unet, embs=embs, policy_embs=policy_embs)
        return original(fam, unet, acc, latents, ts, embs, policy_rows, policy_embs)

    original = methods._reference_and_policy
    monkeypatch.setattr(methods, "_reference_and_policy", spy)
    method = methods.DuoMethod(cfg, family, pairs, "cpu")
    acc = Accelerator(cpu=True)
    for step in (0, 2):  # a round of each inner attack, so their vectors are not the initial ones
        method.before_step(encoder, acc, step)
    d = method.draw(1, 4)  # step 1: slots 4..7
    method.micro_loss(encoder, acc, d)
    assert seen["unet"] is family.unet and seen["policy_embs"].requires_grad and not seen["embs"].requires_grad

    advs = method.adversaries
    assert len(advs) == len(adversarial.split("+")) and len({s for a in advs for s in a.slots.ids}) == 3 * len(advs)
    texts = [pairs.unsafe_prompts[i] if c else "" for i, c in zip(d.pair_index, d.use_concept)]
    rows = texts * 2 + [""] * 4 + [pairs.concept.neighbours[i] for i in d.retain_prompt]
    adv_ids = torch.cat([a.ids[d.pair_index].repeat(2, 1) for a in advs])
    if adv_pairs == "split":  # slots 4, 5, 6, 7 → adversaries 0, 1, 0, 1
        adv_ids = torch.stack([advs[k % 2].ids[i] for k, i in enumerate(d.pair_index)]).repeat(2, 1)
    with torch.no_grad(), ExitStack() as stack:
        for a in advs:
            stack.enter_context(a.vectors_in_place())
        live = torch.cat([family.encode_ids(family.tokenize(rows)), family.encode_ids(adv_ids)])
        with adapters_disabled(encoder):
            cached = torch.cat([family.encode_ids(family.tokenize(rows)), family.encode_ids(adv_ids)])
    assert (live - cached).abs().max() > 1e-3
    torch.testing.assert_close(seen["policy_embs"].detach(), live, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["embs"], cached, rtol=0, atol=1e-5)


def test_resume_is_exact_with_the_inner_attack(tiny_model, pairs_dir, tmp_path):
    # steps 3 and 6 are checkpoints; rounds at steps 0, 2, 4 put the resume between two rounds.
    flags = dict(checkpoint_every=3, **ADV, **TE)
    straight, half = trained_in_halves(tiny_model, pairs_dir, tmp_path, 6, **flags)
    assert (half / LORA_FILE).read_bytes() == (straight / LORA_FILE).read_bytes()
    assert_same_weights(lora_weights(straight), lora_weights(half))
    assert [m["adv_loss"] for m in metrics(straight)] == [m["adv_loss"] for m in metrics(half)]
    assert [m["loss"] for m in metrics(straight)] == [m["loss"] for m in metrics(half)]


def test_bad_placement_is_refused_before_anything_loads(tmp_path, capsys):
    flags = ["--model", "nowhere", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flags, "--lora-on", "vae"])
    assert exit_info.value.code == 2 and "--lora-on" in capsys.readouterr().err
    # the Python entry point: refused before the (missing) pairs folder is read
    with pytest.raises(UserError, match="--lora-on must be one of") as error:
        resolve_config(model="nowhere", data=str(tmp_path / "none"), out=str(tmp_path / "o"), lora_on="vae")
    assert error.value.exit_code == 2
    with pytest.raises(UserError, match="--lora-on applies to --method duo"):
        resolve_config(model="nowhere", data=str(tmp_path / "none"), out="o", method="esd-x", **TE)
    assert not (tmp_path / "o").exists()


def test_concept_targets_belong_to_the_placement_they_were_written_for():
    unet_regex = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
    base = {"model": "m", "data": "d", "out": "o"}
    assert config_with_concept_defaults({**base, **TE}, {"targets": unet_regex}).targets is None
    assert config_with_concept_defaults(base, {"targets": unet_regex}).targets == unet_regex
    assert config_with_concept_defaults({**base, **TE, "targets": "x"}, {"targets": unet_regex}).targets == "x"
    own = {"targets": "te-regex", "lora_on": "text-encoder"}
    assert config_with_concept_defaults(base, own).targets == "te-regex"
    assert config_with_concept_defaults({**base, "lora_on": "unet"}, own).targets is None
    cfg = config_with_concept_defaults({**base, **TE}, {})
    assert cfg.lora_module == "text_encoder" and config_with_concept_defaults(base, {}).lora_module == "unet"


def test_the_text_retain_term_holds_the_encoders_output_on_the_retain_prompts(tiny_model, pairs_dir, tmp_path, capsys):
    """--lam-text-retain: ‖E_θ(c_r) − E(c_r)‖² on the retain rows, zero while the LoRA is zero, then positive and in
    the loss; refused without a text-encoder LoRA (exit 2, nothing written)."""
    flags = dict(steps=3, keep="noise+retain", conditioning="concept", **TE)
    plain = metrics(run(tiny_model, pairs_dir, tmp_path / "plain", **flags))
    held_dir = run(tiny_model, pairs_dir, tmp_path / "held", lam_text_retain=1e4, **flags)
    held = metrics(held_dir)
    assert "| keep term | noise+retain, text-encoder retain λ 10000.0 |" in (held_dir / "README.md").read_text()
    assert "text_retain" not in plain[0] and held[0]["text_retain"] == pytest.approx(0.0, abs=1e-12)
    assert held[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)  # the same first step: LoRA B is zero
    assert held[1]["text_retain"] > 0 and held[1]["loss"] != pytest.approx(plain[1]["loss"], abs=1e-6)
    args = ["train", "--model", tiny_model, "--data", str(pairs_dir), "--out", str(tmp_path / "unet")]
    assert main([*args, "--keep", "noise+retain", "--lam-text-retain", "10"]) == 2
    assert "--lam-text-retain holds the output of a text-encoder LoRA" in capsys.readouterr().err
    assert not (tmp_path / "unet").exists()
