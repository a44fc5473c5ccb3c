"""Robust DUO on a reduced Shapes run: adversarial training (soft-prompt inner attack, c∅ anchored) keeps red out
under Concept Inversion where plain DUO, trained on the same pairs with the same seed, lets it back.

The slow test trains both LoRAs and attacks them; the fast one attacks the two LoRAs that
`scripts/train_robust_test_loras.py` trained with exactly the slow test's settings (tests/assets/robust_ci/),
so `make test` pays for the attack only.
"""

from pathlib import Path

import pytest
import torch

from duo.attacks import run_attack
from duo.attacks.base import AttackConfig
from duo.train.api import resolve_config, train

# The robust study's first finalist (UNet LoRA, duo.shapes.world.DUO_ADV_UNET) over the shapes-red preset; fewer
# pairs and steps than the study. (make compare's DUO-adv row is now the text-encoder setting, DUO_ADV.)
ROBUST = {"adversarial": "soft-prompt", "adv_vectors": 5, "lam_uncond": 1e4}
STEPS, PAIRS = 250, 24
# Concept Inversion's small budget has 400 steps. DSR measured on these LoRAs (plain / robust, 1 thread): 200 steps
# over 8 images .75 / 1.00; 400 steps over 32 images .53 / 1.00; 800 steps .16 / .97 — the gap at half the cost.
CI_STEPS = 400
ASSETS = Path(__file__).parent / "assets" / "robust_ci"


@pytest.fixture(scope="module")
def reduced_pairs(tmp_path_factory):
    from duo.data.curate import CurateConfig, curate

    out = tmp_path_factory.mktemp("robust") / "pairs"
    curate(CurateConfig(model="shapes", concept="shapes-red", out=str(out), pairs=PAIRS, batch_size=PAIRS))
    return str(out)


def _concept_inversion_dsr(lora, out) -> float:
    # model and concept named: the shipped folders hold the LoRA and its card, not the lineage that names them
    cfg = AttackConfig(
        out=str(out), model="shapes", concept="shapes-red", lora=[str(lora)], n_prompts=4, images_per_prompt=8,
        threads=torch.get_num_threads(),
    )  # fmt: skip
    return run_attack("concept-inversion", cfg, train_steps=CI_STEPS)["dsr"]["rate"]


def _assert_robust_beats_plain(loras: dict, tmp_path) -> None:
    dsr = {name: _concept_inversion_dsr(lora, tmp_path / f"ci-{name}") for name, lora in loras.items()}
    print(dsr)
    assert dsr["robust"] >= dsr["plain"] + 0.25, dsr  # 8 of 32 images more


def test_shipped_robust_lora_holds_under_concept_inversion_where_plain_duo_does_not(tmp_path):
    _assert_robust_beats_plain({name: ASSETS / name for name in ("plain", "robust")}, tmp_path)


def test_shipped_loras_are_the_settings_of_the_slow_test():
    """The model cards the training script copied say the fast test attacks what the slow test trains."""
    plain, robust = ((ASSETS / name / "README.md").read_text() for name in ("plain", "robust"))
    for card in (plain, robust):
        assert f"| steps | {STEPS} |" in card and "| concept | shapes-red |" in card
    assert "| adversary | none |" in plain and "| adversary | soft-prompt: 5 vector(s)" in robust


@pytest.mark.slow
def test_adversarial_training_raises_dsr_under_concept_inversion(reduced_pairs, tmp_path):
    loras = {
        name: train(resolve_config(model="shapes", data=reduced_pairs, out=str(tmp_path / name), steps=STEPS, **flags))
        for name, flags in (("plain", {}), ("robust", ROBUST))
    }
    _assert_robust_beats_plain(loras, tmp_path)
