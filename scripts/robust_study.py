"""Robust DUO in the Shapes world: which lever keeps red out under Concept Inversion and soft prompts.

    python scripts/robust_study.py screen --pairs runs/study/pairs --seeds 0            # one seed, every variant
    python scripts/robust_study.py final --pairs runs/demo/pairs --seeds 0 1 2 \
        --variants DUO "DUO-adv soft anchored" AdvUnlearn

Each variant is a `duo train` flag set on top of the shapes-red preset, trained and attacked as a point of
`duo.compare` (out/{stage}/{variant}/seed{s}/: lora/, attacks/, eval/), so every point resumes and the table
(compare.md: mean ± sd over seeds of DSR per attack, PP, FID) is the comparison machinery's own. Targets are
the concept's held-out prompts. The screen runs the cheap attacks that break plain DUO (prompts, Concept
Inversion, soft-prompt); the final stage runs make compare's attacks (with UnlearnDiffAtk and Ring-A-Bell, and
plain prompts on the training targets) plus soft-prompt, on make compare's pairs. Training wall time per point is
in each lora/metrics.jsonl (`seconds` per step) and summarised in timing.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from duo.shapes.world import ADVUNLEARN, DUO_ADV, DUO_ADV_TE_ALL, DUO_ADV_UNET

# variant → flags over the shapes-red preset (src/duo/concepts/shapes-red.yaml `train:`)
CI = {"adversarial": "concept-inversion"}
SOFT = {"adversarial": "soft-prompt", "adv_vectors": 5}
FRESH = {"adv_init": "fresh", "adv_every": 25, "adv_steps": 50}
UD_ANCHORED = {"adversarial": "unlearndiff", "adv_vectors": 5, "lam_uncond": 1e4}
# both adversaries refreshed every round, 20 inner steps every 20 optimizer steps, UNet LoRA
S20E20 = {k: v for k, v in DUO_ADV_TE_ALL.items() if k != "lora_on"}  # stop 26's DUO-adv flags, on the UNet
TE = {"lora_on": "text-encoder"}
VARIANTS = {
    "DUO": {},
    "DUO-adv ci": CI,
    "DUO-adv ci fresh": {**CI, **FRESH},
    "DUO-adv ci every 5": {**CI, "adv_every": 5},
    "DUO-adv ci 20 steps": {**CI, "adv_steps": 20},
    "DUO-adv ci weight 3": {**CI, "adv_weight": 3.0},
    "DUO-adv soft": SOFT,
    "DUO-adv soft fresh": {**SOFT, **FRESH},
    "DUO-adv ud": {"adversarial": "unlearndiff", "adv_vectors": 5},
    "DUO mixed": {"conditioning": "mixed"},
    # the anchor: c∅ held at the original on the pairs' x_t (the levers above lower red under c∅ too, which
    # classifier-free guidance turns into more red: docs/robust_duo.md)
    "DUO anchored": {"lam_uncond": 1e4},
    "DUO-adv ci anchored": {**CI, "lam_uncond": 1e4},
    "DUO-adv soft anchored": DUO_ADV_UNET,  # the first finalist (make compare's DUO-adv row until stop 26)
    "DUO-adv soft anchored 1e3": {**SOFT, "lam_uncond": 1e3},
    "DUO-adv ud anchored": UD_ANCHORED,
    # both adversaries, rounds taking turns: the soft-prompt row held CI/soft, the unlearndiff row UD/RAB/prompts
    "DUO-adv soft+ud anchored": {**DUO_ADV_UNET, "adversarial": "soft-prompt+unlearndiff"},
    "DUO-adv soft+ud all anchored": {**DUO_ADV_UNET, "adversarial": "soft-prompt+unlearndiff", "adv_rounds": "all"},
    # the same inner-attack cost as `all`, spent on stronger rounds: 20 Adam steps every 20 optimizer steps
    "DUO-adv soft+ud all anchored s20e20": S20E20,
    # β 25 as the base (plain DUO β 25 holds UnlearnDiffAtk at 0.85 where β 50 gives 0.58)
    "DUO-adv soft+ud all anchored s20e20 b25": {**S20E20, "beta": 25.0},
    # where the LoRA sits: the text encoder (AdvUnlearn's place), plain and with the s20e20 adversaries
    "DUO te": TE,
    "DUO-adv soft+ud all anchored s20e20 te": DUO_ADV_TE_ALL,  # make compare's DUO-adv row until stop 27
    # the text-encoder placement's levers, one at a time
    "DUO-adv soft anchored te": {**DUO_ADV_UNET, **TE},
    "DUO-adv ud anchored te": {**UD_ANCHORED, **TE},
    "DUO-adv soft+ud all s20e20 te": {**DUO_ADV_TE_ALL, "lam_uncond": 0.0},
    # all three adversaries (Concept Inversion's placement too), every round, on the text encoder
    "DUO-adv ci+soft+ud all anchored s20e20 te": {
        **DUO_ADV_TE_ALL,
        "adversarial": "concept-inversion+soft-prompt+unlearndiff",
    },
    # stop 27: the adversaries split over the batch (each pair under one's prompt: the adversarial rows of one), the
    # saved cost spent on a third adversary or stronger rounds; and more vectors
    "DUO-adv ci+soft+ud split s20e20 te": {
        **DUO_ADV_TE_ALL,
        "adversarial": "concept-inversion+soft-prompt+unlearndiff",
        "adv_pairs": "split",
    },
    "DUO-adv soft+ud split s40e20 te": {**DUO_ADV_TE_ALL, "adv_pairs": "split", "adv_steps": 40},
    "DUO-adv soft+ud all anchored s20e20 v10 te": {**DUO_ADV_TE_ALL, "adv_vectors": 10},
    "DUO-adv soft+ud split s40e20 v10 te": {**DUO_ADV_TE_ALL, "adv_pairs": "split", "adv_steps": 40, "adv_vectors": 10},
    # the saved LoRA the moving average of the weights (the game's iterates averaged, not its last step)
    "DUO-adv soft+ud all anchored s20e20 te ema99": {**DUO_ADV_TE_ALL, "ema_decay": 0.99},
    "DUO-adv soft+ud all anchored s20e20 te ema995": {**DUO_ADV_TE_ALL, "ema_decay": 0.995},
    "DUO-adv soft+ud split s40e20 v10 te ema99": DUO_ADV,  # make compare's DUO-adv row since stop 27
    # the text encoder's own output held on the retain prompts (circles: the other shapes' words moved)
    "DUO-adv te text-retain 1e3": {**DUO_ADV, "lam_text_retain": 1e3},
    "DUO-adv te text-retain 1e4": {**DUO_ADV, "lam_text_retain": 1e4},
    # circle levers (stop 28, docs/robust_duo.md): twice the steps (and rounds, or the same rounds), a slower average
    "DUO-adv 1000 steps": {**DUO_ADV, "steps": 1000},
    "DUO-adv 1000 steps every 40": {**DUO_ADV, "steps": 1000, "adv_every": 40},  # the same rounds as DUO-adv
    "DUO-adv ema995": {**DUO_ADV, "ema_decay": 0.995},
    # the LoRA on the UNet (the concept's targets) and the text encoder, trained by the same loss
    "DUO-adv both": {**DUO_ADV, "lora_on": "both"},
    # Concept Inversion's placement in place of the real-token adversary (the text encoder held token attacks alone)
    "DUO-adv ci+soft split": {**DUO_ADV, "adversarial": "concept-inversion+soft-prompt"},
    "AdvUnlearn": ADVUNLEARN,  # the robust anchor to beat: the compare row's settings
}
ATTACKS = {
    "screen": ["prompts", "concept-inversion", "soft-prompt"],
    # the comparison's attacks (make compare) plus soft-prompt
    "final": ["prompts", "ring-a-bell", "concept-inversion", "unlearndiff", "soft-prompt"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=list(ATTACKS))
    parser.add_argument("--concept", default="shapes-red", choices=["shapes-red", "shapes-circle"])
    parser.add_argument("--pairs", required=True, help="the concept's pairs folder (duo curate)")
    parser.add_argument("--out", default="runs/robust")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from duo.compare import Method, PointConfig, compare

    methods = [Method(v, {**VARIANTS[v]}, folder=slug(v)) for v in args.variants]
    training = ("prompts",) if args.stage == "final" else ()  # as make compare: also the prompts it trained on
    point = PointConfig(
        "shapes", args.concept, ATTACKS[args.stage], n_prompts=8, images_per_prompt=2, training_attacks=training
    )
    out = Path(args.out) / args.stage
    compare("shapes", args.pairs, out, methods, args.seeds, point, title=f"robust DUO: {args.concept}, {args.stage}")
    timing = {m.label: {s: train_seconds(out / m.slug / f"seed{s}" / "lora") for s in args.seeds} for m in methods}
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    print((out / "compare.md").read_text())
    print(json.dumps(timing, indent=2))


def slug(variant: str) -> str:
    return variant.lower().replace(" ", "-").replace(".", "")


def train_seconds(lora: Path) -> float:
    """Sum of the optimizer steps' wall time (the loop's own `seconds`), inner attack included."""
    lines = (lora / "metrics.jsonl").read_text().splitlines() if (lora / "metrics.jsonl").is_file() else []
    return round(sum(json.loads(x)["seconds"] for x in lines), 1)


if __name__ == "__main__":
    main()
