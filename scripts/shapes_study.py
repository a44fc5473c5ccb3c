"""The shapes-red study: which DUO settings erase red (and its synonyms) without touching other colours?

Each configuration is curated, trained and measured for every seed; rows go to RUN/results.jsonl (a rerun
skips finished rows) and the table, mean ± spread over seeds, to docs/shapes_study.md.

    .venv/bin/python scripts/shapes_study.py --plan screen --seeds 0            # one seed, every config
    .venv/bin/python scripts/shapes_study.py --plan final --seeds 0 1 2         # the short list, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALL_ATTENTION = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
CROSS_ATTENTION = r".*attn2\.(to_q|to_k|to_v|to_out\.0)$"
# Every knob the study touches is set in each row, so the concept file's own `train:` defaults never leak in.
PAPER = {
    "conditioning": "empty",
    "beta": 500.0,
    "keep": "noise",
    "steps": 500,
    "t_max": None,
    "lam_retain": None,
    "targets": None,
    "timesteps": "independent",
    "retain_prompts": "safe",
}
# name → (curation judge, training overrides). "judge none" = the unfiltered pairs of the paper's recipe.
CONFIGS = {
    "paper (unfiltered)": ("none", PAPER),
    "paper, filtered pairs": ("shapes", PAPER),
    "concept β50": ("shapes", {**PAPER, "conditioning": "concept", "beta": 50.0}),
    "concept β50 retain": ("shapes", {**PAPER, "conditioning": "concept", "beta": 50.0, "keep": "noise+retain"}),
    "concept β50 retain, all-attn": (
        "shapes",
        {**PAPER, "conditioning": "concept", "beta": 50.0, "keep": "noise+retain", "targets": ALL_ATTENTION},
    ),
    # SDEdit at 0.75 never trains t ≥ 750, where a 32-px image's colour is decided: open the range.
    "concept β50, t<1000": ("shapes", {**PAPER, "conditioning": "concept", "beta": 50.0, "t_max": 1000}),
    "concept β50 retain, all-attn, t<1000": (
        "shapes",
        {
            **PAPER,
            "conditioning": "concept",
            "beta": 50.0,
            "keep": "noise+retain",
            "targets": ALL_ATTENTION,
            "t_max": 1000,
        },
    ),
    "concept β100 retain, all-attn, t<1000": (
        "shapes",
        {
            **PAPER,
            "conditioning": "concept",
            "beta": 100.0,
            "keep": "noise+retain",
            "targets": ALL_ATTENTION,
            "t_max": 1000,
        },
    ),
    "mixed β50 retain, all-attn, t<1000": (
        "shapes",
        {
            **PAPER,
            "conditioning": "mixed",
            "beta": 50.0,
            "keep": "noise+retain",
            "targets": ALL_ATTENTION,
            "t_max": 1000,
        },
    ),
    "paper, filtered pairs, t<1000": ("shapes", {**PAPER, "t_max": 1000}),
    # Self-attention never sees the prompt, so a LoRA there cannot tell red prompts from others.
    "concept β50, all-attn": ("shapes", {**PAPER, "conditioning": "concept", "beta": 50.0, "targets": ALL_ATTENTION}),
    "concept β50, all-attn, t<1000": (
        "shapes",
        {**PAPER, "conditioning": "concept", "beta": 50.0, "targets": ALL_ATTENTION, "t_max": 1000},
    ),
    "concept β50, cross-attn, t<1000": (
        "shapes",
        {**PAPER, "conditioning": "concept", "beta": 50.0, "targets": CROSS_ATTENTION, "t_max": 1000},
    ),
    "concept β50 retain λr1e4, all-attn, t<1000": (
        "shapes",
        {
            **PAPER,
            "conditioning": "concept",
            "beta": 50.0,
            "keep": "noise+retain",
            "lam_retain": 1e4,
            "targets": ALL_ATTENTION,
            "t_max": 1000,
        },
    ),
    "concept β50 retain λr5e4, all-attn, t<1000": (
        "shapes",
        {
            **PAPER,
            "conditioning": "concept",
            "beta": 50.0,
            "keep": "noise+retain",
            "lam_retain": 5e4,
            "targets": ALL_ATTENTION,
            "t_max": 1000,
        },
    ),
    "concept β50 retain λr1e4, cross-attn, t<1000": (
        "shapes",
        {
            **PAPER,
            "conditioning": "concept",
            "beta": 50.0,
            "keep": "noise+retain",
            "lam_retain": 1e4,
            "targets": CROSS_ATTENTION,
            "t_max": 1000,
        },
    ),
}


def _retain(lam_retain: float, steps: int = 500, t_max: int | None = 1000, beta: float = 50.0, **extra) -> tuple:
    over = {
        **PAPER,
        "conditioning": "concept",
        "beta": beta,
        "keep": "noise+retain",
        "lam_retain": lam_retain,
        "targets": ALL_ATTENTION,
        "steps": steps,
        **extra,
    }
    if t_max:
        over["t_max"] = t_max
    return ("shapes", over)


CONFIGS.update(
    {
        "concept β50 retain λr3e3, all-attn, t<1000": _retain(3e3),
        "concept β50 retain λr1e3, all-attn, t<1000": _retain(1e3),
        "concept β50 retain λr1e4, all-attn, t<1000, 1000 steps": _retain(1e4, steps=1000),
        "concept β50 retain λr3e3, all-attn": _retain(3e3, t_max=None),
        "concept β50 retain-neighbours λr3e3, all-attn, t<1000": _retain(3e3, retain_prompts="neighbours"),
        "concept β100 retain λr3e3, all-attn, t<1000": _retain(3e3, beta=100.0),
        "mixed β50 retain λr1e3, all-attn, t<1000": _retain(1e3, conditioning="mixed"),
        "concept β50 retain λr1e3, all-attn, t<1000, shared t": _retain(1e3, timesteps="shared"),
        "concept β50 retain λr1e3, all-attn, t<1000, 250 steps": _retain(1e3, steps=250),
        "concept β25 retain λr1e3, all-attn, t<1000": _retain(1e3, beta=25.0),
        "concept β500 retain λr1e3, all-attn, t<1000": _retain(1e3, beta=500.0),
    }
)
# Ordered by what each row tells: the paper's recipe, then one lever changed at a time.
SCREEN = [
    "paper (unfiltered)",
    "paper, filtered pairs",
    "concept β50 retain, all-attn",
    "concept β50",
    "concept β50 retain",
    "concept β50, t<1000",
    "concept β50 retain, all-attn, t<1000",
    "concept β100 retain, all-attn, t<1000",
    "concept β50, all-attn",
    "concept β50, all-attn, t<1000",
    "concept β50, cross-attn, t<1000",
    "concept β50 retain λr1e4, all-attn, t<1000",
    "concept β50 retain λr5e4, all-attn, t<1000",
    "concept β50 retain λr3e3, all-attn, t<1000",
    "concept β50 retain λr1e3, all-attn, t<1000",
    "concept β50 retain λr1e4, all-attn, t<1000, 1000 steps",
    "concept β50 retain λr3e3, all-attn",
    "concept β50 retain-neighbours λr3e3, all-attn, t<1000",
    "concept β100 retain λr3e3, all-attn, t<1000",
    "concept β50 retain λr1e4, cross-attn, t<1000",
    "mixed β50 retain λr1e3, all-attn, t<1000",
    "concept β50 retain λr1e3, all-attn, t<1000, shared t",
    "concept β50 retain λr1e3, all-attn, t<1000, 250 steps",
    "concept β25 retain λr1e3, all-attn, t<1000",
    "concept β500 retain λr1e3, all-attn, t<1000",
    "mixed β50 retain, all-attn, t<1000",
    "paper, filtered pairs, t<1000",
]
PLANS = {"screen": SCREEN, "final": []}  # final: the short list, given by --configs


def run_one(name: str, seed: int, root: Path, n_eval: int) -> dict:
    from duo.data.concepts import load_concept
    from duo.data.curate import CurateConfig, curate
    from duo.judges import get_judge
    from duo.models.family import load_family
    from duo.shapes.demo import generate, judge_images
    from duo.shapes.evaluation import preservation
    from duo.train.api import resolve_config, train

    judge_name, overrides = CONFIGS[name]
    pairs = root / f"pairs-{judge_name}-seed{seed}"
    curate(
        CurateConfig(
            model="shapes",
            concept="shapes-red",
            out=str(pairs),
            seed=seed,
            judge=judge_name,
            batch_size=16,
            max_tries=40,
        )
    )
    lora = root / "loras" / f"{_slug(name)}-seed{seed}"
    started = time.perf_counter()
    train(resolve_config(model="shapes", data=str(pairs), out=str(lora), seed=seed, overwrite=True, **overrides))
    train_seconds = time.perf_counter() - started
    concept = load_concept("shapes-red")
    family = load_family("shapes")
    family.load_loras([(str(lora), 1.0)])
    images = generate(family, concept, n_eval)
    results = judge_images(images, concept, get_judge(concept.judge, concept.judge_options))
    a, o = results["attacks"]["prompts"], results["other_colours"]
    return {
        "config": name,
        "seed": seed,
        "judge": judge_name,
        "train": overrides,
        "train_seconds": round(train_seconds, 1),
        "dsr_original": a["original"]["rate"],
        "dsr": a["duo"]["rate"],
        "dsr_per_word": {w: v["duo"] for w, v in a["per_word"].items()},
        "colour_acc_original": o["original"]["colour_accuracy"],
        "colour_acc": o["duo"]["colour_accuracy"],
        "shape_acc_original": o["original"]["shape_accuracy"],
        "shape_acc": o["duo"]["shape_accuracy"],
        "pp": preservation(*images["other"][1:]),  # the study's PP: judge-feature cosine (docs/shapes_world.md)
        "n_eval": n_eval,
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def write_table(rows: list[dict], path: Path, command: str) -> None:
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        by_config.setdefault(r["config"], []).append(r)
    lines = [
        "| config | seeds | DSR direct | DSR red / crimson / scarlet | other-colour acc (orig → DUO) | "
        "shape acc (orig → DUO) | PP | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in by_config.items():
        words = " / ".join(
            _fmt([r["dsr_per_word"].get(w, float("nan")) for r in rs]) for w in ("red", "crimson", "scarlet")
        )
        lines.append(
            f"| {name} | {len(rs)} | {_fmt([r['dsr'] for r in rs])} (orig {_fmt([r['dsr_original'] for r in rs])}) "
            f"| {words} | {_fmt([r['colour_acc_original'] for r in rs])} → {_fmt([r['colour_acc'] for r in rs])} "
            f"| {_fmt([r['shape_acc_original'] for r in rs])} → {_fmt([r['shape_acc'] for r in rs])} "
            f"| {_fmt([r['pp'] for r in rs])} | {_fmt([r['train_seconds'] for r in rs])} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    note = (
        "\n\nMean ± half the range over seeds; n = 60 images per group (DSR: 20 per synonym; other colours: "
        "12 per colour), DDIM 20 steps, CFG 5, judge `shapes` (colour red, p ≥ 0.5). PP = 1 − cosine distance "
        "of judge features between original and DUO images of the same prompt and seed."
    )
    path.write_text("\n".join(lines) + note + f"\n\nRegenerate: `{command}`\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=list(PLANS), default="screen")
    p.add_argument("--configs", nargs="+", help="config names (default: the plan's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--run", default="runs/study")
    p.add_argument("--n-eval", type=int, default=60)
    p.add_argument("--table", default=None, help="markdown table to write (default docs/shapes_study_<plan>.md)")
    args = p.parse_args()
    names = args.configs or PLANS[args.plan]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; known: {list(CONFIGS)}")
    root = Path(args.run)
    root.mkdir(parents=True, exist_ok=True)
    results = root / "results.jsonl"
    done = (
        {(r["config"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())}
        if results.exists()
        else set()
    )
    for name in names:
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            row = run_one(name, seed, root, args.n_eval)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                json.dumps({k: row[k] for k in ("config", "seed", "dsr", "colour_acc", "shape_acc", "pp")}), flush=True
            )
    rows = [
        r for r in map(json.loads, results.read_text().splitlines()) if r["config"] in names and r["seed"] in args.seeds
    ]
    command = "python scripts/shapes_study.py " + " ".join(
        [f"--plan {args.plan}", "--seeds " + " ".join(map(str, args.seeds))]
        + (["--configs " + " ".join(repr(n) for n in args.configs)] if args.configs else [])
    )
    write_table(rows, Path(args.table or f"docs/shapes_study_{args.plan}.md"), command)


if __name__ == "__main__":
    main()
