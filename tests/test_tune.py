"""`duo tune`: the β search against synthetic DSR(β)/PP(β) curves, then once end to end on Shapes, small."""

import json
import math

import pytest

from duo.cli.main import main
from duo.data.curate import CurateConfig, curate
from duo.errors import UserError
from duo.tune import Point, TuneConfig, choose, log_grid, next_beta, round_beta, search

FLOOR = 0.98


def curves(boundary: float = 18.0):
    """Shapes-like: DSR falls as β grows (1 at β 10, 0.2 at β 1000), PP rises with β and crosses FLOOR at
    `boundary`. The best feasible β is then `boundary` (the strongest erasure the floor allows). Returns
    measure(β) and the list of β it was called with.
    """
    calls = []

    def measure(beta):
        calls.append(beta)
        dsr = min(1.0, max(0.0, 1.0 - 0.4 * math.log10(beta / 10)))
        pp = FLOOR + 0.01 * math.log10(beta / boundary)
        return {"prompts": dsr, "unlearndiff": 0.9 * dsr}, pp

    return measure, calls


def test_grid_is_log_spaced_and_rounded():
    assert log_grid(10, 1000, 3) == [10, 100, 1000]
    assert log_grid(10, 1000, 4) == [10, 46, 220, 1000]
    assert round_beta(math.sqrt(10 * 100)) == 32


def test_finds_the_floor_boundary_within_budget():
    measure, calls = curves(boundary=18.0)
    result = search(measure, log_grid(10, 1000, 3), max_runs=8, min_pp=FLOOR)
    assert len(calls) <= 8 and len(calls) == len(set(calls)), "a β is never run twice"
    assert result.chosen.pp >= FLOOR
    # grid 10 (infeasible), 100, 1000; then 32, 18 (= the boundary), ... toward 10
    assert calls[:5] == [10, 100, 1000, 32, 18]
    assert result.chosen.beta == 18
    assert [p.stage for p in result.points][3:] == ["bisect"] * (len(calls) - 3)


def test_next_beta_follows_the_results_not_a_list():
    low = [Point(10, {"a": 1.0}, 0.97), Point(100, {"a": 0.6}, 0.99), Point(1000, {"a": 0.0}, 1.0)]
    assert next_beta(low, FLOOR) == (32, "")  # toward the infeasible point with the higher DSR
    # the same β with every point feasible and DSR flat at small β: more PP lies toward larger β
    flat = [Point(10, {"a": 1.0}, 0.985), Point(100, {"a": 1.0}, 0.99), Point(1000, {"a": 0.0}, 1.0)]
    assert next_beta(flat, FLOOR) == (320, "")


def test_never_exceeds_max_runs():
    for max_runs in (3, 4, 5):
        measure, calls = curves(boundary=13.0)
        result = search(measure, log_grid(10, 1000, 3), max_runs=max_runs, min_pp=FLOOR)
        assert len(calls) == max_runs and result.stopped.startswith("budget")
    measure, calls = curves()
    search(measure, log_grid(10, 1000, 5), max_runs=2, min_pp=FLOOR)  # a grid above the budget is cut
    assert len(calls) == 2


def test_stops_early_when_the_interval_is_exhausted():
    measure, calls = curves(boundary=18.0)
    result = search(measure, log_grid(10, 1000, 3), max_runs=50, min_pp=FLOOR)
    assert len(calls) < 10 and result.stopped.startswith("converged")
    assert len(calls) == len(set(calls))


def test_respects_the_floor_and_says_when_nothing_is_feasible():
    measure, calls = curves(boundary=5000.0)  # PP below the floor everywhere in 10..1000
    result = search(measure, log_grid(10, 1000, 3), max_runs=4, min_pp=FLOOR)
    assert result.chosen is None and len(calls) == 3, "no bisection without a feasible point to start from"
    assert "no β tried reaches PP" in result.stopped
    assert choose([Point(10, {"a": 1.0}, 0.9)], FLOOR) is None


def test_ties_go_to_the_larger_pp():
    points = [Point(10, {"a": 1.0, "b": 0.8}, 0.99), Point(20, {"a": 0.8, "b": 1.0}, 0.995)]
    assert choose(points, FLOOR).beta == 20  # same worst case (0.8): the larger PP
    assert choose([*points, Point(5, {"a": 0.9, "b": 0.9}, 0.97)], FLOOR).beta == 20  # infeasible never wins


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ({"min_pp": 1.5}, "--min-pp"),
        ({"attacks": ["nope"]}, "unknown"),
        ({"beta_min": 1000.0, "beta_max": 10.0}, "reversed"),
        ({"grid": 5, "max_runs": 4}, "--max-runs"),
    ],
)
def test_bad_config_refused_before_anything_loads(tmp_path, change, cause):
    cfg = TuneConfig(model="shapes", data=str(tmp_path / "none"), out=str(tmp_path / "t"), **change)
    with pytest.raises(UserError, match=cause):
        cfg.check()


def test_duo_tune_end_to_end_on_shapes(tmp_path, capsys):
    pairs, out = tmp_path / "pairs", tmp_path / "tune"
    curate(CurateConfig(model="shapes", concept="shapes-red", out=str(pairs), pairs=8, batch_size=8))
    argv = ["tune", "--model", "shapes", "--data", str(pairs), "--out", str(out), "--steps", "10"]
    argv += ["--n-prompts", "2", "--images-per-prompt", "1", "--eval-prompts", "2", "--min-pp", "0.5"]
    assert main([*argv, "--beta-min", "500", "--beta-max", "25"]) == 2
    assert "swap them" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--beta-min", "25", "--beta-max", "500", "--grid", "2", "--max-runs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| # | stage | β | DSR prompts (held-out) | worst DSR | PP | feasible |" in printed
    summary = json.loads((out / "tune.json").read_text())
    assert [p["beta"] for p in summary["points"]][:2] == [25, 500] and len(summary["points"]) == 2
    chosen = summary["chosen"]
    row = next(line for line in printed.splitlines() if "← chosen" in line)
    assert f"| {chosen['beta']:g} |" in row
    assert (out / "chosen" / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "chosen" / "checkpoints").exists()
    assert json.loads((out / "chosen" / "config.json").read_text())["beta"] == chosen["beta"]
    assert (out / chosen["source"] / "pytorch_lora_weights.safetensors").is_file()
    assert "Chosen: β=" in (out / "tune.md").read_text()
