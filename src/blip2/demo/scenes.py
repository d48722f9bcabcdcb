"""Synthetic scenes for the demo model: coloured shapes on a background, with their ground truth.

A scene is 1-4 objects in the cells of a 3x3 grid, drawn in 1-3 groups. The objects of a group share a shape
and a colour; different groups differ in both, so that "what color is the star?" and "what shape is the red
one?" have one answer. Each object has a size (small/large); the background is gray, white or black, drawn
solid, as a gradient or with noise, and never in an object colour (the palettes are disjoint).

Everything is a pure function of (split, index): `scene(split, i)` draws the same scene on every machine, and
the held-out split draws from a different seed sequence than the training split. The texts (captions, QA
pairs, false captions, search queries) are functions of the ground truth alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48  # a 3x3 grid of 16x16 cells: one ViT patch each (patch size 16)
SUPERSAMPLE = 4  # drawn at 4x and downsampled: smooth edges
GRID = 3

# Object colours, well apart in RGB; the background palette is disjoint from them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 225, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
    "pink": (255, 120, 200),
}
BACKGROUNDS: dict[str, int] = {"gray": 128, "white": 235, "black": 25}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
SIZES = ("small", "large")
STYLES = ("solid", "gradient", "noise")
NUMBERS = ("zero", "one", "two", "three", "four")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
MAX_OBJECTS = 4
MAX_GROUPS = 3

# Splits draw from disjoint seed sequences: held-out scenes never repeat training ones.
SPLITS = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class Thing:
    """One object: its shape, colour, size and grid cell (row, column)."""

    shape: str
    color: str
    size: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class Group:
    """Objects of one shape and colour: the unit of captions and questions ("two red circles")."""

    shape: str
    color: str
    count: int


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image."""

    things: tuple[Thing, ...]
    background: str
    style: str
    seed: tuple[int, int]  # (split code, index): what the pixels are drawn from

    @property
    def groups(self) -> tuple[Group, ...]:
        """Groups in reading order of their first object (top-left to bottom-right)."""
        order: dict[tuple[str, str], int] = {}
        for thing in sorted(self.things, key=lambda t: t.cell):
            key = (thing.shape, thing.color)
            order[key] = order.get(key, 0) + 1
        return tuple(Group(shape, color, count) for (shape, color), count in order.items())


def scene(split: str, index: int) -> Scene:
    """The ground truth of scene `index` of `split` ("train" or "heldout")."""
    rng = np.random.default_rng([SPLITS[split], index])
    total = int(rng.integers(1, MAX_OBJECTS + 1))
    n_groups = int(rng.integers(1, min(total, MAX_GROUPS) + 1))
    counts = _partition(rng, total, n_groups)
    shapes = rng.choice(len(SHAPES), n_groups, replace=False)
    colors = rng.choice(len(COLORS), n_groups, replace=False)
    cells = rng.choice(GRID * GRID, total, replace=False)
    names = list(COLORS)
    things = []
    for (shape, color, count), start in zip(zip(shapes, colors, counts), np.cumsum([0, *counts[:-1]])):
        for k in range(count):
            cell = int(cells[start + k])
            size = SIZES[int(rng.integers(2))]
            things.append(Thing(SHAPES[shape], names[color], size, (cell // GRID, cell % GRID)))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    style = STYLES[int(rng.integers(len(STYLES)))]
    return Scene(tuple(things), background, style, (SPLITS[split], index))


def _partition(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    """`total` split into `parts` positive counts, uniformly over the compositions."""
    cuts = sorted(rng.choice(np.arange(1, total), parts - 1, replace=False).tolist()) if parts > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


# -- pixels ---------------------------------------------------------------------------------------------------
def render(s: Scene) -> Image.Image:
    """The scene as a 48x48 RGB image. Object positions jitter within their cells and colours by a few levels,
    drawn from the scene's own seed, so the same scene always gives the same pixels."""
    rng = np.random.default_rng([*s.seed, 1])
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.fromarray(_background(rng, s.background, s.style, big))
    draw = ImageDraw.Draw(image)
    cell = big / GRID
    for thing in s.things:
        radius = cell * (0.42 if thing.size == "large" else 0.3)
        slack = cell / 2 - radius
        cx = (thing.cell[1] + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (thing.cell[0] + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        color = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLORS[thing.color])
        _draw_shape(draw, thing.shape, cx, cy, radius, color)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def _background(rng: np.random.Generator, name: str, style: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the grey level of `name`, solid, as a gradient (+-40 across, any direction) or
    with Gaussian noise (sigma 12)."""
    level = float(BACKGROUNDS[name]) + rng.uniform(-10, 10)
    plane = np.full((size, size), level)
    if style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(-1, 1, size)
        plane = plane + 40 * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]) / np.sqrt(2)
    elif style == "noise":
        small = rng.normal(0, 12, (IMAGE_SIZE, IMAGE_SIZE))
        plane = plane + np.kron(small, np.ones((SUPERSAMPLE, SUPERSAMPLE)))
    tint = rng.uniform(-6, 6, 3)  # a faint colour cast, far from any object colour
    return np.clip(plane[:, :, None] + tint, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=color)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=color)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a triangle (apex up), diamond or five-pointed star around (cx, cy)."""
    if shape == "triangle":
        angles, radii = np.deg2rad([-90, 30, 150]), [r, r, r]
        cy += r * 0.2  # the triangle's centroid sits low: centre it in its cell
    elif shape == "diamond":
        angles, radii = np.deg2rad([-90, 0, 90, 180]), [r, r * 0.75, r, r * 0.75]
    else:  # star
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)]
