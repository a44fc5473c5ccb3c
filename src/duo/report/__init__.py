"""Reports: the summary table, the DSR-vs-PP figure and image grids of evaluation runs, as one HTML file."""

from __future__ import annotations

from pathlib import Path


def build_report(
    folders: list[str],
    out: str,
    title: str = "duo-unlearn report",
    summary: list[dict] | None = None,
    grid_folders: list[str] | None = None,
) -> Path:
    """One page over evaluation folders; `summary` (rows of duo.compare) adds the mean ± sd table and figure;
    `grid_folders` limits the image grids to those runs (default: every run)."""
    from duo.report.html import load_runs, write_report

    runs = load_runs(folders)
    if grid_folders is not None:
        keep = {str(Path(f)) for f in grid_folders}
        for run in runs:
            run["_grids"] = run["_folder"] in keep
    return write_report(Path(out), runs, title, summary)
