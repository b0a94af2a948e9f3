"""LPIPS (Flax) vs the lpips package (PyTorch) with a random VGG16 trunk and the real v0.1 heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.lpips import convert_lpips_state_dict, default_heads_path, load_lpips_params
from ldm_jax.losses.lpips import LPIPS
from tests import reference_vgg

RTOL = 1e-5  # float32 both sides; 13 convs on 32x32 inputs stay well inside this


@pytest.fixture(scope="module")
def reference():
    """(torch lpips model, our params converted from its whole state dict)."""
    model = reference_vgg.lpips_module(seed=0)
    return model, convert_lpips_state_dict(model.state_dict())


@jax.jit
def _distance(params, x0, x1):
    return LPIPS().apply({"params": params}, x0, x1)


def _images(seed, shape):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, shape).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 16, 40, 3)])
def test_distances_match_lpips_package(reference, shape):
    model, params = reference
    x0, x1 = _images(1, shape), _images(2, shape)
    x1[0] = x0[0]  # one identical pair: distance exactly 0
    with torch.no_grad():
        want = model(_nchw(x0), _nchw(x1)).numpy()
    assert want.shape == (shape[0], 1, 1, 1)
    got = np.asarray(_distance(params, x0, x1))
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, want.reshape(-1), rtol=RTOL, atol=1e-7)
    assert got[0] == 0.0 and np.all(got[1:] > 1e-3)


def test_input_gradient_matches_lpips_package(reference):
    model, params = reference
    x0, x1 = _images(3, (2, 16, 16, 3)), _images(4, (2, 16, 16, 3))
    t1 = _nchw(x1).requires_grad_(True)
    model(_nchw(x0), t1).sum().backward()
    want = t1.grad.numpy().transpose(0, 2, 3, 1)
    got = jax.jit(jax.grad(lambda b: _distance(params, x0, b).sum()))(x1)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=RTOL * scale)


def test_gradient_is_finite_at_identical_images():
    # Tiny widths make all-zero ReLU feature vectors likely; the unit-normalisation must not give NaN.
    model = LPIPS(widths=(2, 2, 2, 2, 2))
    x = jnp.asarray(_images(5, (2, 16, 16, 3)))
    params = jax.jit(model.init)(jax.random.key(5), x, x)["params"]
    grad = jax.jit(jax.grad(lambda b: model.apply({"params": params}, x, b).sum()))(x)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_torchvision_layout_and_default_heads(reference):
    model, params = reference
    vgg = reference_vgg.VGG16()
    vgg.load_state_dict({f"features.{k.split('.', 1)[1]}": v for k, v in model.net.state_dict().items()})
    vgg_sd = dict(vgg.state_dict())
    vgg_sd["classifier.6.bias"] = torch.zeros(1000)  # torchvision's classifier: dropped on purpose
    heads = torch.load(default_heads_path(), map_location="cpu", weights_only=True)
    got = convert_lpips_state_dict(vgg_sd, heads)
    jax.tree.map(np.testing.assert_array_equal, got, params)
    assert got["lin4"]["kernel"].shape == (1, 1, 512, 1)
    assert got["vgg"]["features_28"]["kernel"].shape == (3, 3, 512, 512)


def test_converter_is_strict(reference):
    model, _ = reference
    sd = {k: v.numpy() for k, v in model.state_dict().items()}

    def error(mutate):
        bad = dict(sd)
        mutate(bad)
        with pytest.raises(ConversionError) as info:
            convert_lpips_state_dict(bad)
        return str(info.value)

    assert "lin3" in error(lambda d: [d.pop("lin3.model.1.weight"), d.pop("lins.3.model.1.weight")])
    assert "lins.2" in error(lambda d: d.update({"lins.2.model.1.weight": 2 * d["lin2.model.1.weight"]}))
    assert "features_26" in error(lambda d: d.pop("net.slice5.26.bias"))
    assert "net.extra.weight" in error(lambda d: d.update({"net.extra.weight": np.zeros(3)}))
    assert "lin0.model.1.weight" in error(lambda d: d.update({"lin0.model.1.weight": np.zeros((1, 32, 1, 1))}))
    assert "slice2" in error(lambda d: d.update({"net.slice2.12.weight": d.pop("net.slice3.12.weight")}))
    assert "scaling_layer.scale" in error(lambda d: d.update({"scaling_layer.scale": np.ones((1, 3, 1, 1))}))
    with pytest.raises(ConversionError, match="given twice"):
        convert_lpips_state_dict(sd, {"lin0.model.1.weight": sd["lin0.model.1.weight"]})


def test_load_from_torch_files(reference, tmp_path):
    model, params = reference
    vgg_sd = {f"features.{k.split('.', 1)[1]}": v for k, v in model.net.state_dict().items()}
    vgg_sd["classifier.0.bias"] = torch.zeros(8)
    torch.save(vgg_sd, tmp_path / "vgg16-397923af.pth")
    got = load_lpips_params(tmp_path / "vgg16-397923af.pth")  # heads: the lpips package's v0.1 file
    jax.tree.map(np.testing.assert_array_equal, got, params)


def test_missing_files_are_named(tmp_path):
    assert default_heads_path().is_file()
    with pytest.raises(FileNotFoundError) as info:
        load_lpips_params(tmp_path / "vgg16.pth", heads_path=tmp_path / "heads.pth")
    message = str(info.value)
    assert "vgg16.pth" in message and "vgg16-397923af.pth" in message and "heads.pth" in message


@pytest.mark.parametrize("a,b,match", [((1, 32, 32, 3), (1, 32, 32, 4), "differ in shape"),
                                       ((1, 32, 32, 1), (1, 32, 32, 1), "RGB"),
                                       ((1, 8, 32, 3), (1, 8, 32, 3), "at least 16x16")])
def test_bad_inputs(a, b, match):
    with pytest.raises(ValueError, match=match):
        LPIPS().init(jax.random.key(0), jnp.zeros(a), jnp.zeros(b))
