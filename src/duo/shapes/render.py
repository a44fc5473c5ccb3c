"""The Shapes world renderer: small RGB images of one coloured shape on a background.

Everything is deterministic from a seed: a `Scene` holds every random choice (colour, jittered RGB,
shape, position, size, rotation, background texture seed), `sample_scene(rng)` draws one, `render`
turns it into a 32x32 RGB image (drawn at 64x64, then 2x2-averaged), `caption` writes it in the
grammar "a {colour word} {shape} on a {bg} background" with colour synonyms.

A fixed set of (colour, shape, background) combinations, HELD_OUT, never appears in base training;
base quality is measured on prompts built from them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # output resolution
_DRAW = 64  # drawing resolution (2x2 averaged down to SIZE)

# canonical colour -> caption synonyms (the first is the canonical word)
COLOURS: dict[str, list[str]] = {
    "red": ["red", "crimson", "scarlet"],
    "green": ["green", "emerald", "jade"],
    "blue": ["blue", "azure", "cobalt"],
    "yellow": ["yellow", "golden", "lemon"],
    "purple": ["purple", "violet", "plum"],
    "white": ["white", "ivory", "snowy"],
}
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (35, 175, 45),
    "blue": (35, 70, 225),
    "yellow": (230, 215, 35),
    "purple": (140, 45, 185),
    "white": (235, 235, 235),
}
RGB_JITTER = 18

SHAPES: list[str] = ["circle", "square", "triangle", "star", "cross"]
# background words exactly as the caption grammar writes them
BACKGROUNDS: list[str] = ["black", "gray", "textured"]

# (colour, shape, background) combinations excluded from base training, used for quality evaluation.
# Every colour appears twice, every shape at least twice, every background four times.
HELD_OUT: list[tuple[str, str, str]] = [
    ("red", "triangle", "gray"),
    ("red", "star", "textured"),
    ("green", "circle", "black"),
    ("green", "cross", "gray"),
    ("blue", "square", "textured"),
    ("blue", "star", "black"),
    ("yellow", "cross", "black"),
    ("yellow", "circle", "textured"),
    ("purple", "triangle", "black"),
    ("purple", "square", "gray"),
    ("white", "star", "gray"),
    ("white", "cross", "textured"),
]
ALL_COMBOS: list[tuple[str, str, str]] = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
TRAIN_COMBOS: list[tuple[str, str, str]] = [x for x in ALL_COMBOS if x not in set(HELD_OUT)]

# words parse_prompt understands beyond the grammar's own
_COLOUR_WORDS = {w: c for c, ws in COLOURS.items() for w in ws}
_SHAPE_WORDS = {s: s for s in SHAPES}
_SHAPE_WORDS.update({s + "s": s for s in SHAPES})
_SHAPE_WORDS.update({"crosses": "cross", "plus": "cross"})
_BG_WORDS = {"black": "black", "gray": "gray", "grey": "gray", "textured": "textured", "texture": "textured"}


@dataclass(frozen=True)
class Scene:
    colour: str  # canonical colour name
    shape: str
    background: str  # one of BACKGROUNDS
    rgb: tuple[int, int, int]  # jittered fill colour
    cx: float  # centre, in 64-px drawing coordinates
    cy: float
    radius: float  # in 64-px drawing coordinates (5..12 px at 32)
    angle: float  # rotation in degrees
    texture_seed: int | None = None


def sample_scene(
    rng: np.random.Generator,
    colour: str | None = None,
    shape: str | None = None,
    background: str | None = None,
    combos: list[tuple[str, str, str]] | None = None,
) -> Scene:
    """Draw a random scene; fixed attributes are kept. `combos` restricts the (c, s, b) choice."""
    if combos is not None and colour is None and shape is None and background is None:
        colour, shape, background = combos[int(rng.integers(len(combos)))]
    colour = colour or list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    background = background or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    base = np.array(COLOUR_RGB[colour])
    rgb = tuple(int(v) for v in np.clip(base + rng.integers(-RGB_JITTER, RGB_JITTER + 1, 3), 0, 255))
    radius = float(rng.uniform(10.0, 24.0))
    margin = radius + 2.0
    cx = float(rng.uniform(margin, _DRAW - margin))
    cy = float(rng.uniform(margin, _DRAW - margin))
    angle = float(rng.uniform(-20.0, 20.0))
    return Scene(colour, shape, background, rgb, cx, cy, radius, angle, int(rng.integers(2**31)))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(r * 0.95, math.radians(45 + 90 * k)) for k in range(4)]
    elif shape == "triangle":
        pts = [(r, math.radians(-90 + 120 * k)) for k in range(3)]
    elif shape == "star":
        pts = [(r if k % 2 == 0 else 0.42 * r, math.radians(-90 + 36 * k)) for k in range(10)]
    elif shape == "cross":
        w = 0.34 * r
        xy = [
            (w, r),
            (w, w),
            (r, w),
            (r, -w),
            (w, -w),
            (w, -r),
            (-w, -r),
            (-w, -w),
            (-r, -w),
            (-r, w),
            (-w, w),
            (-w, r),
        ]
        pts = [(math.hypot(x, y), math.atan2(y, x)) for x, y in xy]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    a = math.radians(angle)
    return [(cx + d * math.cos(t + a), cy + d * math.sin(t + a)) for d, t in pts]


def _background(scene: Scene, rng: np.random.Generator | None) -> np.ndarray:
    if scene.background == "black":
        return np.zeros((_DRAW, _DRAW, 3), np.uint8)
    if scene.background == "gray":
        return np.full((_DRAW, _DRAW, 3), 120, np.uint8)
    if scene.background == "textured":
        trng = np.random.default_rng(scene.texture_seed) if scene.texture_seed is not None else rng
        if trng is None:
            trng = np.random.default_rng(0)
        blocks = trng.integers(15, 75, (8, 8, 1)) + trng.integers(-10, 11, (8, 8, 3))
        blocks = np.clip(blocks, 0, 255).astype(np.uint8)
        return np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)
    raise ValueError(f"unknown background {scene.background!r}")


def render_array(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a uint8 array [32, 32, 3]."""
    img = Image.fromarray(_background(scene, rng))
    draw = ImageDraw.Draw(img)
    if scene.shape == "circle":
        r = scene.radius
        draw.ellipse([scene.cx - r, scene.cy - r, scene.cx + r, scene.cy + r], fill=scene.rgb)
    else:
        draw.polygon(_polygon(scene.shape, scene.cx, scene.cy, scene.radius, scene.angle), fill=scene.rgb)
    a = np.asarray(img, dtype=np.float32).reshape(SIZE, 2, SIZE, 2, 3).mean(axis=(1, 3))
    return np.round(a).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator | None = None) -> Image.Image:
    """The scene as a 32x32 RGB PIL image. `rng` is used only for a texture the scene does not fix."""
    return Image.fromarray(render_array(scene, rng))


def caption_for(colour_word: str, shape: str, background: str) -> str:
    return f"a {colour_word} {shape} on a {background} background"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of the scene in the grammar, with a random colour synonym."""
    words = COLOURS[scene.colour]
    return caption_for(words[int(rng.integers(len(words)))], scene.shape, scene.background)


def all_captions() -> list[str]:
    """Every caption the grammar can write (all synonyms, all combinations)."""
    return [caption_for(w, s, b) for c, ws in COLOURS.items() for w in ws for s in SHAPES for b in BACKGROUNDS]


def parse_prompt(text: str) -> dict:
    """What a prompt asks for: canonical colour, shape, background (None where it does not say)."""
    out: dict = {"colour": None, "shape": None, "background": None}
    for word in re.findall(r"[a-z]+", text.lower()):
        if out["colour"] is None and word in _COLOUR_WORDS:
            out["colour"] = _COLOUR_WORDS[word]
        elif out["shape"] is None and word in _SHAPE_WORDS:
            out["shape"] = _SHAPE_WORDS[word]
        elif out["background"] is None and word in _BG_WORDS:
            out["background"] = _BG_WORDS[word]
    return out


def render_dataset(n: int, seed: int, combos: list[tuple[str, str, str]] | None = None):
    """n scenes and their images as a uint8 array [n, 32, 32, 3], deterministic from seed."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, combos=combos) for _ in range(n)]
    images = np.stack([render_array(s) for s in scenes]) if n else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return scenes, images


def heldout_prompts(n: int = 200, seed: int = 1234) -> list[str]:
    """n prompts whose (colour, shape, background) combinations were held out of base training."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c, s, b = HELD_OUT[i % len(HELD_OUT)]
        words = COLOURS[c]
        out.append(caption_for(words[int(rng.integers(len(words)))], s, b))
    return out


def colour_prompts(colour: str, n: int = 200, seed: int = 4321, shapes: list[str] | None = None) -> list[str]:
    """n prompts asking for `colour` (all its synonyms, every shape of `shapes` (default all), all backgrounds)."""
    rng = np.random.default_rng(seed)
    words, shapes = COLOURS[colour], shapes or SHAPES
    return [
        caption_for(
            words[i % len(words)],
            shapes[int(rng.integers(len(shapes)))],
            BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        )
        for i in range(n)
    ]
