"""Reports: the summary table, the DSR-vs-PP figure and image grids of evaluation runs, as one HTML file."""

from __future__ import annotations

from pathlib import Path


def build_report(
    folders: list[str], out: str, title: str = "duo-unlearn report", summary: list[dict] | None = None
) -> Path:
    """One page over evaluation folders; `summary` (rows of duo.compare) adds the mean ± sd table and figure."""
    from duo.report.html import load_runs, write_report

    return write_report(Path(out), load_runs(folders), title, summary)
