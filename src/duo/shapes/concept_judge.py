"""The `shapes` judge: the Shapes world's classifier behind the project's Judge interface (duo.judges).

It lives with the world rather than in duo.judges so that the judges layer knows no world; duo.judges
finds it by name, lazily.

ShapesJudge(colour="red") says the concept is present when the classifier's probability of colour red
is >= threshold; ShapesJudge(shape="circle") likewise for a shape (both given: both must hold, the
score is the smaller probability). `matches_prompt` is whether the predicted colour and shape equal
what the prompt asks for (attributes the prompt does not mention are ignored).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from duo.errors import UserError
from duo.judges.base import Verdict
from duo.shapes.judge import HEADS, JUDGE_VERSION, classify, load_judge
from duo.shapes.render import COLOURS, SHAPES, parse_prompt


def canonical(kind: str, value: str | None) -> str | None:
    if value is None:
        return None
    v = str(value).strip().lower()
    if kind == "colour":
        for name, words in COLOURS.items():
            if v in words:
                return name
        raise UserError(
            f"Unknown shapes colour {value!r} in judge_options; use one of {', '.join(COLOURS)} (or a synonym)."
        )
    if kind == "shape":
        if v.endswith("s") and v[:-1] in SHAPES:
            v = v[:-1]
        if v == "crosse":
            v = "cross"
        if v not in SHAPES:
            raise UserError(f"Unknown shapes shape {value!r} in judge_options; use one of {', '.join(SHAPES)}.")
        return v
    raise AssertionError(kind)


class ShapesJudge:
    name = "shapes"
    version = JUDGE_VERSION

    def __init__(
        self,
        colour: str | None = None,
        shape: str | None = None,
        threshold: float = 0.5,
        weights: str | None = None,
        color: str | None = None,
        **unknown,
    ) -> None:
        if unknown:
            raise UserError(
                f"Unknown option(s) for the shapes judge: {', '.join(sorted(unknown))}; "
                "it takes colour, shape, threshold, weights."
            )
        colour = colour if colour is not None else color
        self.colour = canonical("colour", colour)
        self.shape = canonical("shape", shape)
        if self.colour is None and self.shape is None:
            raise UserError(
                "The shapes judge needs a target: set judge_options to e.g. {colour: red} or {shape: circle}."
            )
        try:
            self.threshold = float(threshold)
        except (TypeError, ValueError):
            raise UserError(f"shapes judge threshold must be a number, got {threshold!r}.") from None
        self.weights = weights
        self.classes = [c for c in (self.colour, self.shape) if c]

    def _net(self):
        return load_judge(Path(self.weights) if self.weights else None)

    def judge(self, images: list[Image.Image], prompts: list[str]) -> list[Verdict]:
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        preds = classify(images, self._net())
        out = []
        for i, p in enumerate(preds):
            scores = []
            if self.colour:
                scores.append(p["colour_probs"][self.colour])
            if self.shape:
                scores.append(p["shape_probs"][self.shape])
            score = min(scores)
            matches = None
            if prompts is not None:
                asked = parse_prompt(prompts[i] or "")
                checks = [p[k] == asked[k] for k in ("colour", "shape") if asked[k] is not None]
                matches = all(checks) if checks else None
            details = {k: p[k] for k in HEADS}
            details.update({f"p_{k}": p[f"{k}_probs"][p[k]] for k in HEADS})
            out.append(
                Verdict(present=score >= self.threshold, score=float(score), matches_prompt=matches, details=details)
            )
        return out

    def provenance(self) -> dict:
        from duo.shapes import _sha256
        from duo.shapes.judge import default_weights

        path = Path(self.weights) if self.weights else default_weights()
        return {
            "name": self.name,
            "version": self.version,
            "classes": self.classes,
            "threshold": self.threshold,
            "weights": str(path),
            "sha256": _sha256(path) if path.is_file() else None,
            "target": {"colour": self.colour, "shape": self.shape},
        }
