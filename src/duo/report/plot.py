"""The paper's figure: defense success rate (up) against prior preservation (right), one panel per attack."""

from __future__ import annotations

import io


def dsr_pp_figure(runs: list[dict], attacks: list[str]) -> bytes:
    """PNG bytes: a panel per attack, a point per run (its label next to it), 95 % intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    cols = min(2, max(1, len(attacks)))
    rows = -(-max(1, len(attacks)) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False, layout="constrained")
    axes = [list(grid.flat)]
    for ax in axes[0][len(attacks) :]:
        ax.set_visible(False)
    markers = {}
    for ax, attack in zip(axes[0], attacks):
        for run in runs:
            cell = run.get("attacks", {}).get(attack)
            pp = run.get("preservation", {}).get("pp")
            if cell is None or pp is None:
                continue
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
            )
        ax.set_title(attack)
        ax.set_xlabel("prior preservation (PP) →")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in grid[:, 0]:
        ax.set_ylabel("defense success rate (DSR) ↑")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncol=len(unique), frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
