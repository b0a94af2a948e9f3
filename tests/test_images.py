"""The one image-file decoder (`images.decode_image` / `open_image`) and the control-image contract between
training and sampling.

What is checked: the alpha policies ("white" composites transparency onto white, "drop" is PIL's convert("RGB"));
every undecodable file (not an image, truncated, a broken PNG chunk, a decompression bomb, missing) is one
ImageFileError, a one-line ValueError naming the file, from a path or from bytes; a dataset skips such a record;
an RGBA control image reaches the ControlNet with the same values in training (`data.readers` +
`data.pipeline.preprocess_with_control`) and in `ldm-jax sample` (`sampling.read_control_image`), resized or not;
`ldm-jax evaluate` reads PNGs through the decoder too. No JAX program runs.

Run: .venv/bin/python -m pytest -q tests/test_images.py
"""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm_jax import evaluate, sampling
from ldm_jax.data import pipeline as data_pipeline
from ldm_jax.data import readers
from ldm_jax.images import CONTROL_ALPHA, ImageFileError, decode_image, open_image, prepare_control_image


def _rgba(size: int = 8, seed: int = 0) -> np.ndarray:
    """An RGBA image: random colours, the left half fully transparent (its RGB stays random), a translucent
    column."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 4), np.uint8)
    image[..., 3] = 255
    image[:, : size // 2, 3] = 0
    image[:, size // 2, 3] = 128
    return image


def _png_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, **kwargs).save(buffer, "PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def broken_chunk_png() -> bytes:
    """A PNG whose image data continues in a chunk with an invalid type: PIL reads the header, then its load
    raises SyntaxError ("broken PNG file")."""
    data = _png_bytes(np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8))
    start = 8 + 12 + 13  # signature, IHDR
    (length,) = struct.unpack(">I", data[start:start + 4])
    assert data[start + 4:start + 8] == b"IDAT"
    payload = data[start + 8:start + 8 + length]
    return (data[:start] + _chunk(b"IDAT", payload[:100]) + _chunk(b"\x00\x01\x02\x03", payload[100:])
            + data[start + 12 + length:])


def truncated_png() -> bytes:
    data = _png_bytes(np.random.default_rng(2).integers(0, 256, (16, 16, 3), np.uint8))
    return data[: len(data) // 2]


def test_alpha_policies():
    rgba = _rgba()
    data = _png_bytes(rgba)
    white = decode_image(data, alpha="white")
    drop = decode_image(data, alpha="drop")
    assert white.dtype == drop.dtype == np.uint8 and white.shape == drop.shape == (8, 8, 3)
    np.testing.assert_array_equal(drop, rgba[..., :3])  # PIL's convert("RGB"): the stored colours
    np.testing.assert_array_equal(white[:, :4], 255)  # transparent: white
    np.testing.assert_array_equal(white[:, 5:], rgba[:, 5:, :3])  # opaque: as stored
    half = rgba[:, 4, :3].astype(np.float64) * 128 / 255 + 255 * 127 / 255
    assert np.abs(white[:, 4] - half).max() <= 1
    # grey with alpha, a palette with a transparent index, and grey output
    la = np.stack([np.full((4, 4), 40, np.uint8), np.zeros((4, 4), np.uint8)], axis=-1)
    np.testing.assert_array_equal(decode_image(_png_bytes(la, mode="LA"), alpha="white"), 255)
    np.testing.assert_array_equal(decode_image(_png_bytes(la, mode="LA"), alpha="drop"), 40)
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=palette.info["transparency"])
    assert (decode_image(buffer.getvalue(), alpha="white")[0, 0] == 255).all()
    grey = decode_image(data, alpha="drop", mode="L")
    np.testing.assert_array_equal(grey, np.asarray(Image.fromarray(rgba).convert("L")))
    with pytest.raises(ValueError, match="alpha 'black' is not one of"):
        decode_image(data, alpha="black")


@pytest.mark.parametrize("case", ["not_an_image", "truncated", "broken_chunk", "bomb", "missing"])
def test_undecodable_files_are_one_image_file_error(case, tmp_path, monkeypatch):
    data = {"not_an_image": b"not an image\n", "truncated": truncated_png(), "broken_chunk": broken_chunk_png(),
            "bomb": _png_bytes(np.zeros((16, 16, 3), np.uint8)), "missing": None}[case]
    if case == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels: over twice the limit, PIL's error
    path = tmp_path / f"{case}.png"
    if data is not None:
        path.write_bytes(data)
    reasons = {"not_an_image": "not an image PIL can read", "truncated": "truncated", "broken_chunk": "broken PNG",
               "bomb": "decompression bomb", "missing": "no such file"}
    with pytest.raises(ImageFileError) as excinfo:
        decode_image(path, alpha="white")
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError) and "\n" not in message
    assert message.startswith(f"{path}: cannot read the image (") and reasons[case] in message, message
    if data is not None:
        with pytest.raises(ImageFileError, match=rf"^shard.tar:x.png: cannot read the image \(.*{reasons[case]}"):
            decode_image(data, alpha="drop", name="shard.tar:x.png")
        with pytest.raises(ImageFileError):
            with open_image(data):
                pass


def test_a_dataset_skips_undecodable_records(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"caption {name}\n")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(broken_chunk_png())
    (tmp_path / "c.png").write_bytes(truncated_png())
    source = readers.ImageFolderSource(tmp_path)
    assert source[0]["image"].shape == (8, 8, 3)
    assert source[1] is None and source[2] is None
    first = dict(source.skipped.first())
    assert "broken PNG file" in first["b.png"] and "truncated" in first["c.png"], first


@pytest.mark.parametrize("size", [16, 32])
def test_rgba_control_images_match_between_training_and_sampling(tmp_path, size):
    """An RGBA control image (transparent left half over random colours) beside an RGBA image: training decodes the
    image onto white and the control image with CONTROL_ALPHA, as `ldm-jax sample --control-image` does; at the
    training resolution (size 16) and resized from 32 (both Lanczos) the net gets the same values."""
    resolution = 16
    (tmp_path / "0001.txt").write_text("a caption\n")
    Image.fromarray(_rgba(size, seed=4)).save(tmp_path / "0001.png")
    control = _rgba(size, seed=5)
    Image.fromarray(control).save(tmp_path / "0001.conditioning_image.png")
    example = readers.ImageFolderSource(tmp_path, control_key="conditioning_image")[0]
    assert CONTROL_ALPHA == "drop"
    np.testing.assert_array_equal(example["control"], control[..., :3])  # diffusers' convert("RGB")
    np.testing.assert_array_equal(example["image"][:, : size // 2], 255)  # the training image: onto white
    _, trained, _, _ = data_pipeline.preprocess_with_control(example["image"], example["control"], resolution)
    sampled = sampling.read_control_image(str(tmp_path / "0001.conditioning_image.png"), resolution, resolution,
                                          "default")
    assert trained.dtype == sampled.dtype == np.float32
    np.testing.assert_array_equal(trained, sampled)
    np.testing.assert_array_equal(sampled, prepare_control_image(control[..., :3], resolution, resolution))


def test_evaluate_reads_pngs_through_the_decoder(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(broken_chunk_png())
    with pytest.raises(ImageFileError, match="broken.png: cannot read the image"):
        evaluate.read_png(path)
    rgba = _rgba(seed=6)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    image, text = evaluate.read_png(tmp_path / "rgba.png")
    np.testing.assert_array_equal(image, rgba[..., :3])  # alpha dropped, as pytorch-fid's convert("RGB")
    assert text is None
