"""Shapes features: a small CNN that reads a captioned-shapes scene, and the Frechet Shapes Distance (FSD) on its
features, the way a LeNet serves FID on MNIST.

The network (`AttributeClassifier`) sees RGB renders (N, R, R, 3) and predicts, for each of the 9 grid cells
(row-major, `shapes.POSITIONS` order), three attributes: the colour (`COLOUR_CLASSES`: "empty" or one of
`shapes.COLOURS`), the shape ("none" or one of `shapes.SHAPES`) and the size ("none" or one of `shapes.SIZES`).
Every object of the world lies inside its cell, so one small `CellNetwork`, shared by the 9 cells, reads each cell's
crop (`cell_crops`) into an E = 14 wide embedding whose ReLU feeds three linear heads. The penultimate layer (before
its ReLU, so that no feature is constant), the 9 embeddings side by side, is the feature vector: `features(images)` -> (N, D = 126) float32, and
`fsd(images_a, images_b)` = `fid.frechet_distance` between Gaussians fitted to the two feature sets
(`fid.fid_from_features`). `metrics.precision_recall` reads the same features (`ldm-jax evaluate distribution`).

What FSD sees (32 px weights, 1000 + 1000 renders, tests/test_distribution_metrics.py): real-vs-real 12 - 14;
blur and noise raise it steeply (sigma 0.7 px: 38, 1.5 px: 128; noise std 0.1: 29, 0.2: 669); a dropped shape
strongly (no circles: 107), a dropped colour faintly (no red: 16): colours are easy for the classifier and take
little of the features' spread. Like any FID, its value depends on the set sizes: compare values measured with
equal sizes only. (The features after the ReLU, 45 of 126 of them constant on real renders, gave 7.5 - 8.8
real-vs-real, 11.5 without red, 39 without circles: the dropped shape stood out half as much.)

Training (`train`): the cell network learns on cells cropped from renders made on the fly (`training_crops`) from
`training_scene` (1 to 3 objects, every colour+shape pair including `shapes.HELDOUT_PAIRS`, so the features cover
every mode a model may draw) in the varied world (`shapes.VARIED`: jittered position, size, rotation and colour on a
textured background), with Adam on the summed, label-smoothed cross-entropy of its three heads. A seed fixes the
weights on one machine and library version (the shipped 32 px file was reproduced bit for bit by a second run).
Held-out accuracy (`attribute_accuracy`) is measured on fresh renders from another seed stream.

Shipped weights, one pair of files per resolution in `ldm_jax/assets/shapes_features/` (`load`): resN.safetensors
(params named by their "/"-joined Flax paths) and resN.json ({"model": the `FeatureConfig`, "training": seed, steps,
batch size, learning rate, label smoothing, seconds, final loss, "accuracy": per-head held-out accuracy on 2000
renders}). Retrain them (4000 steps; 125 s at 32 px and about 10 minutes at 64 px on a shared 2-core CPU) with

    python -m ldm_jax.metrics.shapes_features --resolution 32 --out ldm_jax/assets/shapes_features
    python -m ldm_jax.metrics.shapes_features --resolution 64 --out ldm_jax/assets/shapes_features
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import pathlib
import sys
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.convert.checkpoint_io import load_state_dict, save_safetensors
from ldm_jax.convert.common import assemble_params
from ldm_jax.data import shapes
from ldm_jax.metrics import fid, image_quality

ASSETS_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "shapes_features"
POSITIONS: tuple[str, ...] = tuple(shapes.POSITIONS)  # cell index -> position name, row-major
COLOUR_CLASSES: tuple[str, ...] = ("empty", *shapes.COLOURS)
SHAPE_CLASSES: tuple[str, ...] = ("none", *shapes.SHAPES)
SIZE_CLASSES: tuple[str, ...] = ("none", *shapes.SIZES)
HEADS: dict[str, tuple[str, ...]] = {"colour": COLOUR_CLASSES, "shape": SHAPE_CLASSES, "size": SIZE_CLASSES}
NUM_CELLS = len(POSITIONS)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """The classifier's architecture (what the weights need, nothing run-time).

    resolution: the side R of the (R, R, 3) images it reads; the grid cells are s x s crops, s = R // 3
      (`shapes.cell_bounds`).
    channels: output channels of the 3x3 conv stages of the cell network, each followed by ReLU.
    pools: per stage, whether a 2x2 max-pool (stride 2, "SAME" padding: odd sides round up) follows it.
    cell_features: width E of a cell's embedding; the image's feature vector is the 9 embeddings side by side,
      D = 9 E.
    """

    resolution: int = 32
    channels: tuple[int, ...] = (32, 32, 32)
    pools: tuple[bool, ...] = (False, True, False)
    cell_features: int = 14

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "pools", tuple(bool(p) for p in self.pools))
        shapes.grid_geometry(self.resolution)  # checks the resolution
        if len(self.pools) != len(self.channels):
            raise ValueError(f"FeatureConfig: {len(self.channels)} conv stages but {len(self.pools)} pool flags")

    @property
    def features(self) -> int:
        """D, the length of an image's feature vector."""
        return NUM_CELLS * self.cell_features


class CellNetwork(nn.Module):
    """crops (M, s, s, 3) float32 in [-1, 1] of single cells -> (embeddings (M, E), {head: logits (M, classes)}).

    Conv stages, flattened, a Dense layer to the E-wide embedding, and one linear head per attribute on its ReLU.
    The embedding is returned before the ReLU: a ReLU unit that never fires on real renders (5 of the 14 of the
    shipped 32 px weights) would be a constant feature, its covariance singular; before the ReLU every unit varies.
    """

    config: FeatureConfig

    @nn.compact
    def __call__(self, crops: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = crops.astype(jnp.float32)
        # 1. Conv stages: (M, s, s, 3) -> (M, s', s', channels[-1]).
        for index, (channels, pool) in enumerate(zip(self.config.channels, self.config.pools)):
            x = nn.relu(nn.Conv(channels, (3, 3), name=f"conv{index}")(x))
            if pool:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        # 2. The embedding: (M, s' * s' * C) -> (M, E).
        embedding = nn.Dense(self.config.cell_features, name="embedding")(x.reshape(x.shape[0], -1))
        # 3. One linear head per attribute on the ReLU of the embedding: (M, E) -> (M, classes).
        hidden = nn.relu(embedding)
        return embedding, {name: nn.Dense(len(classes), name=f"{name}_head")(hidden) for name, classes in HEADS.items()}


class AttributeClassifier(nn.Module):
    """images (N, R, R, 3) float32 in [-1, 1] -> (features (N, 9 E), {head: logits (N, 9, classes)}), float32.

    The image's 9 cells (`cell_crops`) go through one shared `CellNetwork` (params under "cell"); the features are
    the cells' embeddings side by side in row-major cell order.
    """

    config: FeatureConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        crops = cell_crops(images.astype(jnp.float32), self.config.resolution)  # (N, 9, s, s, 3)
        n, side = crops.shape[0], crops.shape[2]
        embedding, logits = CellNetwork(self.config, name="cell")(crops.reshape(n * NUM_CELLS, side, side, 3))
        return (embedding.reshape(n, self.config.features),
                {name: value.reshape(n, NUM_CELLS, -1) for name, value in logits.items()})


def cell_crops(images, resolution: int):
    """The grid cells of images (N, R, R, C) as (N, 9, s, s, C), row-major (`shapes.cell_bounds`); numpy in, numpy
    out, jax in, jax out."""
    stack = np.stack if isinstance(images, np.ndarray) else jnp.stack
    bounds = [shapes.cell_bounds(position, resolution) for position in POSITIONS]
    return stack([images[:, top:bottom, left:right] for top, bottom, left, right in bounds], axis=1)


# ------------------------------------------------------------------------------------------------ data


def training_scene(rng: np.random.Generator) -> shapes.Scene:
    """A scene for training and measuring the classifier: 1 to `shapes.MAX_OBJECTS` objects (uniform) in distinct
    random cells, each colour, shape and size uniform over the whole vocabulary (held-out pairs included)."""
    num = int(rng.integers(1, shapes.MAX_OBJECTS + 1))
    cells = rng.choice(NUM_CELLS, size=num, replace=False)
    colours, kinds = list(shapes.COLOURS), shapes.SHAPES
    return tuple(shapes.ShapeObject(colour=colours[int(rng.integers(len(colours)))],
                                    shape=kinds[int(rng.integers(len(kinds)))],
                                    size=shapes.SIZES[int(rng.integers(len(shapes.SIZES)))],
                                    position=POSITIONS[int(cell)]) for cell in cells)


def scene_labels(scene: shapes.Scene) -> np.ndarray:
    """int32 (9, 3): per cell (row-major) the class index of colour, shape and size (`HEADS`; 0 = empty cell)."""
    labels = np.zeros((NUM_CELLS, len(HEADS)), np.int32)
    for obj in shapes.validate_scene(scene):
        cell = POSITIONS.index(obj.position)
        labels[cell] = (COLOUR_CLASSES.index(obj.colour), SHAPE_CLASSES.index(obj.shape), SIZE_CLASSES.index(obj.size))
    return labels


def render_batch(rng: np.random.Generator, batch_size: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (B, R, R, 3), int32 labels (B, 9, 3)) of `batch_size` fresh `training_scene`s rendered in the
    varied world (`shapes.VARIED`), drawn from `rng`."""
    scenes = [training_scene(rng) for _ in range(batch_size)]
    images = np.stack([shapes.render(scene, resolution, variation=shapes.VARIED, rng=rng) for scene in scenes])
    return images, np.stack([scene_labels(scene) for scene in scenes])


def training_crops(rng: np.random.Generator, batch_size: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """A training batch of cells: (uint8 crops (B, s, s, 3), int32 labels (B, 3)), B = `batch_size`, a multiple of
    `shapes.MAX_OBJECTS`. From each of B / 3 fresh renders (`render_batch`) it takes every occupied cell and fills
    up to 3 with random empty ones, so a third of the crops are empty cells and none is wasted on a fourth."""
    per_image = shapes.MAX_OBJECTS
    if batch_size % per_image:
        raise ValueError(f"training_crops: batch_size must be a multiple of {per_image}, got {batch_size}")
    images, labels = render_batch(rng, batch_size // per_image, resolution)
    crops = cell_crops(images, resolution)  # (B / 3, 9, s, s, 3)
    rows, cells = [], []
    for index, image_labels in enumerate(labels):
        occupied = np.flatnonzero(image_labels[:, 0] > 0)
        empty = np.flatnonzero(image_labels[:, 0] == 0)
        chosen = np.concatenate([occupied, rng.choice(empty, per_image - len(occupied), replace=False)])
        rows += [index] * per_image
        cells += list(chosen)
    return crops[rows, cells], labels[rows, cells]


def _prefetched(function, steps: int, *args):
    """`steps` results of function(*args), in order, the next one computed on a worker thread while the caller uses
    the current one (one worker: draws from a Generator in args stay in order, so a seed fixes every batch)."""
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        future = worker.submit(function, *args)
        for index in range(steps):
            batch = future.result()
            if index + 1 < steps:
                future = worker.submit(function, *args)
            yield batch


def to_float(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]; float images are taken to be in [-1, 1] already and cast to float32."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ training


def _loss(model: CellNetwork, label_smoothing: float, params, crops, labels):
    _, logits = model.apply({"params": params}, to_float(crops))
    losses = [optax.softmax_cross_entropy(logits[name], optax.smooth_labels(
        jax.nn.one_hot(labels[..., i], len(classes)), label_smoothing)).mean() for i, (name, classes) in
        enumerate(HEADS.items())]
    return sum(losses)


def train(config: FeatureConfig, *, seed: int = 0, steps: int = 4000, batch_size: int = 96,
          learning_rate: float = 3e-3, label_smoothing: float = 0.1, log_every: int = 500) -> tuple[dict, dict]:
    """Trains an `AttributeClassifier` from scratch on on-the-fly varied renders (module doc).

    The cell network is trained on cells (`training_crops`, `batch_size` crops from batch_size / 3 renders, a third
    of them empty) with Adam and a cosine decay of `learning_rate` over `steps` (after 100 warm-up steps), on the
    summed cross-entropy of the three heads with `label_smoothing`; the next batch renders on a worker thread
    meanwhile. Label smoothing bounds the logits, which keeps each class's embeddings in a tight cluster (Mueller
    et al. 2019) and so makes the features' spread mostly between attributes rather than within one: measured with
    500 + 500 renders at 32 px on the post-ReLU features then in use, FSD without red rose from 1.2x to 1.5x the
    real-vs-real value, without circles from 2.5x to 3.3x (2000 + 2000: 1.7x -> 2.2x and 15x -> 8.5x; the feature
    scale fell from FSD ~680 to ~16), every head still 100% right. The seed draws the init (jax key) and every scene
    and render (numpy Generator), so a seed gives the same weights on the same machine and library versions. Prints
    the loss every `log_every` steps (0: never); raises FloatingPointError when it is not finite.
    Returns (params of the `AttributeClassifier`, training info {"seed", "steps", "batch_size" (crops),
    "learning_rate", "label_smoothing", "seconds", "final_loss"}).
    """
    model = CellNetwork(config)
    rng = np.random.default_rng([seed, 0])  # stream 0: training batches (attribute_accuracy uses other streams)
    side = shapes.grid_geometry(config.resolution)[1]
    params = model.init(jax.random.key(seed), jnp.zeros((1, side, side, 3)))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps), steps)
    optimiser = optax.adam(schedule)
    opt_state = optimiser.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(functools.partial(_loss, model, label_smoothing))(params, images, labels)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    loss = float("nan")
    batches = _prefetched(training_crops, steps, rng, batch_size, config.resolution)
    for index, (crops, labels) in enumerate(batches):
        params, opt_state, loss = step(params, opt_state, crops, labels)
        if log_every and (index + 1) % log_every == 0:
            loss = float(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"shapes_features.train: loss is {loss} at step {index + 1}")
            print(f"step {index + 1}/{steps}: loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
            "label_smoothing": label_smoothing,
            "seconds": round(time.perf_counter() - start, 1), "final_loss": float(loss)}
    return {"cell": jax.device_get(params)}, info


@functools.partial(jax.jit, static_argnums=0)
def _predict(config: FeatureConfig, params, images):
    features, logits = AttributeClassifier(config).apply({"params": params}, to_float(images))
    return features, {name: jnp.argmax(value, axis=-1) for name, value in logits.items()}


def predict(config: FeatureConfig, params, images: np.ndarray, *, batch_size: int = 250
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(features (N, D) float32, {head: predicted class indices (N, 9) int}) of images (N, R, R, 3), uint8 or
    float in [-1, 1]. Runs `batch_size` images at a time (a short last batch, or a set smaller than a batch, padded), so one
    program per image shape and batch size, whatever the set size."""
    images = _check_images(images, config.resolution)
    features, classes = [], []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        count = chunk.shape[0]
        if count < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - count, axis=0)])
        f, c = jax.device_get(_predict(config, params, chunk))
        features.append(f[:count])
        classes.append({name: value[:count] for name, value in c.items()})
    return (np.concatenate(features).astype(np.float32),
            {name: np.concatenate([c[name] for c in classes]) for name in HEADS})


def attribute_accuracy(config: FeatureConfig, params, *, num: int = 2000, seed: int = 1) -> dict[str, float]:
    """Held-out accuracy on `num` fresh varied renders of `training_scene`s (numpy stream [seed, 1], which
    `train` never draws): per head, the fraction of the occupied cells whose class is right ("colour", "shape",
    "size"), the fraction of all cells read right as empty or not ("occupancy"), and the fraction of images with
    all 27 predictions right ("scene"). Values in [0, 1]."""
    images, labels = render_batch(np.random.default_rng([seed, 1]), num, config.resolution)
    _, classes = predict(config, params, images)
    occupied = labels[..., 0] > 0
    predicted = np.stack([classes[name] for name in HEADS], axis=-1)  # (N, 9, 3)
    right = predicted == labels
    out = {name: float(right[..., i][occupied].mean()) for i, name in enumerate(HEADS)}
    out["occupancy"] = float(((predicted[..., 0] > 0) == occupied).mean())
    out["scene"] = float(right.all(axis=(1, 2)).mean())
    return out


# ------------------------------------------------------------------------------------------------ files


def param_shapes(config: FeatureConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax path: shape} of the classifier's params: the weights file's contract."""
    variables = jax.eval_shape(AttributeClassifier(config).init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, config.resolution, config.resolution, 3), jnp.float32))
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        flat[tuple(entry.key for entry in path)] = tuple(leaf.shape)
    return flat


def save(outdir: str | pathlib.Path, config: FeatureConfig, params, info: dict) -> pathlib.Path:
    """Writes OUTDIR/resR.safetensors (float32 params by "/"-joined path) and OUTDIR/resR.json ({"model": config,
    **info}); returns the JSON's path."""
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(entry.key for entry in path): np.asarray(leaf, np.float32)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    save_safetensors(outdir / f"res{config.resolution}.safetensors", flat)
    path = outdir / f"res{config.resolution}.json"
    path.write_text(json.dumps({"model": dataclasses.asdict(config), **info}, indent=2) + "\n")
    return path


def available_resolutions(directory: str | pathlib.Path = ASSETS_DIR) -> tuple[int, ...]:
    """The resolutions with a resR.json in `directory` (the shipped ones by default), ascending."""
    found = (p.stem[3:] for p in pathlib.Path(directory).glob("res*.json"))
    return tuple(sorted(int(r) for r in found if r.isdigit()))


@functools.lru_cache(maxsize=8)
def load(resolution: int, directory: str | pathlib.Path = ASSETS_DIR) -> tuple[FeatureConfig, dict, dict]:
    """(config, params, the JSON's other entries) of the weights for `resolution` in `directory` (the shipped
    ones by default). Raises FileNotFoundError naming the resolutions there are, ConversionError (a ValueError) for
    params that do not match the config (missing, unexpected, mis-shaped names listed)."""
    directory = pathlib.Path(directory)
    path = directory / f"res{resolution}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shapes-features weights for resolution {resolution} in {directory}; there are "
                                f"weights for {list(available_resolutions(directory)) or 'none'}")
    info = json.loads(path.read_text())
    config = FeatureConfig(**info.pop("model"))
    arrays = load_state_dict(path.with_suffix(".safetensors"))
    params = assemble_params({tuple(name.split("/")): (name, array) for name, array in arrays.items()},
                             param_shapes(config), source=str(path.with_suffix(".safetensors")))
    return config, jax.device_put(params), info


# ------------------------------------------------------------------------------------------------ metrics


def features(images: np.ndarray, *, batch_size: int = 250) -> np.ndarray:
    """Shapes features of images (N, R, R, 3), uint8 or float in [-1, 1], with the shipped weights for R:
    (N, D) float32, D = 9 E = 126 for the shipped weights. Runs `batch_size` images at a time (one jit compile per image shape and dtype).
    Raises ValueError for a bad shape or dtype, FileNotFoundError when no weights exist for R."""
    images = _check_images(images)
    config, params, _ = load(images.shape[1])
    return predict(config, params, images, batch_size=batch_size)[0]


def fsd(images_a: np.ndarray, images_b: np.ndarray, *, batch_size: int = 250) -> float:
    """Frechet Shapes Distance: `fid.fid_from_features` of the `features` of two image sets (N_a, R, R, 3) and
    (N_b, R, R, 3) (uint8 or float in [-1, 1], N >= 2 each, one R); >= 0, 0 for identical feature statistics."""
    return fid.fid_from_features(features(images_a, batch_size=batch_size), features(images_b, batch_size=batch_size))


def _check_images(images: np.ndarray, resolution: int | None = None) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or images.shape[0] == 0:
        raise ValueError(f"shapes features: expected images (N, R, R, 3) with N >= 1, got shape {images.shape}")
    if resolution is not None and images.shape[1] != resolution:
        raise ValueError(f"shapes features: the classifier reads {resolution}x{resolution} images, got "
                         f"{images.shape[1]}x{images.shape[2]}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"shapes features: expected uint8 or float images, got {images.dtype}")
    if images.dtype != np.uint8:  # the project's one range check: NaN or [0, 255] floats are refused, not featurised
        images = (2.0 * image_quality.to_unit_interval(images, name="shapes features images") - 1.0).astype(np.float32)
    return images


# ------------------------------------------------------------------------------------------------ command


# Cell networks per resolution (cells of 10 and 21 pixels): 10 -> 5 x 5 x 32 and 21 -> 11 -> 6 x 6 x 32 maps.
DEFAULT_CONFIGS = {32: FeatureConfig(32, (32, 32, 32), (False, True, False)),
                   64: FeatureConfig(64, (32, 32, 32), (True, True, False))}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ldm_jax.metrics.shapes_features --resolution R --out DIR`: trains, measures and saves (module
    doc). Prints the held-out accuracy; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.metrics.shapes_features", description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=32, help="image side (32 and 64 are shipped)")
    parser.add_argument("--out", required=True, help="folder for resR.safetensors and resR.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=96, help="cells per step (a multiple of 3)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--eval-num", type=int, default=2000, help="fresh renders for the held-out accuracy")
    args = parser.parse_args(argv)
    if args.resolution not in DEFAULT_CONFIGS:
        parser.error(f"--resolution must be one of {sorted(DEFAULT_CONFIGS)}, got {args.resolution}")
    config = DEFAULT_CONFIGS[args.resolution]
    params, info = train(config, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, label_smoothing=args.label_smoothing)
    accuracy = attribute_accuracy(config, params, num=args.eval_num, seed=args.seed)
    path = save(args.out, config, params, {"training": info, "accuracy": {"num_images": args.eval_num, **accuracy}})
    print(json.dumps(accuracy), f"\nwrote {path} and {path.with_suffix('.safetensors').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
