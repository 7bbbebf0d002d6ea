"""Synthetic MVTec-AD-layout data: procedural textures and objects with painted defects and exact masks.

Tests, demos and CI benchmarks need data that any machine can make in seconds, without the licensed
MVTec images. Each category is one procedural *kind* (a texture or an object on a background) whose
normal images vary the way real production photos do (phase, small shift/rotation/scale, lighting,
sensor noise), so a detector has to learn a distribution rather than memorise one picture.

Defects are painted with hard edges and composited with ``np.where(mask, defective, clean)`` after
lighting and noise, so the ground-truth mask is exact: every pixel outside it equals the defect-free
render, and every pixel inside it was painted. Randomness comes from ``SeedSequence(seed)`` spawn keys
``(category index, split, image index)``, so a category's images do not depend on how many categories,
training or test images were asked for, and the same arguments give byte-identical files.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from stfpm_ray.errors import OutputExistsError, UserError

MIN_SIZE = 32
GOOD_SHARE = 0.4
_TRAIN, _TEST = 1, 2  # spawn-key slots of the two splits


@dataclass(frozen=True)
class _Style:
    """What distinguishes a category variant (``weave_2``) from its base kind (``weave``)."""

    palette: np.ndarray  # (k, channels) float32 colours in [0, 1]; one channel means grayscale
    freq: float  # texture frequency multiplier
    scale: float  # object size multiplier


@dataclass(frozen=True)
class _Scene:
    """A defect-free render before lighting and noise, with what defects need to know about it."""

    image: np.ndarray  # (H, W, C) float32 in [0, 1]
    support: np.ndarray  # (H, W) float32 coverage of the product (1 everywhere for textures)
    background: np.ndarray | None  # (H, W, C) what shows where part of an object is missing


@lru_cache(maxsize=8)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image-side units, so shapes are defined independently of size."""
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


def _rotate(size: int, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (v, u) in a frame centred at (cy, cx) and turned by ``angle`` radians."""
    y, x = _coords(size)
    dy, dx = y - np.float32(cy), x - np.float32(cx)
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    return cos * dy - sin * dx, cos * dx + sin * dy


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Band-limited noise (about unit amplitude): a coarse random grid upsampled bicubically.

    Anisotropic cell counts give streaks (wood grain); many cells give fine fibre noise.
    """
    grid = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _coverage(signed_distance: np.ndarray, size: int) -> np.ndarray:
    """One-pixel anti-aliased coverage of a shape given its signed distance (negative inside)."""
    return np.clip(0.5 - signed_distance * size, 0.0, 1.0)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Blend colour images/colours ``a`` -> ``b`` by the (H, W) weight ``t``."""
    return a + (b - a) * t[..., None]


# ----------------------------------------------------------------------------------------- kinds


def _lattice(
    size: int, rng: np.random.Generator, max_degrees: float, per_side: float, phase: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A slightly rotated square lattice: cell indices (ia, ib) and positions inside the cell (fa, fb)."""
    v, u = _rotate(size, 0.5, 0.5, math.radians(rng.uniform(-max_degrees, max_degrees)))
    a = u * per_side + rng.uniform(0.0, phase)
    b = v * per_side + rng.uniform(0.0, phase)
    ia, ib = np.floor(a), np.floor(b)
    return ia, ib, a - ia, b - ib


def _render_weave(size: int, rng: np.random.Generator, style: _Style) -> _Scene:
    """Plain-woven fabric (carpet-like): warp and weft threads alternating over and under."""
    warp, weft, gap = style.palette
    ia, ib, fa, fb = _lattice(size, rng, 2.0, 11.0 * style.freq, 2.0)
    warp_on_top = ((ia + ib) % 2.0) < 1.0
    # Across a thread it is rounded; along it, it dips where it passes under the crossing thread.
    warp_shade = np.sqrt(np.sin(np.pi * fa)) * (0.7 + 0.3 * np.sin(np.pi * fb))
    weft_shade = np.sqrt(np.sin(np.pi * fb)) * (0.7 + 0.3 * np.sin(np.pi * fa))
    shade = np.where(warp_on_top, warp_shade, weft_shade)
    shade *= 1.0 + 0.06 * _smooth_noise(rng, size, (size // 2, size // 2))
    thread = np.where(warp_on_top[..., None], warp, weft) * (1.0 + 0.04 * _smooth_noise(rng, size, (4, 4)))[..., None]
    image = _mix(np.broadcast_to(gap, thread.shape), thread, np.clip(shade, 0.0, 1.0))
    return _Scene(image.astype(np.float32), np.ones((size, size), np.float32), None)


def _render_grain(size: int, rng: np.random.Generator, style: _Style) -> _Scene:
    """Wood-like grain: warped growth lines plus fine horizontal streaks."""
    dark, light = style.palette
    y, x = _coords(size)
    warp = _smooth_noise(rng, size, (3, 5))
    lines = (y + 0.05 * warp + rng.uniform(-0.03, 0.03) * x) * (9.0 * style.freq) + rng.uniform(0.0, 1.0)
    rings = (0.5 + 0.5 * np.sin(2.0 * np.pi * lines)) ** 2
    streaks = _smooth_noise(rng, size, (max(size // 3, 4), 6))
    tone = np.clip(0.15 + 0.7 * rings + 0.12 * streaks, 0.0, 1.0)
    return _Scene(_mix(dark, light, tone).astype(np.float32), np.ones((size, size), np.float32), None)


def _render_tiles(size: int, rng: np.random.Generator, style: _Style) -> _Scene:
    """Square tiles separated by grout lines (grayscale, like MVTec grid/tile), per-tile tone."""
    grout, tile = style.palette
    per_side = 5.0 * style.freq
    ia, ib, fa, fb = _lattice(size, rng, 1.5, per_side, 1.0)
    to_edge = np.minimum(np.minimum(fa, 1.0 - fa), np.minimum(fb, 1.0 - fb)) / per_side  # image units
    cover = _coverage(0.012 - to_edge, size)
    tones = rng.uniform(-0.04, 0.04, (16, 16)).astype(np.float32)
    tone = tones[ia.astype(np.int64) % 16, ib.astype(np.int64) % 16]
    speckle = 0.05 * _smooth_noise(rng, size, (size // 3, size // 3))
    surface = tile + (tone + speckle)[..., None]
    image = _mix(np.broadcast_to(grout, surface.shape), surface, cover)
    return _Scene(image.astype(np.float32), np.ones((size, size), np.float32), None)


def _place(rng: np.random.Generator, style: _Style, base: float) -> tuple[float, float, float]:
    """Object centre and size: small shifts and scale changes, as on a real conveyor."""
    cy, cx = 0.5 + rng.uniform(-0.03, 0.03, 2)
    return float(cy), float(cx), base * style.scale * rng.uniform(0.97, 1.03)


def _background(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    return (colour * (1.0 + 0.08 * _smooth_noise(rng, size, (4, 4)))[..., None]).astype(np.float32)


def _render_disc(size: int, rng: np.random.Generator, style: _Style) -> _Scene:
    """A bottle seen from above: rim, body, inner ring and cap, lit from a random side."""
    rim, body, cap, back = style.palette
    cy, cx, radius = _place(rng, style, 0.36)
    v, u = _rotate(size, cy, cx, 0.0)
    r = np.hypot(u, v) / radius
    light = 1.0 + 0.12 * r * np.cos(np.arctan2(v, u) - rng.uniform(0.0, 2.0 * np.pi))
    surface = _mix(body * 0.75, body, np.clip(1.0 - r, 0.0, 1.0))
    surface = _mix(surface, rim, np.clip((r - 0.86) / 0.04, 0.0, 1.0))
    surface *= (1.0 - 0.4 * np.exp(-(((r - 0.5) / 0.035) ** 2)))[..., None]
    surface = _mix(surface, cap * (1.1 - 0.3 * r[..., None] / 0.32), np.clip((0.32 - r) / 0.02, 0.0, 1.0))
    support = _coverage(np.hypot(u, v) - radius, size)
    background = _background(rng, size, back)
    return _Scene(_mix(background, surface * light[..., None], support), support, background)


def _render_pill(size: int, rng: np.random.Generator, style: _Style) -> _Scene:
    """A two-coloured capsule with cylindrical shading, a seam and a specular highlight."""
    left, right, back = style.palette
    cy, cx, scale = _place(rng, style, 1.0)
    v, u = _rotate(size, cy, cx, math.radians(rng.uniform(-4.0, 4.0)))
    half, radius = 0.22 * scale, 0.14 * scale
    d = np.hypot(u - np.clip(u, -half, half), v)
    across = np.clip(1.0 - (d / radius) ** 2, 0.0, 1.0)
    colour = _mix(np.broadcast_to(left, (size, size, left.size)), right, _coverage(-u, size))
    shade = (0.65 + 0.35 * np.sqrt(across)) * (1.0 - 0.25 * np.exp(-((u / 0.008) ** 2)))
    highlight = 0.3 * np.exp(-((((v / radius) + 0.45) / 0.12) ** 2))
    highlight *= np.clip((half + 0.6 * radius - np.abs(u)) * size, 0.0, 1.0)
    surface = np.clip(colour * shade[..., None] + highlight[..., None], 0.0, 1.0)
    support = _coverage(d - radius, size)
    background = _background(rng, size, back)
    return _Scene(_mix(background, surface, support), support, background)


def _render_ring(size: int, rng: np.random.Generator, style: _Style) -> _Scene:
    """A hexagonal nut at any orientation (grayscale): brushed face, outer chamfer, dark bore."""
    face, back = style.palette
    cy, cx, apothem = _place(rng, style, 0.3)
    turn = rng.uniform(0.0, np.pi / 3.0)
    v, u = _rotate(size, cy, cx, turn)
    hexagon = np.maximum.reduce([np.abs(u * math.cos(k * np.pi / 3) + v * math.sin(k * np.pi / 3)) for k in range(3)])
    r = np.hypot(u, v)
    hole = 0.5 * apothem
    brushed = 0.12 * np.cos(2.0 * (np.arctan2(v, u) - rng.uniform(0.0, np.pi)))
    chamfer = 0.15 * np.clip((r / apothem - 0.9) / 0.05, 0.0, 1.0)
    bore = 0.2 * np.clip((1.25 * hole - r) / (0.25 * hole), 0.0, 1.0)
    surface = face + (brushed + chamfer - bore)[..., None]
    support = _coverage(hexagon - apothem, size) * (1.0 - _coverage(r - hole, size))
    background = _background(rng, size, back)
    return _Scene(_mix(background, surface, support).astype(np.float32), support, background)


@dataclass(frozen=True)
class _Kind:
    """A base kind: how to draw it, its default colours (one channel = grayscale) and its defects."""

    render: Callable[[int, np.random.Generator, _Style], _Scene]
    palette: tuple[tuple[float, ...], ...]
    defects: tuple[str, ...]


_KINDS: dict[str, _Kind] = {
    "weave": _Kind(
        _render_weave, ((0.62, 0.18, 0.16), (0.72, 0.32, 0.22), (0.16, 0.05, 0.04)), ("hole", "stain", "scratch")
    ),
    "grain": _Kind(_render_grain, ((0.40, 0.24, 0.12), (0.80, 0.60, 0.40)), ("scratch", "stain", "crack", "hole")),
    "tiles": _Kind(_render_tiles, ((0.22,), (0.62,)), ("crack", "hole", "stain")),
    "disc": _Kind(
        _render_disc,
        ((0.58, 0.52, 0.40), (0.44, 0.38, 0.24), (0.32, 0.27, 0.17), (0.06, 0.06, 0.06)),
        ("scratch", "stain", "missing"),
    ),
    "pill": _Kind(
        _render_pill,
        ((0.86, 0.46, 0.16), (0.92, 0.90, 0.85), (0.12, 0.12, 0.14)),
        ("crack", "stain", "scratch", "missing"),
    ),
    "ring": _Kind(_render_ring, ((0.62,), (0.12,)), ("scratch", "crack", "missing")),
}
CATEGORY_KINDS: tuple[str, ...] = tuple(_KINDS)


def _hue_rotate(colours: np.ndarray, degrees: float) -> np.ndarray:
    """Turn colours about the gray axis (Rodrigues): hue changes, grays and brightness stay."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], np.float64) / math.sqrt(3.0)
    matrix = c * np.eye(3) + s * cross + (1.0 - c) * np.full((3, 3), 1.0 / 3.0)
    return colours @ matrix.T


@cache
def _style(kind: str, variant: int) -> _Style:
    """Variant looks depend only on (kind, variant), so ``weave_2`` is the same product for every seed."""
    palette = np.array(_KINDS[kind].palette, np.float64)
    freq = scale = 1.0
    if variant > 1:
        rng = np.random.default_rng([CATEGORY_KINDS.index(kind), variant])
        if palette.shape[1] == 3:
            palette = _hue_rotate(palette, rng.uniform(60.0, 300.0)) * rng.uniform(0.8, 1.15)
        else:
            palette = 0.45 + (palette - 0.45) * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)
        freq, scale = rng.uniform(0.7, 1.4), rng.uniform(0.85, 1.12)
    palette = np.clip(palette, 0.02, 0.98).astype(np.float32)
    palette.setflags(write=False)
    return _Style(palette, float(freq), float(scale))


def category_names(count: int) -> list[str]:
    """The first ``count`` category names: the base kinds, then ``<kind>_2``, ``<kind>_3``, ...

    A prefix of a longer list, so the names (and each category's images) are stable as ``count`` grows.
    """
    kinds = len(CATEGORY_KINDS)
    return [CATEGORY_KINDS[i % kinds] + ("" if i < kinds else f"_{i // kinds + 1}") for i in range(count)]


def _resolve(category: str) -> tuple[_Kind, _Style]:
    kind, _, suffix = category.rpartition("_")
    if category in _KINDS:
        return _KINDS[category], _style(category, 1)
    if kind in _KINDS and suffix.isdigit() and str(int(suffix)) == suffix and int(suffix) >= 2:
        return _KINDS[kind], _style(kind, int(suffix))
    raise UserError(
        f"unknown synthetic category {category!r}: expected one of {', '.join(CATEGORY_KINDS)}, "
        "optionally with a variant number >= 2 (e.g. 'weave_2')"
    )


def defect_types(category: str) -> tuple[str, ...]:
    """Defect folders a synthetic category has (besides ``good``)."""
    return _resolve(category)[0].defects


# --------------------------------------------------------------------------------------- defects


def _interior(scene: _Scene) -> np.ndarray:
    """Where a defect may start: fully on the product and away from the image border."""
    y, x = _coords(scene.support.shape[0])
    return (scene.support >= 0.999) & (np.abs(y - 0.5) < 0.42) & (np.abs(x - 0.5) < 0.42)


def _pick(rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
    """A random pixel centre (y, x) among ``allowed`` pixels."""
    y, x = _coords(allowed.shape[0])
    candidates = np.flatnonzero(allowed)
    index = candidates[rng.integers(candidates.size)]
    return np.array([y.flat[index], x.flat[index]])


def _walk(rng: np.random.Generator, start: np.ndarray, steps: int, step: float, wiggle: float) -> np.ndarray:
    """Polyline vertices (n+1, 2) of a random walk with a persistent heading."""
    angles = rng.uniform(0.0, 2.0 * np.pi) + np.cumsum(rng.normal(0.0, wiggle, steps))
    moves = step * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return np.vstack([start, start + np.cumsum(moves, axis=0)])


def _near_polyline(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of a polyline (vectorised per segment; a handful of segments)."""
    y, x = _coords(size)
    distance = np.full((size, size), np.inf, np.float32)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((y - y0) * dy + (x - x0) * dx) / max(dy * dy + dx * dx, 1e-12), 0.0, 1.0)
        np.minimum(distance, np.hypot(y - (y0 + t * dy), x - (x0 + t * dx)), out=distance)
    return distance < width / 2.0


def _blob(size: int, rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """An irregular round region: a circle whose radius wobbles with a few low harmonics."""
    v, u = _rotate(size, centre[0], centre[1], 0.0)
    angle = np.arctan2(v, u)
    amplitudes, phases = rng.uniform(0.0, 0.15, 3), rng.uniform(0.0, 2.0 * np.pi, 3)
    wobble = sum(a * np.cos(k * angle + p) for k, a, p in zip((2, 3, 4), amplitudes, phases))
    return np.hypot(u, v) < radius * (1.0 + wobble)


def _line_shape(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.support.shape[0]
    points = _walk(rng, _pick(rng, _interior(scene)), 3, rng.uniform(0.12, 0.3) / 3, 0.15)
    return _near_polyline(size, points, max(rng.uniform(0.010, 0.02), 1.3 / size)) & (scene.support >= 0.5)


def _crack_shape(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.support.shape[0]
    trunk = _walk(rng, _pick(rng, _interior(scene)), int(rng.integers(7, 13)), rng.uniform(0.015, 0.025), 0.5)
    branch = _walk(rng, trunk[rng.integers(1, len(trunk) - 1)], int(rng.integers(2, 5)), 0.02, 0.5)
    width = max(rng.uniform(0.008, 0.014), 1.2 / size)
    return (_near_polyline(size, trunk, width) | _near_polyline(size, branch, width)) & (scene.support >= 0.5)


def _blob_shape(radii: tuple[float, float]) -> Callable[[_Scene, np.random.Generator], np.ndarray]:
    def shape(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
        region = _blob(scene.support.shape[0], rng, _pick(rng, _interior(scene)), rng.uniform(*radii))
        return region & (scene.support >= 0.5)

    return shape


def _chunk_shape(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """A bite out of the object's outline: every pixel it covers changes (object -> background)."""
    edge = (scene.support > 0.02) & (scene.support < 0.98)
    return _blob(scene.support.shape[0], rng, _pick(rng, edge), rng.uniform(0.07, 0.12)) & (scene.support > 0.0)


def _paint_scratch(scene: _Scene, rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Toward white on dark surfaces and black on light ones, at a random strength."""
    target = 0.05 if scene.image[mask].mean() > 0.45 else 0.95
    return scene.image + rng.uniform(0.35, 0.85) * (target - scene.image)


def _paint_stain(scene: _Scene, rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A mottled, half-transparent colour clearly away from the surface's own colour."""
    channels = scene.image.shape[2]
    local = scene.image[mask].mean(axis=0)
    candidates = rng.uniform(0.0, 1.0, (16, channels))
    distance = np.linalg.norm(candidates - local, axis=1)
    far = distance > 0.35 * math.sqrt(channels)
    colour = candidates[np.argmax(far) if far.any() else np.argmax(distance)].astype(np.float32)
    size = mask.shape[0]
    alpha = rng.uniform(0.4, 0.85) * (0.85 + 0.15 * np.tanh(_smooth_noise(rng, size, (8, 8))))
    return _mix(scene.image, colour, alpha)


def _darken(low: float, high: float) -> Callable[[_Scene, np.random.Generator, np.ndarray], np.ndarray]:
    def paint(scene: _Scene, rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
        return scene.image * np.float32(rng.uniform(low, high))

    return paint


def _paint_missing(scene: _Scene, rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    assert scene.background is not None, "'missing' is only defined for objects"
    return scene.background


@dataclass(frozen=True)
class _Defect:
    """Where a defect goes (a boolean mask) and what it looks like there."""

    shape: Callable[[_Scene, np.random.Generator], np.ndarray]
    paint: Callable[[_Scene, np.random.Generator, np.ndarray], np.ndarray]


_DEFECTS: dict[str, _Defect] = {
    "scratch": _Defect(_line_shape, _paint_scratch),
    "crack": _Defect(_crack_shape, _darken(0.1, 0.5)),
    "stain": _Defect(_blob_shape((0.04, 0.085)), _paint_stain),
    "hole": _Defect(_blob_shape((0.035, 0.07)), _darken(0.08, 0.45)),
    "missing": _Defect(_chunk_shape, _paint_missing),
}
_PLACEMENT_TRIES = 50


def _defect_mask(defect: _Defect, scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw placements until one covers enough of the product to be a visible defect."""
    size = scene.support.shape[0]
    min_pixels = max(6, int(0.0008 * size * size))
    for _ in range(_PLACEMENT_TRIES):
        mask = defect.shape(scene, rng)
        if mask.sum() >= min_pixels:
            return mask
    raise RuntimeError(f"could not place a defect of at least {min_pixels} pixels in {_PLACEMENT_TRIES} tries")


# ------------------------------------------------------------------------------------ rendering


def _camera(rng: np.random.Generator, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image exposure (gain and a gentle gradient) and sensor noise, shared by clean and defect."""
    y, x = _coords(size)
    gy, gx = rng.uniform(-0.06, 0.06, 2)
    light = rng.uniform(0.93, 1.07) * (1.0 + gy * (y - 0.5) + gx * (x - 0.5))
    noise = rng.normal(0.0, 0.012, (size, size, channels)).astype(np.float32)
    return light[..., None].astype(np.float32), noise


def _expose(image: np.ndarray, light: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image * light + noise, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_sample(
    kind: str, size: int, rng: np.random.Generator, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image of a category (``weave``, ``weave_2``, ...), optionally with a named defect.

    Returns ``(image, clean, mask)``: uint8 HxWx3 (RGB kinds) or HxW (grayscale kinds), the same
    image without the defect, and the boolean defect mask (all False for a good image).
    """
    spec, style = _resolve(kind)
    if defect is not None and defect not in spec.defects:
        raise UserError(f"category {kind!r} has no defect {defect!r}; it has {', '.join(spec.defects)}")
    scene = spec.render(size, rng, style)
    light, noise = _camera(rng, size, scene.image.shape[2])
    clean = _expose(scene.image, light, noise)
    mask = np.zeros((size, size), bool)
    image = clean.copy()
    if defect is not None:
        painter = _DEFECTS[defect]
        mask = _defect_mask(painter, scene, rng)
        image = np.where(mask[..., None], _expose(painter.paint(scene, rng, mask), light, noise), clean)
    if clean.shape[2] == 1:
        return image[..., 0], clean[..., 0], mask
    return image, clean, mask


# ------------------------------------------------------------------------------------ the dataset

_ARGUMENT_RULES = {
    "categories": (1, "at least one category"),
    "size": (MIN_SIZE, "smaller images cannot show the textures and defects"),
    "n_train": (1, "training needs images"),
    "n_test": (2, "at least one good and one defective test image"),
    "seed": (0, "numpy seeds are non-negative"),
}


def _check_arguments(**values: object) -> None:
    for name, value in values.items():
        low, why = _ARGUMENT_RULES[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise UserError(f"{name} must be an integer >= {low} ({why}), got {value!r}")


def _test_plan(n_test: int, defects: tuple[str, ...]) -> list[str]:
    """Folder of each test image: about 40% good (>= 1), the rest round-robin over the defects,
    with fewer good images if that is what it takes to show every defect type at least once."""
    n_defective = n_test - max(1, round(GOOD_SHARE * n_test))
    n_defective = max(n_defective, min(len(defects), n_test - 1))
    return ["good"] * (n_test - n_defective) + [defects[i % len(defects)] for i in range(n_defective)]


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_category(folder: Path, name: str, index: int, seed: int, size: int, n_train: int, n_test: int) -> list[str]:
    """Write one category into ``folder``; returns its test plan (for the progress line)."""

    def rng(split: int, number: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, split, number)))

    digits = max(3, len(str(max(n_train, n_test) - 1)))
    for number in range(n_train):
        image, _, _ = render_sample(name, size, rng(_TRAIN, number), None)
        _save(image, folder / "train" / "good" / f"{number:0{digits}d}.png")
    plan = _test_plan(n_test, defect_types(name))
    counts: dict[str, int] = {}
    for number, label in enumerate(plan):
        stem = f"{counts.get(label, 0):0{digits}d}"
        counts[label] = counts.get(label, 0) + 1
        image, _, mask = render_sample(name, size, rng(_TEST, number), None if label == "good" else label)
        _save(image, folder / "test" / label / f"{stem}.png")
        if label != "good":
            _save(mask.astype(np.uint8) * 255, folder / "ground_truth" / label / f"{stem}_mask.png")
    return plan


def generate_dataset(
    out_dir: str | Path,
    categories: int = 3,
    size: int = 128,
    n_train: int = 40,
    n_test: int = 20,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Writes OUT/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}; returns the names.

    Each category is first written to a hidden ``OUT/.<category>.partial`` folder and renamed when
    complete, so an interrupted run never leaves a category that looks whole. Existing non-empty
    category folders are never touched.
    """
    _check_arguments(categories=categories, size=size, n_train=n_train, n_test=n_test, seed=seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another output folder")
    names = category_names(categories)
    busy = [str(out / name) for name in names if (out / name).exists() and not _is_empty_dir(out / name)]
    if busy:
        raise OutputExistsError(
            f"{', '.join(busy)} already exist(s) and is not empty; pass --overwrite to replace them, or choose "
            "another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        staging = out / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
        try:
            plan = _write_category(staging, name, index, seed, size, n_train, n_test)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        target = out / name
        if target.is_dir():
            target.rmdir()
        staging.rename(target)
        if progress is not None:
            defective = len(plan) - plan.count("good")
            progress(
                f"{name}: {n_train} train, {plan.count('good')} good + {defective} defective test images "
                f"({', '.join(defect_types(name))}) -> {target}"
            )
    return names


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())
