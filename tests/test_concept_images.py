"""The original model's concept images (Concept Inversion, relearn): drawn in batches, resumed exactly."""

import dataclasses
import json

import pytest
from test_gradient_attacks import make_ctx

from duo.attacks import concept_images as cimg
from duo.judges.base import Verdict


class EveryOther:
    """Sees the concept in every other image it is shown (counting across calls): some draws are rejected."""

    def __init__(self):
        self.seen = 0

    def judge(self, images, prompts):
        out = [Verdict(i % 2 == 0, 1.0) for i in range(self.seen, self.seen + len(images))]
        self.seen += len(images)
        return out


def _ctx(model, out, batch_size):
    ctx = make_ctx(model, out, judge=EveryOther())
    return dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, batch_size=batch_size))


def _folder(out):
    folder = out / cimg.FOLDER
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_drawn_in_batches_and_a_cut_batch_is_redrawn_whole(tiny_model, tmp_path, monkeypatch):
    calls = []
    whole = _ctx(tiny_model, tmp_path / "whole", 3)
    real = whole.family.text2image

    def counted(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(whole.family, "text2image", counted)
    images, prompts, prov = cimg.concept_images(whole, 3)
    assert calls == [3, 3]  # 3 kept of every other draw: draws 0-5 in two batches of 3
    assert len(images) == 3 and prov["n"] == 3 and prov["drawn"] == 6
    records = [json.loads(line) for line in (tmp_path / "whole" / cimg.FOLDER / "images.jsonl").open()]
    assert [r["draw"] for r in records] == list(range(6)) and [r["kept"] for r in records] == [True, False] * 3

    # A crash after the 4th image was recorded (inside the second batch): the rerun redraws that batch whole.
    cut = _ctx(tiny_model, tmp_path / "cut", 3)
    append = cimg.append_jsonl
    written = []

    def die_after_four(path, record):
        append(path, record)
        written.append(record)
        if len(written) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(cimg, "append_jsonl", die_after_four)
    with pytest.raises(KeyboardInterrupt):
        cimg.concept_images(cut, 3)
    monkeypatch.setattr(cimg, "append_jsonl", append)
    rerun = _ctx(tiny_model, tmp_path / "cut", 3)
    rerun.judge.seen = 3  # the judge's verdicts follow the draw number, as a real judge's follow the pixels
    _, _, again = cimg.concept_images(rerun, 3)
    assert again == prov and _folder(tmp_path / "cut") == _folder(tmp_path / "whole")
