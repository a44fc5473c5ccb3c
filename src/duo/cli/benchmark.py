"""`duo benchmark NAME`: a paper's protocol end to end — curate, train each β, every attack, evaluate, report."""

from __future__ import annotations

from duo.cli.args import add_dataclass_flags, dataclass_from_args


def add_parser(sub) -> None:
    from duo.benchmark import BenchmarkConfig
    from duo.benchmark_spec import BENCHMARKS

    known = "; ".join(f"{b.name}: {b.title}" for b in BENCHMARKS.values())
    parser = sub.add_parser(
        "benchmark",
        help="a paper's protocol in one resumable command (prints the estimated GPU time first)",
        description=f"Benchmarks: {known}. Curates the concept's pairs, trains DUO at each β of the paper's sweep "
        "(authors' recipe), runs every attack of the protocol at --budget paper against the original model and each "
        "β, evaluates (DSR per attack on --prompts-file, PP/FID/CLIP score on --coco-captions) and writes "
        "compare.md, report.html and benchmark.json (inputs by sha256). The plan and the estimated GPU time are "
        "printed before any work; a rerun resumes; a changed setting or input file is refused. Bad input exits 2 "
        "before anything is written.",
    )
    add_dataclass_flags(parser, BenchmarkConfig, positional=("name",))
    parser.set_defaults(func=run)


def run(args) -> int:
    from duo.benchmark import BenchmarkConfig, run_benchmark

    result = run_benchmark(dataclass_from_args(BenchmarkConfig, args), echo=lambda text: print(text, flush=True))
    for r in result["rows"]:
        dsr = ", ".join(f"{k} {v['mean']:.3f}" for k, v in r["dsr"].items())
        print(f"{r['label']}: PP {r['pp']['mean']:.3f}, DSR {dsr}")
    print(f"table: {result['table']}; report: {result['report']}")
    if result["dry_run"]:
        print("dry run: tiny sizes on this model, mechanics only; these numbers are not results.")
    return 0
