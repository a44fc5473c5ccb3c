"""`duo demo`: curate → train → generate → judge → report, on the Shapes world (or a tiny random model)."""

from __future__ import annotations

from pathlib import Path

from duo.cli.args import add_command, dataclass_from_args
from duo.demo import DemoConfig, run_demo


def add_parser(sub) -> None:
    add_command(
        sub,
        "demo",
        DemoConfig,
        run,
        help="run the whole DUO loop on the built-in Shapes world",
        description=__doc__.split(":", 1)[1].strip() + " Writes results.json and report.html "
        "in --out; a rerun resumes finished stages.",
    )


def run(args) -> int:
    results = run_demo(dataclass_from_args(DemoConfig, args))
    if "compare" in results:
        print((Path(args.out) / "compare" / "compare.md").read_text())
        print(f"report: {args.out}/compare/report.html ({results['seconds']} s)")
        return 0
    print(format_table(results))
    report = f", report: {args.out}/report.html" if results["world"] == "shapes" else ""
    print(f"\nresults: {args.out}/results.json{report}")
    return 0


def format_table(r: dict) -> str:
    if r["world"] != "shapes":
        c = r["mean_pixel_change"]
        return (
            f"tiny random world ({r['note']}), {r['seconds']} s\n"
            f"mean pixel change from the LoRA: concept prompt {c['concept']:.4f}, "
            f"neutral prompt {c['neutral']:.4f}"
        )
    a, o, c = r["attacks"]["prompts"], r["other_colours"], r["comparison"]
    rows = [(f"DSR, direct prompts (n={a['duo']['n']})", a["original"]["rate"], a["duo"]["rate"])]
    rows += [(f"  DSR, {word!r}", v["original"], v["duo"]) for word, v in a["per_word"].items()]
    for key, label in (("colour_accuracy", "colour"), ("shape_accuracy", "shape")):
        rows.append((f"{label} accuracy, other colours", o["original"][key], o["duo"][key]))
    # The comparison's rows (duo.compare.summarise over one seed): their means are the measured values.
    original, duo = ({row["label"]: row for row in c["rows"]}[label] for label in ("original", "DUO"))
    rows.append(("PP, 1 − LPIPS-style (duo evaluate)", original["pp"]["mean"], duo["pp"]["mean"]))
    rows.append(("FID vs original (judge features)", original["fid"]["mean"], duo["fid"]["mean"]))
    from duo.compare import column_name

    for name, cell in c["points"]["DUO"]["attacks"].items():
        label = f"DSR under {column_name(name)} (n={cell['n']})"
        rows.append((label, original["dsr"][name]["mean"], duo["dsr"][name]["mean"]))
    lines = [f"{'':40}{'original':>10}{'DUO':>10}"]
    lines += [f"{name:40}{x:>10.3f}{y:>10.3f}" for name, x, y in rows]
    lines.append(f"whole loop: {r['seconds']} s")
    return "\n".join(lines)
