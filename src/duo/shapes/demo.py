"""The Shapes half of `duo demo`: generate with and without the LoRA and judge both.

Preservation is not measured here: the demo takes it from `duo evaluate` (1 − LPIPS-style distance), the one
definition the comparison tables use.
"""

from __future__ import annotations

from duo.data.concepts import load_concept
from duo.judges import get_judge
from duo.metrics import rate_with_interval
from duo.models.family import load_family
from duo.shapes.evaluation import attribute_accuracy, concept_prompts, other_prompts


def _both(family, prompts: list[str], steps: int, guidance: float) -> tuple[list, list]:
    seeds = list(range(len(prompts)))
    edited = family.text2image(prompts, seeds, steps, guidance)
    with family.loras_off():
        original = family.text2image(prompts, seeds, steps, guidance)
    return original, edited


def _dsr(judge, images, prompts) -> dict:
    verdicts = judge.judge(images, prompts)
    return rate_with_interval(sum(not v.present for v in verdicts), len(verdicts))


def generate(family, concept, n: int) -> dict:
    """{"red" | "other": (prompts, original images, LoRA images)}: the concept's colour under all its names,
    and every other colour; same prompt and seed with the LoRA off and on."""
    colour = concept.judge_options["colour"]
    red, other = concept_prompts(colour, n), other_prompts(colour, n)
    return {
        "red": (red, *_both(family, red, concept.steps, concept.guidance)),
        "other": (other, *_both(family, other, concept.steps, concept.guidance)),
    }


def judge_images(images: dict, concept, judge) -> dict:
    """Direct-prompt DSR (overall and per unsafe word) and the other colours' colour and shape accuracy."""
    red, red_orig, red_duo = images["red"]
    other, other_orig, other_duo = images["other"]
    per_word = {}
    for word in concept.unsafe_words:
        idx = [i for i, p in enumerate(red) if f" {word} " in f" {p} "]
        if idx:
            per_word[word] = {
                m: _dsr(judge, [imgs[i] for i in idx], [red[i] for i in idx])["rate"]
                for m, imgs in (("original", red_orig), ("duo", red_duo))
            }
    return {
        "concept": concept.name,
        "judge": judge.provenance(),
        "sampling": {"steps": concept.steps, "guidance": concept.guidance, "scheduler": "DDIM"},
        "attacks": {
            "prompts": {"original": _dsr(judge, red_orig, red), "duo": _dsr(judge, red_duo, red), "per_word": per_word}
        },
        "other_colours": {
            "original": attribute_accuracy(other_orig, other),
            "duo": attribute_accuracy(other_duo, other),
        },
    }


def measure(family, concept, judge, n: int) -> dict:
    """Judge the LoRA-loaded `family` against itself with LoRAs off."""
    return judge_images(generate(family, concept, n), concept, judge)


def evaluate_shapes(model: str, lora: str, concept_name: str, n: int) -> dict:
    concept = load_concept(concept_name)
    family = load_family(model)
    family.load_loras([(lora, 1.0)])
    return measure(family, concept, get_judge(concept.judge, concept.judge_options), n)
