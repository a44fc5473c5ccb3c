"""`duo sweep` on Shapes, small: each β trains with coupled lr/λ, is attacked and evaluated, one report."""

import json

import pytest

from duo.data.curate import CurateConfig, curate
from duo.errors import UserError
from duo.sweep import SweepConfig, sweep


def test_small_sweep_on_shapes(tmp_path):
    pairs = tmp_path / "pairs"
    curate(CurateConfig(model="shapes", concept="shapes-red", out=str(pairs), pairs=8, batch_size=8))
    cfg = SweepConfig(
        model="shapes", data=str(pairs), out=str(tmp_path / "sweep"), betas=[25, 500], steps=30,
        n_prompts=4, images_per_prompt=1, eval_prompts=6,
    )  # fmt: skip
    rows = sweep(cfg)
    assert [r["label"] for r in rows] == ["β=25", "β=500"]
    assert all(r["n_seeds"] == 1 and 0 <= r["pp"]["mean"] <= 1 for r in rows)
    for b in (25, 500):
        evaluation = json.loads((tmp_path / "sweep" / f"beta{b}" / "seed0" / "eval" / "results.json").read_text())
        assert evaluation["attacks"]["prompts"]["dsr"]["n"] == 4
    configs = [
        json.loads((tmp_path / "sweep" / f"beta{b}" / "seed0" / "lora" / "config.json").read_text()) for b in (25, 500)
    ]
    assert [c["beta"] for c in configs] == [25, 500]
    assert configs[0]["resolved_lr"] == pytest.approx(20 * configs[1]["resolved_lr"])  # lr = base_lr·100/β
    page = (tmp_path / "sweep" / "report.html").read_text()
    assert "β=25" in page and "β=500" in page and page.count("data:image/png;base64,") > 2
    assert "| β=25 |" in (tmp_path / "sweep" / "compare.md").read_text()
    with pytest.raises(UserError, match="positive"):
        sweep(SweepConfig(model="shapes", data=str(pairs), out=str(tmp_path / "x"), betas=[0]))
