"""`python -m ldm_jax.evaluate` on PNG directories the tests write, and the captioned-shapes tokenizer.

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm_jax import evaluate
from ldm_jax.data import shapes, train_tokenizer
from ldm_jax.metrics import fid, image_quality
from ldm_jax.models.tokenizer import load_tokenizer, tokenize


def _save_png(path: pathlib.Path, image: np.ndarray, prompt: str | None = None) -> None:
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text(evaluate.CAPTION_KEY, prompt)
    Image.fromarray(image).save(path, pnginfo=info)


def _scenes(n: int) -> list[shapes.Scene]:
    rng = np.random.default_rng(3)
    return [shapes.sample_scene(rng) for _ in range(n)]


@pytest.fixture
def captioned_dir(tmp_path):
    """Four 32-px images: two with PNG prompts, one with a sidecar .txt, one whose caption is wrong."""
    scenes = _scenes(4)
    directory = tmp_path / "samples"
    directory.mkdir()
    for i, scene in enumerate(scenes[:2]):
        _save_png(directory / f"{i}.png", shapes.render(scene, 32), shapes.caption(scene))
    _save_png(directory / "2.png", shapes.render(scenes[2], 32))
    (directory / "2.txt").write_text(shapes.caption(scenes[2]) + "\n")
    _save_png(directory / "3.png", shapes.render(scenes[3], 32), shapes.caption(scenes[0]))  # wrong caption
    return directory, scenes


def test_adherence_command(captioned_dir, capsys):
    directory, scenes = captioned_dir
    summary, rows = evaluate.adherence(directory)
    assert summary["accuracy"] == 0.75 and summary["num_images"] == 4
    assert [r[1] == "ok" for r in rows] == [True, True, True, False]
    assert rows[2][2] == shapes.caption(scenes[2])  # the sidecar caption, stripped
    assert evaluate.main(["adherence", "--images", str(directory), "--per-image"]) == 0
    out = capsys.readouterr().out
    assert "accuracy         0.7500" in out and "3.png" in out and "wrong" in out


def test_adherence_caption_errors(tmp_path):
    image = shapes.render(_scenes(1)[0], 32)
    _save_png(tmp_path / "a.png", image)
    with pytest.raises(ValueError, match=r"a\.png: no caption; expected a PNG text chunk 'prompt' or a sidecar a\.txt"):
        evaluate.adherence(tmp_path)
    _save_png(tmp_path / "a.png", image, "a small red circle at the top left")
    (tmp_path / "a.txt").write_text("a large red circle at the top left")
    with pytest.raises(ValueError, match="differs from a.txt"):
        evaluate.adherence(tmp_path)
    (tmp_path / "a.txt").unlink()
    _save_png(tmp_path / "a.png", image, "a cat")
    with pytest.raises(ValueError, match=r"a\.png: cannot parse caption fragment 'a cat'"):
        evaluate.adherence(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.adherence(tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.png files"):
        evaluate.adherence(tmp_path / "empty")


def test_reconstruction_command(tmp_path, capsys):
    rng = np.random.default_rng(0)
    originals, recons = tmp_path / "x", tmp_path / "y"
    originals.mkdir(), recons.mkdir()
    xs = rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    ys = np.clip(xs.astype(int) + rng.integers(-30, 31, xs.shape), 0, 255).astype(np.uint8)
    ys[2] = xs[2]  # one perfect reconstruction
    for i in range(3):
        _save_png(originals / f"{i}.png", xs[i])
        _save_png(recons / f"{i}.png", ys[i])
    out = evaluate.reconstruction(originals, recons)
    assert out["identical"] == 1 and out["num_images"] == 3
    assert out["psnr"] == pytest.approx(np.mean(image_quality.psnr(xs[:2], ys[:2])), rel=1e-12)
    assert out["ssim"] == pytest.approx(np.mean(image_quality.ssim(xs, ys)), rel=1e-12)
    assert evaluate.main(["reconstruction", "--images", str(originals), "--reconstructions", str(recons)]) == 0
    assert "ssim" in capsys.readouterr().out
    assert evaluate.main(["reconstruction", "--images", str(originals), "--reconstructions", str(recons),
                          "--lpips-vgg", str(tmp_path / "vgg16.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vgg16-397923af.pth" in err[0], err
    (recons / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks reconstructions of \['2\.png'\]"):
        evaluate.reconstruction(originals, recons)


def test_fid_command(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 3)), rng.normal(0.5, 1.0, size=(40, 3))
    np.savez(tmp_path / "a.npz", mu=a.mean(0), sigma=np.cov(a.T))
    np.save(tmp_path / "b.npy", b)
    assert evaluate.fid_from_files(tmp_path / "a.npz", tmp_path / "b.npy") == pytest.approx(
        fid.fid_from_features(a, b), rel=1e-12)
    assert evaluate.main(["fid", "--stats", str(tmp_path / "a.npz"), str(tmp_path / "b.npy")]) == 0
    assert "fid" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- the shapes tokenizer


@pytest.fixture(scope="module")
def shapes_tokenizer(tmp_path_factory):
    directory = train_tokenizer.train_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return directory, load_tokenizer(directory, "tokenizer_json")


def test_tokenizer_layout_and_files(shapes_tokenizer):
    directory, tok = shapes_tokenizer
    assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == (
        "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>")
    assert (tok.pad_token_id, tok.unk_token_id) == (0, 1)
    assert (tok.bos_token_id, tok.eos_token_id) == (len(tok) - 2, len(tok) - 1)  # CLIP layout: EOT largest
    words = train_tokenizer.caption_words()
    assert len(words) == 22 and len(tok) == 22 + 4
    assert set(tok.get_vocab()) == set(words) | {"<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"}
    # training is deterministic: a second run writes the same file
    again = train_tokenizer.build_tokenizer().to_str()
    assert json.loads(again) == json.loads((directory / "tokenizer.json").read_text())


def test_tokenizer_round_trip_and_lengths(shapes_tokenizer):
    _, tok = shapes_tokenizer
    rng = np.random.default_rng(0)
    captions = train_tokenizer.training_captions() + [
        shapes.caption(shapes.sample_scene(rng, heldout=bool(i % 2))) for i in range(200)]
    longest = " and ".join(f"a small magenta triangle {p}" for p in ("at the bottom right", "at the top right",
                                                                     "at the bottom left"))
    captions.append(longest)
    ids = tokenize(tok, captions, pad_token_id=tok.pad_token_id, max_length=train_tokenizer.MAX_LENGTH)
    assert tok.unk_token_id not in ids
    lengths = (ids != tok.pad_token_id).sum(axis=1)
    assert lengths.max() == 28 == len(longest.split()) + 2  # one id per word, well under 77
    for caption, row, n in zip(captions, ids, lengths):
        assert row[0] == tok.bos_token_id and row[n - 1] == tok.eos_token_id
        assert tok.decode(row[:n], skip_special_tokens=True) == caption
        assert shapes.parse_caption(tok.decode(row, skip_special_tokens=True)) == shapes.parse_caption(caption)


def test_tokenizer_normalises_like_clip(shapes_tokenizer, tmp_path, capsys):
    _, tok = shapes_tokenizer
    plain = tok("a small red circle at the top left")["input_ids"]
    assert tok("  A Small  RED circle\tat the TOP left ")["input_ids"] == plain
    ids = tok("a purple circle!")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a", "<|unk|>", "circle", "<|unk|>",
                                              "<|endoftext|>"]
    train_tokenizer.main(["--out", str(tmp_path / "cli")])  # the command line writes the same tokenizer
    assert "26 tokens" in capsys.readouterr().out
    cli = load_tokenizer(tmp_path / "cli", "tokenizer_json")
    assert cli("a small red circle at the top left")["input_ids"] == plain
