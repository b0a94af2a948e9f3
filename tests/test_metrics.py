"""Metrics: the captioned-shapes checker, PSNR/SSIM against direct computations, LPIPS wiring, FID, CLIP score.

Run: .venv/bin/python -m pytest -q tests/test_metrics.py
"""
import io

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ldm_jax.data import shapes
from ldm_jax.losses.lpips import LPIPS
from ldm_jax.metrics import clip_score, fid, image_quality
from ldm_jax.metrics.shapes_checker import CheckerConfig, check_image, classify_pixels, prompt_adherence

Obj = shapes.ShapeObject


# ------------------------------------------------------------------------------------------ shapes checker


def _scenes(n: int, seed: int) -> list[shapes.Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, heldout=bool(i % 2)) for i in range(n)]


def _render_degraded(scene, resolution, rng, *, noise=0.0, blur=0.0, jpeg=None, shift=0, colour_jitter=0.0):
    """A 'generated-looking' image: each object moved by up to `shift` px and its colour jittered uniformly by
    up to `colour_jitter` per channel; then Gaussian blur (sigma px), Gaussian noise (sigma, 0..255 scale),
    uint8 rounding and optionally a JPEG round trip at quality `jpeg`."""
    image = np.zeros((resolution, resolution, 3))
    for obj in scene:
        dy, dx = rng.integers(-shift, shift + 1, size=2)
        mask = np.roll(shapes.object_mask(obj, resolution), (dy, dx), axis=(0, 1))
        image[mask] = np.array(shapes.COLOURS[obj.colour]) + rng.uniform(-colour_jitter, colour_jitter, 3)
    if blur:
        image = ndimage.gaussian_filter(image, (blur, blur, 0))
    image = np.clip(np.round(image + rng.normal(0, noise, image.shape)), 0, 255).astype(np.uint8)
    if jpeg:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg)
        image = np.asarray(Image.open(buffer))
    return image


@pytest.mark.parametrize("resolution", [24, 32, 64, 128])
def test_checker_is_exact_on_clean_renders(resolution):
    scenes = _scenes(40, seed=resolution)
    for scene in scenes:
        result = check_image(shapes.render(scene, resolution), shapes.caption(scene))
        assert result.adheres and result.count and not result.extras, (shapes.caption(scene), result)
        assert [o.detection.iou for o in result.objects] == [1.0] * len(scene)  # templates match exactly
    # float input in [-1, 1] reads the same as uint8
    image = shapes.render(scenes[0], resolution).astype(np.float32) / 127.5 - 1
    assert check_image(image, scenes[0]).adheres


# (resolution, degradation, minimum accuracy). Measured on 300 scenes each: 1.000, 1.000, 1.000, 1.000, 0.98.
# Known limits (measured): 32 px JPEG q75 0.75 (4:2:0 chroma subsampling at 16x16 loses small shapes);
# 64 px blur sigma 2.0 0.79 (triangles and circles round into each other).
DEGRADATIONS = [
    (32, dict(noise=50.0), 0.98),
    (32, dict(blur=1.0), 0.98),
    (64, dict(noise=25.0, blur=0.7, shift=2, colour_jitter=30.0), 0.98),
    (64, dict(jpeg=75), 0.98),
    (128, dict(noise=50.0, blur=1.5, jpeg=75, shift=3, colour_jitter=40.0), 0.98),
]


@pytest.mark.parametrize("resolution,degradation,minimum", DEGRADATIONS)
def test_checker_is_robust_to_degradation(resolution, degradation, minimum):
    rng = np.random.default_rng(7)
    scenes = _scenes(100 if resolution < 128 else 40, seed=resolution + 1)
    images = [_render_degraded(scene, resolution, rng, **degradation) for scene in scenes]
    summary = prompt_adherence(images, [shapes.caption(s) for s in scenes])
    assert summary["accuracy"] >= minimum, summary


SCENE = (Obj("red", "circle", "small", "top left"), Obj("blue", "square", "large", "centre"),
         Obj("yellow", "triangle", "large", "bottom right"))


@pytest.mark.parametrize("resolution", [32, 64])
def test_checker_rejects_wrong_captions(resolution):
    image = shapes.render(SCENE, resolution)
    red, blue, yellow = SCENE

    def check(*objects):
        result = check_image(image, tuple(objects))
        assert not result.adheres
        return result

    r = check(Obj("green", "circle", "small", "top left"), blue, yellow)  # wrong colour
    assert [(o.colour, o.shape, o.size, o.position) for o in r.objects[:1]] == [(False, True, True, True)]
    assert all(o.correct for o in r.objects[1:]) and not r.extras

    r = check(Obj("red", "circle", "small", "top right"), blue, yellow)  # wrong position: found elsewhere
    assert (r.objects[0].position, r.objects[0].colour, r.objects[0].shape) == (False, True, True)
    assert r.objects[0].detection.position == "top left" and not r.extras

    r = check(red, Obj("blue", "circle", "large", "centre"), yellow)  # wrong shape
    assert (r.objects[1].shape, r.objects[1].colour, r.objects[1].size) == (False, True, True)
    r = check(red, blue, Obj("yellow", "square", "large", "bottom right"))  # triangle is no square
    assert not r.objects[2].shape
    r = check(Obj("red", "circle", "large", "top left"), blue, yellow)  # wrong size
    assert (r.objects[0].size, r.objects[0].shape) == (False, True)

    assert check_image(image, SCENE).adheres  # the true caption

    r = check(red, blue, Obj("green", "square", "small", "top"))  # missing object (and yellow is extra)
    assert r.objects[2].detection is None and not any(
        getattr(r.objects[2], a) for a in ("colour", "shape", "size", "position"))
    assert [(d.colour, d.position) for d in r.extras] == [("yellow", "bottom right")]

    r = check(red, blue)  # an object the caption does not mention
    assert all(o.correct for o in r.objects) and not r.count
    assert [(d.colour, d.shape, d.position) for d in r.extras] == [("yellow", "triangle", "bottom right")]


def test_checker_splits_merged_blobs_and_keeps_spills():
    scene = (Obj("red", "square", "large", "top left"), Obj("red", "square", "large", "top"))
    image = shapes.render(scene, 32)
    image[4:6, 8:13] = shapes.COLOURS["red"]  # a bridge across the cell border: one connected component
    assert ndimage.label(classify_pixels(image, 0.4) == 1, structure=np.ones((3, 3)))[1] == 1
    result = check_image(image, scene)
    assert result.adheres, result
    # a large object moved 2 px right spills a 1-px strip into the next cell: still one object, in its cell
    moved = np.roll(shapes.render(scene[:1], 32), 2, axis=1)
    result = check_image(moved, scene[:1])
    assert result.adheres and len(result.detections) == 1, result


def test_checker_reads_blank_and_smeared_images():
    blank = np.zeros((64, 64, 3), np.uint8)
    result = check_image(blank, "a small red circle at the top left")
    assert not result.adheres and result.objects[0].detection is None and not result.detections
    smear = blank.copy()
    smear[2:19, 2:30] = shapes.COLOURS["red"]  # a red bar across two cells: no shape of this world
    smear[4:17, 4:8] = 0
    result = check_image(smear, "a large red square at the top left")
    assert not result.adheres


def test_checker_errors():
    image = shapes.render(SCENE, 32)
    with pytest.raises(ValueError, match="square RGB image"):
        check_image(image[:, :30], SCENE)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        check_image(image.astype(np.float32), SCENE)  # floats on the 0..255 scale
    with pytest.raises(TypeError, match="dtype int64"):
        check_image(image.astype(np.int64), SCENE)
    with pytest.raises(ValueError, match="cannot parse caption fragment"):
        check_image(image, "a red circle somewhere")
    with pytest.raises(ValueError, match="at least 24"):
        check_image(image[:16, :16], SCENE)
    with pytest.raises(ValueError, match="colour_margin"):
        CheckerConfig(colour_margin=1.5)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        prompt_adherence([image, image], [SCENE])


def test_prompt_adherence_accuracies():
    image = shapes.render(SCENE, 32)
    red, blue, yellow = SCENE
    wrong_colour = (Obj("green", "circle", "small", "top left"), blue, yellow)
    summary = prompt_adherence(np.stack([image, image]), [shapes.caption(SCENE), shapes.caption(wrong_colour)])
    assert summary == {"accuracy": 0.5, "object_accuracy": 5 / 6, "colour": 5 / 6, "shape": 1.0, "size": 1.0,
                       "position": 1.0, "count": 1.0, "num_images": 2, "num_objects": 6}


# ------------------------------------------------------------------------------------------ PSNR and SSIM


def _ssim_reference(x, y):
    """SSIM with scipy's Gaussian filter (radius 5, zero padding) cropped to the valid region; x, y on [0, 1]."""
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(x.shape[-1]):
        a, b = x[..., ch], y[..., ch]

        def blur(z):
            return ndimage.gaussian_filter(z, 1.5, radius=5, mode="constant")[5:-5, 5:-5]

        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        values.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return np.mean(values), values


def _ssim_one_window(a, b, top, left):
    """The SSIM index of one 11x11 window from its definition (weighted mean, centred second moments)."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    pa, pb = a[top:top + 11, left:left + 11], b[top:top + 11, left:left + 11]
    mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
    var_a, var_b = (w * (pa - mu_a) ** 2).sum(), (w * (pb - mu_b) ** 2).sum()
    cov = (w * (pa - mu_a) * (pb - mu_b)).sum()
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def test_ssim_matches_direct_computations():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 24, 20, 3))
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1)
    ours = image_quality.ssim(x, y)
    assert ours.shape == (2,)
    u, v = (x + 1) / 2, (y + 1) / 2
    for i in range(2):
        reference, maps = _ssim_reference(u[i], v[i])
        np.testing.assert_allclose(ours[i], reference, rtol=1e-12)  # float64 both ways
        for top, left in ((0, 0), (13, 9), (7, 4)):  # the map is indexed by the window's top-left corner
            np.testing.assert_allclose(maps[1][top, left], _ssim_one_window(u[i, ..., 1], v[i, ..., 1], top, left),
                                       rtol=1e-10)
    assert image_quality.ssim(x[0], y[0]) == pytest.approx(ours[0], rel=1e-15)  # one HWC image -> a scalar


def test_ssim_and_psnr_known_values():
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, (3, 16, 16, 3))
    assert np.all(image_quality.ssim(x, x) == 1.0) and np.all(np.isposinf(image_quality.psnr(x, x)))
    # constant images a, b on [0, 1]: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (the contrast-structure term is 1)
    a, b = 0.3, 0.6
    const_a, const_b = np.full((16, 16, 3), 2 * a - 1), np.full((16, 16, 3), 2 * b - 1)
    expected = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    np.testing.assert_allclose(image_quality.ssim(const_a, const_b), expected, rtol=1e-12)
    # PSNR of a known MSE: an offset of 0.1 on [-1, 1] is 0.05 on [0, 1]: MSE 0.0025, PSNR 10 log10(400) dB
    np.testing.assert_allclose(image_quality.psnr(x, x + 0.1), 10 * np.log10(400.0), rtol=1e-12)
    # uint8 in [0, 255] and floats in [-1, 1] are the same images
    u8 = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    u8b = np.clip(u8.astype(int) + rng.integers(-20, 21, u8.shape), 0, 255).astype(np.uint8)
    as_float = lambda z: z.astype(np.float64) / 127.5 - 1  # noqa: E731
    np.testing.assert_allclose(image_quality.ssim(u8, u8b), image_quality.ssim(as_float(u8), as_float(u8b)),
                               rtol=1e-12)
    mse = np.mean((u8.astype(float) - u8b) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(image_quality.psnr(u8, u8b), 10 * np.log10(255.0**2 / mse), rtol=1e-12)


def test_image_quality_errors():
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        image_quality.psnr(x, x[:, :8])
    with pytest.raises(ValueError, match="at least 11x11"):
        image_quality.ssim(x[:, :10, :10], x[:, :10, :10])
    with pytest.raises(ValueError, match="NaN"):
        image_quality.psnr(x, np.full_like(x, np.nan))


def test_lpips_metric_wiring(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth"):
        image_quality.lpips_metric(tmp_path / "vgg16.pth")
    widths = (4, 4, 4, 4, 4)
    model = LPIPS(widths)
    images = jax.ShapeDtypeStruct((1, 16, 16, 3), np.float32)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.uniform(0.1, 1.0, s.shape).astype(np.float32),  # positive: distances > 0
                          jax.eval_shape(model.init, jax.random.key(0), images, images)["params"])
    metric = image_quality.make_lpips_metric(params, widths)
    x = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    y = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    direct = jax.jit(model.apply)({"params": params}, x / 127.5 - 1, y / 127.5 - 1)
    np.testing.assert_allclose(metric(x, y), direct, rtol=1e-5)  # same float32 graph; only the input scaling differs
    np.testing.assert_allclose(metric(x, x), 0.0, atol=1e-7)
    assert np.all(metric(x, y) > 0)


# --------------------------------------------------------------------------------------------- FID, CLIP


def _spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    # S2 = k^2 S1: Tr(S1 + k^2 S1 - 2k S1) = (1 - k)^2 Tr(S1)
    s1 = _spd(rng, 6)
    assert fid.frechet_distance(np.zeros(6), s1, np.zeros(6), 9 * s1) == pytest.approx(4 * np.trace(s1), rel=1e-8)
    # general SPD pair: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), the latter by eigendecomposition
    s2 = _spd(rng, 6)
    w, v = np.linalg.eigh(s1)
    half = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(half @ s2 @ half)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert fid.frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu1, s1[:5, :5], mu1, s1[:5, :5]) == pytest.approx(0.0, abs=1e-8)


def test_fid_from_features_statistics_and_files(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 4)), rng.normal(1.0, 2.0, size=(60, 4))
    mu, sigma = fid.feature_statistics(a)
    np.testing.assert_allclose(mu, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a.T, ddof=1), rtol=1e-12)
    value = fid.fid_from_features(a, b)
    assert value == pytest.approx(fid.frechet_distance(mu, sigma, *fid.feature_statistics(b)), rel=1e-12)
    assert fid.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    batches = lambda z: [z[:20], z[20:]]  # noqa: E731
    assert fid.compute_fid(batches(a), batches(b), lambda x: x * 2) == pytest.approx(
        fid.fid_from_features(2 * a, 2 * b), rel=1e-12)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "feats.npz", features=a)
    np.save(tmp_path / "feats.npy", a)
    for name in ("stats.npz", "feats.npz", "feats.npy"):
        loaded = fid.load_statistics(tmp_path / name)
        np.testing.assert_allclose(loaded[0], mu, rtol=1e-12)
        np.testing.assert_allclose(loaded[1], sigma, rtol=1e-12)


def test_fid_errors(tmp_path):
    with pytest.raises(ValueError, match=r"sigma2 has shape \(3, 3\), expected \(2, 2\)"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="imaginary part"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(np.zeros((1, 3)))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(2))
    with pytest.raises(ValueError, match=r"holds \['mean'\]; expected `mu` and `sigma`"):
        fid.load_statistics(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid.load_statistics(tmp_path / "nothing.npz")
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth"):
        fid.inception_feature_fn(tmp_path / fid.INCEPTION_WEIGHTS)
    (tmp_path / fid.INCEPTION_WEIGHTS).write_bytes(b"")
    with pytest.raises(ValueError, match="file is empty"):  # a CheckpointError from the weights reader
        fid.inception_feature_fn(tmp_path / fid.INCEPTION_WEIGHTS)


def test_clip_score():
    image = np.array([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    text = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, np.sqrt(3.0)]])
    np.testing.assert_allclose(clip_score.clip_score_from_embeddings(image, text), [100.0, 0.0, 0.0, 50.0],
                               atol=1e-12)
    with pytest.raises(ValueError, match="zero embedding at index 0"):
        clip_score.clip_score_from_embeddings(np.zeros((1, 2)), np.ones((1, 2)))
