"""`duo train --method advunlearn` settings (no torch: the CLI builds its flags from them).

Defaults are the published ones: the README's command of OPTML-Group/AdvUnlearn (`--attack_init random
--attack_step 30 --retain_train reg --retain_loss_w 0.3 --train_method text_encoder_full`) on top of the training
script's argparse defaults. The method and every difference from the published code: duo.train.advunlearn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTACK_METHODS = ("pgd", "fast-at")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class AdvUnlearnConfig:
    """AdvUnlearn (Zhang et al., NeurIPS 2024): ESD's negative guidance on the text encoder, trained under a
    prefix attack refreshed as it trains, plus a retain term."""

    negative_guidance: float = _f(1.0, "η of the upper level's ESD target ε(c∅) − η·(ε(c) − ε(c∅))")
    unlearn_prompts: str = _f(
        "words",
        "the concept prompts c: each unsafe word alone (authors: the concept's name), or the pairs' unsafe prompts",
        choices=["words", "unsafe"],
    )
    retain_weight: float = _f(0.3, "weight of the retain term ‖ε_θ(x_t, c_r) − ε_ref(x_t, c_r)‖² (authors' README)")
    retain_batch: int = _f(5, "retain prompts per concept image (authors: 5 per step, with one concept image)")
    retain_from: str = _f(
        "neighbours",
        "retain prompts c_r: the concept's neighbours (authors: COCO object prompts), or the pairs' safe prompts",
        choices=["neighbours", "safe"],
    )
    attack_tokens: int = _f(1, "k, adversarial token vectors placed before the concept prompt")
    attack_steps: int = _f(30, "Adam steps of the inner attack per refresh")
    attack_lr: float = _f(1e-3, "learning rate of the inner attack")
    attack_init: str = _f(
        "random",
        "start of each refresh: random vocabulary tokens (README), or the latest vectors (the script's default)",
        choices=["random", "latest"],
    )
    attack_every: int = _f(1, "optimizer steps between refreshes of the adversarial prompt")
    attack_warmup: int = _f(200, "optimizer steps on the plain concept prompts before the first attack")
    attack_method: str = _f(
        "pgd",
        "pgd: Adam on the gradient (the authors' name; nothing is projected); fast-at: Adam on its sign",
        choices=list(ATTACK_METHODS),
    )


def advunlearn_checks(c) -> list[tuple[bool, str]]:
    return [
        (c.retain_weight >= 0, "--retain-weight must be ≥ 0"),
        (c.retain_batch >= 1, "--retain-batch must be ≥ 1"),
        (min(c.attack_tokens, c.attack_steps, c.attack_every) >= 1, "--attack-tokens/-steps/-every must be ≥ 1"),
        (c.attack_lr > 0, "--attack-lr must be positive"),
        (c.attack_warmup >= 0, "--attack-warmup must be ≥ 0"),
    ]
