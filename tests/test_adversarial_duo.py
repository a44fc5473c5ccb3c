"""Adversarial DUO (`duo train --adversarial`): the inner attack, its placement, resume, and what stays unchanged."""

import json

import pytest
import torch
from test_train_tiny import assert_same_weights, lora_weights

from duo.errors import UserError
from duo.train.adversary import adversarial_texts
from duo.train.api import resolve_config, train
from duo.train.config import TrainConfig

ADV = dict(adversarial="concept-inversion", adv_every=2, adv_steps=2, adv_batch=2)


def run(model, data, out, **kw):
    return train(resolve_config(model=model, data=data, out=str(out), **kw))


def metrics(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_placement_of_the_vectors():
    prompts = ["a red circle on a black background", "a Crimson star", "a square"]
    words = ["red", "crimson"]
    assert adversarial_texts("concept-inversion", prompts, words, "<s0> <s1>") == [
        "a <s0> <s1> circle on a black background",
        "a <s0> <s1> star",
        "<s0> <s1> a square",
    ]
    assert adversarial_texts("soft-prompt", prompts, words, "<s0>") == [
        "<s0> a circle on a black background",
        "<s0> a star",
        "<s0> a square",
    ]
    assert adversarial_texts("unlearndiff", prompts[:1], words, "<s0>") == ["<s0> a red circle on a black background"]


def test_unlearndiff_adversary_conditions_on_real_tokens(tiny_model, pairs_dir):
    """After a round, the adversarial conditioning is exactly the prompt with the prefix's tokens written out:
    the inner attack moved continuous vectors, but only their nearest tokens ever reach the text encoder."""
    from duo.data.pairs import load_pairs
    from duo.models.family import load_family
    from duo.train.adversary import Adversary

    cfg = resolve_config(model=tiny_model, data=pairs_dir, out="unused", **{**ADV, "adversarial": "unlearndiff"})
    family = load_family(tiny_model, device="cpu")
    pairs = load_pairs(pairs_dir)
    mean, std = family.encode_images(pairs.unsafe_images, pairs.resolution)
    adv = Adversary(cfg, family, pairs, mean, std, "cpu", "unlearndiff")
    start = adv.vectors.detach().clone()
    adv.refresh(family.unet, step=0)
    assert not torch.equal(start, adv.vectors)
    ids = adv.ids.clone()
    for slot, token in zip(adv.slots.ids, adv.prefix_ids()):
        ids[ids == slot] = token
    written = family.encode_ids(ids)
    torch.testing.assert_close(adv.emb, written, rtol=0, atol=1e-5)


def test_resume_is_exact_with_the_inner_attack(tiny_model, pairs_dir, tmp_path):
    # steps 3 and 6 are checkpoints; a round at steps 0, 2, 4 means the resume lands between two rounds.
    straight = run(tiny_model, pairs_dir, tmp_path / "straight", steps=6, checkpoint_every=3, **ADV)
    half = tmp_path / "halves"
    run(tiny_model, pairs_dir, half, steps=3, checkpoint_every=3, **ADV)
    run(tiny_model, pairs_dir, half, steps=6, checkpoint_every=3, resume=True, **ADV)
    assert_same_weights(lora_weights(straight), lora_weights(half))
    assert [m["adv_loss"] for m in metrics(straight)] == [m["adv_loss"] for m in metrics(half)]


def test_the_adversary_changes_training_and_moves_only_its_vectors(tiny_model, pairs_dir, tmp_path, monkeypatch):
    from duo.train import adversary

    rounds = []
    original = adversary.Adversary.refresh

    def spy(self, policy, step):
        lora_before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
        vectors_before = self.vectors.detach().clone()
        original(self, policy, step)
        lora_after = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
        rounds.append((step, vectors_before, self.vectors.detach().clone(), lora_before, lora_after))
        assert all(p.grad is None or not p.grad.abs().sum() for p in policy.parameters() if p.requires_grad)

    monkeypatch.setattr(adversary.Adversary, "refresh", spy)
    plain = run(tiny_model, pairs_dir, tmp_path / "plain", steps=4)
    adv = run(tiny_model, pairs_dir, tmp_path / "adv", steps=4, **ADV)
    assert [r[0] for r in rounds] == [0, 2]
    for _, v0, v1, l0, l1 in rounds:
        assert not torch.equal(v0, v1)  # the attack learned something
        assert all(torch.equal(a, b) for a, b in zip(l0, l1))  # and the LoRA did not move during it
    a, b = lora_weights(plain), lora_weights(adv)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(m["adv_loss"] > 0 and m["adv_pref"] > 0 for m in metrics(adv))
    # the model card says which LoRA was trained robustly, and how
    assert "| adversary | concept-inversion: 3 vector(s), 2 steps" in (adv / "README.md").read_text()
    assert "| adversary | none |" in (plain / "README.md").read_text()


def test_two_adversaries_take_turns_and_resume_exactly(tiny_model, pairs_dir, tmp_path, monkeypatch):
    """soft-prompt+unlearndiff: round k refreshes adversary k mod 2 (one round's cost per round), each with its own
    placeholders; both adversaries' rows enter the loss; a resume between their rounds continues exactly."""
    from duo.train import adversary

    rounds = []
    original = adversary.Adversary.refresh

    def spy(self, policy, step):
        rounds.append((self.kind, step, tuple(self.slots.ids)))
        original(self, policy, step)

    monkeypatch.setattr(adversary.Adversary, "refresh", spy)
    both = {**ADV, "adversarial": "soft-prompt+unlearndiff", "adv_every": 1}
    straight = run(tiny_model, pairs_dir, tmp_path / "straight", steps=4, checkpoint_every=3, **both)
    assert [(kind, step) for kind, step, _ in rounds] == [
        ("soft-prompt", 0), ("unlearndiff", 1), ("soft-prompt", 2), ("unlearndiff", 3)
    ]  # fmt: skip
    assert not set(rounds[0][2]) & set(rounds[1][2])
    single = run(tiny_model, pairs_dir, tmp_path / "single", steps=4, **{**both, "adversarial": "soft-prompt"})
    assert [m["adv_pref"] for m in metrics(single)] != [m["adv_pref"] for m in metrics(straight)]
    half = tmp_path / "halves"
    run(tiny_model, pairs_dir, half, steps=3, checkpoint_every=3, **both)
    run(tiny_model, pairs_dir, half, steps=4, checkpoint_every=3, resume=True, **both)
    assert_same_weights(lora_weights(straight), lora_weights(half))
    assert [m["loss"] for m in metrics(straight)] == [m["loss"] for m in metrics(half)]
    assert "soft-prompt+unlearndiff (rounds take turns)" in (straight / "README.md").read_text()
    rounds.clear()  # --adv-rounds all: every adversary each round
    every = run(tiny_model, pairs_dir, tmp_path / "all", steps=2, **{**both, "adv_rounds": "all"})
    assert [(kind, step) for kind, step, _ in rounds] == [
        ("soft-prompt", 0), ("unlearndiff", 0), ("soft-prompt", 1), ("unlearndiff", 1)
    ]  # fmt: skip
    assert "(all refreshed each round)" in (every / "README.md").read_text()


def test_fresh_rounds_restart_and_persistent_rounds_continue(tiny_model, pairs_dir, tmp_path, monkeypatch):
    from duo.train import adversary

    starts, ends = {}, {}
    original = adversary.Adversary._loss

    def spy(self, policy, g):
        key = (self.cfg.adv_init, len(ends.get(self.cfg.adv_init, [])))
        starts.setdefault(key, self.vectors.detach().clone())
        return original(self, policy, g)

    original_refresh = adversary.Adversary.refresh

    def spy_refresh(self, policy, step):
        original_refresh(self, policy, step)
        ends.setdefault(self.cfg.adv_init, []).append(self.vectors.detach().clone())

    monkeypatch.setattr(adversary.Adversary, "_loss", spy)
    monkeypatch.setattr(adversary.Adversary, "refresh", spy_refresh)
    for init in ("persistent", "fresh"):
        run(tiny_model, pairs_dir, tmp_path / init, steps=4, **{**ADV, "adv_init": init})
    assert torch.equal(starts[("persistent", 1)], ends["persistent"][0])
    assert not torch.equal(starts[("fresh", 1)], ends["fresh"][0])
    assert not torch.equal(starts[("fresh", 0)], starts[("fresh", 1)])


def test_plain_duo_is_unchanged_by_the_feature(tiny_model, pairs_dir, tmp_path):
    """--adversarial none builds no inner attack and logs no adv_loss."""
    a = run(tiny_model, pairs_dir, tmp_path / "a", steps=2)
    assert "adv_loss" not in metrics(a)[0]


def _uncond_drift(model, data, lora) -> float:
    """Mean ‖ε_θ − ε_ref‖² under c∅ on the pairs' noised unsafe images (fixed draws)."""
    from duo.data.pairs import load_pairs
    from duo.models.family import load_with_loras
    from duo.models.lora import adapters_disabled

    family = load_with_loras(model, [str(lora)])
    pairs = load_pairs(data)
    mean, std = family.encode_images(pairs.unsafe_images, pairs.resolution)
    g = torch.Generator().manual_seed(0)
    x0 = family.latents_from_distribution(mean, std, torch.randn(mean.shape, generator=g))
    t = torch.randint(0, family.num_train_timesteps, (len(mean),), generator=g)
    x_t = family.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    empty = family.encode_prompts([""]).expand(len(mean), -1, -1)
    with torch.no_grad():
        policy = family.denoise(family.unet, x_t, t, empty)
        with adapters_disabled(family.unet):
            reference = family.denoise(family.unet, x_t, t, empty)
    return float(((policy - reference) ** 2).mean())


def test_the_unconditional_anchor_holds_the_empty_branch(tiny_model, pairs_dir, tmp_path):
    """Mixed conditioning trains c∅ directly; the anchor must pull it back toward the original (the keep term is
    off so that only the anchor holds c∅; measured on the tiny model: drift ×0.04 at λ_u 1e5)."""
    flags = dict(steps=6, conditioning="mixed", lr=1e-3, lam=0.0, **ADV)
    free = run(tiny_model, pairs_dir, tmp_path / "free", **flags)
    held = run(tiny_model, pairs_dir, tmp_path / "held", lam_uncond=1e5, **flags)
    logged = [m["uncond"] for m in metrics(held)]
    assert logged[0] == 0.0 and max(logged) > 0  # the LoRA starts as the original: no drift at step 1
    assert "uncond" not in metrics(free)[0]
    assert _uncond_drift(tiny_model, pairs_dir, held) < 0.25 * _uncond_drift(tiny_model, pairs_dir, free)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"lam_uncond": 1.0, "conditioning": "empty"}, "--lam-uncond anchors"),
        ({"lam_uncond": -1.0, "conditioning": "concept"}, "--lam-uncond must be"),
        ({"adv_steps": 5}, "only apply with --adversarial"),
        ({"adversarial": "soft-prompt", "adv_weight": 0.0}, "--adv-weight"),
        ({"adversarial": "soft-prompt", "adv_init": "warm"}, "--adv-init must be one of"),
        ({"adversarial": "unknown"}, "--adversarial must be none or one or more"),
        ({"adversarial": "soft-prompt+soft-prompt"}, "each once"),
        ({"adversarial": "none+soft-prompt"}, "--adversarial must be none or one or more"),
        ({"adversarial": "soft-prompt", "adv_lr": -1.0}, "--adv-lr"),
    ],
)
def test_bad_adversary_flags_are_refused_before_loading(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(model="nowhere", data="nowhere", out=str(tmp_path / "x"), **flags).validate()


def test_a_concept_file_sets_the_adversary_and_an_explicit_none_turns_it_off(tmp_path):
    from duo.train.api import config_with_concept_defaults

    section = {"adversarial": "soft-prompt", "adv_vectors": 5, "adv_every": 20, "lam_uncond": 1e4}
    section["conditioning"] = "concept"
    base = {"model": "m", "data": "d", "out": str(tmp_path / "x")}
    cfg = config_with_concept_defaults(base, section)
    assert (cfg.adversarial, cfg.adv_vectors, cfg.adv_every, cfg.lam_uncond) == ("soft-prompt", 5, 20, 1e4)
    plain = config_with_concept_defaults({**base, "adversarial": "none"}, section)
    plain.validate()  # no "--adv-vectors only apply with --adversarial": the section's knobs went with it
    assert (plain.adversarial, plain.adv_vectors, plain.adv_every, plain.lam_uncond) == ("none", 3, 10, 1e4)
