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


def render(scene: Scene, resolution: int) -> np.ndarray:
    """Draws a scene: uint8 (resolution, resolution, 3), background `BACKGROUND`, objects in their colours."""
    grid_geometry(resolution)  # checks the resolution
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[...] = BACKGROUND
    for obj in validate_scene(scene):
        image[object_mask(obj, resolution)] = colour_rgb(obj.colour)
    return image


def render_mask(scene: Scene, resolution: int) -> np.ndarray:
    """The scene's layout as a ControlNet control image: uint8 (resolution, resolution, 3), 255 (white) in every
    channel of the pixels an object covers (`object_mask`, the pixels `render` paints), 0 elsewhere. It fixes each
    object's position, size and shape but not its colour (the caption's); per-object masks are `object_mask`."""
    grid_geometry(resolution)  # checks the resolution
    mask = np.zeros((resolution, resolution, 3), np.uint8)
    for obj in validate_scene(scene):
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
