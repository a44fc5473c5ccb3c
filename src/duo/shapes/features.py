"""The Shapes world's measuring networks, both built from its judge: the stand-ins for Inception (FID) and
for LPIPS's VGG. Each says which network and which weights it used, like the metrics' own networks."""

from __future__ import annotations

from pathlib import Path

import torch

from duo.metrics.features import sha256_prefix
from duo.metrics.lpips import layer_distance


class ShapesFeatures:
    """The Shapes judge's penultimate ReLU features; images are resized to the judge's 32 px."""

    name = "shapes"

    def __init__(self, weights: str | Path | None = None) -> None:
        self.weights = Path(weights) if weights else None

    def net(self):
        from duo.shapes.judge import load_judge

        return load_judge(self.weights)

    def features(self, images) -> torch.Tensor:
        from duo.shapes.judge import features

        return features(images, self.net())

    def provenance(self) -> dict:
        from duo.shapes.judge import FEATURE_DIM, JUDGE_VERSION, default_weights

        path = self.weights or default_weights()
        return {
            "name": self.name,
            "network": f"Shapes judge {JUDGE_VERSION}, penultimate layer (fc + ReLU, {FEATURE_DIM}-d)",
            "input": "resized to 32x32, [0,1]",
            "weights": str(path),
            "sha256": sha256_prefix(path),
        }


class ShapesLpips:
    """The LPIPS recipe over the Shapes judge's own conv blocks (no learned heads: channels summed)."""

    name = "shapes-lpips"
    blocks = (0, 1, 3, 4, 6)  # indices in ShapesNet.body of the five conv-BN-ReLU blocks

    def __init__(self, weights: str | Path | None = None) -> None:
        self.weights = Path(weights) if weights else None

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        from duo.shapes.judge import load_judge, to_tensor

        h = (to_tensor(x) - 0.5) / 0.5  # the judge's own input normalisation
        out = []
        for i, layer in enumerate(load_judge(self.weights).body[: max(self.blocks) + 1]):
            h = layer(h)
            if i in self.blocks:
                out.append(h)
        return out

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        layers = [layer_distance(fa, fb) for fa, fb in zip(self.taps(a), self.taps(b))]
        return torch.stack(layers).mean(0)

    def provenance(self) -> dict:
        from duo.shapes.judge import JUDGE_VERSION, default_weights

        path = self.weights or default_weights()
        return {
            "name": self.name,
            "network": f"Shapes judge {JUDGE_VERSION}, intermediate features (body blocks {list(self.blocks)})",
            "mode": "intermediate-features",
            "recipe": "resize to 32 px; per block: unit-normalise channels, squared difference summed over "
            "channels, spatial mean; mean over blocks (range 0..2)",
            "weights": str(path),
            "sha256": sha256_prefix(path),
        }
