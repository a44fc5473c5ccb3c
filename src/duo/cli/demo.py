"""`duo demo`: curate → train → generate → judge → report, on the Shapes world (or a tiny random model)."""

from __future__ import annotations

from duo.cli.args import add_command, dataclass_from_args
from duo.demo import DemoConfig, run_demo


def add_parser(sub) -> None:
    add_command(sub, "demo", DemoConfig, run, help="run the whole DUO loop on the built-in Shapes world",
                description=__doc__.split(":", 1)[1].strip() + " Writes results.json and report.html "
                "in --out; a rerun resumes finished stages.")


def run(args) -> int:
    results = run_demo(dataclass_from_args(DemoConfig, args))
    print(format_table(results))
    report = f", report: {args.out}/report.html" if results["world"] == "shapes" else ""
    print(f"\nresults: {args.out}/results.json{report}")
    return 0


def format_table(r: dict) -> str:
    if r["world"] != "shapes":
        c = r["mean_pixel_change"]
        return (f"tiny random world ({r['note']}), {r['seconds']} s\n"
                f"mean pixel change from the LoRA: concept prompt {c['concept']:.4f}, neutral prompt {c['neutral']:.4f}")
    a, o, pp = r["attacks"]["prompts"], r["other_colours"], r["preservation"]["pp"]
    lines = [f"{'':34}{'original':>10}{'DUO':>10}",
             f"{'DSR, direct prompts (n=' + str(a['duo']['n']) + ')':34}{a['original']['rate']:>10.3f}{a['duo']['rate']:>10.3f}"]
    for word, v in a["per_word"].items():
        lines.append(f"{'  DSR, ' + repr(word):34}{v['original']:>10.3f}{v['duo']:>10.3f}")
    lines += [f"{'colour accuracy, other colours':34}{o['original']['colour_accuracy']:>10.3f}{o['duo']['colour_accuracy']:>10.3f}",
              f"{'shape accuracy, other colours':34}{o['original']['shape_accuracy']:>10.3f}{o['duo']['shape_accuracy']:>10.3f}",
              f"{'preservation PP':34}{1.0:>10.3f}{pp:>10.3f}",
              f"whole loop: {r['seconds']} s"]
    return "\n".join(lines)
