"""What each image of the embedded generated dataset shows (:mod:`simprop.data.synthetic` writes
them as a VOC2012 + SBD tree): the classes' shape families, colours and textures, the scenes
behind them, the plan of every image (its main class, set membership, minor objects) and its
rendering into an RGB image and a palette label with 255 boundary bands.

Everything is drawn from ``numpy.random.default_rng([seed, image index])``.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from simprop.data.errors import DataError
from simprop.data.filters import FILTERS, mask_passes
from simprop.voc import IGNORE_INDEX, NUM_CLASSES

OVERLAP_FRACTION = 0.77  # share of VOC2012 segmentation images that are also in SBD (2237 / 2913)


SBD_VAL_FRACTION = 0.25  # SBD val / (train + val) = 2857 / 11355


MINOR_COUNT_P = (0.5, 0.35, 0.15)  # probabilities of 0, 1, 2 minor objects of other classes


TWO_MAJOR_P = 0.8  # probability of a second large object of another class beside the main one


GROUP_SIZE = 5  # classes 5g+1..5g+5 form a group (a PASCAL-5i fold's classes); see render_image


MAJOR_TRIES = 8  # layouts tried before the second major object is given up


SCENE_PREFERENCE = 0.75  # probability that an image shows its main class' usual scene


Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]


SHAPES: dict[str, Shape] = {
    "ellipse": lambda u, v: u * u + v * v <= 1.0,
    "rectangle": lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 0.62),
    "triangle": lambda u, v: (v <= 0.8) & (np.abs(u) <= (v + 1.0) * 0.5) & (v >= -1.0),
    "star": lambda u, v: _rho(u, v) <= 0.55 + 0.45 * np.cos(5 * _angle(u, v) + math.pi / 2),
    "ring": lambda u, v: (_rho(u, v) <= 1.0) & (_rho(u, v) >= 0.55),
    "plus": lambda u, v: ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "hexagon": lambda u, v: np.maximum(np.abs(u) * 0.866 + np.abs(v) * 0.5, np.abs(v)) <= 0.9,
    "crescent": lambda u, v: (_rho(u, v) <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.72**2),
    "ell": lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0) & ~((u > -0.25) & (v < 0.25)),
    "bowtie": lambda u, v: (np.abs(v) <= np.abs(u) * 0.9) & (np.abs(u) <= 1.0),
    "halfdisk": lambda u, v: (_rho(u, v) <= 1.0) & (v >= -0.1),
    "trapezoid": lambda u, v: (np.abs(v) <= 0.7) & (np.abs(u) <= 0.5 + 0.5 * (v + 0.7) / 1.4),
    "arrow": lambda u, v: ((np.abs(v) <= 0.25) & (u >= -1.0) & (u <= 0.15))
    | ((u >= 0.15) & (u <= 1.0) & (np.abs(v) <= (1.0 - u) * 1.1)),
    "gear": lambda u, v: _rho(u, v) <= 0.78 + 0.22 * np.sign(np.cos(8 * _angle(u, v))),
    "frame": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 1.0) & (np.maximum(np.abs(u), np.abs(v)) >= 0.58),
    "tee": lambda u, v: ((np.abs(u) <= 1.0) & (v >= -1.0) & (v <= -0.45)) | ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)),
    "dumbbell": lambda u, v: ((u - 0.55) ** 2 + v * v <= 0.2) | ((u + 0.55) ** 2 + v * v <= 0.2)
    | ((np.abs(u) <= 0.6) & (np.abs(v) <= 0.16)),
    "heart": lambda u, v: ((1.15 * u) ** 2 + (1.15 * -v + 0.25) ** 2 - 1.0) ** 3
    - (1.15 * u) ** 2 * (1.15 * -v + 0.25) ** 3 <= 0.0,
    "arch": lambda u, v: (_rho(u, v) <= 1.0) & (_rho(u, v) >= 0.5) & (v <= 0.25),
}


def _rho(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.hypot(u, v)


def _angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.arctan2(v, u)


TEXTURES = ("flat", "stripes", "checker", "dots", "radial")


SCENES = ("sky", "road", "grass", "indoor")


# The usual scene of each class (1-based ids, VOC names in simprop.data.voc.VOC_CLASSES).
CLASS_SCENE = {
    1: "sky", 3: "sky", 4: "sky",
    2: "road", 6: "road", 7: "road", 14: "road", 15: "road", 19: "road",
    10: "grass", 12: "grass", 13: "grass", 17: "grass",
    5: "indoor", 8: "indoor", 9: "indoor", 11: "indoor", 16: "indoor", 18: "indoor", 20: "indoor",
}  # fmt: skip


@dataclass(frozen=True)
class ClassStyle:
    """How objects of one class look: shape family, texture and two colours (RGB 0..255)."""

    shape: str
    texture: str
    base: tuple[float, float, float]
    accent: tuple[float, float, float]


def class_styles() -> dict[int, ClassStyle]:
    """A distinct shape family for every class; hues spread so neighbouring ids differ."""
    shapes = list(SHAPES)
    styles = {}
    for c in range(1, NUM_CLASSES + 1):
        hue = ((c - 1) * 7 % NUM_CLASSES) / NUM_CLASSES
        sat = 0.85 if c % 2 else 0.6
        val = 0.9 if (c // 2) % 2 else 0.7
        base = tuple(255 * x for x in colorsys.hsv_to_rgb(hue, sat, val))
        accent = tuple(255 * x for x in colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.5, val * 0.45))
        styles[c] = ClassStyle(shapes[c - 1], TEXTURES[(c - 1) % len(TEXTURES)], base, accent)
    return styles


STYLES = class_styles()


@dataclass(frozen=True)
class ImagePlan:
    """One generated image: its id, main class and archive memberships."""

    index: int  # seeds the image's random stream
    image_id: str
    primary: int
    voc_split: str | None  # "train" | "val" | None
    sbd_split: str | None  # "train" | "val" | None


def plan_images(params) -> list[ImagePlan]:
    """Ids, main classes and set memberships of every image (``params``: data.synthetic)."""
    n_voc_val = params.num_voc_images // 2
    n_voc_train = params.num_voc_images - n_voc_val
    n_overlap = min(round(OVERLAP_FRACTION * params.num_voc_images), params.num_sbd_images)
    overlap_val = min(n_overlap // 2, n_voc_val)
    overlap_train = min(n_overlap - overlap_val, n_voc_train)
    n_sbd_only = params.num_sbd_images - overlap_val - overlap_train
    # Three pools; main classes are dealt round-robin within each, so every class is covered.
    memberships: list[tuple[int, str | None, bool]] = []  # (main class, VOC split, in SBD)
    for size, voc_split, n_in_sbd in (
        (n_voc_val, "val", overlap_val),
        (n_voc_train, "train", overlap_train),
        (n_sbd_only, None, n_sbd_only),
    ):
        memberships += [(k % NUM_CLASSES + 1, voc_split, k < n_in_sbd) for k in range(size)]
    total = len(memberships)
    rng = np.random.default_rng([params.seed, 2**31])
    id_numbers = rng.permutation(total)
    in_sbd = [i for i, (_, _, sbd) in enumerate(memberships) if sbd]
    sbd_val = set(rng.choice(in_sbd, size=round(SBD_VAL_FRACTION * len(in_sbd)), replace=False).tolist())
    plans = []
    for index, (primary, voc_split, sbd) in enumerate(memberships):
        number = int(id_numbers[index])
        image_id = f"{2007 + number * 5 // total}_{number:06d}"
        sbd_split = ("val" if index in sbd_val else "train") if sbd else None
        plans.append(ImagePlan(index, image_id, primary, voc_split, sbd_split))
    return plans


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.random((height // cell + 2, width // cell + 2), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR))


def render_scene(scene: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A background texture, ``height x width x 3`` float32 in 0..255."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    tint = rng.normal(0.0, 8.0, 3).astype(np.float32)
    coarse = _smooth_noise(rng, height, width, max(4, width // 6))[..., None]
    fine = rng.standard_normal((height, width, 1), dtype=np.float32)
    if scene == "sky":
        top, bottom = np.array([100, 150, 225], np.float32), np.array([195, 215, 240], np.float32)
        img = top + (bottom - top) * y + 90.0 * np.clip(coarse - 0.55, 0.0, 1.0) + 3.0 * fine
    elif scene == "road":
        horizon = rng.uniform(0.25, 0.4)
        sky = np.array([175, 185, 195], np.float32) + 10.0 * coarse
        asphalt = np.array([92, 92, 98], np.float32) + 25.0 * coarse + 10.0 * fine
        img = np.where(y < horizon, sky, asphalt)
        lane = abs(y - (horizon + 0.55 * (1 - horizon))) < 0.02
        img = np.where(lane & (np.sin(np.arange(width) / max(2.0, width / 20)) > 0)[None, :, None],
                       np.array([215, 210, 160], np.float32), img)
    elif scene == "grass":
        img = np.array([68, 130, 52], np.float32) + 45.0 * (coarse - 0.5) + 16.0 * fine
    elif scene == "indoor":
        floor = rng.uniform(0.55, 0.75)
        wall = np.array([205, 186, 152], np.float32) + 12.0 * coarse
        planks = (np.floor(y * rng.uniform(8, 14)) % 2) * 14.0
        wood = np.array([125, 82, 46], np.float32) - planks + 8.0 * fine
        img = np.where(y < floor, wall, wood)
    else:
        raise ValueError(f"unknown scene {scene!r}")
    return np.broadcast_to(img + tint, (height, width, 3)).astype(np.float32)


def _texture(style: ClassStyle, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The colours of an object in its own coordinates, with per-instance jitter."""
    jitter = rng.normal(0.0, 12.0, 3)
    brightness = rng.uniform(0.85, 1.15)
    base = np.clip(np.array(style.base) * brightness + jitter, 0, 255).astype(np.float32)
    accent = np.clip(np.array(style.accent) * brightness + 0.5 * jitter, 0, 255).astype(np.float32)
    freq = rng.uniform(2.5, 4.0)
    phase = rng.uniform(0.0, 2 * math.pi)
    if style.texture == "flat":
        weight = np.zeros_like(u)
    elif style.texture == "stripes":
        weight = (np.sin(freq * math.pi * u + phase) > 0).astype(np.float32)
    elif style.texture == "checker":
        weight = ((np.floor(freq * (u + 2)) + np.floor(freq * (v + 2))) % 2).astype(np.float32)
    elif style.texture == "dots":
        fu, fv = (freq * u) % 1.0 - 0.5, (freq * v) % 1.0 - 0.5
        weight = (fu * fu + fv * fv < 0.09).astype(np.float32)
    else:  # radial
        weight = np.clip(np.hypot(u, v), 0.0, 1.0).astype(np.float32)
    shading = (1.0 - 0.12 * np.clip(v, -1, 1))[..., None]
    weight = weight[..., None]
    return (base * (1 - weight) + accent * weight) * shading


@dataclass
class _Object:
    rows: slice
    cols: slice
    mask: np.ndarray
    colours: np.ndarray


def _draw_object(
    rng: np.random.Generator, cls: int, radius: float, cy: float, cx: float, height: int, width: int
) -> _Object | None:
    """Mask and colours of one object of class ``cls`` in its bounding box (clipped to the image)."""
    style = STYLES[cls]
    aspect = rng.uniform(0.75, 1.33)
    theta = rng.uniform(-0.35, 0.35)
    rx, ry = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    half = int(math.ceil(1.45 * max(rx, ry))) + 1
    y0, y1 = max(0, int(cy) - half), min(height, int(cy) + half + 1)
    x0, x1 = max(0, int(cx) - half), min(width, int(cx) + half + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    yy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
    xx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
    cos, sin = math.cos(theta), math.sin(theta)
    u = (cos * xx + sin * yy) / rx
    v = (-sin * xx + cos * yy) / ry
    mask = SHAPES[style.shape](u, v)
    colours = _texture(style, u, v, rng)
    return _Object(slice(y0, y1), slice(x0, x1), mask, colours)


def _paint_label(label: np.ndarray, obj: _Object, cls: int) -> None:
    label[obj.rows, obj.cols][obj.mask] = cls


def _paint(image: np.ndarray, label: np.ndarray, obj: _Object, cls: int) -> None:
    image[obj.rows, obj.cols][obj.mask] = obj.colours[obj.mask]
    _paint_label(label, obj, cls)


def band_size(height: int, width: int) -> int:
    """Window of the VOC-style void band: about 2 px wide on small images, 4 px at VOC size."""
    return 3 if min(height, width) < 250 else 5


def with_boundary_bands(label: np.ndarray, size: int) -> np.ndarray:
    """``label`` with 255 on every pixel within ``size // 2`` of a boundary between labels."""
    edges = ndimage.maximum_filter(label, size=size) != ndimage.minimum_filter(label, size=size)
    banded = label.copy()
    banded[edges] = IGNORE_INDEX
    return banded


def group_classes(cls: int) -> list[int]:
    """The five classes of ``cls``' group (1-5, 6-10, ...): the second major object's candidates."""
    first = (cls - 1) // GROUP_SIZE * GROUP_SIZE + 1
    return list(range(first, first + GROUP_SIZE))


def choose_scene(primary: int, rng: np.random.Generator) -> str:
    """The main class' usual scene with probability SCENE_PREFERENCE, else one of the others."""
    usual = CLASS_SCENE[primary]
    if rng.random() < SCENE_PREFERENCE:
        return usual
    others = [s for s in SCENES if s != usual]
    return others[int(rng.integers(len(others)))]


def render_image(plan: ImagePlan, params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rgb uint8, SBD label, VOC label with void bands)`` of one planned image.

    Layout: 0-2 *minor* objects of other classes (log-uniform sizes, often small enough for the
    small-object filter to drop), then either the main object alone near the centre or, with
    probability TWO_MAJOR_P, the main object and a second *major* object of another class side
    by side, in random depth order. Layouts are redrawn, growing, until the major objects pass
    every small-object filter; after MAJOR_TRIES failures only the main object is required, and
    after as many more only the OSLSM filter (on images too small for 2048 pixels of its shape),
    with the object placed anywhere.
    """
    height, width = params.height, params.width
    side = min(height, width)
    rng = np.random.default_rng([params.seed, plan.index])
    scene = render_scene(choose_scene(plan.primary, rng), rng, height, width)
    others = [c for c in range(1, NUM_CLASSES + 1) if c != plan.primary]
    n_minor = int(rng.choice(len(MINOR_COUNT_P), p=MINOR_COUNT_P))
    group = [c for c in group_classes(plan.primary) if c != plan.primary]
    second = int(group[int(rng.integers(len(group)))])
    minors = [int(c) for c in rng.choice([c for c in others if c != second], size=n_minor, replace=False)]
    two_major = rng.random() < TWO_MAJOR_P
    band = band_size(height, width)
    phases = (  # (second major object?, filters the major objects must pass, tries, largest scale)
        (two_major, FILTERS, MAJOR_TRIES, 1.7),
        (False, FILTERS, MAJOR_TRIES, 1.7),
        (False, ("oslsm",), 4 * MAJOR_TRIES, 1.7),  # too small an image for 2048 pixels of this shape
    )
    for with_second, rules, tries, max_scale in phases:
        for attempt in range(tries):
            scale = 1.0 + (max_scale - 1.0) * attempt / max(1, tries - 1)
            image, label = scene.copy(), np.zeros((height, width), np.uint8)
            for cls in minors:
                radius = side * math.exp(rng.uniform(math.log(0.04), math.log(0.25)))
                obj = _draw_object(rng, cls, radius, rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width,
                                   height, width)  # fmt: skip
                if obj is not None:
                    _paint(image, label, obj, cls)
            if with_second:
                main_left = rng.random() < 0.5
                left, right = rng.uniform(0.22, 0.36) * width, rng.uniform(0.64, 0.78) * width
                majors = [(plan.primary, left if main_left else right), (second, right if main_left else left)]
                if rng.random() < 0.5:
                    majors.reverse()  # depth order: the main object is in front only half of the time
                radius_range = (0.42, 0.54)
            else:
                majors = [(plan.primary, rng.uniform(0.35, 0.65) * width)]
                radius_range = (0.3, 0.42)
            cy_range = (0.4, 0.6) if rules is FILTERS else (0.25, 0.75)
            for cls, cx in majors:
                radius = side * scale * rng.uniform(*radius_range)
                obj = _draw_object(rng, cls, radius, rng.uniform(*cy_range) * height, cx, height, width)
                _paint(image, label, obj, cls)
            voc_label = with_boundary_bands(label, band)
            if all(mask_passes(voc_label == cls, rule) for cls, _ in majors for rule in rules):
                rgb = np.clip(image, 0, 255).astype(np.uint8)
                return rgb, label, voc_label
    raise DataError(
        f"generated image {plan.image_id}: its {STYLES[plan.primary].shape} never passed the OSLSM "
        f"small-object filter at {width}x{height}; use a larger data.synthetic.width/height"
    )
