"""AdvUnlearn through `duo train --method advunlearn`: its loss by hand, a text-encoder LoRA that diffusers and
`load_loras` read identically, an inner attack that works, an exact resume, and on Shapes less red."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from duo.errors import UserError
from duo.objectives import advunlearn_loss
from duo.train.api import LORA_FILE, resolve_config, train
from duo.train.config import TrainConfig

# Short runs on the tiny model: the test concept has no unsafe_words, so its pairs' prompts are the concept's.
TINY = {"method": "advunlearn", "unlearn_prompts": "unsafe", "attack_warmup": 1, "attack_steps": 2, "lr": 1e-2}
PROMPT = "a naked white woman, realistic photo"


def test_loss_is_esd_under_the_adversarial_prompt_plus_the_weighted_retain_term():
    g = torch.Generator().manual_seed(0)
    p, c, u = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    pr, er = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    eta, w = 1.5, 0.3
    loss, unlearn, retain = advunlearn_loss(p, c, u, eta, pr, er, w)
    by_hand_unlearn = ((p - (u - eta * (c - u))) ** 2).mean()
    by_hand_retain = ((pr - er) ** 2).mean()
    torch.testing.assert_close(unlearn, by_hand_unlearn)
    torch.testing.assert_close(retain, by_hand_retain)
    torch.testing.assert_close(loss, by_hand_unlearn + w * by_hand_retain)
    # no retain rows (or weight 0): the ESD part alone
    alone, _, zero = advunlearn_loss(p, c, u, eta)
    assert zero.item() == 0.0 and alone.item() == pytest.approx(by_hand_unlearn.item())
    # the targets are the frozen model's: no gradient reaches them
    c.requires_grad_(True), er.requires_grad_(True), pr.requires_grad_(True)
    advunlearn_loss(p, c, u, eta, pr, er, w)[0].backward()
    assert c.grad is None and er.grad is None and pr.grad is not None


def test_flags_of_other_methods_are_refused_both_ways():
    base = {"model": "m", "data": "d", "out": "o"}
    with pytest.raises(UserError, match="--attack-steps applies to --method advunlearn"):
        TrainConfig(**base, method="esd-x", attack_steps=3).validate()
    with pytest.raises(UserError, match="--retain-weight applies to --method advunlearn"):
        TrainConfig(**base, retain_weight=1.0).validate()
    with pytest.raises(UserError, match="--beta applies to --method duo"):
        TrainConfig(**base, method="advunlearn", beta=10.0).validate()
    with pytest.raises(UserError, match="--eta applies to --method esd-u / esd-x"):
        TrainConfig(**base, method="advunlearn", eta=2.0).validate()
    with pytest.raises(UserError, match="--attack-tokens/-steps/-every must be ≥ 1"):
        TrainConfig(**base, method="advunlearn", attack_steps=0).validate()
    cfg = TrainConfig(**base, method="advunlearn", attack_steps=3, retain_weight=0.5, steps=10)
    cfg.validate()
    assert cfg.resolved_lr == 1e-4 and cfg.spec.module == "text_encoder"


def _encode(family, text=PROMPT):
    with torch.no_grad():
        return family.encode_ids(family.tokenize([text]))


def test_text_encoder_lora_loads_the_same_in_diffusers_and_load_loras(tiny_model, pairs_dir, tmp_path):
    """α ≠ r on purpose: the file must carry the scale, or a loader that assumes α = r reads another LoRA."""
    from diffusers import StableDiffusionPipeline

    from duo.models.family import load_family, load_with_loras
    from duo.models.lora import attach_lora, set_lora_state
    from duo.train.checkpoint import latest_checkpoint, load_checkpoint

    out = train(resolve_config(model=tiny_model, data=pairs_dir, out=str(tmp_path / "a"), steps=3, rank=4, alpha=8.0,
                               checkpoint_every=3, **TINY))  # fmt: skip
    keys = load_file(Path(out) / LORA_FILE).keys()
    assert keys and all(k.startswith("text_encoder.") for k in keys)
    layers = {k.split(".lora")[0].split(".")[-1] for k in keys}
    assert layers == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}

    trained = load_family(tiny_model)  # the raw checkpoint state, on an adapter with the run's α and r
    attach_lora(trained.text_encoders[0], 4, 8.0, trained.lora_targets("advunlearn"))
    set_lora_state(trained.text_encoders[0], load_checkpoint(latest_checkpoint(Path(out)))[1])
    ours = load_with_loras(tiny_model, [str(out)])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    ids = ours.tokenize([PROMPT]).cpu()
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(out))
        plain = pipe.text_encoder(ids)[0]
    assert (plain - _encode(ours)).abs().max() <= 1e-5
    assert (plain - _encode(trained)).abs().max() <= 1e-5
    assert (plain - base).abs().max() > 1e-3
    with ours.loras_off():
        assert (_encode(ours) - base).abs().max() <= 1e-5


def _attack_objective(method, vectors, d, idx):
    fam = method.family
    x_t, t = method._noised(idx, torch.Generator().manual_seed(5))
    with torch.no_grad(), method.slots.hooked():
        method.slots.vectors = vectors
        pred = fam.denoise(fam.unet, x_t, t, fam.encode_ids(method.adv_ids[d.prompt_index]))
        target = fam.denoise(fam.unet, x_t, t, method.emb_prompts[d.prompt_index])
    return ((pred - target) ** 2).mean().item()


def test_inner_attack_moves_the_vectors_toward_the_concept_prediction(tiny_model, pairs_dir):
    from accelerate import Accelerator

    from duo.data.pairs import load_pairs
    from duo.models.family import load_family
    from duo.models.lora import attach_lora, lora_parameters
    from duo.seeds import derive_seed
    from duo.train.advunlearn import AdvUnlearnMethod

    family, pairs = load_family(tiny_model), load_pairs(pairs_dir)
    encoder = family.text_encoders[0]
    attach_lora(encoder, 4, 4.0, family.lora_targets("advunlearn"))
    with torch.no_grad():  # a LoRA that changed the encoder, so there is something to bring back
        for p in lora_parameters(encoder):
            p.normal_(0, 0.3)
    cfg = TrainConfig(model=tiny_model, data=pairs_dir, out="x", **{**TINY, "attack_steps": 30, "attack_lr": 5e-2})
    method = AdvUnlearnMethod(cfg, family, pairs, "cpu")
    assert lora_parameters(encoder)  # placeholder tokens must not freeze the LoRA
    d = method.draw(0, 4)
    start = method._initial_vectors(torch.Generator().manual_seed(derive_seed(cfg.seed, "advunlearn-attack", 0)))
    vectors, last = method.attack(d, 0, Accelerator(cpu=True))
    idx = d.pair_index
    assert _attack_objective(method, vectors, d, idx) < 0.8 * _attack_objective(method, start, d, idx)
    assert last.item() > 0 and all(p.grad is None for p in lora_parameters(encoder))


def _run(tiny_model, pairs_dir, out, steps, **kw):
    flags = {**TINY, "attack_every": 2, "attack_init": "latest", "checkpoint_every": 2, **kw}
    return train(resolve_config(model=tiny_model, data=pairs_dir, out=str(out), steps=steps, **flags))


def test_train_end_to_end_and_resume_gives_the_same_lora_bytes(tiny_model, pairs_dir, tmp_path):
    """Resumed at step 2, between refreshes: the vectors of step 1 must come back from the checkpoint."""
    straight = _run(tiny_model, pairs_dir, tmp_path / "straight", 4)
    metrics = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["attack"] == 0.0 and all(m["attack"] > 0 for m in metrics[1:])  # warm-up, then attacked
    assert all(m["retain"] > 0 for m in metrics[1:])
    assert "AdvUnlearn" in (straight / "README.md").read_text()
    half = tmp_path / "halves"
    _run(tiny_model, pairs_dir, half, 2)
    _run(tiny_model, pairs_dir, half, 4, resume=True)
    assert (half / LORA_FILE).read_bytes() == (straight / LORA_FILE).read_bytes()
    resumed = [json.loads(x) for x in (half / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in metrics]


# ---- Shapes: the compare row's settings, on the prompts it trained on -------------------------------------


@pytest.mark.slow
def test_shapes_row_lowers_red_on_its_training_prompts(tmp_path):
    from duo.data.concepts import load_concept
    from duo.data.curate import CurateConfig, curate
    from duo.data.splits import split_prompts
    from duo.judges import get_judge
    from duo.models.family import load_with_loras
    from duo.shapes.world import METHODS

    row = next(m for m in METHODS if m["label"] == "AdvUnlearn")
    pairs = tmp_path / "pairs"
    torch.set_num_threads(1)
    curate(CurateConfig(model="shapes", concept="shapes-red", out=str(pairs)))
    out = train(resolve_config(model="shapes", data=str(pairs), out=str(tmp_path / "lora"), threads=1, **row["train"]))

    concept = load_concept("shapes-red")
    prompts = [p for p, _ in split_prompts(concept, "training", 0)[0][:16]] * 2  # what the row was chosen on

    def red_rate(loras):
        family = load_with_loras("shapes", loras, threads=1)
        images = family.text2image(prompts, list(range(len(prompts))), concept.steps, concept.guidance)
        return sum(v.present for v in get_judge(concept.judge, concept.judge_options).judge(images, prompts)) / 32

    before, after = red_rate(None), red_rate([str(out)])
    assert before >= 0.9 and after <= before - 0.5
