"""Built-in synthetic surface-defect datasets, so DefectPrune works with no download.

Four industrial surface families, each with several defect classes and pixel-exact masks
(the mask is drawn first and the image is changed only where the mask says, never thresholded
from the image). Images are grayscale with texture noise, illumination gradients, sensor noise,
defects of many sizes and contrasts (some subtle), and about 15 % defect-free images.

- ``steel``: hot-rolled steel strip (NEU style): streaks along the rolling direction and a
  mottled scale; classes scratch (long thin bright or dark lines), inclusion (clusters of small
  dark elongated spots), patch (large irregular dark or bright areas).
- ``tile``: magnetic tile / ceramic (CASIA style): dark surface with grinding striations;
  classes blowhole (small round holes), crack (thin dark random-walk lines), fray (ragged
  damage along an edge), uneven (large low-contrast areas with a smoothed texture).
- ``fabric``: woven textures (DAGM style): a jittered periodic weave; classes stain (local
  intensity blot over the weave), thread (a broken or thick thread along the weave), distortion
  (a patch where the weave's period and orientation change).
- ``metal``: machined metal or commutators (KolektorSDD style): brushed lines, a specular band,
  sometimes commutator bars; classes crack (hairline, 1-3 px wide), pit (small dark spots),
  dent (shallow dents seen as a bright/dark shading pair).

Generation is deterministic: image ``i`` of family ``f`` with seed ``s`` comes from a numpy
Generator seeded by ``(s, f, i)``, so it does not depend on how many images are generated.
`build` writes PNG images and class-id PNG masks to
``<root>/<family>-<size>px-n<count>-s<seed>/{images,masks}/NNNN.png``, generating into a
temporary folder that is renamed into place only when complete, and reuses that folder later.

Licence: the generators and everything they produce are part of this project (no third-party
data); the family descriptions only imitate the look of the public datasets named above.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from core import config
from core.data.base import (
    DatasetError, DatasetIndex, FormatTraits, SampleRecord, UnknownFormatError, build_index, index_mask_reader,
    reject_options,
)

FORMAT_PREFIX = "synthetic-"
DEFAULT_NUM_IMAGES = 300
# 96 px: the default demo (issue 16) trains to its target within minutes on a 2-core CPU;
# defects are drawn in proportion to the side (`_scale`), so any image_size looks alike
DEFAULT_IMAGE_SIZE = 96
DEFECT_FREE_FRACTION = 0.15
EXTRA_CLASS_PROBABILITY = 0.2  # chance each further class joins an image's primary defect
GENERATOR_VERSION = 2  # bump when the images change, so stale caches are regenerated

FAMILIES: dict[str, list[str]] = {
    "steel": ["background", "scratch", "inclusion", "patch"],
    "tile": ["background", "blowhole", "crack", "fray", "uneven"],
    "fabric": ["background", "stain", "thread", "distortion"],
    "metal": ["background", "crack", "pit", "dent"],
}


class SyntheticOptionError(DatasetError):
    """An option of a synthetic dataset (family, image count, image size) is not valid."""


# ---------------------------------------------------------------- small building blocks
Image = np.ndarray  # float32 HxW grey levels, clipped to 0..255 only at the end
Region = np.ndarray  # bool HxW


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in pixels, shared read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise: a (rows x cols) grid of normals upsampled bicubically, about unit std.
    Few rows and many columns gives vertical streaks; many rows and few columns, horizontal."""
    rows, cols = max(2, int(cells[0])), max(2, int(cells[1]))
    small = rng.standard_normal((rows, cols)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _fractal(rng: np.random.Generator, size: int, base_cells: int, octaves: int = 3) -> np.ndarray:
    """Sum of octaves of smooth noise with halving amplitude, normalised to unit std."""
    out = np.zeros((size, size), np.float32)
    for octave in range(octaves):
        cells = min(size, base_cells * 2**octave)
        out += _noise(rng, size, (cells, cells)) * 0.5**octave
    return out / (out.std() + 1e-6)


def _grain(rng: np.random.Generator, size: int, sigma: float = 0.7) -> np.ndarray:
    """Fine isotropic grain: white noise blurred a little."""
    white = rng.standard_normal((size, size)).astype(np.float32)
    return cv2.GaussianBlur(white, (0, 0), sigma)


def _illumination(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Multiplicative gain map around 1: a linear gradient in a random direction plus an
    off-centre radial fall-off, as from an oblique or uneven light."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    linear = ((xx * np.cos(angle) + yy * np.sin(angle)) / size - 0.5) * rng.uniform(0.3, 1.0)
    cy, cx = rng.uniform(-0.3, 1.3, 2) * size
    radial = ((yy - cy) ** 2 + (xx - cx) ** 2) / (size * size)
    return (1.0 + strength * (linear - rng.uniform(0.1, 0.4) * radial)).astype(np.float32)


def _soft(region: Region, sigma: float) -> np.ndarray:
    """A profile that is 1 deep inside the region and falls towards its edge, zero outside,
    so an intensity change looks natural yet touches only the mask's pixels."""
    inside = region.astype(np.float32)
    if sigma <= 0:
        return inside
    blurred = cv2.GaussianBlur(inside, (0, 0), sigma)
    return inside * (0.45 + 0.55 * np.clip(blurred * 1.6, 0, 1))


def _blob(
    rng: np.random.Generator, size: int, center: tuple[float, float], radii: tuple[float, float],
    angle: float, roughness: float, cells: int = 6,
) -> Region:
    """An irregular blob: a rotated ellipse whose edge is pushed in and out by smooth noise.
    Always holds its centre pixel, so it is never empty."""
    yy, xx = _grid(size)
    cy, cx = center
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / max(radii[0], 0.5)
    v = (-(xx - cx) * s + (yy - cy) * c) / max(radii[1], 0.5)
    field = 1.0 - np.sqrt(u * u + v * v)
    if roughness > 0:
        field += roughness * _noise(rng, size, (cells, cells))
    region = field > 0
    iy, ix = int(np.clip(round(cy), 0, size - 1)), int(np.clip(round(cx), 0, size - 1))
    region[iy, ix] = True
    return region


def _walk(
    rng: np.random.Generator, start: tuple[float, float], angle: float, length: float,
    turn: float, step: float = 2.0,
) -> np.ndarray:
    """Points (x, y) of a random walk whose heading drifts by `turn` radians per step."""
    n = max(2, int(length / step))
    headings = angle + np.cumsum(rng.normal(0, turn, n))
    steps = np.stack([np.cos(headings), np.sin(headings)], axis=1) * step
    origin = np.array([start[1], start[0]], np.float64)
    points = np.vstack([origin, origin + np.cumsum(steps, axis=0)])
    return points


def _draw_line(size: int, points: np.ndarray, width: int) -> Region:
    canvas = np.zeros((size, size), np.uint8)
    pts = np.round(points).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], False, 1, thickness=max(1, int(width)), lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _point(rng: np.random.Generator, size: int, margin: float = 0.1) -> tuple[float, float]:
    """A random (y, x) inside the image, `margin` (a fraction of the side) away from the edges."""
    low, high = margin * size, (1 - margin) * size - 1
    return float(rng.uniform(low, high)), float(rng.uniform(low, high))


def _contrast(rng: np.random.Generator, low: float, high: float, bright: float = 0.0) -> float:
    """A signed contrast between `low` and `high` grey levels, positive with chance `bright`.
    Skewed towards the low end so that a good share of defects is subtle."""
    magnitude = low + (high - low) * rng.random() ** 1.4
    return float(magnitude if rng.random() < bright else -magnitude)


def _scale(size: int) -> float:
    return size / 128.0


# ---------------------------------------------------------------- steel (hot-rolled strip)
def _steel_background(rng: np.random.Generator, size: int, ctx: dict) -> Image:
    vertical = rng.random() < 0.5
    ctx["along"] = np.pi / 2 if vertical else 0.0  # rolling direction
    rows, cols = (3, size // 2) if vertical else (size // 2, 3)
    streaks = _noise(rng, size, (rows, cols)) + 0.5 * _noise(rng, size, (rows * 2 // 3 + 2, cols * 2 // 3 + 2))
    image = (
        rng.uniform(95, 155)
        + rng.uniform(3, 7) * streaks
        + rng.uniform(3, 7) * _fractal(rng, size, 3)
        + rng.uniform(2, 5) * _grain(rng, size, 0.8)
    )
    return image.astype(np.float32)


def _steel_scratch(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    k = _scale(size)
    region = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 3)):
        angle = ctx["along"] + rng.normal(0, 0.15) + (np.pi if rng.random() < 0.5 else 0)
        length = rng.uniform(0.35, 1.1) * size
        start = np.array(_point(rng, size, 0.15))
        start -= 0.4 * length * np.array([np.sin(angle), np.cos(angle)])  # centre the line
        points = _walk(rng, tuple(start), angle, length, turn=0.02, step=3.0)
        line = _draw_line(size, points, round(rng.uniform(3, 6) * k))
        if not line.any():  # walked off the image entirely: take a line through the centre
            line = _draw_line(size, np.array([[0, size / 2], [size - 1, size / 2]]), 2)
        amount = _contrast(rng, 35, 80, bright=0.9)
        image += amount * _soft(line, 0.8) * (0.8 + 0.2 * _noise(rng, size, (4, 4)))
        region |= line
    return region


def _steel_inclusion(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    k = _scale(size)
    region = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 3)):
        cy, cx = _point(rng, size, 0.12)
        along = ctx["along"] + rng.normal(0, 0.2)
        spread = rng.uniform(0.05, 0.25) * size
        for _ in range(rng.integers(2, 6)):
            t = rng.uniform(-1, 1) * spread
            y = np.clip(cy + t * np.sin(along) + rng.normal(0, 2 * k), 0, size - 1)
            x = np.clip(cx + t * np.cos(along) + rng.normal(0, 2 * k), 0, size - 1)
            radii = (rng.uniform(5, 11) * k, rng.uniform(2.5, 5) * k)
            region |= _blob(rng, size, (y, x), radii, along + rng.normal(0, 0.2), 0.25, cells=12)
    amount = _contrast(rng, 40, 85, bright=0.05)
    image += amount * _soft(region, 0.8) * (0.75 + 0.25 * _noise(rng, size, (8, 8)))
    return region


def _steel_patch(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    region = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 3)):
        radii = tuple(rng.uniform(0.08, 0.3, 2) * size)
        region |= _blob(rng, size, _point(rng, size, 0.1), radii, rng.uniform(0, np.pi), 0.35, cells=5)
    amount = _contrast(rng, 40, 75, bright=0.25)
    texture = 0.65 + 0.35 * _fractal(rng, size, 16, 2)  # mottled, as NEU's patches
    image += amount * _soft(region, 1.0) * texture
    return region


# ---------------------------------------------------------------- tile (magnetic tile)
def _striations(rng: np.random.Generator, size: int) -> np.ndarray:
    """Vertical grinding marks: noise that varies fast across x and slowly down y."""
    return _noise(rng, size, (3, size)) + 0.6 * _noise(rng, size, (6, size // 2))


def _tile_background(rng: np.random.Generator, size: int, ctx: dict) -> Image:
    yy, xx = _grid(size)
    ctx["striations"] = rng.uniform(5, 11) * _striations(rng, size)
    arc = np.cos((xx / size - rng.uniform(0.3, 0.7)) * rng.uniform(1.0, 2.5))  # curved tile
    image = (
        rng.uniform(45, 110)
        + ctx["striations"]
        + rng.uniform(10, 30) * arc
        + rng.uniform(3, 8) * _fractal(rng, size, 3)
        + rng.uniform(2, 5) * _grain(rng, size, 0.6)
    )
    return image.astype(np.float32)


def _tile_blowhole(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    k = _scale(size)
    region = np.zeros((size, size), bool)
    yy, xx = _grid(size)
    for _ in range(rng.integers(1, 5)):
        cy, cx = _point(rng, size, 0.06)
        r = rng.uniform(1.5, 6) * k
        hole = _blob(rng, size, (cy, cx), (r, r * rng.uniform(0.7, 1.0)), rng.uniform(0, np.pi), 0.15, 16)
        depth = np.clip(1 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (r + 1), 0.35, 1)
        image += _contrast(rng, 25, 80, bright=0.05) * depth * hole
        region |= hole
    return region


def _tile_crack(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    region = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 3)):
        start = _point(rng, size, 0.1)
        points = _walk(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.7) * size, turn=0.35)
        region |= _draw_line(size, points, 1 if rng.random() < 0.6 else 2)
        if rng.random() < 0.4:  # a branch from somewhere along the crack
            origin = points[rng.integers(len(points))]
            branch = _walk(rng, (origin[1], origin[0]), rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3) * size, 0.4)
            region |= _draw_line(size, branch, 1)
    image += _contrast(rng, 22, 70, bright=0.0) * region * (0.8 + 0.2 * _noise(rng, size, (6, 6)))
    return region


def _edge_coordinates(size: int, edge: int) -> tuple[np.ndarray, np.ndarray]:
    """(distance from the edge, position along it) for edge 0 top, 1 bottom, 2 left, 3 right."""
    yy, xx = _grid(size)
    depth = (yy, size - 1 - yy, xx, size - 1 - xx)[edge]
    along = (xx, xx, yy, yy)[edge]
    return depth, along


def _tile_fray(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    """A ragged chipped sliver along one edge of the tile, tapering at both ends."""
    edge = int(rng.integers(4))
    depth, along = _edge_coordinates(size, edge)
    centre, half = rng.uniform(0.25, 0.75) * size, rng.uniform(0.15, 0.45) * size
    ragged = 1 + 0.35 * _noise(rng, size, (2, size // 8) if edge < 2 else (size // 8, 2))
    taper = np.clip(1 - np.abs((along - centre) / half) ** 1.5, 0, 1) ** 0.5
    region = depth < rng.uniform(0.04, 0.12) * size * ragged * taper
    if not region.any():
        region[(depth == 0) & (np.abs(along - centre) < 1)] = True
    fibres = _noise(rng, size, (size // 2, 4) if edge < 2 else (4, size // 2))  # into the tile
    amount = _contrast(rng, 18, 55, bright=0.5)
    image += amount * _soft(region, 1.0) * (0.7 + 0.3 * fibres)
    return region


def _tile_uneven(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    """A large area ground differently: its striations change and its brightness shifts a
    little. Mostly a band from one edge with a slanted, slightly wavy border (as in the real
    tiles), sometimes a large blob."""
    if rng.random() < 0.7:
        edge = int(rng.integers(2))  # bands start at the top or the bottom
        depth, along = _edge_coordinates(size, edge)
        border = rng.uniform(0.2, 0.6) * size + rng.uniform(-0.15, 0.15) * (along - size / 2)
        border = border + 0.02 * size * _noise(rng, size, (2, 6))
        region = depth < border
    else:
        radii = tuple(rng.uniform(0.18, 0.4, 2) * size)
        region = _blob(rng, size, _point(rng, size, 0.15), radii, rng.uniform(0, np.pi), 0.3, cells=4)
    if not region.any():
        region[0, :] = True
    blend = _soft(region, 1.5)
    new_striations = rng.uniform(0.3, 2.2) * _striations(rng, size) * float(ctx["striations"].std())
    image += (new_striations - ctx["striations"]) * blend + _contrast(rng, 6, 25, bright=0.5) * blend
    return region


# ---------------------------------------------------------------- fabric (DAGM-style weave)
def _weave(size: int, period: float, angle: float, jitter_u: np.ndarray, jitter_v: np.ndarray) -> np.ndarray:
    """A plain weave in 0..1: warp and weft threads alternate over and under each other."""
    yy, xx = _grid(size)
    c, s = np.cos(angle), np.sin(angle)
    u = (xx * c + yy * s) / period + jitter_u
    v = (-xx * s + yy * c) / period + jitter_v
    warp = 0.5 + 0.5 * np.cos(2 * np.pi * u)
    weft = 0.5 + 0.5 * np.cos(2 * np.pi * v)
    over = np.sin(np.pi * (np.floor(u + 0.5) + np.floor(v + 0.5))) ** 2 < 0.5  # checkerboard
    return np.where(over, warp * (0.6 + 0.4 * weft), weft * (0.6 + 0.4 * warp)).astype(np.float32)


def _fabric_background(rng: np.random.Generator, size: int, ctx: dict) -> Image:
    k = _scale(size)
    ctx["period"] = rng.uniform(5.0, 10.0) * max(k, 0.6)
    ctx["angle"] = rng.uniform(-0.35, 0.35) + (np.pi / 4 if rng.random() < 0.25 else 0.0)
    ctx["jitter"] = (0.12 * _noise(rng, size, (6, 6)), 0.12 * _noise(rng, size, (6, 6)))
    ctx["amplitude"] = rng.uniform(25, 55)
    weave = _weave(size, ctx["period"], ctx["angle"], *ctx["jitter"])
    image = (
        rng.uniform(70, 150)
        + ctx["amplitude"] * weave
        + rng.uniform(4, 10) * _fractal(rng, size, 3)
        + rng.uniform(2, 5) * _grain(rng, size, 0.6)
    )
    return image.astype(np.float32)


def _fabric_stain(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    radii = tuple(rng.uniform(0.05, 0.2, 2) * size)
    region = _blob(rng, size, _point(rng, size, 0.1), radii, rng.uniform(0, np.pi), 0.4, cells=6)
    image += _contrast(rng, 14, 60, bright=0.3) * _soft(region, 2.5)
    return region


def _fabric_thread(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    """A broken (dark gap) or thick (bright) thread: a band along one thread direction."""
    angle = ctx["angle"] + (np.pi / 2 if rng.random() < 0.5 else 0.0)
    length = rng.uniform(0.25, 1.0) * size
    width = max(1.0, ctx["period"] * rng.uniform(0.3, 0.6))
    cy, cx = _point(rng, size, 0.15)
    d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
    n = np.array([-np.sin(angle), np.cos(angle)]) * width / 2
    corners = np.array([[cx, cy] - d - n, [cx, cy] + d - n, [cx, cy] + d + n, [cx, cy] - d + n])
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(corners).astype(np.int32)], 1)
    canvas[int(np.clip(cy, 0, size - 1)), int(np.clip(cx, 0, size - 1))] = 1
    region = canvas.astype(bool)
    mean = float(image[region].mean())
    flat = mean + _contrast(rng, 18, 60, bright=0.4)  # the weave is replaced by a flat thread
    blend = _soft(region, 0.7)
    image[:] = image * (1 - blend) + (flat + 0.15 * (image - mean)) * blend
    return region


def _fabric_distortion(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    """A local patch whose weave has another period and orientation (DAGM's texture faults)."""
    radii = tuple(rng.uniform(0.1, 0.25, 2) * size)
    region = _blob(rng, size, _point(rng, size, 0.12), radii, rng.uniform(0, np.pi), 0.3, cells=5)
    period = ctx["period"] * rng.choice([rng.uniform(0.55, 0.75), rng.uniform(1.35, 1.8)])
    angle = ctx["angle"] + rng.choice([-1, 1]) * rng.uniform(0.35, 0.8)
    other = _weave(size, period, angle, *ctx["jitter"])
    before = _weave(size, ctx["period"], ctx["angle"], *ctx["jitter"])
    blend = _soft(region, 2.0)
    image += ctx["amplitude"] * (other - before) * blend + _contrast(rng, 0, 15, 0.5) * blend
    return region


# ---------------------------------------------------------------- metal (machined / commutator)
def _metal_background(rng: np.random.Generator, size: int, ctx: dict) -> Image:
    yy, xx = _grid(size)
    brushed = _noise(rng, size, (size, 3)) + 0.5 * _noise(rng, size, (size // 2, 6))
    band_centre, band_width = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.35) * size
    specular = np.exp(-0.5 * ((yy - band_centre) / band_width) ** 2)
    image = (
        rng.uniform(80, 140)
        + rng.uniform(5, 10) * brushed
        + rng.uniform(15, 60) * specular
        + rng.uniform(3, 7) * _fractal(rng, size, 3)
        + rng.uniform(2, 4) * _grain(rng, size, 0.5)
    )
    if rng.random() < 0.5:  # commutator: bars separated by dark insulating gaps
        pitch = rng.uniform(0.2, 0.45) * size
        phase = rng.uniform(0, pitch)
        gap = max(1.0, rng.uniform(1.5, 3.5) * _scale(size))
        in_gap = ((xx - phase) % pitch) < gap
        image = np.where(in_gap, image * rng.uniform(0.3, 0.55), image)
    return image.astype(np.float32)


def _metal_crack(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    region = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 3)):
        start = _point(rng, size, 0.12)
        angle = rng.uniform(0, 2 * np.pi)
        points = _walk(rng, start, angle, rng.uniform(0.12, 0.55) * size, turn=0.25, step=1.5)
        region |= _draw_line(size, points, int(rng.choice([1, 1, 2, 3])))
    image += _contrast(rng, 20, 75, bright=0.1) * region * (0.75 + 0.25 * _noise(rng, size, (8, 8)))
    return region


def _metal_pit(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    k = _scale(size)
    region = np.zeros((size, size), bool)
    cy, cx = _point(rng, size, 0.08)
    spread = rng.uniform(0.0, 0.15) * size
    for _ in range(rng.integers(1, 6)):
        y = float(np.clip(cy + rng.normal(0, spread + 1e-3), 0, size - 1))
        x = float(np.clip(cx + rng.normal(0, spread + 1e-3), 0, size - 1))
        r = rng.uniform(1.2, 4.5) * k
        region |= _blob(rng, size, (y, x), (r, r * rng.uniform(0.6, 1.0)), rng.uniform(0, np.pi), 0.2, 16)
    image += _contrast(rng, 28, 85, bright=0.0) * _soft(region, 0.6)
    return region


def _metal_dent(rng: np.random.Generator, image: Image, size: int, ctx: dict) -> Region:
    """A shallow dent lit from one side: bright on the lit slope, dark on the other."""
    yy, xx = _grid(size)
    cy, cx = _point(rng, size, 0.15)
    ry, rx = rng.uniform(0.05, 0.16, 2) * size
    angle = rng.uniform(0, np.pi)
    region = _blob(rng, size, (cy, cx), (rx, ry), angle, 0.1, cells=6)
    light = rng.uniform(0, 2 * np.pi)
    slope = ((xx - cx) * np.cos(light) + (yy - cy) * np.sin(light)) / max(rx, ry)
    shading = np.clip(slope, -1, 1) - 0.3  # a dent also looks a little darker overall
    image += abs(_contrast(rng, 15, 50)) * shading * _soft(region, 1.5)
    return region


# ---------------------------------------------------------------- the families
Drawer = Callable[[np.random.Generator, Image, int, dict], Region]


class _Family:
    """A background generator plus one drawer per defect class, in drawing order (large
    areas first, thin lines last, so that the last-drawn class owns overlapping pixels)."""

    def __init__(self, background: Callable[[np.random.Generator, int, dict], Image],
                 drawers: dict[str, Drawer], order: list[str], light: tuple[float, float]):
        self.background, self.drawers, self.order, self.light = background, drawers, order, light


_FAMILY_IMPL: dict[str, _Family] = {
    "steel": _Family(
        _steel_background,
        {"scratch": _steel_scratch, "inclusion": _steel_inclusion, "patch": _steel_patch},
        ["patch", "inclusion", "scratch"], (0.1, 0.3),
    ),
    "tile": _Family(
        _tile_background,
        {"blowhole": _tile_blowhole, "crack": _tile_crack, "fray": _tile_fray, "uneven": _tile_uneven},
        ["uneven", "fray", "blowhole", "crack"], (0.2, 0.6),
    ),
    "fabric": _Family(
        _fabric_background,
        {"stain": _fabric_stain, "thread": _fabric_thread, "distortion": _fabric_distortion},
        ["distortion", "stain", "thread"], (0.1, 0.4),
    ),
    "metal": _Family(
        _metal_background,
        {"crack": _metal_crack, "pit": _metal_pit, "dent": _metal_dent},
        ["dent", "pit", "crack"], (0.15, 0.5),
    ),
}


def _check_family(family: str) -> list[str]:
    try:
        return FAMILIES[family]
    except KeyError:
        names = ", ".join(FORMAT_PREFIX + f for f in FAMILIES)
        raise UnknownFormatError(f"unknown synthetic family {family!r}; choose one of {names}") from None


def _rng(seed: int, family: str, index: int) -> np.random.Generator:
    """One independent stream per (seed, family, image), so image i never depends on others."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, zlib.crc32(family.encode()), int(index)]
    return np.random.default_rng(entropy)


def generate_sample(family: str, index: int, seed: int = 0, size: int = DEFAULT_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of a family: (uint8 HxW grayscale image, uint8 HxW class-id mask).

    About `DEFECT_FREE_FRACTION` of the images are defect-free; the rest hold one primary
    defect class, chosen uniformly, plus each other class with `EXTRA_CLASS_PROBABILITY`."""
    classes = _check_family(family)
    impl = _FAMILY_IMPL[family]
    rng = _rng(seed, family, index)
    ctx: dict = {}
    image = impl.background(rng, size, ctx)
    mask = np.zeros((size, size), np.uint8)
    defects = classes[1:]
    chosen: set[str] = set()
    if rng.random() >= DEFECT_FREE_FRACTION:
        chosen.add(defects[int(rng.integers(len(defects)))])
        chosen.update(name for name in defects if rng.random() < EXTRA_CLASS_PROBABILITY)
    for name in impl.order:
        if name in chosen:
            region = impl.drawers[name](rng, image, size, ctx)
            mask[region] = classes.index(name)
    image *= _illumination(rng, size, rng.uniform(*impl.light))
    image += rng.normal(0, rng.uniform(1.5, 4.0), image.shape).astype(np.float32)  # sensor noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask


# ---------------------------------------------------------------- cache on disk
def _validate_options(num_images: object, image_size: object) -> tuple[int, int]:
    try:
        count, size = int(num_images), int(image_size)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SyntheticOptionError(
            f"num_images={num_images!r} and image_size={image_size!r} must be whole numbers"
        ) from None
    if count < 1 or count > 100_000:
        raise SyntheticOptionError(f"num_images={count} must be between 1 and 100000")
    if size < 32 or size > 1024 or size % 32:
        raise SyntheticOptionError(
            f"image_size={size} must be a multiple of 32 between 32 and 1024 (e.g. 128)"
        )
    return count, size


def cache_folder_name(family: str, num_images: int, image_size: int, seed: int) -> str:
    return f"{family}-{image_size}px-n{num_images}-s{seed}"


def _manifest(family: str, count: int, size: int, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION, "family": family, "classes": FAMILIES[family],
        "num_images": count, "image_size": size, "seed": seed,
    }


def _file_name(i: int, count: int) -> str:
    return f"{i:0{max(4, len(str(count - 1)))}d}.png"


def _is_complete(folder: Path, manifest: dict) -> bool:
    """A cached folder is reused only when its manifest matches and every file is there."""
    try:
        stored = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if stored != manifest:
        return False
    count = manifest["num_images"]
    names = {_file_name(i, count) for i in range(count)}
    for sub in ("images", "masks"):
        try:
            present = set(os.listdir(folder / sub))
        except OSError:
            return False
        if not names <= present:
            return False
    return True


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"could not encode {path}")
    data.tofile(str(path))


def _generate_into(folder: Path, family: str, count: int, size: int, seed: int) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(count):
        image, mask = generate_sample(family, i, seed, size)
        name = _file_name(i, count)
        _write_png(folder / "images" / name, image)
        _write_png(folder / "masks" / name, mask)
    # the manifest last: a folder without it is never taken for a complete dataset
    (folder / "manifest.json").write_text(json.dumps(_manifest(family, count, size, seed), indent=1))


def ensure_generated(
    root: str | Path | None, family: str, num_images: int = DEFAULT_NUM_IMAGES,
    image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
) -> Path:
    """The folder of a generated dataset, generating it first when it is not cached yet.

    Generation goes into a hidden temporary folder beside the target, which is renamed into
    place only when complete, so an interrupted run (error, Ctrl-C, crash) never leaves a half
    dataset under the real name; the temporary folder is removed on errors."""
    _check_family(family)
    count, size = _validate_options(num_images, image_size)
    root = Path(root).expanduser() if root is not None else config.synthetic_cache_dir()
    target = root / cache_folder_name(family, count, size, seed)
    manifest = _manifest(family, count, size, seed)
    if _is_complete(target, manifest):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SyntheticOptionError(
            f"cannot create the synthetic cache folder {root} ({exc.strerror}); set "
            "DEFECTPRUNE_WORKSPACE to a writable folder or pass another root"
        ) from exc
    temp = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate_into(temp, family, count, size, seed)
        if _is_complete(target, manifest):  # another process finished first: its copy stays, a
            return target                   # reader of it must not see its files vanish
        if target.exists():  # stale (older generator or incomplete copy): swap it out
            trash = root / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                target.rename(trash)
            except OSError:
                pass  # another process swapped it already; the rename below sorts it out
            else:
                shutil.rmtree(trash, ignore_errors=True)
        try:
            temp.rename(target)
        except OSError:
            if not _is_complete(target, manifest):  # not another process beating us to it
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return target


def build(
    root: str | Path | None = None, seed: int = 0, family: str = "steel",
    num_images: int = DEFAULT_NUM_IMAGES, image_size: int = DEFAULT_IMAGE_SIZE, strict: bool = False, **options,
) -> DatasetIndex:
    """Generate (or reuse) a synthetic family in the cache and index it.

    The seed picks both the images and the 70/15/15 split; `root` None means the workspace's
    synthetic cache (`core.config.synthetic_cache_dir`)."""
    classes = _check_family(family)
    reject_options(FORMAT_PREFIX + family, options, ["num_images", "image_size"])
    count, size = _validate_options(num_images, image_size)
    folder = ensure_generated(root, family, count, size, seed)
    records = []
    for i in range(count):
        name = _file_name(i, count)
        records.append(SampleRecord(str(folder / "images" / name), str(folder / "masks" / name)))
    return build_index(
        FormatTraits(FORMAT_PREFIX + family, classes, index_mask_reader, (size, size), require_masks=True),
        folder, records, seed=seed, strict=strict,
    )
