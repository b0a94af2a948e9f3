"""Distribution metrics for the captioned-shapes world: improved precision / recall (`metrics.precision_recall`),
the shapes classifier and FSD (`metrics.shapes_features`, shipped weights), `ldm-jax evaluate distribution`.

Run: .venv/bin/python -m pytest -q -n 2 tests/test_distribution_metrics.py

Image sets are `SET_SIZE` varied 32-pixel renders of train-split scenes (`shapes.sample_scene`), features computed
`BATCH` at a time, so every set of one dtype runs one compiled program (uint8 and float32: two).

Measured with the shipped 32-pixel weights (1000 + 1000 renders; the tests print theirs): FSD real-vs-real 12.1
(14.0 for another seed of the first set); Gaussian blur sigma 0.7 / 1.0 / 1.5 px: 37.6 / 71.8 / 127.6; additive noise
std 0.1 / 0.15 / 0.2 (on [-1, 1]): 29.1 / 210 / 669; no red object: 16.4; no circle: 106.6. Precision / recall
real-vs-real 0.931 / 0.939; 20 images x 50 copies: 0.95 / 0.0. A colour drop is the faintest of these signals (the
classifier separates colours with little of its features' spread); it needs sets of about 1000 to stand out.
"""
import json
import pathlib

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from ldm_jax import evaluate
from ldm_jax.data import shapes
from ldm_jax.metrics import fid, precision_recall, shapes_features

SET_SIZE = 1000
BATCH = 250
RESOLUTION = 32
REAL_BOUND = 16.0  # FSD between two disjoint real sets stays below this (measured 12.1 - 14.0; mildest noise 29.1)
BLUR_SIGMAS = (0.7, 1.0, 1.5)  # pixels
NOISE_STDS = (0.1, 0.15, 0.2)  # on the [-1, 1] scale
COLLAPSE_DISTINCT = 20


def _renders(seed: int, num: int = SET_SIZE, resolution: int = RESOLUTION, scene_fn=shapes.sample_scene
             ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([shapes.render(scene_fn(rng), resolution, variation=shapes.VARIED, rng=rng) for _ in range(num)])


def _features(images: np.ndarray) -> np.ndarray:
    return shapes_features.features(images, batch_size=BATCH)


def _fsd(images: np.ndarray, reference_features: np.ndarray) -> float:
    return fid.fid_from_features(_features(images), reference_features)


@pytest.fixture(scope="module")
def real():
    """Two disjoint real sets: (uint8 images A, features of A, features of B)."""
    images_a = _renders(seed=100)
    return images_a, _features(images_a), _features(_renders(seed=200))


# ------------------------------------------------------------------------------------------ precision / recall


def test_precision_recall_exact_on_hand_made_points():
    # 1-D points on the x axis of a 2-D feature space. k = 1 radii of the real set {0, 1, 3, 7, 20}: 1, 1, 2, 4, 13,
    # so its balls are [-1, 1], [0, 2], [1, 5], [3, 11], [7, 33]; generated {0.5, 4, 12, -2, 6}: all but -2 inside.
    # Generated radii: 2.5, 2, 6, 2.5, 2 -> balls [-2, 3], [2, 6], [6, 18], [-4.5, 0.5], [4, 8]; real 20 outside.
    real = np.array([[0, 0], [1, 0], [3, 0], [7, 0], [20, 0]], np.float64)
    generated = np.array([[0.5, 0], [4, 0], [12, 0], [-2, 0], [6, 0]], np.float64)
    np.testing.assert_array_equal(precision_recall.knn_sq_radii(real, 1), [1, 1, 4, 16, 169])
    assert precision_recall.precision_recall(real, generated, k=1) == (4 / 5, 4 / 5)
    # k = 2: real radii 3, 2, 3, 6, 17 cover every generated point; generated radii 3.5, 3.5, 8, 6, 5.5 cover every
    # real point (20 on the boundary of 12's ball [4, 20]).
    assert precision_recall.precision_recall(real, generated, k=2) == (1.0, 1.0)
    # Euclidean and closed balls: (3, 4) lies exactly on the radius-5 sphere around (0, 0), (-3, -4.01) just outside.
    pair = np.array([[0.0, 0.0], [5.0, 0.0]])
    assert precision_recall.precision_recall(pair, np.array([[3.0, 4.0], [-3.0, -4.01]]), k=1)[0] == 0.5
    # A duplicate is a neighbour at distance 0: with k = 1 the duplicated point's ball is the point itself.
    np.testing.assert_array_equal(precision_recall.knn_sq_radii(np.array([[0.0], [0.0], [2.0]]), 1), [0, 0, 4])
    # Blocked computation agrees with one block.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(70, 5)), rng.normal(size=(50, 5)) + 0.5
    assert precision_recall.precision_recall(a, b, block_size=7) == precision_recall.precision_recall(a, b)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall.precision_recall(a[:3], b, k=3)


# ------------------------------------------------------------------------------------------ classifier


@pytest.mark.parametrize("resolution", [32, 64])
def test_shipped_weights_classify_fresh_renders(resolution):
    config, params, info = shapes_features.load(resolution)
    assert config.resolution == resolution and info["training"]["steps"] > 0
    accuracy = shapes_features.attribute_accuracy(config, params, num=400, seed=7)  # renders the JSON never saw
    for head in ("colour", "shape", "size", "occupancy"):
        assert accuracy[head] >= min(info["accuracy"][head], 0.99) - 0.01, (head, accuracy, info["accuracy"])
    # The JSON is the file the weights came with.
    path = shapes_features.ASSETS_DIR / f"res{resolution}.json"
    assert json.loads(path.read_text())["model"]["resolution"] == resolution


def test_features_read_uint8_and_float_alike(real):
    images, reference, _ = real
    some = images[:BATCH]
    np.testing.assert_allclose(_features(some.astype(np.float32) / 127.5 - 1.0), reference[:BATCH], atol=1e-4)
    assert reference.shape == (SET_SIZE, 126) and reference.dtype == np.float32
    with pytest.raises(FileNotFoundError, match="no shapes-features weights for resolution 48"):
        shapes_features.features(np.zeros((2, 48, 48, 3), np.uint8))
    with pytest.raises(ValueError, match=r"expected images \(N, R, R, 3\)"):
        shapes_features.features(np.zeros((2, 32, 32), np.uint8))


# ------------------------------------------------------------------------------------------ FSD


def test_fsd_real_vs_real_and_degradations(real):
    images, features_a, features_b = real
    baseline = fid.fid_from_features(features_a, features_b)
    x = images.astype(np.float32) / 127.5 - 1.0
    blurred = [_fsd(scipy.ndimage.gaussian_filter(x, (0, s, s, 0)), features_b) for s in BLUR_SIGMAS]
    noisy_rng = np.random.default_rng(3)
    noise = noisy_rng.normal(size=x.shape).astype(np.float32)
    noisy = [_fsd(np.clip(x + s * noise, -1, 1), features_b) for s in NOISE_STDS]
    print(f"FSD real-vs-real {baseline:.3f}; blur sigma {BLUR_SIGMAS}: {[round(v, 3) for v in blurred]}; "
          f"noise std {NOISE_STDS}: {[round(v, 3) for v in noisy]}")
    assert baseline < REAL_BOUND
    assert min(blurred[0], noisy[0]) > 2 * baseline  # the mildest degradation is well above real-vs-real
    assert all(np.diff(blurred) > 0), blurred
    assert all(np.diff(noisy) > 0), noisy


def _without(attribute: str, value: str):
    def scene_fn(rng):
        scene = shapes.sample_scene(rng)
        while any(getattr(obj, attribute) == value for obj in scene):
            scene = shapes.sample_scene(rng)
        return scene

    return scene_fn


def test_fsd_rises_when_a_mode_is_dropped(real):
    _, features_a, features_b = real
    baseline = fid.fid_from_features(features_a, features_b)
    no_red = _fsd(_renders(seed=300, scene_fn=_without("colour", "red")), features_b)
    no_circle = _fsd(_renders(seed=400, scene_fn=_without("shape", "circle")), features_b)
    print(f"FSD without red {no_red:.3f}, without circles {no_circle:.3f} (real-vs-real {baseline:.3f})")
    assert no_red > 1.2 * baseline
    assert no_circle > 3 * baseline


def test_mode_collapse_keeps_precision_and_loses_recall(real):
    _, features_a, features_b = real
    honest = precision_recall.precision_recall(features_b, features_a)
    collapsed_features = np.repeat(features_a[:COLLAPSE_DISTINCT], SET_SIZE // COLLAPSE_DISTINCT, axis=0)
    collapsed = precision_recall.precision_recall(features_b, collapsed_features)
    print(f"precision/recall real-vs-real {honest}; {COLLAPSE_DISTINCT} images x {SET_SIZE // COLLAPSE_DISTINCT} "
          f"{collapsed}")
    assert honest[0] > 0.9 and honest[1] > 0.9
    assert collapsed[0] >= honest[0] - 0.05
    assert collapsed[1] < 0.1


# ------------------------------------------------------------------------------------------ command


def _write_pngs(directory: pathlib.Path, images: np.ndarray) -> pathlib.Path:
    directory.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(directory / f"{index:03d}.png")
    return directory


def test_distribution_command(tmp_path, capsys):
    generated = _write_pngs(tmp_path / "generated", _renders(seed=400, num=12))
    reference = _write_pngs(tmp_path / "reference", _renders(seed=500, num=16))
    summary = evaluate.distribution(generated, reference)
    assert summary["num_images"] == 12 and summary["num_reference"] == 16 and summary["fsd"] >= 0
    assert 0 <= summary["precision"] <= 1 and 0 <= summary["recall"] <= 1
    assert evaluate.main(["distribution", "--images", str(generated), "--reference", str(reference),
                          "--resolution", "32", "--no-compile-cache"]) == 0
    out = capsys.readouterr().out
    table = dict(line.split() for line in out.strip().splitlines()[2:])
    assert table.keys() == {"num_images", "num_reference", "fsd", "precision", "recall"}, out
    assert table["num_images"] == "12" and float(table["fsd"]) == pytest.approx(summary["fsd"], abs=1e-4)
    wrong_size = _write_pngs(tmp_path / "wrong_size", np.zeros((4, 48, 48, 3), np.uint8))
    for argv, message in (
        (["--images", str(wrong_size), "--reference", str(wrong_size)], "no shapes-features weights for resolution 48"),
        (["--images", str(wrong_size), "--reference", str(reference)], "they must match"),
        (["--images", str(generated), "--reference", str(reference), "--resolution", "64"], "expected 64x64"),
        (["--images", str(tmp_path / "missing"), "--reference", str(reference)], "does not exist"),
    ):
        assert evaluate.main(["distribution", *argv, "--no-compile-cache"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
