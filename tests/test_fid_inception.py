"""pytorch-fid's Inception-v3 (Flax port) vs the pytorch-fid 0.3.0 package, random weights, through our converter.

The reference is pytorch-fid's own `InceptionV3([3])` (its FIDInceptionA/C/E_1/E_2 blocks on a stand-in
torchvision Inception3, tests/reference_inception.py) with random weights and non-trivial BatchNorm statistics,
saved with torch.save in pytorch-fid's weights-file layout and read back by `fid.inception_feature_fn`.
Measured (float32 both sides, 2-core CPU): pool3 features differ by at most 1.7e-6 of the largest feature
(64 x 64 float and 299 x 299 uint8 inputs; elementwise relative error is larger only on near-zero features),
the CLI's FID from PNG directories differs from pytorch-fid's `calculate_fid_given_paths` by 1.1e-6 relative,
and the bilinear resize matches F.interpolate to 1.2e-7 (absolute, images in [0, 1]). About 35 s on 2 cores.
"""
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_jax import evaluate
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.inception import convert_inception_state_dict, load_inception_variables
from ldm_jax.metrics import fid
from ldm_jax.models.inception import resize_bilinear
from tests import reference_inception

RTOL = 1e-5  # of the largest feature: ~94 float32 convs, features up to ~1e2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(pytorch-fid InceptionV3 in eval mode, its fid_inception_v3 state dict, that dict saved as a .pth).

    torch runs on one thread here: beside another busy process, its two-thread convs were 15x slower (measured
    0.33 s vs 5.0 s for this network on 3 images)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    calibration = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32))
    model, state_dict = reference_inception.fid_reference(seed=0, calibration=calibration)
    path = tmp_path_factory.mktemp("inception") / fid.INCEPTION_WEIGHTS
    torch.save(state_dict, path)
    yield model, state_dict, path
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def feature_fn(reference):
    return fid.inception_feature_fn(reference[2])


def _reference_features(model, images):
    """pytorch-fid features of NHWC images: uint8 go through to_tensor's / 255, floats are taken as [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    x = x.float().div(255) if images.dtype == np.uint8 else x
    with torch.no_grad():
        (out,) = model(x)
    return out.reshape(len(images), -1).double().numpy()


def _assert_features_close(got, want):
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


@pytest.mark.parametrize("shape", [(2, 37, 53, 3), (1, 320, 410, 3), (1, 150, 500, 3), (1, 299, 299, 3)])
def test_resize_matches_torch_interpolate(shape):
    x = np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(resize_bilinear(x)), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape, dtype", [((3, 64, 64, 3), np.float32), ((1, 299, 299, 3), np.uint8)])
def test_features_match_pytorch_fid(reference, feature_fn, shape, dtype):
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 1, shape).astype(np.float32) if dtype == np.float32 else \
        rng.integers(0, 256, shape, dtype=np.uint8)
    want = _reference_features(reference[0], images)
    assert want.std() > 1.0 and np.mean(want == 0) < 0.5  # features are neither collapsed nor mostly dead
    _assert_features_close(feature_fn(images), want)


def _write_pngs(directory, images):
    directory.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(directory / f"{index:03d}.png")
    return directory


def test_cli_images_matches_pytorch_fid_paths(reference, tmp_path, capsys):
    """`evaluate fid --images A B --inception W` vs pytorch-fid's `calculate_fid_given_paths` on the same PNGs and
    weights: pytorch-fid's own PNG loading, features and `calculate_frechet_distance` on those reference features.

    Each FID takes the sqrtm of a singular 2048 x 2048 matrix (4 samples per set): about a minute on 2 busy
    cores. To keep this test short, 15 of every 16 pool3 channels are silenced (Mixed_7c's output BatchNorm
    bias set to -1e4, so their ReLUs give exactly 0 on both sides); LAPACK's balancing then isolates those
    dimensions and sqrtm takes ~10 s. The 128 live features still come through the whole network."""
    state_dict = {key: value.clone() for key, value in reference[1].items()}
    for name in ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"):
        bias = state_dict[f"Mixed_7c.{name}.bn.bias"]
        bias[torch.arange(bias.numel()) % 16 != 0] = -1e4
    weights = tmp_path / fid.INCEPTION_WEIGHTS
    torch.save(state_dict, weights)
    _, fid_score = reference_inception.import_pytorch_fid()
    rng = np.random.default_rng(4)
    # A: three 40x40 and one 48-wide x 36-high image (a new batch of another size); B: four 40x40
    images_a = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    images_a.append(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8))
    images_b = [(rng.uniform(0, 1, (40, 40, 3)) ** 2 * 255).astype(np.uint8) for _ in range(4)]
    dir_a, dir_b = _write_pngs(tmp_path / "a", images_a), _write_pngs(tmp_path / "b", images_b)
    with reference_inception.no_download(state_dict):
        # batches of 3 as ours; pytorch-fid batches consecutive files, so A's odd-sized last image is alone
        want = fid_score.calculate_fid_given_paths([str(dir_a), str(dir_b)], batch_size=3, device="cpu",
                                                   dims=2048, num_workers=0)
    capsys.readouterr()
    argv = ["fid", "--images", str(dir_a), str(dir_b), "--inception", str(weights), "--batch-size", "3"]
    assert evaluate.main(argv) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fid ")]
    got = float(row.split()[1])
    assert got == pytest.approx(want, rel=RTOL) and want > 1.0


def test_cli_errors(tmp_path, capsys):
    tiny = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)]
    dir_a, dir_b = _write_pngs(tmp_path / "a", tiny), _write_pngs(tmp_path / "b", tiny)
    missing = tmp_path / fid.INCEPTION_WEIGHTS
    assert evaluate.main(["fid", "--images", str(dir_a), str(dir_b), "--inception", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(missing) in err and fid.INCEPTION_URL in err
    with pytest.raises(SystemExit):  # argparse: --images needs --inception
        evaluate.main(["fid", "--images", str(dir_a), str(dir_b)])
    with pytest.raises(SystemExit):  # argparse: --stats and --images exclude each other
        evaluate.main(["fid", "--stats", "a.npz", "b.npz", "--images", str(dir_a), str(dir_b)])
    assert "--inception" in capsys.readouterr().err


def test_converter_layouts_and_strictness(reference, tmp_path):
    _, state_dict, path = reference
    variables = load_inception_variables(path)
    assert set(variables) == {"params", "batch_stats"}
    assert variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"].shape == (1, 1, 2048, 192)
    np.testing.assert_array_equal(variables["batch_stats"]["Mixed_6b"]["branch7x7_2"]["bn"]["var"],
                                  state_dict["Mixed_6b.branch7x7_2.bn.running_var"].numpy())
    # the legacy (pre-1.6) torch.save format, and a file without num_batches_tracked, give the same variables
    legacy = tmp_path / "legacy.pth"
    torch.save({k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}, legacy,
               _use_new_zipfile_serialization=False)
    jax.tree.map(np.testing.assert_array_equal, load_inception_variables(legacy), variables)

    broken = dict(state_dict)
    del broken["Mixed_5b.branch1x1.conv.weight"]
    broken["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    broken["Conv2d_1a_3x3.bn.running_var"] = torch.ones(31)
    with pytest.raises(ConversionError) as error:
        convert_inception_state_dict(broken)
    message = str(error.value)
    assert "params/Mixed_5b/branch1x1/conv/kernel" in message and "AuxLogits.fc.weight" in message
    assert "Conv2d_1a_3x3.bn.running_var: checkpoint (31,)" in message
    with pytest.raises(ConversionError, match="1008-way"):
        convert_inception_state_dict({**state_dict, "fc.weight": torch.zeros(1000, 2048)})
