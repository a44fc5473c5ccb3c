"""`duo report`: one self-contained HTML page from evaluation runs.

Adversarial prompts are untrusted input: every string that reaches the page goes through `html.escape`,
images are embedded as PNG data URIs, and the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path

from PIL import Image

from duo.data.files import atomic_write_text
from duo.errors import UserError
from duo.report.plot import compare_figure, dsr_pp_figure

STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px} td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
    "text-align:left;vertical-align:top} .num{text-align:right;font-variant-numeric:tabular-nums} "
    "img.cell{image-rendering:pixelated} img.fig{max-width:100%} details{margin:.5em 0} code{font-size:90%}"
)


def load_runs(folders: list[str]) -> list[dict]:
    runs = []
    for folder in folders:
        path = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
        if not path.is_file():
            raise UserError(f"'{folder}' has no results.json; pass folders written by `duo evaluate`.")
        data = json.loads(path.read_text())
        if "attacks" not in data or "preservation" not in data:
            raise UserError(f"'{path}' is not a `duo evaluate` result (no attacks/preservation); run duo evaluate.")
        data["_folder"] = str(path.parent)
        runs.append(data)
    return runs


def write_report(
    out: Path, runs: list[dict], title: str = "duo-unlearn report", summary: list[dict] | None = None
) -> Path:
    attacks = list(dict.fromkeys(a for r in runs for a in r.get("attacks", {})))
    figure = base64.b64encode(dsr_pp_figure(runs, attacks)).decode() if attacks else ""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>",
        _comparison(summary, attacks) if summary else "",
        _summary(runs, attacks),
        f"<h2>DSR against preservation</h2><img class='fig' alt='DSR vs PP' src='data:image/png;base64,{figure}'>"
        if figure
        else "",
        *(_grids(run) for run in runs if run.get("_grids", True)),
        _provenance(runs),
        "</body></html>",
    ]
    atomic_write_text(out, "\n".join(parts))
    return out


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _summary(runs: list[dict], attacks: list[str]) -> str:
    head = "".join(f"<th>DSR {escape(a)}</th>" for a in attacks)
    rows = []
    for r in runs:
        cells = "".join(
            f"<td class='num'>{_fmt(r['attacks'].get(a, {}).get('dsr', {}).get('rate'))}</td>" for a in attacks
        )
        fid = (r.get("fid") or {}).get("original") or {}
        clip = ((r.get("clip_score") or {}).get("unlearned") or {}).get("x100")
        rows.append(
            f"<tr><td>{escape(str(r.get('label', '')))}</td><td>{escape(_method(r))}</td>{cells}"
            f"<td class='num'>{_fmt(r['preservation'].get('pp'))}</td><td class='num'>{_fmt(fid.get('fid'), 2)}</td>"
            f"<td class='num'>{_fmt(clip, 2)}</td></tr>"
        )
    return (
        "<h2>Summary</h2><table><tr><th>run</th><th>method</th>"
        f"{head}<th>PP</th><th>FID vs original</th><th>CLIP score ×100</th></tr>{''.join(rows)}</table>"
    )


def _comparison(rows: list[dict], attacks: list[str]) -> str:
    """Mean ± sd over seeds per method, and the figure of those means."""
    head = "".join(f"<th>DSR {escape(a)}</th>" for a in attacks)
    body = []
    for r in rows:
        cells = "".join(
            f"<td class='num'>{_fmt(r['dsr'][a]['mean'], 2)} ± {_fmt(r['dsr'][a]['sd'], 2)}</td>" for a in attacks
        )
        pp, fid = r["pp"], r["fid"]
        body.append(
            f"<tr><td>{escape(r['label'])}</td>{cells}<td class='num'>{_fmt(pp['mean'])} ± {_fmt(pp['sd'])}</td>"
            + (f"<td class='num'>{_fmt(fid['mean'], 1)} ± {_fmt(fid['sd'], 1)}</td></tr>" if fid else "<td>—</td></tr>")
        )
    figure = base64.b64encode(compare_figure(rows, attacks)).decode()
    seeds = max(r["n_seeds"] for r in rows)
    return (
        f"<h2>Comparison (mean ± sd over {seeds} seed(s))</h2><table><tr><th>method</th>{head}<th>PP</th>"
        f"<th>FID vs original</th></tr>{''.join(body)}</table>"
        f"<img class='fig' alt='mean DSR vs mean PP' src='data:image/png;base64,{figure}'>"
    )


def _method(run: dict) -> str:
    m = run.get("method", {})
    extra = ", ".join(f"{k} {v}" for k, v in m.items() if k != "name")
    return f"{m.get('name', '?')} ({extra})" if extra else str(m.get("name", "?"))


def _image(folder: str, rel: str | None, size: int = 96) -> str:
    if not rel:
        return ""
    path = Path(folder) / rel
    if not path.is_file():
        return "<em>missing</em>"
    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").resize((size, size), Image.NEAREST).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return f"<img class='cell' width='{size}' height='{size}' src='data:image/png;base64,{data}'>"


def _grids(run: dict) -> str:
    folder, sections = run["_folder"], []
    for name, rows in run.get("grids", {}).items():
        body = "".join(
            f"<tr><td>{escape(str(g.get('prompt', '')))}</td><td>{_image(folder, g.get('original'))}</td>"
            f"<td>{_image(folder, g.get('unlearned'))}</td></tr>"
            for g in rows
        )
        sections.append(
            f"<details open><summary>{escape(name)}</summary><table><tr><th>prompt</th><th>original</th>"
            f"<th>unlearned</th></tr>{body}</table></details>"
        )
    return f"<h2>Images: {escape(str(run.get('label', '')))}</h2>{''.join(sections)}" if sections else ""


def _provenance(runs: list[dict]) -> str:
    blocks = []
    for r in runs:
        keep = {k: v for k, v in r.items() if k not in ("grids", "_folder")}
        blocks.append(
            f"<details><summary>{escape(str(r.get('label', '')))}</summary>"
            f"{_lineage(r.get('_folder'))}<pre>{escape(json.dumps(keep, indent=2))}</pre></details>"
        )
    return "<h2>Provenance of every number</h2>" + "".join(blocks)


def _lineage(folder: str | None) -> str:
    """The folders a run's numbers came from, each with the kind of run that made it and its content hash."""
    from duo.runs import ancestors

    tree = ancestors(folder) if folder else {}
    return f"<p>Lineage (run folders it was built from):</p><ul>{_lineage_items(tree)}</ul>" if tree else ""


def _lineage_items(tree: dict) -> str:
    items = []
    for role, rec in tree.items():
        where = f"<code>{escape(rec['path'])}</code>"
        head = f"{escape(role)}: {escape(rec['kind'])} {where} sha256 {escape(rec['hash'][:12])}"
        inner = _lineage_items(rec.get("parents", {}))
        items.append(f"<li>{head}{f'<ul>{inner}</ul>' if inner else ''}</li>")
    return "".join(items)
