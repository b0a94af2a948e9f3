"""CLIP score on images: our ClipModel (vision + text towers, projections) against transformers' CLIPModel.

A tiny random-weight transformers CLIPModel (text: hidden 24, gelu; vision: hidden 32, quick_gelu, 32 px,
patch 8; projection_dim 16) is saved with `save_pretrained` beside a tiny CLIP tokenizer and a
CLIPImageProcessor config, then loaded through `load_clip_model`, so the test covers the on-disk key names.

Run: .venv/bin/python -m pytest -q tests/test_clip_score.py
"""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, PngImagePlugin

from ldm_jax import evaluate
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.transformers_clip import (clip_preprocess_config, convert_clip_model_state_dict,
                                               load_clip_model)
from ldm_jax.metrics import clip_score
from ldm_jax.models.clip_vision import preprocess_images
from tokenizer_fixtures import write_clip_tokenizer

# float32 and matmul precision "highest" (conftest) on both sides; what differs is summation order and the
# erf/exp implementations. Measured max error relative to the largest reference value (|ours - ref|.max() /
# |ref|.max()): image embeds 1.2e-6, text embeds 4.6e-7; scores 1.8e-6 relative (1.5e-5 absolute on the 0..100
# scale, part of it the reference's float32 cosine). Preprocessing: identical to the processor's (0.0).
RTOL = 1e-5
PROMPTS = ["a red circle on the left", "a photo of a cat", "a blue square on the right", "the cat sat on the mat"]
SIZES = [(45, 70), (32, 32), (64, 40), (31, 33)]  # (H, W): landscape, exact, portrait, upsampled


def _hf_model(vocab: dict[str, int]) -> transformers.CLIPModel:
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu", bos_token_id=bos,
                eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act="quick_gelu")
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # transformers initialises norms to (1, 0) and the class token small: randomise them
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name or "class_embedding" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _center_image_embeds(model: transformers.CLIPModel, pixels: torch.Tensor) -> None:
    """Projects the mean pooled vision output out of visual_projection. A random CLIP gives every image nearly
    one embedding, so every pair would get the same cosine sign; centred, the scores mix 0 (clipped) and > 0."""
    with torch.no_grad():
        mean = model.vision_model(pixel_values=pixels).pooler_output.mean(0)
        mean = mean / mean.norm()
        model.visual_projection.weight.sub_(torch.outer(model.visual_projection.weight @ mean, mean))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """(folder, transformers model, processor, tokenizer): a CLIPModel folder as a user would have it."""
    folder = write_clip_tokenizer(tmp_path_factory.mktemp("clip") / "clip")
    vocab = json.loads((folder / "vocab.json").read_text())
    model = _hf_model(vocab)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    _center_image_embeds(model, processor(images=_images(0) + _images(1), return_tensors="pt")["pixel_values"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return folder, model, processor, tokenizer


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _features(out) -> np.ndarray:
    """transformers 5 returns a ModelOutput whose pooler_output holds the projected features; 4.x a tensor."""
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


def _max_rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_preprocessing_matches_clip_image_processor(clip_dir):
    """PIL bicubic on uint8, crop, rescale, normalise: identical to CLIPImageProcessor (PIL backend), 0.0."""
    _, _, processor, _ = clip_dir
    images = _images()
    ref = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = preprocess_images(images, clip_preprocess_config(processor.to_dict(), 32))
    assert ours.shape == (4, 32, 32, 3) and ours.dtype == np.float32
    assert float(np.max(np.abs(ours - ref))) == 0.0


def test_embeddings_and_scores_match_transformers(clip_dir):
    folder, hf, processor, tokenizer = clip_dir
    model = load_clip_model(folder)
    assert model.config.vision.image_size == 32 and model.config.text.pooling == "first_eos"
    images = _images(seed=1)  # cosines -0.39, -0.18, 0.03, 0.13: two scores clipped to 0, two above
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref_image = _features(hf.get_image_features(pixel_values=pixels))
        ref_text = _features(hf.get_text_features(**tokens))

    image_embeds = clip_score.clip_image_embeds(model, images, batch_size=3)  # 3 + 1 padded: the batching path
    text_embeds = clip_score.clip_text_embeds(model, PROMPTS)
    assert _max_rel(image_embeds, ref_image) < RTOL, _max_rel(image_embeds, ref_image)
    assert _max_rel(text_embeds, ref_text) < RTOL, _max_rel(text_embeds, ref_text)

    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(ref_image), torch.from_numpy(ref_text)).numpy()
    ref_scores = 100.0 * np.maximum(cosine, 0.0)  # torchmetrics' CLIPScore per pair
    scores = clip_score.clip_score(images, PROMPTS, folder)
    assert scores.shape == (4,) and scores.dtype == np.float64
    assert (ref_scores == 0).sum() == 2 and (ref_scores > 1).sum() == 2
    np.testing.assert_allclose(scores, ref_scores, rtol=RTOL, atol=1e-5)
    # The same scores from a (B, H, W, 3) array of one size and from a LoadedClip.
    same_size = np.stack([np.asarray(Image.fromarray(im).resize((32, 32))) for im in images])
    with torch.no_grad():
        ref_same = _features(hf.get_image_features(
            pixel_values=processor(images=list(same_size), return_tensors="pt")["pixel_values"]))
    np.testing.assert_allclose(clip_score.clip_image_embeds(model, same_size), ref_same, rtol=RTOL,
                               atol=RTOL * np.abs(ref_same).max())


def test_missing_files_and_strict_conversion(clip_dir, tmp_path):
    folder, hf, _, _ = clip_dir
    images = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist .*config\.json, model\.safetensors or "
                                                 r"pytorch_model\.bin, vocab\.json \+ merges\.txt or tokenizer\.json"):
        clip_score.clip_score(images, ["a cat"], tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{partial} lacks model\.safetensors or pytorch_model\.bin "):
        clip_score.clip_score(images, ["a cat"], partial)
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        clip_score.clip_score(images, ["a cat", "a dog"], folder)

    model = load_clip_model(folder)
    state = {k: v for k, v in hf.state_dict().items() if k != "vision_model.post_layernorm.bias"}
    state["vision_model.extra.weight"] = torch.zeros(3)
    state["visual_projection.weight"] = torch.zeros(16, 31)
    with pytest.raises(ConversionError) as err:
        convert_clip_model_state_dict(state, model.config)
    message = str(err.value)
    assert "missing (1): vision_model/post_layernorm/bias" in message
    assert "unexpected (1): vision_model.extra.weight" in message
    assert "visual_projection.weight: checkpoint (31, 16) vs model (32, 16)" in message
    with pytest.raises(ValueError, match="resample=2"):
        clip_preprocess_config({"resample": 2}, 32)


def test_clip_score_command(clip_dir, tmp_path, capsys):
    folder = clip_dir[0]
    images = _images(seed=0)  # cosines 0.10, 0.20, 0.02, 0.05
    directory = tmp_path / "samples"
    directory.mkdir()
    for i, (image, prompt) in enumerate(zip(images[:3], PROMPTS)):
        info = PngImagePlugin.PngInfo()
        info.add_text(evaluate.CAPTION_KEY, prompt)
        Image.fromarray(image).save(directory / f"{i}.png", pnginfo=info)
    Image.fromarray(images[3]).save(directory / "3.png")
    (directory / "3.txt").write_text(PROMPTS[3] + "\n")
    expected = clip_score.clip_score(images, PROMPTS, folder)

    assert evaluate.main(["clip-score", "--images", str(directory), "--clip", str(folder), "--per-image",
                          "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"clip_score  {expected.mean():.4f}" in out and "num_images  4" in out
    assert f"3.png  {expected[3]:.4f}" in out and PROMPTS[3] in out

    assert evaluate.main(["clip-score", "--images", str(directory), "--clip", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm-jax evaluate: error: CLIP model directory") and "\n" not in err
