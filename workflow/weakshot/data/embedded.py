"""The embedded "weak-shot toy": a procedural scene-segmentation dataset written as a raw COCO-Stuff-10K v1.1 zip.

Why it exists: the real archives are gigabytes; this one is generated from a seed in seconds, yet keeps what the
weak-shot problem needs (design: datasets.md section 4, measured in calibration.md):

- many classes (default 24 stuff + 20 things), 3-6 per image, a few percent unlabeled pixels;
- **stuff** fills large warped-Voronoi regions and is told apart by texture (family x period x orientation);
- **things** are compact objects told apart by shape x fill;
- colour alone cannot name a class: every class draws its colours from a small set of shared two-colour
  palettes, and every colour appears in two palettes;
- every thing carries the same class-agnostic objectness cues (closed silhouette, 1-px darker outline, soft
  drop-shadow, texture contrast), so masks learned on base classes transfer to novel ones;
- scene types give co-occurrence (in-scene most of the time, random otherwise);
- intra-class jitter: hue, saturation, value, texture period, orientation, object scale, rotation, mirror.

The archive has exactly the raw v1.1 layout, so the same download -> extract -> convert path runs on it as on
the real data: ``images/<name>.jpg``, ``annotations/<name>.mat`` (MATLAB v5, ``S`` = HxW raw ids, 0 = unlabeled,
1..C = classes, plus ``names`` and ``captions``) and ``imageLists/{train,test,all}.txt``.

Determinism: the class design depends only on the config's class fields and ``design_seed``; image ``i`` of a
split is drawn from its own generator seeded with ``(seed, split, i)``, so images can be drawn in parallel, in
any order and by any number of workers, and the whole zip is byte-identical between runs.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
import multiprocessing
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image
from scipy.ndimage import gaussian_filter

from weakshot.data.classes import ClassInfo, ClassTable
from weakshot.io_utils import atomic_path

DATASET_NAME = "embedded"
SPLITS = ("train", "test")

# Stuff texture families and the angle after which each pattern repeats itself: a square lattice (checks,
# dots, hatch) looks the same after 90 degrees, so its orientation variants must differ by less than that.
STUFF_FAMILIES: tuple[str, ...] = ("grating", "stripes", "checks", "dots", "waves", "bricks", "hatch")
_SYMMETRY_DEG = {
    "grating": 180.0,
    "stripes": 180.0,
    "checks": 90.0,
    "dots": 90.0,
    "waves": 180.0,
    "bricks": 180.0,
    "hatch": 90.0,
}
# Variants of one family, as (period level, orientation index); the first four are well separated under the
# default jitter (a 2x period step beats +-25 %, a half-symmetry angle step beats +-20 deg).
_STUFF_VARIANTS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1))
# Texture periods at 64 px for the period levels; level 2 sits between the others and is only used when more
# than four classes per family are asked for (those classes are harder to tell apart).
_PERIOD_LEVELS_64 = (4.0, 8.0, 5.7)
_MIN_PERIOD_PX = 2.4  # below ~2.4 px a pattern aliases on the pixel grid and JPEG smears it

THING_SHAPES: tuple[str, ...] = (
    "disk",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "hexagon",
    "crescent",
    "heart",
    "arrow",
    "ellipse",
    "diamond",
)
THING_FILLS: tuple[str, ...] = ("solid", "stripes", "dots", "waves", "checks")
_FILL_PERIOD_64 = 3.5
_THING_RADIUS_64 = 8.0

# Generic objectness cues shared by every thing; calibration.md found the outline makes the class-agnostic
# complement nearly free, so keep these mild.
_OUTLINE_FACTOR = 0.6
_SHADOW_STRENGTH = 0.35
_MIN_VISIBLE_FRACTION = 0.4  # an occluded thing keeps at least this much of its silhouette
_PLACEMENT_TRIES = 10  # positions tried per thing instance
_CONTRAST_TRIES = 7  # of which the first ones also ask for a background of another palette
_MIN_REGION_FRACTION = 0.06  # each stuff region covers at least this much of the image before things land
_MAX_ATTEMPTS = 50

# MAT v5 files carry a 116-byte free-text header that scipy fills with the current time; a fixed text keeps
# the archive byte-identical between runs.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: weakshot embedded generator"


def _error(key: str, message: str) -> ValueError:
    return ValueError(f"embedded generator: key {key!r} {message}")


@dataclass(frozen=True)
class EmbeddedConfig:
    """Settings of the embedded dataset; ``from_dict`` reads them from the pipeline config."""

    seed: int = 0  # draws the images
    design_seed: int = 0  # draws the class design (palettes, scenes); kept apart so the class table is stable
    image_size: int = 64
    num_train: int = 2000
    num_test: int = 500
    num_stuff_classes: int = 24
    num_thing_classes: int = 20
    num_palettes: int = 8  # shared two-colour palettes; must be even (light and dark colours alternate)
    num_scenes: int = 5
    scenes_per_class: int = 2  # how many scene types list each class as typical
    in_scene_prob: float = 0.7  # chance that a class slot is filled from the scene's typical classes
    min_classes_per_image: int = 3
    max_classes_per_image: int = 6
    max_stuff_per_image: int = 3
    max_things_per_image: int = 4
    second_instance_prob: float = 0.2  # chance that a thing class gets a second instance
    min_pixels: int | None = None  # a class covering fewer pixels becomes unlabeled; None: 12 at 64 px, by area
    clutter_min_fraction: float = 0.015  # unlabeled clutter blobs cover this share of the image ...
    clutter_max_fraction: float = 0.045  # ... up to this one
    hue_jitter: float = 0.04  # absolute, on the 0..1 hue circle
    saturation_jitter: float = 0.15  # relative
    value_jitter: float = 0.15  # relative
    period_jitter: float = 0.25  # relative
    orientation_jitter_deg: float = 20.0
    object_scale_min: float = 0.6
    object_scale_max: float = 1.4
    thing_rotation_deg: float = 20.0
    pixel_noise: float = 0.03  # Gaussian noise sigma on the 0..1 intensity scale
    illumination: float = 0.15  # largest brightness change across the image from a linear lighting gradient
    jpeg_quality: int = 95
    name_prefix: str = "EMB"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "min_pixels" and value is None:
                continue
            if f.name == "name_prefix":
                if not isinstance(value, str) or not value.isidentifier():
                    raise _error(f.name, f"must be a short identifier-like string, got {value!r}")
                continue
            # bool is an int subclass; reject it so that `true` in YAML is not read as 1.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _error(f.name, f"must be a number, got {value!r}")
            if f.type in ("int", "int | None") and not isinstance(value, int):
                raise _error(f.name, f"must be an integer, got {value!r}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise _error(key, f"{message}, got {getattr(self, key)!r}")

        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.design_seed >= 0, "design_seed", "must be >= 0")
        need(32 <= self.image_size <= 1024, "image_size", "must be between 32 and 1024")
        # Names carry a 6-digit index, as the lists and the converter expect one name per image.
        need(1 <= self.num_train <= 999_999, "num_train", "must be between 1 and 999999")
        need(1 <= self.num_test <= 999_999, "num_test", "must be between 1 and 999999")
        max_stuff = len(STUFF_FAMILIES) * len(_STUFF_VARIANTS)
        need(1 <= self.num_stuff_classes <= max_stuff, "num_stuff_classes", f"must be between 1 and {max_stuff}")
        max_things = len(THING_SHAPES) * len(THING_FILLS)
        need(1 <= self.num_thing_classes <= max_things, "num_thing_classes", f"must be between 1 and {max_things}")
        need(self.num_palettes >= 4 and self.num_palettes % 2 == 0, "num_palettes", "must be even and >= 4")
        need(self.num_scenes >= 1, "num_scenes", "must be >= 1")
        need(1 <= self.scenes_per_class <= self.num_scenes, "scenes_per_class", "must be between 1 and num_scenes")
        need(0.0 <= self.in_scene_prob <= 1.0, "in_scene_prob", "must be in [0, 1]")
        need(self.max_stuff_per_image >= 1, "max_stuff_per_image", "must be >= 1")
        need(self.max_things_per_image >= 1, "max_things_per_image", "must be >= 1")
        need(
            self.max_stuff_per_image <= self.num_stuff_classes,
            "max_stuff_per_image",
            "must not exceed num_stuff_classes",
        )
        need(
            self.max_things_per_image <= self.num_thing_classes,
            "max_things_per_image",
            "must not exceed num_thing_classes",
        )
        need(
            2 <= self.min_classes_per_image <= self.max_classes_per_image,
            "min_classes_per_image",
            "must be >= 2 and <= max_classes_per_image",
        )
        need(
            self.max_classes_per_image <= self.max_stuff_per_image + self.max_things_per_image,
            "max_classes_per_image",
            "must not exceed max_stuff_per_image + max_things_per_image",
        )
        need(0.0 <= self.second_instance_prob <= 1.0, "second_instance_prob", "must be in [0, 1]")
        need(self.min_pixels is None or self.min_pixels >= 1, "min_pixels", "must be >= 1 or null")
        need(
            0.0 <= self.clutter_min_fraction <= self.clutter_max_fraction <= 0.2,
            "clutter_min_fraction",
            "must satisfy 0 <= clutter_min_fraction <= clutter_max_fraction <= 0.2",
        )
        need(0.0 <= self.hue_jitter <= 0.5, "hue_jitter", "must be in [0, 0.5]")
        for key in ("saturation_jitter", "value_jitter", "period_jitter"):
            need(0.0 <= getattr(self, key) < 1.0, key, "must be in [0, 1)")
        need(0.0 <= self.orientation_jitter_deg <= 90.0, "orientation_jitter_deg", "must be in [0, 90]")
        need(
            0.0 < self.object_scale_min <= self.object_scale_max <= 3.0,
            "object_scale_min",
            "must satisfy 0 < object_scale_min <= object_scale_max <= 3",
        )
        need(0.0 <= self.thing_rotation_deg <= 180.0, "thing_rotation_deg", "must be in [0, 180]")
        need(0.0 <= self.pixel_noise <= 0.5, "pixel_noise", "must be in [0, 0.5]")
        need(0.0 <= self.illumination <= 0.5, "illumination", "must be in [0, 0.5]")
        need(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be between 1 and 100")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> EmbeddedConfig:
        """Build a config from a mapping; unknown keys and bad values raise an error naming the key."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"embedded generator: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
        # JSON and YAML give 0.5 for floats but may give 1 for 1.0; accept ints where floats are expected.
        for f in fields(cls):
            if f.name in d and f.type == "float" and isinstance(d[f.name], int) and not isinstance(d[f.name], bool):
                d[f.name] = float(d[f.name])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def num_classes(self) -> int:
        return self.num_stuff_classes + self.num_thing_classes

    def resolved_min_pixels(self) -> int:
        """``min_pixels``, or 12 pixels at 64x64 scaled with the image area."""
        if self.min_pixels is not None:
            return self.min_pixels
        return max(1, round(12 * (self.image_size / 64) ** 2))

    def period_scale(self) -> float:
        # Texture periods shrink slower than the image: at 32 px a linear scale would push them below the
        # pixel-grid limit.
        return math.sqrt(self.image_size / 64)

    def radius_scale(self) -> float:
        # Objects keep their share of a large image, but do not shrink below what a texture fill can show.
        ratio = self.image_size / 64
        return max(ratio, math.sqrt(ratio))


# ----------------------------------------------------------------------------------------------------------
# Class design: which texture, shape, fill and palette each class has, and which scenes list it.


@dataclass(frozen=True)
class StuffClass:
    name: str
    family: str
    period: float  # pixels at 64 px, before scaling and jitter
    angle_deg: float
    palette: int


@dataclass(frozen=True)
class ThingClass:
    name: str
    shape: str
    fill: str
    palette: int


@dataclass(frozen=True)
class Design:
    """The drawn class design; index ``k`` of ``classes`` is train id ``k`` and raw id ``k + 1``."""

    classes: tuple[StuffClass | ThingClass, ...]
    palettes_hsv: np.ndarray  # (P, 2, 3) HSV colours, one light and one dark per palette
    scene_stuff: tuple[np.ndarray, ...]  # per scene: typical stuff class ids
    scene_things: tuple[np.ndarray, ...]  # per scene: typical thing class ids
    stuff_ids: np.ndarray
    thing_ids: np.ndarray
    count_pairs: tuple[tuple[int, int], ...]  # allowed (stuff, thing) class counts per image
    count_probs: np.ndarray  # their probabilities

    @property
    def palette_of_raw_id(self) -> np.ndarray:
        """Palette per raw label id (index 0, unlabeled, maps to -1)."""
        return np.array([-1] + [c.palette for c in self.classes])

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]


def _base_colours_hsv(num: int) -> np.ndarray:
    """``num`` colours with hues spread by the golden ratio and alternately light and dark."""
    k = np.arange(num)
    hue = (0.07 + k * 0.6180339887) % 1.0
    light = k % 2 == 0
    sat = np.where(light, 0.45, 0.7)
    val = np.where(light, 0.9, 0.42)
    return np.stack([hue, sat, val], axis=1)


def _stuff_classes(cfg: EmbeddedConfig) -> list[tuple[str, float, float, str]]:
    """(family, period at 64 px, base angle, name) of each stuff class, spreading classes over families."""
    n = cfg.num_stuff_classes
    num_families = min(len(STUFF_FAMILIES), max(1, math.ceil(n / 4)))
    out = []
    for k in range(n):
        family = STUFF_FAMILIES[k % num_families]
        variant = k // num_families
        level, orient = _STUFF_VARIANTS[variant]
        sym = _SYMMETRY_DEG[family]
        # Orientation variants sit half a symmetry period apart; the second period level is turned by a
        # quarter so that the family covers more directions.
        angle = (orient * sym / 2 + level * sym / 4) % sym
        out.append((family, _PERIOD_LEVELS_64[level], angle, f"stuff-{family}-{variant:02d}"))
    return out


def _thing_classes(cfg: EmbeddedConfig) -> list[tuple[str, str, str]]:
    """(shape, fill, name) of each thing class; each shape is used by about two classes with different fills,
    so neither the shape nor the fill alone names a class."""
    n = cfg.num_thing_classes
    num_shapes = min(len(THING_SHAPES), max(1, math.ceil(n / 2)))
    out = []
    for k in range(n):
        shape_idx, round_idx = k % num_shapes, k // num_shapes
        # Offset the fill by 2 per round: with 5 fills the rounds of one shape get distinct fills.
        fill = THING_FILLS[(shape_idx + 2 * round_idx) % len(THING_FILLS)]
        shape = THING_SHAPES[shape_idx]
        out.append((shape, fill, f"thing-{shape}-{fill}"))
    return out


def _balanced_membership(num_items: int, num_groups: int, per_item: int, rng: np.random.Generator) -> list[list[int]]:
    """Put each item into ``per_item`` distinct groups, always choosing the currently smallest groups, so that
    every class is typical of equally many scenes (and appears in about equally many images)."""
    members: list[list[int]] = [[] for _ in range(num_groups)]
    for item in rng.permutation(num_items):
        sizes = np.array([len(m) for m in members], dtype=float) + rng.random(num_groups) * 0.5
        for g in np.argsort(sizes, kind="stable")[:per_item]:
            members[g].append(int(item))
    return [sorted(m) for m in members]


def build_design(cfg: EmbeddedConfig) -> Design:
    """Draw the class design from ``cfg.design_seed``; it does not depend on ``cfg.seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.design_seed, 0x5EED_C1A5]))
    stuff = _stuff_classes(cfg)
    things = _thing_classes(cfg)
    num = len(stuff) + len(things)
    # Palettes are assigned round-robin over a shuffled class order, so each palette serves about
    # num / num_palettes classes of mixed kinds.
    palette_of = np.empty(num, dtype=int)
    palette_of[rng.permutation(num)] = np.arange(num) % cfg.num_palettes
    classes: list[StuffClass | ThingClass] = []
    for k, (family, period, angle, name) in enumerate(stuff):
        classes.append(StuffClass(name, family, period, angle, int(palette_of[k])))
    for j, (shape, fill, name) in enumerate(things):
        classes.append(ThingClass(name, shape, fill, int(palette_of[len(stuff) + j])))

    # Palette p pairs base colour p with base colour p+1: every colour is shared by two palettes, and with an
    # even count the pair is always one light and one dark colour.
    base = _base_colours_hsv(cfg.num_palettes)
    palettes = np.stack([np.stack([base[p], base[(p + 1) % cfg.num_palettes]]) for p in range(cfg.num_palettes)])

    stuff_ids = np.arange(len(stuff))
    thing_ids = np.arange(len(stuff), num)
    pairs, probs = _count_distribution(cfg)
    scene_stuff = _balanced_membership(len(stuff), cfg.num_scenes, cfg.scenes_per_class, rng)
    scene_things = _balanced_membership(len(things), cfg.num_scenes, cfg.scenes_per_class, rng)
    return Design(
        classes=tuple(classes),
        palettes_hsv=palettes,
        scene_stuff=tuple(stuff_ids[np.array(m, dtype=int)] for m in scene_stuff),
        scene_things=tuple(thing_ids[np.array(m, dtype=int)] for m in scene_things),
        stuff_ids=stuff_ids,
        thing_ids=thing_ids,
        count_pairs=pairs,
        count_probs=probs,
    )


def class_table(cfg: EmbeddedConfig) -> ClassTable:
    """The class table of the embedded dataset: id i <-> raw id i + 1 in the archive."""
    design = build_design(cfg)
    return ClassTable(
        DATASET_NAME,
        tuple(
            ClassInfo(id=i, name=c.name, dataset_id=i + 1, kind="stuff" if isinstance(c, StuffClass) else "thing")
            for i, c in enumerate(design.classes)
        ),
    )


# ----------------------------------------------------------------------------------------------------------
# Textures: each returns a mixing weight t in [0, 1] per pixel (0 = palette colour A, 1 = colour B). Edges are
# anti-aliased by a signed distance in pixels, so thin patterns stay legible at small periods.


def _aa(signed_distance: np.ndarray) -> np.ndarray:
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _soft_square(phase: np.ndarray, period: float, duty: float) -> np.ndarray:
    """Anti-aliased square wave that is 1 on a ``duty`` share of each period: near a crossing, (sin - c) divided
    by its slope is the signed distance to the edge in pixels."""
    c = math.cos(math.pi * duty)
    slope = 2 * math.pi / period * math.sqrt(max(1 - c * c, 1e-6))
    return _aa((np.sin(2 * math.pi * phase / period) - c) / slope)


def _lattice_distance(coord: np.ndarray, spacing: float) -> np.ndarray:
    """Distance in pixels to the nearest multiple of ``spacing``."""
    f = np.mod(coord / spacing, 1.0)
    return spacing * np.minimum(f, 1.0 - f)


def _texture(
    family: str, X: np.ndarray, Y: np.ndarray, period: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    ca, sa = math.cos(angle), math.sin(angle)
    # A random phase per instance, so that the pattern does not line up with the image grid the same way twice.
    u = X * ca + Y * sa + rng.uniform(0, period)
    v = -X * sa + Y * ca + rng.uniform(0, period)
    if family == "grating":
        return 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    if family == "stripes":
        return _soft_square(u, period, duty=0.35)
    if family == "checks":
        su = np.sin(2 * math.pi * u / period)
        sv = np.sin(2 * math.pi * v / period)
        return _aa(su * sv * period / (2 * math.pi))
    if family == "dots":
        fu = np.mod(u / period, 1.0) - 0.5
        fv = np.mod(v / period, 1.0) - 0.5
        radius = max(0.8, 0.28 * period)
        return _aa(radius - period * np.hypot(fu, fv))
    if family == "waves":
        # Directional band-pass noise (wood grain): a few sinusoids with frequencies around 1/period and
        # directions around the class angle, summed with random phases.
        k = 6
        angles = angle + rng.normal(0.0, 0.2, k)
        freqs = (1.0 + rng.uniform(-0.15, 0.15, k)) / period
        phases = rng.uniform(0, 2 * math.pi, k)
        z = np.zeros_like(X)
        for a, f, p in zip(angles, freqs, phases):
            z += np.cos(2 * math.pi * f * (X * math.cos(a) + Y * math.sin(a)) + p)
        z /= math.sqrt(k / 2)
        return 1.0 / (1.0 + np.exp(-2.5 * z))
    if family == "bricks":
        row_height, brick_length = period / 2, period
        row = np.floor(v / row_height)
        shifted = u + 0.5 * brick_length * np.mod(row, 2)
        mortar = max(0.5, 0.09 * period)
        dist = np.minimum(_lattice_distance(v, row_height), _lattice_distance(shifted, brick_length))
        return _aa(dist - mortar)  # 1 on the brick faces, 0 on the mortar lines
    if family == "hatch":
        width = max(0.5, 0.12 * period)
        dist = np.minimum(_lattice_distance(u, period), _lattice_distance(v, period))
        return _aa(width - dist)  # 1 on the lines
    raise ValueError(f"embedded generator: unknown texture family {family!r}")


def _fill(fill: str, X: np.ndarray, Y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Mixing weight of a thing fill; fills have a random orientation, since their family names the class."""
    if fill == "solid":
        return np.zeros_like(X)
    return _texture(fill, X, Y, period, rng.uniform(0, math.pi), rng)


# ----------------------------------------------------------------------------------------------------------
# Shapes: inside tests in local coordinates (u, v) scaled so that the shape fits the unit disk.


def _regular_polygon(n: int, radius: float = 1.0, start_deg: float = -90.0) -> np.ndarray:
    a = np.deg2rad(start_deg + np.arange(n) * 360.0 / n)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star_polygon(points: int, inner: float) -> np.ndarray:
    a = np.deg2rad(-90.0 + np.arange(2 * points) * 180.0 / points)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


_POLYGONS = {
    "triangle": _regular_polygon(3, 1.0, -90.0) + np.array([0.0, 0.2]),  # centroid moved towards the middle
    "hexagon": _regular_polygon(6, 0.95, 0.0),
    "star": _star_polygon(5, 0.45),
    "arrow": np.array([[-1.0, -0.3], [0.1, -0.3], [0.1, -0.75], [1.0, 0.0], [0.1, 0.75], [0.1, 0.3], [-1.0, 0.3]]),
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over pixels and looped over the (few) edges."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = verts[-1]
    for x1, y1 in verts:
        crosses = (y1 > v) != (y0 > v)
        x_at = x1 + (x0 - x1) * (v - y1) / ((y0 - y1) if y0 != y1 else 1e-12)
        inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside


def _inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    if shape == "disk":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) / 0.75 + np.abs(v) <= 1.0
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.8**2)
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.1  # image v points down, the heart formula's y points up
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if shape in _POLYGONS:
        return _inside_polygon(u, v, _POLYGONS[shape])
    raise ValueError(f"embedded generator: unknown thing shape {shape!r}")


@dataclass(frozen=True)
class _Placed:
    """A shape's coverage in [0, 1] inside its bounding box ``(y0, y1, x0, x1)`` of the image."""

    cover: np.ndarray
    box: tuple[int, int, int, int]

    @property
    def slices(self) -> tuple[slice, slice]:
        y0, y1, x0, x1 = self.box
        return slice(y0, y1), slice(x0, x1)


def _shape_coverage(
    shape: str,
    size: int,
    cx: float,
    cy: float,
    radius: float,
    rotation: float,
    aspect: float,
    mirror: bool,
    margin: int,
) -> _Placed:
    """Coverage of a placed shape from 2x2 supersampling, in a box ``margin`` pixels wider than the shape (room
    for the outline test and the shadow). Working in the box keeps the cost independent of the image size."""
    reach = radius * max(1.0, aspect) * 1.05 + 1 + margin
    y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 2)
    x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 2)
    # Sample points at +-0.25 px around each pixel centre, in one array so that the inside test runs once.
    sub = np.array([0.25, 0.75])
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1)
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1)
    dy, dx = ys[:, None] - cy, xs[None, :] - cx
    c, s = math.cos(rotation), math.sin(rotation)
    u = (dx * c + dy * s) / radius
    v = (-dx * s + dy * c) / (radius * aspect)
    inside = _inside_shape(shape, -u if mirror else u, v)
    cover = inside.reshape(y1 - y0, 2, x1 - x0, 2).mean(axis=(1, 3))
    return _Placed(cover, (y0, y1, x0, x1))


# ----------------------------------------------------------------------------------------------------------
# One image.


@dataclass(frozen=True)
class RenderedImage:
    rgb: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) uint8 raw ids: 0 unlabeled, 1..C classes
    caption: str


def _jittered_rgb(hsv: np.ndarray, cfg: EmbeddedConfig, rng: np.random.Generator) -> np.ndarray:
    """Jitter one HSV colour (hue absolute, saturation and value relative) and convert it to RGB."""
    h = (hsv[0] + rng.uniform(-cfg.hue_jitter, cfg.hue_jitter)) % 1.0
    s = float(np.clip(hsv[1] * (1 + rng.uniform(-cfg.saturation_jitter, cfg.saturation_jitter)), 0, 1))
    v = float(np.clip(hsv[2] * (1 + rng.uniform(-cfg.value_jitter, cfg.value_jitter)), 0, 1))
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _paint(weight: np.ndarray, palette_hsv: np.ndarray, cfg: EmbeddedConfig, rng: np.random.Generator) -> np.ndarray:
    a = _jittered_rgb(palette_hsv[0], cfg, rng)
    b = _jittered_rgb(palette_hsv[1], cfg, rng)
    return a + weight[..., None] * (b - a)


def _jittered_period(base_64: float, cfg: EmbeddedConfig, rng: np.random.Generator) -> float:
    period = base_64 * cfg.period_scale() * (1 + rng.uniform(-cfg.period_jitter, cfg.period_jitter))
    return max(_MIN_PERIOD_PX, period)


def _choose_classes(
    pool_scene: np.ndarray, pool_all: np.ndarray, count: int, cfg: EmbeddedConfig, rng: np.random.Generator
) -> list[int]:
    """Draw ``count`` distinct classes, each from the scene's typical classes with ``in_scene_prob``."""
    chosen: list[int] = []
    for _ in range(count):
        scene_left = [k for k in pool_scene.tolist() if k not in chosen]
        in_scene = bool(scene_left) and rng.random() < cfg.in_scene_prob
        pool = scene_left if in_scene else [k for k in pool_all.tolist() if k not in chosen]
        chosen.append(pool[int(rng.integers(len(pool)))])
    return chosen


def _count_distribution(cfg: EmbeddedConfig) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
    """The (stuff, thing) class-count pairs that respect every per-image limit, and their probabilities.

    Probabilities are proportional to exp(lambda * stuff), with lambda chosen so that stuff and thing slots are
    filled closer to the proportion of stuff and thing classes, so that classes of both kinds appear in similar
    numbers of images. lambda is capped at +-0.5: a full balance would make nearly every image a 3-stuff scene.
    """
    pairs = tuple(
        (s, t)
        for s in range(1, cfg.max_stuff_per_image + 1)
        for t in range(1, cfg.max_things_per_image + 1)
        if cfg.min_classes_per_image <= s + t <= cfg.max_classes_per_image
    )
    if not pairs:
        raise _error("min_classes_per_image", "leaves no valid (stuff, thing) count with the per-image maxima")
    arr = np.array(pairs, dtype=float)
    target = cfg.num_stuff_classes / cfg.num_thing_classes
    best_probs, best_gap = None, math.inf
    for lam in np.linspace(-0.5, 0.5, 101):
        w = np.exp(lam * arr[:, 0])
        p = w / w.sum()
        gap = abs(math.log((p @ arr[:, 0]) / (p @ arr[:, 1]) / target))
        if gap < best_gap:
            best_probs, best_gap = p, gap
    assert best_probs is not None
    return pairs, best_probs


def _stuff_layout(
    num_regions: int, size: int, X: np.ndarray, Y: np.ndarray, rng: np.random.Generator
) -> np.ndarray | None:
    """Region index per pixel from a warped Voronoi partition whose cells are merged into ``num_regions``
    regions; None if a region came out too small (the caller redraws)."""
    low = max(3, num_regions)
    num_seeds = int(rng.integers(low, low + 4))
    seeds = rng.uniform(0, size, (num_seeds, 2))
    # Low-frequency warp: bends the straight Voronoi edges into organic boundaries.
    amp = 0.07 * size
    wx = amp * np.sin(2 * math.pi * (Y / size * rng.uniform(0.5, 1.5)) + rng.uniform(0, 2 * math.pi))
    wy = amp * np.sin(2 * math.pi * (X / size * rng.uniform(0.5, 1.5)) + rng.uniform(0, 2 * math.pi))
    px, py = X + wx, Y + wy
    d2 = (px[None] - seeds[:, 0, None, None]) ** 2 + (py[None] - seeds[:, 1, None, None]) ** 2
    cell = np.argmin(d2, axis=0)
    # The first cells get distinct regions (seeds are random, so which cells does not matter); the rest merge
    # into random regions, which makes regions non-convex and sometimes split.
    region_of_cell = np.concatenate(
        [rng.permutation(num_regions), rng.integers(0, num_regions, num_seeds - num_regions)]
    )
    region = region_of_cell[cell]
    areas = np.bincount(region.ravel(), minlength=num_regions)
    if areas.min() < _MIN_REGION_FRACTION * size * size:
        return None
    return region


def _edge_pixels(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it; the image border counts as inside, so an object cut by
    the frame gets no outline along the frame."""
    p = np.pad(mask, 1, mode="edge")
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(a)
    h, w = a.shape
    out[dy:, dx:] = a[: h - dy, : w - dx]
    return out


def _place_things(
    things: list[int],
    design: Design,
    cfg: EmbeddedConfig,
    image: np.ndarray,
    label: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    min_pixels: int,
    rng: np.random.Generator,
) -> list[int]:
    """Paste thing instances in painter's order; returns the classes that got at least one instance."""
    size = cfg.image_size
    owner = np.full((size, size), -1)  # instance index per pixel
    area: list[int] = []  # silhouette area of each instance when it was placed
    visible: list[int] = []  # its pixels not yet covered by later instances
    placed: set[int] = set()
    instances = [k for k in things for _ in range(2 if rng.random() < cfg.second_instance_prob else 1)]
    rng.shuffle(instances)
    shadow_offset = max(1, round(cfg.period_scale()))
    shadow_sigma = 0.8 * cfg.period_scale()
    margin = shadow_offset + math.ceil(3 * shadow_sigma) + 1
    palette_of = design.palette_of_raw_id
    for k in instances:
        cls = design.classes[k]
        assert isinstance(cls, ThingClass)
        radius = _THING_RADIUS_64 * cfg.radius_scale() * rng.uniform(cfg.object_scale_min, cfg.object_scale_max)
        chosen: tuple[_Placed, np.ndarray, np.ndarray] | None = None
        for attempt in range(_PLACEMENT_TRIES):
            cx, cy = rng.uniform(0.12 * size, 0.88 * size, 2)
            shape = _shape_coverage(
                cls.shape,
                size,
                cx,
                cy,
                radius,
                rotation=math.radians(rng.uniform(-cfg.thing_rotation_deg, cfg.thing_rotation_deg)),
                aspect=rng.uniform(0.9, 1.1),
                mirror=bool(rng.random() < 0.5),
                margin=margin,
            )
            mask = shape.cover >= 0.5
            if mask.sum() < 2 * min_pixels:
                continue
            # Texture contrast with the background is an objectness cue: prefer a spot where most of what lies
            # below has another palette, but do not insist (camouflage happens, and the outline still shows).
            if attempt < _CONTRAST_TRIES and np.mean(palette_of[label[shape.slices][mask]] == cls.palette) > 0.5:
                continue
            # Keep every earlier instance at least partly visible, as in real occlusion.
            under = owner[shape.slices][mask]
            hidden = np.bincount(under[under >= 0], minlength=len(area))
            if all(visible[i] - hidden[i] >= _MIN_VISIBLE_FRACTION * area[i] for i in range(len(area))):
                chosen = (shape, mask, hidden)
                break
        if chosen is None:
            continue
        shape, mask, hidden = chosen
        sl = shape.slices
        # Soft drop-shadow on what lies below, then the fill with a darker 1-px outline.
        shadow = gaussian_filter(_shift(shape.cover, shadow_offset, shadow_offset), shadow_sigma)
        image[sl] *= (1.0 - _SHADOW_STRENGTH * shadow * (1.0 - shape.cover))[..., None]
        weight = _fill(cls.fill, X[sl], Y[sl], _jittered_period(_FILL_PERIOD_64, cfg, rng), rng)
        colour = _paint(weight, design.palettes_hsv[cls.palette], cfg, rng)
        colour[_edge_pixels(mask)] *= _OUTLINE_FACTOR
        cover = shape.cover[..., None]
        image[sl] = cover * colour + (1.0 - cover) * image[sl]
        label[sl][mask] = k + 1
        owner[sl][mask] = len(area)
        for i, h in enumerate(hidden):
            visible[i] -= int(h)
        area.append(int(mask.sum()))
        visible.append(int(mask.sum()))
        placed.add(k)
    return sorted(placed)


def _add_clutter(cfg: EmbeddedConfig, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> None:
    """Irregular blobs of a held-out confetti texture (random per-pixel colours), labelled 0 (unlabeled) like
    COCO-Stuff's void pixels."""
    size = cfg.image_size
    total = rng.uniform(cfg.clutter_min_fraction, cfg.clutter_max_fraction) * size * size
    if total <= 0:
        return
    num_blobs = int(rng.integers(1, 4))
    radius = math.sqrt(total / num_blobs / math.pi)
    for _ in range(num_blobs):
        cx, cy = rng.uniform(0, size, 2)
        reach = radius * 1.4 + 1
        y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(float)
        dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
        theta = np.arctan2(dy, dx)
        wobble = 1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.15 * np.sin(5 * theta + rng.uniform(0, 6.3))
        blob = np.hypot(dx, dy) <= radius * wobble
        image[y0:y1, x0:x1][blob] = rng.random((int(blob.sum()), 3))
        label[y0:y1, x0:x1][blob] = 0


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (Y, X), cached per size: every image of a run uses the same grid."""
    if size not in _GRIDS:
        Y, X = np.mgrid[0:size, 0:size].astype(float)
        Y.flags.writeable = False
        X.flags.writeable = False
        _GRIDS[size] = (Y, X)
    return _GRIDS[size]


def _draw(cfg: EmbeddedConfig, design: Design, rng: np.random.Generator) -> RenderedImage | None:
    size = cfg.image_size
    Y, X = _grid(size)
    min_pixels = cfg.resolved_min_pixels()
    scene = int(rng.integers(cfg.num_scenes))
    num_stuff, num_things = design.count_pairs[int(rng.choice(len(design.count_pairs), p=design.count_probs))]
    stuff = _choose_classes(design.scene_stuff[scene], design.stuff_ids, num_stuff, cfg, rng)
    things = _choose_classes(design.scene_things[scene], design.thing_ids, num_things, cfg, rng)

    region = _stuff_layout(num_stuff, size, X, Y, rng)
    if region is None:
        return None
    image = np.zeros((size, size, 3))
    label = np.zeros((size, size), dtype=np.uint8)
    for r, k in enumerate(stuff):
        cls = design.classes[k]
        assert isinstance(cls, StuffClass)
        angle = math.radians(cls.angle_deg + rng.uniform(-cfg.orientation_jitter_deg, cfg.orientation_jitter_deg))
        inside = region == r
        # Textures are per-pixel functions of the coordinates, so only the region's own pixels are computed.
        weight = _texture(cls.family, X[inside], Y[inside], _jittered_period(cls.period, cfg, rng), angle, rng)
        image[inside] = _paint(weight, design.palettes_hsv[cls.palette], cfg, rng)
        label[inside] = k + 1

    placed = _place_things(things, design, cfg, image, label, X, Y, min_pixels, rng)
    _add_clutter(cfg, image, label, rng)

    # Slivers too small to name become unlabeled, as the image-level labels ignore them too.
    counts = np.bincount(label.ravel(), minlength=cfg.num_classes + 1)
    tiny = np.flatnonzero((counts > 0) & (counts < min_pixels))
    tiny = tiny[tiny > 0]
    if len(tiny):
        label[np.isin(label, tiny)] = 0
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=cfg.num_classes + 1)[1:])
    if not cfg.min_classes_per_image <= len(present) <= cfg.max_classes_per_image or len(placed) == 0:
        return None

    # Linear lighting gradient and sensor noise: brightness varies within a class, so it cannot name one.
    gx, gy = rng.uniform(-cfg.illumination, cfg.illumination, 2)
    image *= (1.0 + gx * (X / size - 0.5) * 2 + gy * (Y / size - 0.5) * 2)[..., None]
    image += rng.normal(0.0, cfg.pixel_noise, image.shape)
    rgb = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    names = [design.classes[k].name for k in present]
    caption = f"scene type {scene} with " + ", ".join(names)
    return RenderedImage(rgb=rgb, label=label, caption=caption)


def _image_rng(cfg: EmbeddedConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLITS.index(split), index]))


def render_image(cfg: EmbeddedConfig, design: Design, split: str, index: int) -> RenderedImage:
    """Image ``index`` of ``split``; a function of (cfg, split, index) only."""
    if split not in SPLITS:
        raise ValueError(f"embedded generator: unknown split {split!r} (expected one of {SPLITS})")
    rng = _image_rng(cfg, split, index)
    for _ in range(_MAX_ATTEMPTS):
        drawn = _draw(cfg, design, rng)
        if drawn is not None:
            return drawn
    raise RuntimeError(
        f"embedded generator: image {index} of {split!r} failed {_MAX_ATTEMPTS} draws; the per-image class "
        "limits (min/max_classes_per_image, min_pixels) are probably too tight for image_size"
    )


# ----------------------------------------------------------------------------------------------------------
# Files and the archive.


def image_name(cfg: EmbeddedConfig, split: str, index: int) -> str:
    return f"{cfg.name_prefix}_{split}_{index + 1:06d}"


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: at 64 px, 4:2:0 would smear the 1-px outlines and fine coloured textures.
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _mat_elements(variables: dict[str, Any]) -> bytes:
    """The data elements of a MAT v5 file holding ``variables``, without its 128-byte file header. A v5 file
    is a header followed by independent elements, so elements written separately can be concatenated."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, format="5", do_compression=True)
    return buf.getvalue()[128:]


@functools.lru_cache(maxsize=4)
def _names_element(class_names: tuple[str, ...]) -> bytes:
    # The class-name cell is the same in every file and costs ~3 ms to encode, more than the rest together.
    names = np.empty((1, len(class_names)), dtype=object)
    names[0, :] = class_names
    return _mat_elements({"names": names})


@functools.lru_cache(maxsize=1)
def _mat_header() -> bytes:
    # The header of a default-endian v5 file as scipy writes it, with our fixed description text.
    buf = io.BytesIO()
    scipy.io.savemat(buf, {}, format="5")
    return _MAT_HEADER.ljust(116, b" ") + buf.getvalue()[116:128]


def encode_mat(label: np.ndarray, class_names: list[str], caption: str) -> bytes:
    """A MATLAB v5 annotation like COCO-Stuff-10K v1.1: ``S`` (raw ids), ``names`` and ``captions`` as cells."""
    captions = np.empty((1, 1), dtype=object)
    captions[0, 0] = caption
    dtype = np.uint8 if len(class_names) < 256 else np.uint16
    return b"".join(
        [
            _mat_header(),
            _mat_elements({"S": label.astype(dtype)}),
            _names_element(tuple(class_names)),
            _mat_elements({"captions": captions}),
        ]
    )


# Worker state, set once per process so that the design is not pickled with every job.
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: EmbeddedConfig) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["design"] = build_design(cfg)


def _encode_job(job: tuple[str, int]) -> tuple[str, bytes, bytes]:
    cfg: EmbeddedConfig = _WORKER["cfg"]
    design: Design = _WORKER["design"]
    split, index = job
    drawn = render_image(cfg, design, split, index)
    return (
        image_name(cfg, split, index),
        encode_jpeg(drawn.rgb, cfg.jpeg_quality),
        encode_mat(drawn.label, design.names, drawn.caption),
    )


def _zip_entry(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    # A fixed timestamp and mode keep the zip byte-identical between runs.
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_STORED  # JPEG and compressed MAT data do not deflate further
    zf.writestr(info, data)


def default_workers(num_images: int) -> int:
    """Up to 2 processes, but one for small runs: starting a spawned worker costs more than ~200 images."""
    return max(1, min(2, os.cpu_count() or 1, math.ceil(num_images / 200)))


def generate_embedded(cfg: EmbeddedConfig, *, archive: Path, classes: Path, workers: int | None = None) -> None:
    """Write the raw COCO-Stuff-10K v1.1 style zip ``archive`` and the class table ``classes``.

    ``workers`` processes draw the images (default: up to 2, see ``default_workers``); the output does not
    depend on it.
    """
    archive, classes = Path(archive), Path(classes)
    jobs = [(split, i) for split, n in (("train", cfg.num_train), ("test", cfg.num_test)) for i in range(n)]
    workers = default_workers(len(jobs)) if workers is None else workers
    if workers < 1:
        raise ValueError(f"embedded generator: workers must be >= 1, got {workers}")
    lists = {split: [image_name(cfg, s, i) for s, i in jobs if s == split] for split in SPLITS}

    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        if workers == 1:
            _init_worker(cfg)
            results: Iterable[tuple[str, bytes, bytes]] = map(_encode_job, jobs)
            _write_entries(zf, results)
        else:
            # spawn, not fork: the caller may hold torch threads, and forking those can deadlock.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
                # imap keeps job order, so the zip's entry order does not depend on the worker count.
                _write_entries(zf, pool.imap(_encode_job, jobs, chunksize=32))
        for split in SPLITS:
            _zip_entry(zf, f"imageLists/{split}.txt", ("\n".join(lists[split]) + "\n").encode())
        _zip_entry(zf, "imageLists/all.txt", ("\n".join(lists["train"] + lists["test"]) + "\n").encode())
    class_table(cfg).save(classes)


def _write_entries(zf: zipfile.ZipFile, results: Iterable[tuple[str, bytes, bytes]]) -> None:
    for name, jpeg, mat in results:
        _zip_entry(zf, f"images/{name}.jpg", jpeg)
        _zip_entry(zf, f"annotations/{name}.mat", mat)


# ----------------------------------------------------------------------------------------------------------
# Reading back and statistics (tests, benchmarks, the acceptance checks of datasets.md).


def iter_archive(archive: Path, split: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB uint8 image, raw-id label map) of each image of ``split`` in a raw v1.1 style zip."""
    archive = Path(archive)
    with zipfile.ZipFile(archive) as zf:
        try:
            names = zf.read(f"imageLists/{split}.txt").decode().split()
        except KeyError:
            raise ValueError(f"{archive}: no imageLists/{split}.txt in the archive") from None
        for name in names:
            with Image.open(io.BytesIO(zf.read(f"images/{name}.jpg"))) as img:
                rgb = np.asarray(img.convert("RGB"))
            label = scipy.io.loadmat(io.BytesIO(zf.read(f"annotations/{name}.mat")))["S"]
            yield name, rgb, label


@dataclass(frozen=True)
class DatasetStatistics:
    classes_per_image: np.ndarray  # (N,) number of classes present
    ignore_fraction: np.ndarray  # (N,) share of unlabeled pixels
    class_image_counts: np.ndarray  # (C,) images in which each class is present
    class_pixel_fraction: np.ndarray  # (C,) share of all pixels per class

    def summary(self) -> dict[str, float]:
        return {
            "images": int(len(self.classes_per_image)),
            "classes_per_image_mean": float(self.classes_per_image.mean()),
            "classes_per_image_min": int(self.classes_per_image.min()),
            "classes_per_image_max": int(self.classes_per_image.max()),
            "ignore_percent_mean": float(100 * self.ignore_fraction.mean()),
            "ignore_percent_max": float(100 * self.ignore_fraction.max()),
            "images_per_class_min": int(self.class_image_counts.min()),
            "images_per_class_max": int(self.class_image_counts.max()),
        }


def dataset_statistics(
    labels: Iterable[np.ndarray], num_classes: int, *, ignore_value: int = 0, first_class_value: int = 1
) -> DatasetStatistics:
    """Statistics of label maps. Defaults read raw archive ids (0 unlabeled, 1..C); prepared labels (0..C-1,
    255 ignore) need ``ignore_value=255, first_class_value=0``."""
    per_image, ignore, presence = [], [], []
    pixels = np.zeros(num_classes)
    for lab in labels:
        counts = np.bincount(lab.ravel().astype(np.int64), minlength=max(256, first_class_value + num_classes))
        cls_counts = counts[first_class_value : first_class_value + num_classes]
        present = cls_counts > 0
        per_image.append(int(present.sum()))
        ignore.append(counts[ignore_value] / lab.size)
        presence.append(present)
        pixels += cls_counts
    if not per_image:
        raise ValueError("dataset_statistics: no label maps given")
    return DatasetStatistics(
        classes_per_image=np.array(per_image),
        ignore_fraction=np.array(ignore),
        class_image_counts=np.sum(presence, axis=0),
        class_pixel_fraction=pixels / max(pixels.sum(), 1),
    )


def archive_statistics(archive: Path, split: str, num_classes: int) -> DatasetStatistics:
    return dataset_statistics((label for _, _, label in iter_archive(archive, split)), num_classes)
