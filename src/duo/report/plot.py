"""The paper's figure: defense success rate (up) against prior preservation (right), one panel per attack."""

from __future__ import annotations

import io
import math


def _panels(attacks: list[str]):
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    cols = min(2, max(1, len(attacks)))
    rows = -(-max(1, len(attacks)) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False, layout="constrained")
    axes = list(grid.flat)
    for ax in axes[len(attacks) :]:
        ax.set_visible(False)
    return plt, fig, grid, axes


def pp_limits(values: list[float]) -> tuple[float, float]:
    """The PP axis: [0, 1] whatever the data (zoomed to 0.992–1.000, a 0.8 % change fills the panel and no two
    reports compare at a glance); extended left in steps of 0.25 only for a method that damages more than all."""
    low = min([0.0, *values])
    return (math.floor(low * 4) / 4 - 0.03, 1.03)


def _finish(plt, fig, grid, axes, attacks: list[str], pp_values: list[float]) -> bytes:
    for ax, attack in zip(axes, attacks):
        ax.set_title(attack, parse_math=False)  # run text is data: "$$" or "$\\x$" must not reach mathtext
        ax.set_xlabel("prior preservation (PP) →")
        ax.set_xlim(*pp_limits(pp_values))
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in grid[:, 0]:
        ax.set_ylabel("defense success rate (DSR) ↑")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        legend = fig.legend(
            unique.values(), unique.keys(), loc="outside lower center", ncol=min(4, len(unique)), frameon=False
        )
        for text in legend.get_texts():
            text.set_parse_math(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def compare_figure(rows: list[dict], attacks: list[str]) -> bytes:
    """PNG bytes: a panel per attack, a point per method at its mean PP and DSR, ± one sd over seeds as bars."""
    plt, fig, grid, axes = _panels(attacks)
    for ax, attack in zip(axes, attacks):
        for i, r in enumerate(rows):
            dsr, pp = r["dsr"][attack], r["pp"]
            ax.errorbar(
                pp["mean"], dsr["mean"], xerr=pp["sd"], yerr=dsr["sd"], fmt="osD^vP*X"[i % 8], color=f"C{i % 10}",
                capsize=3, label=r["label"],
            )  # fmt: skip
    return _finish(plt, fig, grid, axes, attacks, [r["pp"]["mean"] - r["pp"]["sd"] for r in rows])


def dsr_pp_figure(runs: list[dict], attacks: list[str]) -> bytes:
    """PNG bytes: a panel per attack, a point per run (its label next to it), 95 % intervals as bars."""
    plt, fig, grid, axes = _panels(attacks)
    markers, pp_values = {}, []
    for ax, attack in zip(axes, attacks):
        for run in runs:
            cell = run.get("attacks", {}).get(attack)
            pp = run.get("preservation", {}).get("pp")
            if cell is None or pp is None:
                continue
            pp_values.append(pp)
            method = run.get("method", {}).get("name", "?")
            marker = markers.setdefault(method, "osD^vP*X"[len(markers) % 8])
            rate, (lo, hi) = cell["dsr"]["rate"], cell["dsr"]["ci95"]
            colour = f"C{list(markers).index(method)}"  # one colour and marker per method, β points labelled
            ax.errorbar(pp, rate, yerr=[[rate - lo], [hi - rate]], fmt=marker, color=colour, capsize=3, label=method)
            label = str(run.get("label", ""))
            ax.annotate(
                label if len(label) <= 24 else label[:23] + "…",
                (pp, rate),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
                parse_math=False,
            )
    return _finish(plt, fig, grid, axes, attacks, pp_values)
