"""The Shapes judge: a small CNN reading colour, shape and background of a 32x32 image.

It is the Shapes world's stand-in for NudeNet (is the concept there?), for CLIP score (does the image
show what the prompt asked?) and, through `features`, for the feature network of FID- and LPIPS-style
distances. Trained on clean renders with blur/brightness/noise augmentation, then fine-tuned on a mix
of clean renders and their reconstructions through the trained VAE (generated images are VAE decodes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from duo.shapes.render import ALL_COMBOS, BACKGROUNDS, COLOURS, SHAPES, SIZE, render_dataset

COLOUR_NAMES = list(COLOURS)
HEADS = {"colour": COLOUR_NAMES, "shape": list(SHAPES), "background": list(BACKGROUNDS)}
FEATURE_DIM = 128
JUDGE_VERSION = "shapes-judge-1"
FINETUNE_RECONSTRUCTIONS = 12_000  # renders reconstructed through the VAE for fine-tuning


class ShapesNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(3, 32),
            block(32, 32),
            nn.MaxPool2d(2),  # 16
            block(32, 64),
            block(64, 64),
            nn.MaxPool2d(2),  # 8
            block(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(128, FEATURE_DIM), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, len(v)) for k, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, 32, 32] in [0, 1]."""
        return self.fc(self.body((x - 0.5) / 0.5))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


def _labels(scenes) -> dict[str, torch.Tensor]:
    return {
        "colour": torch.tensor([COLOUR_NAMES.index(s.colour) for s in scenes]),
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        "background": torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
    }


def to_tensor(images) -> torch.Tensor:
    """PIL images, a uint8 array [N,H,W,3] or a float tensor [N,3,H,W] in [0,1] -> [N,3,32,32] in [0,1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.dim() == 3:
            x = x[None]
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0
    else:
        arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
        if not arrs:
            return torch.zeros(0, 3, SIZE, SIZE)
        if len({a.shape for a in arrs}) > 1:
            arrs = [
                np.asarray(
                    Image.fromarray((a * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32
                )
                / 255.0
                for a in arrs
            ]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, brightness and noise, each on a random part of the batch."""
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    x = x * (1 - mix) + blur * mix
    bright = 1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.3
    x = x * bright
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.06
    x = x + torch.randn(x.shape, generator=g) * sigma
    return x.clamp(0, 1)


def _step(net, opt, x, y) -> float:
    out = net(x)
    loss = sum(F.cross_entropy(out[k], y[k]) for k in HEADS)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(net: ShapesNet, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    net.eval()
    correct = {k: 0 for k in HEADS}
    for i in range(0, len(x), 500):
        out = net(x[i : i + 500])
        for k in HEADS:
            correct[k] += int((out[k].argmax(1) == y[k][i : i + 500]).sum())
    return {k: correct[k] / len(x) for k in HEADS}


def _rendered(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes, imgs = render_dataset(n, seed=seed, combos=ALL_COMBOS)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0, _labels(scenes)


def _pretrain(net: ShapesNet, x, y, steps: int, batch: int, g: torch.Generator, log, t0: float) -> None:
    """Clean renders under augmentation, one-cycle schedule."""
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=max(0.1, 3.0 / steps))
    for step in range(steps):
        net.train()
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = _step(net, opt, augment(x[idx], g), {k: v[idx] for k, v in y.items()})
        sched.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log(f"judge step {step + 1}/{steps} loss {loss:.4f} ({time.time() - t0:.0f}s)")


def _finetune(net: ShapesNet, x, y, rec, n_rec: int, steps: int, batch: int, g, log, t0: float) -> None:
    """Half augmented clean renders, half VAE reconstructions of the first n_rec renders, per batch."""
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    half = batch // 2
    for step in range(steps):
        net.train()
        i1 = torch.randint(0, len(x), (half,), generator=g)
        i2 = torch.randint(0, n_rec, (half,), generator=g)
        xb = torch.cat([augment(x[i1], g), rec[i2]])
        yb = {k: torch.cat([v[i1], v[i2]]) for k, v in y.items()}
        loss = _step(net, opt, xb, yb)
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            log(f"judge fine-tune step {step + 1}/{steps} loss {loss:.4f} ({time.time() - t0:.0f}s)")


@torch.no_grad()
def _reconstructions(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
    """Reconstructions of x's first n images in batches of 256; the last batch may run past n (the shipped
    judge was trained so, and a batch's size can change a convolution's last bits on CPU)."""
    return torch.cat([reconstruct(x[i : i + 256]) for i in range(0, n, 256)]).clamp(0, 1)


def save_judge(net: ShapesNet, out_path: str | Path, scores: dict, seed: int) -> None:
    from safetensors.torch import save_file

    net.eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    # one metadata key: safetensors writes several keys in varying order, one keeps the file bytes stable
    meta = {
        "duo": json.dumps({"version": JUDGE_VERSION, "heads": HEADS, "accuracy": scores, "seed": seed}, sort_keys=True)
    }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(out_path)


def train_judge(
    out_path: str | Path,
    seed: int = 0,
    steps: int = 1500,
    finetune_steps: int = 600,
    batch: int = 128,
    n_images: int = 30000,
    reconstruct: Callable[[torch.Tensor], torch.Tensor] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the judge; write safetensors weights to out_path; return accuracies.

    reconstruct: maps images [N,3,32,32] in [0,1] to their VAE reconstructions; when given, the judge
    is fine-tuned on a 50/50 mix of clean renders and reconstructions.
    """
    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = _rendered(n_images, 10_000 + seed)
    vx, vy = _rendered(1500, 20_000 + seed)
    net = ShapesNet()
    _pretrain(net, x, y, steps, batch, g, log, t0)
    result = {"clean": accuracy(net, vx, vy)}
    log(f"judge clean accuracy after pre-training: {json.dumps(result['clean'])}")
    if reconstruct is not None and finetune_steps > 0:
        n_rec = min(len(x), FINETUNE_RECONSTRUCTIONS)
        rec, vrec = _reconstructions(reconstruct, x, n_rec), _reconstructions(reconstruct, vx, len(vx))
        log(f"judge reconstruction accuracy before fine-tuning: {json.dumps(accuracy(net, vrec, vy))}")
        _finetune(net, x, y, rec, n_rec, finetune_steps, batch, g, log, t0)
        result["clean"] = accuracy(net, vx, vy)
        result["vae_reconstruction"] = accuracy(net, vrec, vy)
    log(f"judge final accuracy: {json.dumps(result)} ({time.time() - t0:.0f}s)")
    save_judge(net, out_path, result, seed)
    return result


_CACHE: dict[str, ShapesNet] = {}


def default_weights() -> Path:
    from duo.shapes import ASSETS

    return ASSETS / "judge.safetensors"


def load_judge(path: str | Path | None = None) -> ShapesNet:
    """The judge network in eval mode, from the shipped weights unless `path` is given."""
    from safetensors.torch import load_file

    from duo.errors import UserError

    path = Path(path) if path else default_weights()
    key = str(path.resolve())
    if key not in _CACHE:
        if path == default_weights():
            from duo.shapes import verify_assets

            verify_assets()
        if not path.is_file():
            raise UserError(f"Shapes judge weights not found at {path}; run `duo shapes train-base --ship`.")
        net = ShapesNet()
        net.load_state_dict(load_file(str(path)))
        net.eval()
        _CACHE[key] = net
    return _CACHE[key]


@torch.no_grad()
def classify(images, net: ShapesNet | None = None) -> list[dict]:
    """Per image: predicted canonical colour/shape/background and each head's probabilities."""
    net = net or load_judge()
    x = to_tensor(images)
    out: list[dict] = [dict() for _ in range(len(x))]
    for i in range(0, len(x), 500):
        logits = net(x[i : i + 500])
        for k, names in HEADS.items():
            probs = logits[k].softmax(1)
            for j, p in enumerate(probs):
                out[i + j][k] = names[int(p.argmax())]
                out[i + j][f"{k}_probs"] = {n: float(v) for n, v in zip(names, p)}
    return out


@torch.no_grad()
def features(images, net: ShapesNet | None = None) -> torch.Tensor:
    """Penultimate features [N, 128]: the feature network for FID/LPIPS-style distances here."""
    net = net or load_judge()
    x = to_tensor(images)
    if len(x) == 0:
        return torch.zeros(0, FEATURE_DIM)
    return torch.cat([net.features(x[i : i + 500]) for i in range(0, len(x), 500)])
