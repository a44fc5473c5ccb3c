"""`duo report RUN...`: one self-contained HTML page from `duo evaluate` folders."""

from __future__ import annotations

from duo.report import build_report


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "report",
        help="one HTML page: summary, DSR-vs-PP figure per attack, image grids, provenance",
        description="Combine `duo evaluate` folders (one per β, baseline or seed) into one self-contained HTML "
        "file. All text is escaped; images are embedded; the page loads nothing from elsewhere.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="folders holding results.json from `duo evaluate`")
    parser.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    parser.add_argument("--title", default="duo-unlearn report", help="page title")
    parser.set_defaults(func=run)


def run(args) -> int:
    print(f"report: {build_report(args.runs, args.out, args.title)}")
    return 0
