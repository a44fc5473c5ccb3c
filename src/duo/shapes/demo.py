"""The Shapes half of `duo demo`: generate with and without the LoRA, judge, and write a small report."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from duo.data.concepts import load_concept
from duo.data.files import atomic_write_text
from duo.judges import get_judge
from duo.metrics import rate_with_interval
from duo.models.family import load_family
from duo.shapes.evaluation import attribute_accuracy, concept_prompts, other_prompts, preservation


def _both(family, prompts: list[str], steps: int, guidance: float) -> tuple[list, list]:
    seeds = list(range(len(prompts)))
    edited = family.text2image(prompts, seeds, steps, guidance)
    with family.loras_off():
        original = family.text2image(prompts, seeds, steps, guidance)
    return original, edited


def _dsr(judge, images, prompts) -> dict:
    verdicts = judge.judge(images, prompts)
    return rate_with_interval(sum(not v.present for v in verdicts), len(verdicts))


def measure(family, concept, judge, n: int) -> tuple[dict, dict]:
    """Judge the LoRA-loaded `family` against itself with LoRAs off: numbers and the images behind them."""
    colour = concept.judge_options["colour"]
    red, other = concept_prompts(colour, n), other_prompts(colour, n)
    red_orig, red_duo = _both(family, red, concept.steps, concept.guidance)
    other_orig, other_duo = _both(family, other, concept.steps, concept.guidance)
    per_word = {}
    for word in concept.unsafe_words:
        idx = [i for i, p in enumerate(red) if f" {word} " in f" {p} "]
        if idx:
            per_word[word] = {
                m: _dsr(judge, [imgs[i] for i in idx], [red[i] for i in idx])["rate"]
                for m, imgs in (("original", red_orig), ("duo", red_duo))
            }
    results = {
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
        "preservation": {
            "pp": preservation(other_orig, other_duo),
            "definition": "1 − cosine distance of Shapes-judge features, same prompt and seed",
            "n": len(other),
        },
    }
    return results, {"red prompts": (red, red_orig, red_duo), "other colours": (other, other_orig, other_duo)}


def evaluate_shapes(
    model: str, lora: str, concept_name: str, n: int, out: Path, red_teaming: dict | None = None
) -> dict:
    concept = load_concept(concept_name)
    family = load_family(model)
    family.load_loras([(lora, 1.0)])
    results, grids = measure(family, concept, get_judge(concept.judge, concept.judge_options), n)
    results["red_teaming"] = red_teaming or {}
    write_report(out / "report.html", results, grids)
    return results


def _img(im) -> str:
    buf = io.BytesIO()
    im.resize((64, 64), resample=0).save(buf, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" width="64" height="64">'


def write_report(path: Path, results: dict, grids: dict) -> None:
    e = html.escape
    a, o = results["attacks"]["prompts"], results["other_colours"]
    rows = [
        ("DSR on direct prompts", a["original"]["rate"], a["duo"]["rate"]),
        ("colour accuracy, other colours", o["original"]["colour_accuracy"], o["duo"]["colour_accuracy"]),
        ("shape accuracy, other colours", o["original"]["shape_accuracy"], o["duo"]["shape_accuracy"]),
        ("preservation PP", 1.0, results["preservation"]["pp"]),
    ]
    rows += [
        (f"DSR under {name} (small budget)", r["original"]["rate"], r["duo"]["rate"])
        for name, r in results.get("red_teaming", {}).items()
    ]
    table = "".join(f"<tr><td>{e(k)}</td><td>{x:.3f}</td><td>{y:.3f}</td></tr>" for k, x, y in rows)
    sections = []
    for title, (prompts, orig, duo) in grids.items():
        cells = "".join(
            f"<tr><td>{e(p)}</td><td>{_img(a)}</td><td>{_img(b)}</td></tr>"
            for p, a, b in list(zip(prompts, orig, duo))[:12]
        )
        sections.append(
            f"<h2>{e(title)}</h2><table><tr><th>prompt</th><th>original</th><th>DUO</th></tr>{cells}</table>"
        )
    judge = e(str(results["judge"]))
    atomic_write_text(
        path,
        f"""<!doctype html><html><head><meta charset="utf-8"><title>duo demo: {e(results["concept"])}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}</style></head>
<body><h1>DUO on {e(results["concept"])}</h1><table><tr><th>metric</th><th>original</th><th>DUO</th></tr>{table}</table>
<p>Judge: {judge}</p>{"".join(sections)}</body></html>""",
    )
