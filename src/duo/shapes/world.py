"""The Shapes world as a duo.worlds.World: its judge measures everything, and its comparison is tuned here.

Everything heavy (torch, the judge's weights) is imported only when a network or metric is built, so the
registry can look this world up cheaply for any model.
"""

from __future__ import annotations

from duo.worlds import World


def _lpips(weights: str | None = None):
    from duo.shapes.features import ShapesLpips

    return ShapesLpips(weights)


def _features(weights: str | None = None):
    from duo.shapes.features import ShapesFeatures

    return ShapesFeatures(weights)


def _neutral_prompts(concept, n: int) -> list[str]:
    from duo.shapes.concept_judge import canonical
    from duo.shapes.evaluation import other_prompts

    # a colour concept must leave every other colour alone, a shape concept every other shape (in every colour);
    # a concept that names neither keeps red's prompts
    options = getattr(concept, "judge_options", None) or {}
    colour, shape = canonical("colour", options.get("colour")), canonical("shape", options.get("shape"))
    return other_prompts(colour if colour or shape else "red", n, shape)[:n]


def _alignment(images, prompts: list[str]) -> dict:
    from duo.shapes.evaluation import attribute_accuracy

    return attribute_accuracy(images, prompts)


# The comparison of the baselines issue, on Shapes. ESD conditions on the pairs' unsafe prompts (the word
# "red" alone barely moves the Shapes model: DSR ≤ 0.13) for 500 steps at two learning rates (1e-3 reaches
# DUO's direct-prompt DSR, 3e-4 keeps more); UCE maps each pair's unsafe prompt to its safe prompt (the
# authors' word-to-empty mapping reached DSR 0.34 here). docs/baselines.md has the measurements.
#
# AdvUnlearn: the authors' attack (1 token, 30 Adam steps at 1e-3, a random token to start) and retain term (0.3,
# 5 prompts per image; here the concept's neighbours) on a text-encoder LoRA at our lr 1e-4. Chosen on the training
# prompts: red rate 1.00 → 0.03, other colours kept; UnlearnDiffAtk (small, 8 × 2 images) DSR 0.94, against 0.50
# for the same training without the attack. Where it differs from the authors:
# - the pairs' unsafe prompts, not the word: "red" alone barely moves the Shapes model (300 plain steps left red
#   at 1.00; the prompts took it to 0.06), as ESD found;
# - 400 steps of which 300 warm-up (authors 1000 / 200): Shapes' 16-position encoder, trained on one grammar, reads
#   a prefixed prompt with every word shifted, so erasure learned under the prefix barely reaches the plain
#   prompt (100 warm-up + 200 attacked steps: red 1.00 plain, 0.06 with a prefix word); the plain prompt is
#   erased in warm-up, the attacked steps then cover the prefixed ones (0.00 both);
# - a fresh attack every 2nd step (authors: every step): an attack costs ~10 plain steps; 3–4 min at 1 thread.
ADVUNLEARN = {
    "method": "advunlearn",
    "unlearn_prompts": "unsafe",
    "steps": 400,
    "attack_warmup": 300,
    "attack_every": 2,
}
# The robust study's first finalist (docs/robust_duo.md), a UNet LoRA: a 5-vector soft-prompt adversary against the
# LoRA being trained, and the unconditional anchor that stops guidance from bringing red back through c∅.
DUO_ADV_UNET = {"adversarial": "soft-prompt", "adv_vectors": 5, "lam_uncond": 1e4}
# The same on a text-encoder LoRA, with a real-token (unlearndiff) adversary beside the soft-prompt one, both
# refreshed every 20 steps for 20 inner steps: the comparison's row of 2026-12-07 (every token-space attack held;
# Concept Inversion and soft prompts broke one seed of three).
DUO_ADV_TE_ALL = {
    **DUO_ADV_UNET,
    "adversarial": "soft-prompt+unlearndiff",
    "adv_rounds": "all",
    "adv_steps": 20,
    "adv_every": 20,
    "lora_on": "text-encoder",
}
# DUO-adv, the comparison's row since 2026-12-08: each pair under one adversary's prompt (the batch split between
# them: half the adversarial rows), the saving spent on 40 inner steps a round and 10 vectors, and the saved LoRA
# the moving average of its weights (decay 0.99) — docs/robust_duo.md, "Split, stronger, averaged".
DUO_ADV = {**DUO_ADV_TE_ALL, "adv_pairs": "split", "adv_steps": 40, "adv_vectors": 10, "ema_decay": 0.99}
METHODS = (
    {"label": "DUO β=25", "train": {"beta": 25.0}},
    {"label": "DUO β=50", "train": {"beta": 50.0}},
    {"label": "DUO β=100", "train": {"beta": 100.0}},
    {"label": "DUO β=500", "train": {"beta": 500.0}},  # the paper's β on the Shapes recipe (shapes-red.yaml)
    {"label": "DUO paper recipe", "train": {"recipe": "authors"}},  # every setting the authors', β 500 included
    {"label": "ESD-x", "train": {"method": "esd-x", "esd_prompts": "unsafe", "lr": 1e-3, "steps": 500}},
    {"label": "ESD-x lr 3e-4", "train": {"method": "esd-x", "esd_prompts": "unsafe", "lr": 3e-4, "steps": 500}},
    {"label": "ESD-u", "train": {"method": "esd-u", "esd_prompts": "unsafe", "lr": 1e-3, "steps": 500}},
    {"label": "UCE", "train": {"method": "uce", "uce_erase": "prompts"}},
    # its own folder: the earlier rows' points (UNet: duo-adv, text encoder every pair: duo-adv-te) differ
    {"label": "DUO-adv", "train": DUO_ADV, "folder": "duo-adv-te-split"},
    {"label": "AdvUnlearn", "train": ADVUNLEARN},
    {"label": "negative prompt", "guard": "negprompt"},
    {"label": "SLD-Max", "guard": "sld-max"},
    {"label": "original"},
)

SHAPES = World(
    name="shapes",
    model_ref="shapes",
    judge="shapes",
    lpips=_lpips,
    features=_features,
    neutral_prompts=_neutral_prompts,
    alignment=_alignment,
    alignment_definition="share of images whose colour / shape the Shapes judge reads as the prompt asks "
    "(the Shapes world's stand-in for CLIP score)",
    methods=METHODS,
)
