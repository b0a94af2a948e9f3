"""Captioned shapes: a synthetic text-to-image world whose images can be checked exactly.

A scene is 1 to `MAX_OBJECTS` objects, each a solid shape of one colour and size, centred in its own
cell of a 3x3 grid on a black background. Its caption names every object in order, e.g.
"a small red circle at the top left and a large blue square at the bottom", and `parse_caption` inverts
`caption` exactly.

Geometry, all in whole pixels so that every cell renders alike (everything a checker needs is exported):
- The grid has cells of side s = resolution // 3 pixels starting at pixel o = (resolution - 3s) // 2;
  cell (row, col) is rows [o + row*s, o + (row+1)*s) x the same for columns (`cell_bounds`). The at most
  two pixels outside the grid are background.
- An object's box is its cell less a margin of m = ceil(SIZE_MARGINS[size] * s) pixels on every side:
  an N x N square, N = s - 2m, centred in the cell (`object_box`).
- Pixel (i, j) has centre (i + 0.5, j + 0.5); it is painted iff that centre lies inside the shape
  (`object_mask`): no anti-aliasing, so every pixel is either the background or exactly one palette colour.
  With (dy, dx) the offset from the box centre and h = N/2 - 1/4: square |dy|, |dx| <= h (the whole box);
  circle dy^2 + dx^2 <= h^2; triangle (apex up) -h <= dy <= h and |dx| <= (dy + h) / 2.
  Filled fractions of the box: square 1, circle 0.67-0.79 (pi/4 at large N), triangle about 1/2.

The varied world (`render(scene, resolution, variation=VARIED, rng=rng)`): the same scenes and captions, but a
caption maps to a distribution of images. Per object (`sample_placements`, `Variation` documents every range):
- size: a circumradius r (fraction of the cell side s) uniform inside its size class; the classes are disjoint
  with a gap (`Variation.size_threshold`). Every shape is inscribed in its circle of radius r: circle, square
  (side r sqrt 2) and an equilateral triangle (side r sqrt 3), areas `SHAPE_AREA_FACTORS` * r^2. (Equilateral, not
  the old world's isoceles triangle: it is the largest triangle a rotation-proof circle holds, and the checker's
  three shapes then differ most in area per circumradius: pi, 2, 1.30.)
- position: the centre uniform over the positions that keep the whole circle inside its cell with a margin.
- rotation: uniform in [0, 2 pi) (`edge_distances` defines the rotated shapes).
- colour: every channel of the named colour jittered uniformly, clipped; still nearest to its palette colour.
- background: dark smooth value noise plus Gaussian pixel noise, never bright enough to read as a colour.
Objects are anti-aliased (coverage by supersampling, `object_coverage`) and blended over the background. The
old world's `render` (variation None) is unchanged, bit for bit.

Held out: colour+shape pairs in `HELDOUT_PAIRS` never occur in train/validation scenes; every held-out scene
contains at least one of them (`sample_scene(..., heldout=True)`).

New colours: `NEW_COLOURS` are words outside this world (no dataset, split or tokenizer holds them), for
teaching a trained model something it has never seen (bench/adapt_shapes.py). A `ShapeObject` may use one,
`render`, `caption` and `parse_caption` handle it, and `sample_new_colour_scene` draws scenes with one; the
checker reads it only when asked (`shapes_checker.CheckerConfig.colours`).
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

# Corners of the RGB cube: any two colours, and any colour and the background, differ by 255 in a channel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Margin between an object's box and its cell, per side, as a fraction of the cell side (rounded up).
SIZE_MARGINS: dict[str, float] = {"small": 0.2, "large": 0.1}
SIZES: tuple[str, ...] = tuple(SIZE_MARGINS)
MIN_RESOLUTION = 24  # below this, small and large boxes are too alike
GRID = 3
# Position name -> (row, col) in the 3x3 grid, row 0 at the top.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "centre": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
# Position name -> the phrase a caption uses for it.
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
MAX_OBJECTS = 3
# Colours outside the world (module doc, "New colours"). White is the one corner of the RGB cube the world
# leaves unused, so it too differs from every colour and the background by 255 in a channel and the checker
# reads it with the world's margins; the embedded model's tokenizer has no word for it and its UNet never drew
# it (its frozen autoencoder reproduces white scenes well enough for the checker to read every one).
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255)}
# (colour, shape) pairs that appear only in the held-out split.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("cyan", "triangle")}
)


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; every field is a vocabulary word (checked on construction; colours from
    `COLOURS` or `NEW_COLOURS`)."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self):
        for field, vocabulary in (("colour", {**COLOURS, **NEW_COLOURS}), ("shape", SHAPES), ("size", SIZES),
                                  ("position", POSITIONS)):
            value = getattr(self, field)
            if value not in vocabulary:
                raise ValueError(f"ShapeObject: unknown {field} {value!r}; expected one of {list(vocabulary)}")


Scene = tuple[ShapeObject, ...]


def validate_scene(scene: Scene) -> Scene:
    """Checks 1..MAX_OBJECTS objects in distinct cells and returns the scene as a tuple."""
    scene = tuple(scene)
    if not 1 <= len(scene) <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(scene)}")
    positions = [obj.position for obj in scene]
    if len(set(positions)) != len(positions):
        raise ValueError(f"scene objects must occupy distinct cells, got positions {positions}")
    return scene


def is_heldout(obj: ShapeObject) -> bool:
    """Whether the object's (colour, shape) pair is reserved for the held-out split."""
    return (obj.colour, obj.shape) in HELDOUT_PAIRS


def grid_geometry(resolution: int) -> tuple[int, int]:
    """(origin, side): the grid's first pixel row/column and the cell side, in pixels."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be at least {MIN_RESOLUTION} pixels, got {resolution}")
    side = resolution // GRID
    return (resolution - GRID * side) // 2, side


def cell_bounds(position: str, resolution: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of a position's cell; rows top..bottom-1, cols left..right-1."""
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {list(POSITIONS)}")
    row, col = POSITIONS[position]
    origin, side = grid_geometry(resolution)
    top, left = origin + row * side, origin + col * side
    return top, top + side, left, left + side


def object_box(obj: ShapeObject, resolution: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of the N x N box an object fills (bottom/right exclusive)."""
    top, bottom, left, right = cell_bounds(obj.position, resolution)
    margin = math.ceil(round(SIZE_MARGINS[obj.size] * (bottom - top), 9))
    return top + margin, bottom - margin, left + margin, right - margin


def object_mask(obj: ShapeObject, resolution: int) -> np.ndarray:
    """Bool (resolution, resolution) mask of the pixels whose centres lie inside the object."""
    top, bottom, left, right = object_box(obj, resolution)
    cy, cx, h = (top + bottom) / 2, (left + right) / 2, (bottom - top) / 2 - 0.25
    centres = np.arange(resolution, dtype=np.float64) + 0.5
    dy = (centres - cy)[:, None]
    dx = (centres - cx)[None, :]
    if obj.shape == "square":
        return (np.abs(dy) <= h) & (np.abs(dx) <= h)
    if obj.shape == "circle":
        return dy * dy + dx * dx <= h * h
    return (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)  # triangle, apex up


def render(scene: Scene, resolution: int, *, variation: Variation | None = None,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Draws a scene: uint8 (resolution, resolution, 3).

    variation None (the old world): background `BACKGROUND`, objects in their exact colours, no anti-aliasing
    (module doc, "Geometry"); the same scene always gives the same image.
    variation given (the varied world, e.g. `VARIED`): `rng` is required; per object a placement is drawn
    (`sample_placements`: continuous position in the cell, size in the class, rotation, colour jitter), then the
    background's value noise, then the pixel noise; objects are anti-aliased (`object_coverage`) and blended over
    the background. Deterministic given the generator's state.
    """
    grid_geometry(resolution)  # checks the resolution
    if variation is not None:
        if rng is None:
            raise ValueError("render: a varied render (variation=...) needs rng, a numpy Generator")
        return _render_varied(validate_scene(scene), resolution, variation, rng)
    if rng is not None:
        raise ValueError("render: rng is only used with variation=...; the old world's render is fixed")
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[...] = BACKGROUND
    for obj in validate_scene(scene):
        image[object_mask(obj, resolution)] = colour_rgb(obj.colour)
    return image


def render_mask(scene: Scene, resolution: int, *, variation: Variation | None = None,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene's layout as a ControlNet control image: uint8 (resolution, resolution, 3), 255 (white) in every
    channel of the pixels an object covers (`object_mask`, the pixels `render` paints), 0 elsewhere. It fixes each
    object's position, size and shape but not its colour (the caption's); per-object masks are `object_mask`.

    With a variation (and rng), the pixels at least half covered by the objects `sample_placements` draws: a
    generator in the same state as the one given to `render` yields the mask of that very image (render draws the
    placements first)."""
    grid_geometry(resolution)  # checks the resolution
    scene = validate_scene(scene)
    mask = np.zeros((resolution, resolution, 3), np.uint8)
    if variation is not None:
        if rng is None:
            raise ValueError("render_mask: a varied mask (variation=...) needs rng, a numpy Generator")
        for obj, placement in zip(scene, sample_placements(scene, resolution, variation, rng)):
            mask[object_coverage(obj.shape, placement, resolution, variation.supersample) >= 0.5] = 255
        return mask
    if rng is not None:
        raise ValueError("render_mask: rng is only used with variation=...")
    for obj in scene:
        mask[object_mask(obj, resolution)] = 255
    return mask


def colour_rgb(name: str) -> tuple[int, int, int]:
    """The RGB triple of a colour of `COLOURS` or `NEW_COLOURS`."""
    if name in COLOURS:
        return COLOURS[name]
    if name in NEW_COLOURS:
        return NEW_COLOURS[name]
    raise ValueError(f"unknown colour {name!r}; expected one of {list(COLOURS) + list(NEW_COLOURS)}")


def caption(scene: Scene) -> str:
    """The scene's caption: "a <size> <colour> <shape> <position phrase>" per object, joined by " and "."""
    return " and ".join(
        f"a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}" for obj in validate_scene(scene)
    )


_PHRASE_TO_POSITION = {phrase: name for name, phrase in POSITION_PHRASES.items()}
_OBJECT_RE = re.compile(r"a (\w+) (\w+) (\w+) (.+)")


def parse_caption(text: str) -> Scene:
    """Inverse of `caption`: the scene a caption describes; a ValueError names the fragment it cannot read."""
    objects = []
    for fragment in text.split(" and "):
        match = _OBJECT_RE.fullmatch(fragment)
        if match is None or match.group(4) not in _PHRASE_TO_POSITION:
            raise ValueError(
                f"cannot parse caption fragment {fragment!r} of {text!r}; expected "
                f"'a <size> <colour> <shape> <position phrase>' with phrases {list(_PHRASE_TO_POSITION)}"
            )
        size, colour, shape, phrase = match.groups()
        try:
            objects.append(ShapeObject(colour=colour, shape=shape, size=size, position=_PHRASE_TO_POSITION[phrase]))
        except ValueError as error:
            raise ValueError(f"caption fragment {fragment!r} of {text!r}: {error}") from error
    return validate_scene(tuple(objects))


def _pairs(heldout: bool) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [p for p in pairs if (p in HELDOUT_PAIRS) == heldout]


def sample_scene(rng: np.random.Generator, *, heldout: bool = False) -> Scene:
    """Samples 1..MAX_OBJECTS objects in distinct random cells.

    heldout=False: no object uses a pair from HELDOUT_PAIRS (train/validation scenes).
    heldout=True: one random object uses a held-out pair, the others any pair (held-out scenes).
    """
    num = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(len(POSITIONS), size=num, replace=False)
    allowed = _pairs(heldout=False)
    everything = allowed + _pairs(heldout=True)
    forced = int(rng.integers(num)) if heldout else -1
    objects = []
    for i, cell in enumerate(cells):
        pool = _pairs(heldout=True) if i == forced else (everything if heldout else allowed)
        colour, shape = pool[int(rng.integers(len(pool)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        objects.append(ShapeObject(colour=colour, shape=shape, size=size, position=list(POSITIONS)[cell]))
    return tuple(objects)


def sample_new_colour_scene(rng: np.random.Generator, colour: str) -> Scene:
    """Samples 1..MAX_OBJECTS objects in distinct random cells, one of them (at random) in `colour`, a name
    from `NEW_COLOURS`, with a random shape and size; the others as in train/validation scenes."""
    if colour not in NEW_COLOURS:
        raise ValueError(f"sample_new_colour_scene: {colour!r} is not a new colour; expected one of "
                         f"{list(NEW_COLOURS)}")
    scene = sample_scene(rng)
    forced = int(rng.integers(len(scene)))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    objects = list(scene)
    objects[forced] = dataclasses.replace(objects[forced], colour=colour, shape=shape)
    return tuple(objects)


# ------------------------------------------------------------------------------------------ the varied world
# Every shape is drawn inside a circle of circumradius r about its centre, so a rotated shape never leaves it.
# Shape area / r^2: circle pi, square 2 (inscribed square), triangle 3 sqrt(3) / 4 (inscribed equilateral).
SHAPE_AREA_FACTORS: dict[str, float] = {"circle": math.pi, "square": 2.0, "triangle": 3.0 * math.sqrt(3.0) / 4.0}
# Polygon shapes: (number of sides, angle of the first vertex at rotation 0, clockwise from "up", radians).
# Rotation 0 is the old world's pose: the square axis-aligned, the triangle apex up.
POLYGONS: dict[str, tuple[int, float]] = {"square": (4, math.pi / 4), "triangle": (3, 0.0)}
# Rotations that map a shape onto itself (the checker searches one period): circle any, square 90, triangle 120.
ROTATION_PERIODS: dict[str, float] = {"circle": 0.0, "square": math.pi / 2, "triangle": 2.0 * math.pi / 3}


@dataclasses.dataclass(frozen=True)
class Variation:
    """How the varied world draws a scene: its caption fixes a distribution of images, not one image.

    Lengths are fractions of the cell side s (`grid_geometry`), colour values on the 0..255 scale.
    radii: {size: (low, high)} (as a tuple of (size, (low, high)) pairs, in `SIZES` order): an object's
      circumradius r is uniform in [low * s, high * s]. The classes are disjoint with a gap (the checker reads
      the size from the blob's area, `size_threshold`).
    margin: the object's circumcircle keeps at least margin * s from every side of its cell; the centre is uniform
      over the square of positions that allow it (each coordinate in [r + margin*s, s - r - margin*s] of the cell).
    rotate: rotation uniform in [0, 2 pi) (False: the old world's pose, square axis-aligned, triangle apex up).
    colour_jitter: every channel of an object's colour moves by uniform(-j, j), clipped to [0, 255], once per object
      (the whole object shares one colour).
    background: amplitude of the smooth value noise of the background, per channel in [0, background] (bilinear
      with smoothstep over a lattice of `background_cells` cells across the image), dark: it must stay far below
      half of any colour's channels so that no background pixel reads as a colour.
    background_cells: lattice cells of the value noise across the image (its feature size is R / cells pixels).
    pixel_noise: standard deviation of Gaussian noise added to every pixel (background and objects).
    supersample: anti-aliasing: each pixel's coverage is the inside fraction of supersample x supersample points.
    """

    radii: tuple[tuple[str, tuple[float, float]], ...]
    margin: float = 0.05
    rotate: bool = True
    colour_jitter: float = 40.0
    background: float = 40.0
    background_cells: int = 4
    pixel_noise: float = 3.0
    supersample: int = 4

    def __post_init__(self):
        radii = dict(self.radii)
        if tuple(radii) != SIZES:
            raise ValueError(f"Variation.radii must name the sizes {list(SIZES)} in order, got {list(radii)}")
        bounds = [b for size in SIZES for b in radii[size]]
        if any(not 0 < b for b in bounds) or bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"Variation.radii must be positive, increasing, disjoint ranges, got {self.radii}")
        if not 0 <= self.margin or bounds[-1] + self.margin > 0.5:
            raise ValueError(f"Variation: the largest radius {bounds[-1]} plus the margin {self.margin} must fit in "
                             f"half a cell (0.5)")
        if not 0 <= self.colour_jitter < 100 or not 0 <= self.background < 100 or not 0 <= self.pixel_noise < 30:
            raise ValueError("Variation: colour_jitter and background must lie in [0, 100), pixel_noise in [0, 30) "
                             f"(0..255 scale), got {self.colour_jitter}, {self.background}, {self.pixel_noise}")
        if self.background_cells < 1 or self.supersample < 1:
            raise ValueError(f"Variation: background_cells and supersample must be >= 1, got "
                             f"{self.background_cells}, {self.supersample}")

    def radius_range(self, size: str) -> tuple[float, float]:
        """(low, high) circumradius of a size class, as fractions of the cell side."""
        return dict(self.radii)[size]

    def size_threshold(self) -> float:
        """The circumradius (fraction of the cell side) between the classes: the geometric mean of the small
        class's high and the large class's low end."""
        return math.sqrt(self.radius_range("small")[1] * self.radius_range("large")[0])


# The varied world's defaults. Sizes: at 32 px a cell is 10 px, so a small equilateral triangle of circumradius
# 0.23 s has 6.9 px of area. The gap between the classes, 0.29 .. 0.35 (the threshold 0.319 is 9.7% in radius, 20%
# in area, from either class), is what the checker's area reading keeps at 32 px: on ground truth it reads radii
# to within 0.01 s. Colour jitter 40 and a background up to 40 (+ noise 3) keep every channel of an object above
# 215 or below 40 and the background's coverage of any colour below 0.2, far from the checker's 0.5.
VARIED = Variation(radii=(("small", (0.23, 0.29)), ("large", (0.35, 0.44))), margin=0.05)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where and how one object of a varied scene is drawn (`sample_placements`).

    centre: (y, x) in pixels of the image (pixel (i, j) covers [i, i+1) x [j, j+1), its centre is (i+0.5, j+0.5)).
    radius: circumradius in pixels. angle: clockwise rotation in radians (0: the old world's pose).
    colour: the object's RGB on the 0..255 scale (floats, after jitter).
    """

    centre: tuple[float, float]
    radius: float
    angle: float
    colour: tuple[float, float, float]


def edge_distances(shape: str, dy: np.ndarray, dx: np.ndarray, radius, angle) -> np.ndarray:
    """Signed distances of points from a shape's boundary lines, in pixels (negative inside).

    dy, dx: offsets from the shape's centre (any broadcastable shapes); radius: circumradius; angle: clockwise
    rotation in radians (radius and angle may be arrays broadcasting with dy, dx). Returns (..., E): the circle's
    one distance |d| - r (E = 1), or per polygon edge n_i . d - apothem (E = 3 or 4; a point is inside the polygon
    iff all are <= 0). The renderer tests insideness with these; the checker turns them into pixel coverages.
    """
    dy, dx = np.asarray(dy, np.float64), np.asarray(dx, np.float64)
    radius, angle = np.asarray(radius, np.float64), np.asarray(angle, np.float64)
    if shape == "circle":
        return (np.sqrt(dy * dy + dx * dx) - radius)[..., None]
    if shape not in POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    sides, first = POLYGONS[shape]
    # Edge i's outward normal points at angle + first + pi/n + 2 pi i / n, clockwise from up: (dy, dx) = (-cos, sin).
    normals = (angle[..., None] + first + math.pi / sides + 2.0 * math.pi * np.arange(sides) / sides)
    apothem = (radius * math.cos(math.pi / sides))[..., None]
    return -np.cos(normals) * dy[..., None] + np.sin(normals) * dx[..., None] - apothem


def object_coverage(shape: str, placement: Placement, resolution: int, supersample: int = 4) -> np.ndarray:
    """Float (resolution, resolution) fraction in [0, 1] of each pixel inside a placed shape: the share of its
    supersample x supersample points (at the centres of a regular subgrid) that lie inside."""
    grid_geometry(resolution)  # checks the resolution
    cy, cx = placement.centre
    reach = placement.radius + 1.0
    r0, r1 = max(0, math.floor(cy - reach)), min(resolution, math.ceil(cy + reach))
    c0, c1 = max(0, math.floor(cx - reach)), min(resolution, math.ceil(cx + reach))
    coverage = np.zeros((resolution, resolution), np.float64)
    if r0 >= r1 or c0 >= c1:
        return coverage
    offsets = (np.arange(supersample) + 0.5) / supersample
    ys = (np.arange(r0, r1)[:, None] + offsets).reshape(-1) - cy
    xs = (np.arange(c0, c1)[:, None] + offsets).reshape(-1) - cx
    inside = (edge_distances(shape, ys[:, None], xs[None, :], placement.radius, placement.angle) <= 0).all(-1)
    coverage[r0:r1, c0:c1] = inside.reshape(r1 - r0, supersample, c1 - c0, supersample).mean((1, 3))
    return coverage


def sample_placements(scene: Scene, resolution: int, variation: Variation,
                      rng: np.random.Generator) -> tuple[Placement, ...]:
    """Draws every object's placement (`Placement`, the `Variation` doc says how), in scene order: per object
    radius, centre y, centre x, angle, then the colour's three channel offsets. `render` draws these first, so
    `render_mask` with a generator in the same state draws the same placements."""
    origin, side = grid_geometry(resolution)
    placements = []
    for obj in validate_scene(scene):
        low, high = variation.radius_range(obj.size)
        radius = float(rng.uniform(low, high)) * side
        top, _, left, _ = cell_bounds(obj.position, resolution)
        lo, hi = radius + variation.margin * side, side - radius - variation.margin * side
        cy, cx = top + float(rng.uniform(lo, hi)), left + float(rng.uniform(lo, hi))
        angle = float(rng.uniform(0.0, 2.0 * math.pi)) if variation.rotate else 0.0
        jitter = rng.uniform(-variation.colour_jitter, variation.colour_jitter, 3)
        colour = tuple(float(v) for v in np.clip(np.asarray(colour_rgb(obj.colour), np.float64) + jitter, 0, 255))
        placements.append(Placement(centre=(cy, cx), radius=radius, angle=angle, colour=colour))
    return tuple(placements)


def _value_noise(resolution: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """(resolution, resolution, 3) smooth noise in [0, 1]: a (cells+1)^2 lattice of uniform values per channel,
    interpolated bilinearly with smoothstep weights."""
    u = (np.arange(resolution) + 0.5) / resolution * cells
    i = np.minimum(np.floor(u).astype(int), cells - 1)
    t = u - i
    t = t * t * (3.0 - 2.0 * t)
    weights = np.zeros((resolution, cells + 1))
    weights[np.arange(resolution), i] = 1.0 - t
    weights[np.arange(resolution), i + 1] = t
    lattice = rng.uniform(0.0, 1.0, (cells + 1, cells + 1, 3))
    return (weights @ lattice.transpose(2, 0, 1) @ weights.T).transpose(1, 2, 0)  # (3, R, R) -> (R, R, 3)


def _render_varied(scene: Scene, resolution: int, variation: Variation, rng: np.random.Generator) -> np.ndarray:
    placements = sample_placements(scene, resolution, variation, rng)
    image = variation.background * _value_noise(resolution, variation.background_cells, rng)
    for obj, placement in zip(scene, placements):
        coverage = object_coverage(obj.shape, placement, resolution, variation.supersample)[..., None]
        image = image * (1.0 - coverage) + coverage * np.asarray(placement.colour)
    if variation.pixel_noise:
        image = image + rng.normal(0.0, variation.pixel_noise, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
