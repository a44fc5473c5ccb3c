"""LPIPS (Zhang et al. 2018, VGG variant, v0.1 heads) without torchvision; a world's own stand-in by its name.

Weight file: one safetensors file the user converts once from the public weights (nothing is downloaded):
  features.{i}.weight, features.{i}.bias  for i in 0 2 5 7 10 12 14 17 19 21 24 26 28
      torchvision's vgg16(weights="IMAGENET1K_V1").state_dict() keys (classifier.* keys are ignored)
  lin{k}.model.1.weight                   for k in 0..4, shapes [1, C, 1, 1], C = 64 128 256 512 512
      the LPIPS heads, as in lpips/weights/v0.1/vgg.pth
The LPIPS package's own layout (net.slice{s}.{i}.weight, from lpips.LPIPS(net="vgg").state_dict()) is also
read. Conversion, on a machine that has torchvision and the lpips package:
  import torch, torchvision, lpips, safetensors.torch as st
  vgg = torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict()
  heads = torch.load(lpips.__path__[0] + "/weights/v0.1/vgg.pth")
  st.save_file({**{k: v for k, v in vgg.items() if k.startswith("features.")}, **heads}, "lpips_vgg.safetensors")
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from duo.errors import UserError
from duo.metrics.features import image_batch, sha256_prefix
from duo.worlds import WORLDS, world_named

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TAPS = {3: "relu1_2", 8: "relu2_2", 15: "relu3_3", 22: "relu4_3", 29: "relu5_3"}
CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's ScalingLayer: inputs in [-1, 1] are moved to ImageNet statistics
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
UNIT_EPS = 1e-10


def vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features, module for module, so its state-dict keys load unchanged."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers)


class LinHead(nn.Module):
    """LPIPS's NetLinLayer (dropout + 1x1 conv, no bias): the key layout lin{k}.model.1.weight comes from it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def unit_normalise(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + UNIT_EPS)


def layer_distance(fa: torch.Tensor, fb: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
    """Per pair: unit-normalised squared difference, weighted over channels (head) or summed, spatial mean."""
    diff = (unit_normalise(fa) - unit_normalise(fb)) ** 2
    weighted = head(diff) if head is not None else diff.sum(1, keepdim=True)
    return weighted.mean((2, 3)).flatten()


class LpipsVgg(nn.Module):
    name = "lpips-vgg"

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", LinHead(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.weights: Path | None = None
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """relu1_2 … relu5_3 of images in [0, 1]; the last max-pool is never needed."""
        h = (x * 2 - 1 - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features[: max(TAPS) + 1]):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # separate passes: identical inputs then give bit-identical features, so identical images score 0
        heads = [getattr(self, f"lin{k}") for k in range(len(CHANNELS))]
        return sum(layer_distance(fa, fb, h) for fa, fb, h in zip(self.taps(a), self.taps(b), heads))

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "network": "VGG16 features, taps " + ", ".join(TAPS.values()) + "; LPIPS v0.1 linear heads",
            "recipe": "[0,1] -> [-1,1] -> LPIPS scaling; per tap: unit-normalise channels, squared difference, "
            "1x1 head, spatial mean; sum over taps",
            "weights": str(self.weights) if self.weights else None,
            "sha256": sha256_prefix(self.weights),
        }


def _canonical_key(key: str) -> str:
    # the lpips package keeps VGG's indices inside its slices: net.slice2.5.weight is features.5.weight
    return re.sub(r"^net\.slice\d+\.(\d+)\.", r"features.\1.", key)


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(
            f"LPIPS weights {path} lack {len(missing)} key(s): {', '.join(missing)}. The file needs torchvision's "
            "vgg16 keys features.{i}.weight/bias and LPIPS heads lin{k}.model.1.weight; see duo.metrics.lpips."
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise UserError(f"LPIPS weights {path} have wrong shapes: {'; '.join(wrong)}. Is it the VGG16 variant?")
    negative = [k for k in expected if k.startswith("lin") and bool((state[k] < 0).any())]
    if negative:
        raise UserError(f"LPIPS heads must be non-negative, but {', '.join(negative)} in {path} are not.")


def load_lpips(path: str | Path) -> LpipsVgg:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"LPIPS weights not found at {path}. Convert torchvision's VGG16 and the LPIPS v0.1 heads once into "
            "one safetensors file (recipe in duo.metrics.lpips) and pass its path."
        )
    net = LpipsVgg()
    expected = net.state_dict()
    state = {_canonical_key(k): v for k, v in load_file(str(path)).items()}
    _check_state(state, expected, path)
    net.load_state_dict({k: state[k].float() for k in expected})
    net.weights = path
    return net


def get_lpips(spec: str):
    """'vgg:<lpips safetensors file>', or a world's own network ('shapes', 'shapes:<judge weights>') -> a network."""
    kind, _, arg = spec.partition(":")
    if kind == "vgg" and arg:
        return load_lpips(arg)
    world = world_named(kind)
    if world is not None:
        return world.lpips(arg or None)
    worlds = ", ".join(f"'{w}'" for w in WORLDS)
    raise UserError(f"unknown LPIPS network '{spec}'; use {worlds} or 'vgg:<converted weights.safetensors>'.")


@torch.no_grad()
def lpips_distance(images_a, images_b, net, batch_size: int = 16) -> torch.Tensor:
    """Per-pair distances [N] between image i of a and image i of b (same size, values in [0, 1])."""
    a, b = image_batch(images_a), image_batch(images_b)
    if a.shape != b.shape:
        raise ValueError(f"paired image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if isinstance(net, str):
        net = get_lpips(net)
    out = [net(a[i : i + batch_size], b[i : i + batch_size]) for i in range(0, len(a), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)
