"""A deterministic checker of captioned-shapes images: does a generated image show what its caption says?

`check_image(image, caption)` reads a (possibly noisy, blurred, colour-shifted, slightly misplaced) image of
the captioned-shapes world (`ldm_jax.data.shapes`) in four steps:
1. Colour: a pixel p (0..255 scale) is read as a * c + (1 - a) * background for a palette colour c, a being
   c's coverage of the pixel (blur and anti-aliasing mix an edge pixel so): a = <p, c> / <c, c>, residual
   |p - a c|. The pixel belongs to the colour with the smallest residual among those covering at least half
   of it (the rendered edge), if that residual is below `colour_margin * 255`; else it is background. This is
   the nearest palette colour with a margin, measured along the line from background to each colour.
2. Blobs: 8-connected components of each colour. A component smaller than `min_area` times the smallest
   object's area (a small triangle at this resolution; varied world: at the smallest radius) is noise and
   dropped. A component belongs to the grid cell holding most of its pixels, so a slightly misplaced
   object's spill into a neighbour stays with it; a component with at least `split_area` times the smallest
   object's area in several cells (two same-coloured objects merged by blur) is cut along the grid lines.
   Same-coloured pieces in one cell are one detection.
3. Shape and size: each detection is compared with the exact rendered mask of every (shape, size) (the
   templates `object_mask` draws), shifted so that the bounding-box centres agree and then by up to
   `search` pixels either way; the best intersection-over-union names shape and size. Below `min_iou`
   the blob is no recognisable shape (shape and size None).
   The varied world (`CheckerConfig.variation`, e.g. `VARIED_CHECKER` for `shapes.VARIED`) has no fixed
   templates: objects are rotated, continuously sized and placed, anti-aliased, on a noisy background. There a
   blob's soft coverage is read in a window around it: the colour's coverage a (step 1) less the local
   background level (median a of the window's background pixels more than two pixels from the blob), kept
   where it exceeds twice the background's spread (robust standard deviation: pixel noise stays out), over
   the blob and its two-pixel rim (no other object's pixels), divided by the object's full coverage (its
   brightest pixel, at least the darkest jittered colour: a blurred small object never reaches its colour)
   and clipped to [0, 1]. Its area A and centroid then fix, for each shape, the circumradius
   r = sqrt(A / `shapes.SHAPE_AREA_FACTORS`) and position of a template: per edge line the box-filtered
   coverage clip(1/2 - distance, 0, 1), multiplied over the edges. The angle is searched sharp at `rotations`
   angles over the shape's rotational period, then at the best angle the edges are blurred by each of
   `blur_sigmas` (the box filter and the blur together as one Gaussian edge profile). The best soft IoU (sum
   of minima / sum of maxima) over shapes names the shape (None below `min_iou`), and that shape's r, as a
   fraction of the cell side, names the size: small below `Variation.size_threshold`, else large; None outside
   the world's radii widened by `size_tolerance`. Rotation-invariant by construction; the exact world's path
   is unchanged.
4. Matching: a stated object is judged on the largest detection in its stated cell; when that cell is
   empty, on a same-coloured detection in a cell the caption does not mention (a misplaced object, nearest
   first, same shape preferred). Attributes: position (found in the stated cell), colour, shape, size.
   Every detection not used by a stated object is an extra. The image adheres iff every stated object
   has all four attributes right and there are no extras.

The palette is the world's six colours; `CheckerConfig(colours=...)` adds colours of `shapes.NEW_COLOURS`
(`NEW_COLOUR_CHECKER` reads white too), and a caption naming a colour the checker does not read is an
error. Clean renders at 24 px and up adhere exactly; the tests measure the robustness to noise, blur, JPEG,
colour shifts and misplacement. In the varied world ground-truth renders adhere (measured in
tests/test_shapes_varied.py at 32 and 64 px) and a caption with one attribute changed fails.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage, special

from ldm_jax.data import shapes
from ldm_jax.metrics.image_quality import to_unit_interval

PALETTE_NAMES: tuple[str, ...] = ("background",) + tuple(shapes.COLOURS)
PALETTE = np.array([shapes.BACKGROUND, *shapes.COLOURS.values()], np.float64)  # (7, 3), 0..255
ATTRIBUTES = ("colour", "shape", "size", "position")
_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class CheckerConfig:
    """Thresholds of the checker (defaults measured in tests/test_metrics.py).

    colour_margin: the largest residual from a colour's line (module doc, step 1), as a fraction of 255.
    min_area: a blob counts as an object from this fraction of the smallest object's area on.
    split_area: a blob holding this fraction of the smallest object's area in several cells is cut in two.
    min_iou: a blob whose best template overlap (IoU) is lower has no shape or size.
    search: template shifts tried around the bounding-box alignment, in pixels either way.
    colours: the palette pixels are read against (module doc, step 1): names from `shapes.COLOURS` (default:
      all six) and `shapes.NEW_COLOURS`.
    variation: the world read: None, the exact world (`shapes.render` without a variation: fixed templates,
      `search`); a `shapes.Variation` (e.g. `shapes.VARIED`, `VARIED_CHECKER`), the varied world rendered with it
      (rotated templates scaled to each blob; its radii give the size classes and the smallest object).
    rotations: varied world: template angles tried per rotational period of a shape (square 90, triangle 120
      degrees; 16 -> 5.6 and 7.5 degree steps).
    blur_sigmas: varied world: Gaussian blurs (pixels) of the templates tried, 0 the sharp (box-filtered) edge
      (a blurred object is matched by a blurred template rather than read as a rounder shape).
    size_tolerance: varied world: a blob whose radius lies outside the world's [smallest small, largest large]
      radius widened by this fraction has no size (too small or too big to be an object of the world).
    """

    colour_margin: float = 0.4
    min_area: float = 0.4
    split_area: float = 0.7
    min_iou: float = 0.5
    search: int = 1
    colours: tuple[str, ...] = tuple(shapes.COLOURS)
    variation: shapes.Variation | None = None
    rotations: int = 16
    blur_sigmas: tuple[float, ...] = (0.0, 0.5, 0.9)
    size_tolerance: float = 0.2

    def __post_init__(self):
        if not 0 < self.colour_margin <= 1:
            raise ValueError(f"CheckerConfig.colour_margin must lie in (0, 1], got {self.colour_margin}")
        if not 0 < self.min_area <= 1:
            raise ValueError(f"CheckerConfig.min_area must lie in (0, 1], got {self.min_area}")
        if not self.min_area <= self.split_area <= 1:
            raise ValueError(f"CheckerConfig.split_area must lie in [min_area={self.min_area}, 1], "
                             f"got {self.split_area}")
        if not 0 <= self.min_iou < 1:
            raise ValueError(f"CheckerConfig.min_iou must lie in [0, 1), got {self.min_iou}")
        if self.search < 0:
            raise ValueError(f"CheckerConfig.search must be >= 0, got {self.search}")
        known = {**shapes.COLOURS, **shapes.NEW_COLOURS}
        unknown = [c for c in self.colours if c not in known]
        if unknown or len(set(self.colours)) != len(self.colours):
            raise ValueError(f"CheckerConfig.colours must be distinct names from {list(known)}, got "
                             f"{list(self.colours)}")
        if not self.blur_sigmas or any(not 0 <= b < 5 for b in self.blur_sigmas):
            raise ValueError(f"CheckerConfig.blur_sigmas must be one or more blurs in [0, 5) pixels, got "
                             f"{self.blur_sigmas}")
        if self.rotations < 1:
            raise ValueError(f"CheckerConfig.rotations must be >= 1, got {self.rotations}")
        if not 0 <= self.size_tolerance < 1:
            raise ValueError(f"CheckerConfig.size_tolerance must lie in [0, 1), got {self.size_tolerance}")


# The world's colours and every `shapes.NEW_COLOURS` name (what bench/adapt_shapes.py scores with).
NEW_COLOUR_CHECKER = CheckerConfig(colours=tuple(shapes.COLOURS) + tuple(shapes.NEW_COLOURS))
# The varied world (`shapes.VARIED`): rotated, continuously sized and placed, anti-aliased shapes on a noisy
# background; shape and size from rotated templates scaled to each blob's area (module doc, step 3).
VARIED_CHECKER = CheckerConfig(variation=shapes.VARIED)


@dataclasses.dataclass(frozen=True)
class Detection:
    """An object found in the image: its colour, cell, area in pixels, and best template (None below min_iou).

    radius: varied world only: the circumradius read for the best shape, as a fraction of the cell side."""

    colour: str
    position: str
    area: int
    shape: str | None
    size: str | None
    iou: float
    radius: float | None = None


@dataclasses.dataclass(frozen=True)
class ObjectCheck:
    """The verdict on one stated object; `detection` is what it was judged on (None: nothing found)."""

    expected: shapes.ShapeObject
    detection: Detection | None
    colour: bool
    shape: bool
    size: bool
    position: bool

    @property
    def correct(self) -> bool:
        """All four attributes right."""
        return self.colour and self.shape and self.size and self.position


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Per stated object verdicts, detections no stated object accounts for, and the overall verdict."""

    objects: tuple[ObjectCheck, ...]
    extras: tuple[Detection, ...]
    detections: tuple[Detection, ...]

    @property
    def count(self) -> bool:
        """As many objects detected as stated."""
        return len(self.detections) == len(self.objects)

    @property
    def adheres(self) -> bool:
        """Every stated object fully right and nothing else in the image."""
        return all(o.correct for o in self.objects) and not self.extras


def check_image(image: np.ndarray, caption: str | shapes.Scene,
                config: CheckerConfig = CheckerConfig()) -> CheckResult:
    """Checks one captioned-shapes image against its caption (or scene).

    image: (R, R, 3), uint8 in [0, 255] or float in [-1, 1] (see `to_unit_interval`), R >= 24.
    caption: a caption `shapes.caption` can write, or a scene (tuple of `shapes.ShapeObject`).
    """
    scene = shapes.parse_caption(caption) if isinstance(caption, str) else shapes.validate_scene(caption)
    unread = sorted({obj.colour for obj in scene} - set(config.colours))
    if unread:
        raise ValueError(f"check_image: the caption names colour(s) {unread} that this checker does not read "
                         f"(CheckerConfig.colours={list(config.colours)}; add them, e.g. NEW_COLOUR_CHECKER)")
    pixels = to_unit_interval(image, name="check_image image") * 255.0
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"check_image: expected a square RGB image (R, R, 3), got shape {pixels.shape}")
    detections = detect_objects(pixels, config)
    return _match(scene, detections)


def detect_objects(pixels: np.ndarray, config: CheckerConfig = CheckerConfig()) -> tuple[Detection, ...]:
    """All objects in a (R, R, 3) float image on the 0..255 scale, ordered by cell then area (largest first)."""
    resolution = pixels.shape[0]
    coverage, labels = _read_colours(pixels, config.colour_margin, config.colours)
    cells = _cell_index(resolution)
    smallest = _smallest_area(resolution, config.variation)
    detections = []
    for k, colour in enumerate(config.colours, start=1):
        blobs = _blobs(labels == k, cells, config.min_area * smallest, config.split_area * smallest)
        for cell, mask in blobs.items():
            if config.variation is None:
                detections.append(_describe(mask, colour, cell, config))
            else:
                detections.append(_describe_varied(mask, coverage[..., k - 1], labels, colour, cell, config))
    order = {name: i for i, name in enumerate(shapes.POSITIONS)}
    return tuple(sorted(detections, key=lambda d: (order[d.position], -d.area)))


def classify_pixels(pixels: np.ndarray, colour_margin: float,
                    colours: Sequence[str] = tuple(shapes.COLOURS)) -> np.ndarray:
    """(H, W) int labels on a 0..255 image: k in 1..len(colours) for a pixel of colour colours[k - 1], else 0.

    A pixel is read as a * colour + (1 - a) * background (a: the colour's coverage of the pixel, as blur and
    anti-aliasing mix them): relative to the background, a = <p, c> / <c, c> and the residual is |p - a c|.
    It takes the colour with the smallest residual among those with a >= 1/2 (the rendered shape's edge),
    when that residual is below colour_margin * 255.
    """
    return _read_colours(pixels, colour_margin, colours)[1]


def _read_colours(pixels: np.ndarray, colour_margin: float,
                  colours: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage (H, W, C) of each colour, `classify_pixels` labels (H, W))."""
    palette = _palette(tuple(colours))
    p = pixels.astype(np.float64)[..., None, :] - palette[0]  # (H, W, 1, 3)
    vectors = palette[1:] - palette[0]  # (C, 3)
    coverage = (p * vectors).sum(-1) / (vectors * vectors).sum(-1)  # (H, W, C)
    residual = np.linalg.norm(p - coverage[..., None] * vectors, axis=-1)
    residual = np.where(coverage >= 0.5, residual, np.inf)
    nearest = np.argmin(residual, axis=-1)
    close = np.take_along_axis(residual, nearest[..., None], axis=-1)[..., 0] < colour_margin * 255.0
    return coverage, np.where(close, nearest + 1, 0)


def _palette(colours: tuple[str, ...]) -> np.ndarray:
    """(1 + C, 3) float64 RGB on the 0..255 scale: the background, then `colours` (the default is `PALETTE`)."""
    return np.array([shapes.BACKGROUND, *(shapes.colour_rgb(c) for c in colours)], np.float64)


@functools.lru_cache(maxsize=16)
def _cell_index(resolution: int) -> np.ndarray:
    """(R, R) index into POSITIONS of each pixel's cell; the few pixels outside the grid join the nearest."""
    origin, side = shapes.grid_geometry(resolution)
    rows = np.clip((np.arange(resolution) - origin) // side, 0, shapes.GRID - 1)
    index = rows[:, None] * shapes.GRID + rows[None, :]  # POSITIONS is in row-major order
    index.flags.writeable = False
    return index


def _blobs(mask: np.ndarray, cells: np.ndarray, min_pixels: float, split_pixels: float) -> dict[str, np.ndarray]:
    """One colour's mask -> {position: mask of that colour's object in the cell} (steps 2 of the module doc)."""
    components, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    names = list(shapes.POSITIONS)
    pieces: dict[str, np.ndarray] = {}
    for label in range(1, count + 1):
        component = components == label
        if component.sum() < min_pixels:
            continue
        shares = np.bincount(cells[component], minlength=len(names))
        big = np.flatnonzero(shares >= split_pixels)
        if len(big) <= 1:
            parts = {int(np.argmax(shares)): component}
        else:
            parts = {int(c): component & (cells == c) for c in big}
        for cell, part in parts.items():
            name = names[cell]
            pieces[name] = pieces[name] | part if name in pieces else part
    return pieces


@functools.lru_cache(maxsize=16)
def _templates(resolution: int) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """{(shape, size): (rows, cols)} pixel coordinates of each rendered object mask in the top-left cell."""
    out = {}
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            obj = shapes.ShapeObject(colour="red", shape=shape, size=size, position="top left")
            out[(shape, size)] = np.nonzero(shapes.object_mask(obj, resolution))
    return out


def _smallest_area(resolution: int, variation: shapes.Variation | None) -> float:
    """The area in pixels of the world's smallest object: the old world's small triangle, or the varied world's
    equilateral triangle at the small class's lowest radius."""
    if variation is None:
        return float(_templates(resolution)[("triangle", "small")][0].size)
    side = shapes.grid_geometry(resolution)[1]
    return shapes.SHAPE_AREA_FACTORS["triangle"] * (variation.radius_range("small")[0] * side) ** 2


def _box_centre(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.array([rows.min() + rows.max(), cols.min() + cols.max()], np.float64) / 2


def _describe(mask: np.ndarray, colour: str, position: str, config: CheckerConfig) -> Detection:
    """Names a blob's shape and size by its best-overlapping template (step 3 of the module doc)."""
    resolution = mask.shape[0]
    rows, cols = np.nonzero(mask)
    area = len(rows)
    best, best_iou = None, -1.0
    for key, (t_rows, t_cols) in _templates(resolution).items():
        base = np.round(_box_centre(rows, cols) - _box_centre(t_rows, t_cols)).astype(int)
        for dy in range(-config.search, config.search + 1):
            for dx in range(-config.search, config.search + 1):
                r, c = t_rows + base[0] + dy, t_cols + base[1] + dx
                inside = (r >= 0) & (r < resolution) & (c >= 0) & (c < resolution)
                overlap = int(mask[r[inside], c[inside]].sum())
                iou = overlap / (area + len(t_rows) - overlap)
                if iou > best_iou:
                    best, best_iou = key, iou
    shape, size = best if best_iou >= config.min_iou else (None, None)
    return Detection(colour=colour, position=position, area=area, shape=shape, size=size, iou=float(best_iou))


def _describe_varied(mask: np.ndarray, coverage: np.ndarray, labels: np.ndarray, colour: str, position: str,
                     config: CheckerConfig) -> Detection:
    """Names a blob's shape and size in the varied world (step 3 of the module doc): the blob's soft coverage
    against each shape's anti-aliased (and blurred) template at the blob's centroid, scaled to its area, over
    rotations."""
    variation = config.variation
    resolution = mask.shape[0]
    side = shapes.grid_geometry(resolution)[1]
    rows, cols = np.nonzero(mask)
    r0, r1 = max(rows.min() - 3, 0), min(rows.max() + 4, resolution)
    c0, c1 = max(cols.min() - 3, 0), min(cols.max() + 4, resolution)
    hard, a, window_labels = mask[r0:r1, c0:c1], coverage[r0:r1, c0:c1], labels[r0:r1, c0:c1]
    near = ndimage.binary_dilation(hard, _EIGHT_CONNECTED, iterations=2)
    background = ~near & (window_labels == 0)
    low, spread = 0.0, 0.0
    if background.any():
        low = float(np.median(a[background]))
        spread = 1.4826 * float(np.median(np.abs(a[background] - low)))
    own = hard | (near & (window_labels == 0))  # the blob and its two-pixel rim, no other object's pixels
    excess = np.where(own & (a - low > 2.0 * spread), a - low, 0.0)
    # The object's full coverage: its brightest pixel, but no less than the darkest colour the world draws (a
    # blurred small object never reaches its full colour).
    full = min(max(float(excess.max()), (1.0 - variation.colour_jitter / 255.0) * (1.0 - low)), 1.0 - low)
    soft = np.clip(excess / max(full, 1e-6), 0.0, 1.0)
    area = float(soft.sum())
    if area <= 0:  # nothing stands out of the background's noise: no shape
        return Detection(colour=colour, position=position, area=int(hard.sum()), shape=None, size=None, iou=0.0)
    ys, xs = np.arange(r0, r1) + 0.5, np.arange(c0, c1) + 0.5
    dy = (ys - (soft.sum(1) @ ys) / area)[:, None, None]
    dx = (xs - (soft.sum(0) @ xs) / area)[None, :, None]
    # An edge's coverage profile across distance d: a pixel's box filter, clip(1/2 - d, 0, 1); blurred by a Gaussian
    # of sigma, about the Gaussian of variance 1/12 + sigma^2, Phi(-d / sqrt(1/12 + sigma^2)). A template is the
    # product of its edges' profiles. The angle is searched sharp, then the blurs at the best angle.
    sigmas = np.asarray(config.blur_sigmas, np.float64)
    widths = np.sqrt(1.0 / 12.0 + sigmas**2)[:, None]  # (B, 1)
    best, best_iou, best_radius = None, -1.0, 0.0
    for shape in shapes.SHAPES:
        radius = math.sqrt(area / shapes.SHAPE_AREA_FACTORS[shape])
        period = shapes.ROTATION_PERIODS[shape] if variation.rotate else 0.0
        angles = period * np.arange(config.rotations) / config.rotations if period else np.zeros(1)
        distances = shapes.edge_distances(shape, dy, dx, radius, angles)  # (h, w, K, E)
        sharp = np.clip(0.5 - distances, 0.0, 1.0).prod(-1)  # (h, w, K)
        iou = _soft_iou(soft[..., None], sharp)  # (K,)
        k = int(np.argmax(iou))
        distances = distances[:, :, k, None, :]  # (h, w, 1, E)
        blurred = np.where(sigmas > 0, special.ndtr(-distances / widths).prod(-1), sharp[:, :, k, None])  # (h, w, B)
        iou = _soft_iou(soft[..., None], blurred)  # (B,)
        if iou.max() > best_iou:
            best, best_iou, best_radius = shape, float(iou.max()), radius / side
    small_low, large_high = variation.radius_range("small")[0], variation.radius_range("large")[1]
    plausible = small_low * (1 - config.size_tolerance) <= best_radius <= large_high * (1 + config.size_tolerance)
    size = ("small" if best_radius < variation.size_threshold() else "large") if plausible else None
    shape = best if best_iou >= config.min_iou else None
    return Detection(colour=colour, position=position, area=int(hard.sum()), shape=shape,
                     size=size if shape is not None else None, iou=best_iou, radius=best_radius)


def _soft_iou(soft: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Soft intersection over union of (h, w, 1) coverages with (h, w, N) templates: (N,) sums of minima over sums
    of maxima."""
    return np.minimum(soft, templates).sum((0, 1)) / np.maximum(soft, templates).sum((0, 1))


def _grid_distance(a: str, b: str) -> int:
    (ra, ca), (rb, cb) = shapes.POSITIONS[a], shapes.POSITIONS[b]
    return abs(ra - rb) + abs(ca - cb)


def _match(scene: shapes.Scene, detections: tuple[Detection, ...]) -> CheckResult:
    """Assigns detections to the stated objects (step 4 of the module doc)."""
    stated_cells = {obj.position for obj in scene}
    used: set[int] = set()
    chosen: dict[int, int] = {}
    for i, obj in enumerate(scene):  # detections are sorted by area within a cell: the first is the largest
        for j, det in enumerate(detections):
            if det.position == obj.position:
                chosen[i] = j
                used.add(j)
                break
    for i, obj in enumerate(scene):
        if i in chosen:
            continue
        candidates = [j for j, det in enumerate(detections) if j not in used and det.colour == obj.colour
                      and det.position not in stated_cells]
        if candidates:
            j = min(candidates, key=lambda j: (detections[j].shape != obj.shape,
                                               _grid_distance(detections[j].position, obj.position), j))
            chosen[i] = j
            used.add(j)
    checks = []
    for i, obj in enumerate(scene):
        det = detections[chosen[i]] if i in chosen else None
        checks.append(ObjectCheck(
            expected=obj, detection=det,
            colour=det is not None and det.colour == obj.colour,
            shape=det is not None and det.shape == obj.shape,
            size=det is not None and det.size == obj.size,
            position=det is not None and det.position == obj.position,
        ))
    extras = tuple(det for j, det in enumerate(detections) if j not in used)
    return CheckResult(objects=tuple(checks), extras=extras, detections=detections)


def prompt_adherence(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str | shapes.Scene],
                     config: CheckerConfig = CheckerConfig()) -> dict[str, float]:
    """Scores images against their captions with `check_image`.

    images: N images (R, R, 3) (a list, or an (N, R, R, 3) array), uint8 or float in [-1, 1].
    Returns fractions in [0, 1]: "accuracy" (images that adhere), "object_accuracy" (stated objects with
    every attribute right), "colour", "shape", "size", "position" (over stated objects), "count" (images with
    as many objects as stated); and "num_images", "num_objects".
    """
    if len(images) != len(captions):
        raise ValueError(f"prompt_adherence: {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("prompt_adherence: no images")
    results = [check_image(image, text, config) for image, text in zip(images, captions)]
    return summarise(results)


def summarise(results: Sequence[CheckResult]) -> dict[str, float]:
    """Aggregates check results into the accuracies `prompt_adherence` returns."""
    if not results:
        raise ValueError("summarise: no check results")
    objects = [o for r in results for o in r.objects]
    summary: Mapping[str, float] = {
        "accuracy": float(np.mean([r.adheres for r in results])),
        "object_accuracy": float(np.mean([o.correct for o in objects])),
        **{name: float(np.mean([getattr(o, name) for o in objects])) for name in ATTRIBUTES},
        "count": float(np.mean([r.count for r in results])),
        "num_images": len(results),
        "num_objects": len(objects),
    }
    return dict(summary)
