"""Textual inversion (issue 16) against diffusers 0.42 (PyTorch, CPU, float32) on tiny random models converted through
the store: files saved here load in diffusers' `load_textual_inversion` and give our text embeddings; diffusers,
A1111 (.pt string_to_param, .safetensors emb_params) and SDXL (clip_l / clip_g) files load here and give diffusers'
embeddings; the embedded shapes model's word tokenizer takes a new word; every bad input is a one-line error.

Tolerance: text embeddings within 1e-5 relative to their largest magnitude (float32 on both sides; the towers agree to
~1e-6 without new tokens, tests/test_text.py). Run: .venv/bin/python -m pytest -q tests/test_textual_inversion.py
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdxl_fixtures as parts
from ldm_jax import ldm, pipeline, store
from ldm_jax.adapters import textual_inversion as ti
from ldm_jax.convert import embedding_files
from ldm_jax.convert.checkpoint_io import UnsafeCheckpointError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

RTOL = 1e-5
TOKEN = "<cat-toy>"
PROMPTS = [f"a {TOKEN} on the mat", "the cat sat"]  # the second has no new token: unchanged by adding it


def _rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _vectors(n, width, seed=0):
    return (0.5 * np.random.default_rng(seed).standard_normal((n, width))).astype(np.float32)


def _ours(model, prompts):
    """(context, pooled or None) of our model for prompts, through pipeline.encode_prompts (the sampling path)."""
    cond, _ = pipeline.encode_prompts(model, prompts, warn=False)
    if model.config.text_time:
        cond = dict(cond, time_ids=np.zeros((len(prompts), model.config.num_time_ids), np.float32))
    out = ldm.encode_conditioning(model.config, model.params, cond)
    return np.asarray(out["context"]), (np.asarray(out["y"]) if "y" in out else None)


# ------------------------------------------------------------------------------------------------ SD 1.x


@pytest.fixture(scope="module")
def sd_model(sd):
    """(diffusers pipeline, our model of its folder); the pipeline is never changed (see _fresh_sd)."""
    pipe, folder = sd
    return pipe, store.load_model(folder)


def _fresh_sd(pipe):
    """A pipeline sharing `pipe`'s UNet and VAE with copies of its tokenizer and text encoder (which
    load_textual_inversion changes)."""
    return diffusers.StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=copy.deepcopy(pipe.text_encoder), tokenizer=copy.deepcopy(pipe.tokenizer),
        unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _theirs_sd(pipe, prompts):
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    return embeds.numpy()


def test_saved_file_loads_in_diffusers(sd_model, tmp_path):
    pipe, model = sd_model
    vectors = _vectors(2, 32)
    ours = ti.add_tokens(model, {TOKEN: vectors})
    assert ti.expand_prompt(ours, PROMPTS[0]) == f"a {TOKEN} {TOKEN}_1 on the mat"
    path = tmp_path / "learned_embeds.safetensors"
    embedding_files.save_embedding_file(path, TOKEN, ti.token_vectors(ours, TOKEN))
    np.testing.assert_array_equal(embedding_files.load_embedding_file(path)[TOKEN], vectors)
    for token in (TOKEN, None):  # the token passed, and read from the file's key
        theirs = _fresh_sd(pipe)
        theirs.load_textual_inversion(str(path), token=token)
        assert theirs.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"]) == list(ti.token_ids(ours, [TOKEN])[
            "cond_stage"])
        assert _rel_err(_ours(ours, PROMPTS)[0], _theirs_sd(theirs, PROMPTS)) < RTOL
    np.testing.assert_array_equal(_ours(model, PROMPTS)[0][1], _ours(ours, PROMPTS)[0][1])  # no new token: unchanged


def _write(kind, path, vectors, torch_vectors):
    """Writes an embedding file of `kind`; returns (path, token diffusers needs or None, name we read)."""
    t = torch.from_numpy(vectors)
    if kind == "diffusers_safetensors":
        safetensors_torch.save_file({TOKEN: t}, path / "learned_embeds.safetensors")
        return path / "learned_embeds.safetensors", None, TOKEN
    if kind == "diffusers_bin":
        torch.save({TOKEN: t[0]}, path / "learned_embeds.bin")  # one [width] vector, as older files hold
        return path / "learned_embeds.bin", None, TOKEN
    if kind == "a1111_pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch_vectors}, "name": "charturner",
                    "step": 1500, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "tiny"}, path / "ct.pt")
        return path / "ct.pt", None, "charturner"
    safetensors_torch.save_file({"emb_params": t}, path / "style.safetensors")  # kohya / A1111 safetensors
    return path / "style.safetensors", "style", "style"


@pytest.mark.parametrize("kind", ["diffusers_safetensors", "diffusers_bin", "a1111_pt", "a1111_emb_params"])
def test_files_load_as_in_diffusers(sd_model, tmp_path, kind):
    pipe, model = sd_model
    vectors = _vectors(3, 32, seed=1)
    path, token, name = _write(kind, tmp_path, vectors, torch.nn.Parameter(torch.from_numpy(vectors)))
    ours = ti.add_embedding_files(model, [path])
    assert ti.token_ids(ours, [name])["cond_stage"].size == (1 if kind == "diffusers_bin" else 3)
    theirs = _fresh_sd(pipe)
    theirs.load_textual_inversion(str(path), token=token)
    prompts = [f"a photo of {name}, a dog", "a cat"]
    assert _rel_err(_ours(ours, prompts)[0], _theirs_sd(theirs, prompts)) < RTOL


# ------------------------------------------------------------------------------------------------ SDXL


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(base pipeline, our base, refiner pipeline, our refiner): tiny random SDXL saved by diffusers, loaded by the
    store (towers 32 and 48 wide)."""
    torch.manual_seed(0)
    base, refiner = parts.base_and_refiner(tmp_path_factory.mktemp("ti_sdxl_tok"), block_out_channels=(32, 32),
                                           attention_head_dim=2, transformer_layers_per_block=1)
    root = tmp_path_factory.mktemp("ti_sdxl")
    base.save_pretrained(root / "base", safe_serialization=True)
    refiner.save_pretrained(root / "refiner", safe_serialization=True)
    return base, store.load_model(root / "base"), refiner, store.load_model(root / "refiner")


def _fresh_sdxl(pipe, path, token, fix_pooling=True):
    """A copy of the SDXL pipeline's text side with the clip_l / clip_g file loaded per tower, as diffusers documents.
    fix_pooling: text_encoder_2 pools at the first end-of-text token (its config's legacy eos_token_id 2 makes
    transformers pool at argmax(ids), which is a new token's id whenever the prompt holds one)."""
    parts_ = dict(pipe.components)
    parts_.update(text_encoder_2=copy.deepcopy(pipe.text_encoder_2), tokenizer_2=copy.deepcopy(pipe.tokenizer_2))
    if pipe.text_encoder is not None:
        parts_.update(text_encoder=copy.deepcopy(pipe.text_encoder), tokenizer=copy.deepcopy(pipe.tokenizer))
    fresh = type(pipe)(**parts_)
    state = safetensors_torch.load_file(str(path))
    if fresh.text_encoder is not None:
        fresh.load_textual_inversion(state["clip_l"], token=token, text_encoder=fresh.text_encoder,
                                     tokenizer=fresh.tokenizer)
    fresh.load_textual_inversion(state["clip_g"], token=token, text_encoder=fresh.text_encoder_2,
                                 tokenizer=fresh.tokenizer_2)
    if fix_pooling:
        fresh.text_encoder_2.text_model.eos_token_id = fresh.tokenizer_2.eos_token_id
    return fresh


def _theirs_sdxl(pipe, prompts):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    return embeds.numpy(), pooled.numpy()


def test_sdxl_clip_l_clip_g_file(sdxl, tmp_path):
    base, ours_base, refiner, ours_refiner = sdxl
    path = tmp_path / "sdxl_concept.safetensors"  # written by the reference library, kohya's layout
    safetensors_torch.save_file({"clip_l": torch.from_numpy(_vectors(2, 32, 2)),
                                 "clip_g": torch.from_numpy(_vectors(2, 48, 3))}, str(path))
    ours = ti.add_embedding_files(ours_base, [(path, TOKEN)])
    theirs = _fresh_sdxl(base, path, TOKEN)
    (ctx, pooled), (ctx_ref, pooled_ref) = _ours(ours, PROMPTS), _theirs_sdxl(theirs, PROMPTS)
    assert ctx.shape[-1] == 32 + 48
    assert _rel_err(ctx[..., :32], ctx_ref[..., :32]) < RTOL and _rel_err(ctx[..., 32:], ctx_ref[..., 32:]) < RTOL
    assert _rel_err(pooled, pooled_ref) < RTOL
    # A prompt without the token: as our model before and the unmodified diffusers pipeline (legacy argmax pooling)
    np.testing.assert_array_equal(pooled[1], _ours(ours_base, PROMPTS)[1][1])
    assert _rel_err(pooled[1], _theirs_sdxl(base, PROMPTS)[1][1]) < RTOL
    # Our file of the same vectors: the same keys, loaded the same by diffusers
    saved = tmp_path / "ours.safetensors"
    embedding_files.save_embedding_file(saved, TOKEN, ti.token_vectors(ours, TOKEN))
    assert sorted(safetensors_torch.load_file(str(saved))) == ["clip_g", "clip_l"]
    assert list(embedding_files.load_embedding_file(saved)) == [TOKEN]  # the name travels in the header
    assert _rel_err(ctx, _theirs_sdxl(_fresh_sdxl(base, saved, TOKEN), PROMPTS)[0]) < RTOL
    # The refiner's one tower is bigG: it takes clip_g
    ours_r = ti.add_embedding_files(ours_refiner, [(path, TOKEN)])
    (ctx_r, pooled_r), (ctx_r_ref, pooled_r_ref) = _ours(ours_r, PROMPTS), _theirs_sdxl(
        _fresh_sdxl(refiner, path, TOKEN), PROMPTS)
    assert _rel_err(ctx_r, ctx_r_ref) < RTOL and _rel_err(pooled_r, pooled_r_ref) < RTOL


def test_sdxl_tower_mismatch(sdxl, sd_model, tmp_path):
    _, ours_base, _, _ = sdxl
    with pytest.raises(ti.EmbeddingError, match=r"one set of vectors, but the model has two text towers"):
        ti.add_tokens(ours_base, {TOKEN: _vectors(1, 32)})
    with pytest.raises(ti.EmbeddingError, match=r"two-tower \(SDXL clip_l \+ clip_g\) embedding, but the model"):
        ti.add_tokens(sd_model[1], {TOKEN: {"cond_stage": _vectors(1, 32), "cond_stage_2": _vectors(1, 48)}})
    with pytest.raises(ti.EmbeddingError, match=r"different vector counts per tower"):
        ti.add_tokens(ours_base, {TOKEN: {"cond_stage": _vectors(1, 32), "cond_stage_2": _vectors(2, 48)}})
    path = tmp_path / "half.safetensors"
    safetensors_torch.save_file({"clip_g": torch.zeros(1, 48)}, str(path))
    with pytest.raises(embedding_files.EmbeddingFileError, match=r"needs clip_l and clip_g; \['clip_l'\] is missing"):
        embedding_files.load_embedding_file(path)


# ------------------------------------------------------------------------------------------------ shapes model


@pytest.fixture(scope="module")
def shapes():
    return store.load_model()


def test_shapes_model_new_word(shapes, tmp_path):
    vectors = _vectors(1, 64, 4)
    ours = ti.add_tokens(shapes, {"blorp": vectors})
    (new_id,) = ti.token_ids(ours, ["blorp"])["cond_stage"]
    assert new_id == 26 and ours.config.cond_stage.vocab_size == 27 and len(ours.tokenizer) == 27
    cond, _ = pipeline.encode_prompts(ours, ["a large blorp circle at the top left"], warn=False)
    assert new_id in cond[0]
    # The new row is read as a word's row: the same prompt with "red" whose row holds the vectors encodes the same
    red = shapes.tokenizer.convert_tokens_to_ids("red")
    swapped = ti.set_rows(shapes.params, "cond_stage", np.array([red]), vectors)
    ref_ids, _ = pipeline.encode_prompts(shapes, ["a large red circle at the top left"], warn=False)
    np.testing.assert_array_equal(np.where(cond == new_id, red, cond), ref_ids)
    np.testing.assert_allclose(ldm.encode_conditioning(ours.config, ours.params, cond)["context"],
                               ldm.encode_conditioning(shapes.config, swapped, ref_ids)["context"], rtol=0, atol=1e-6)
    # The caller's model is untouched
    assert len(shapes.tokenizer) == 26 and shapes.config.cond_stage.vocab_size == 26
    assert shapes.params["cond_stage"]["embeddings"]["token_embedding"]["embedding"].shape == (26, 64)
    # Two vectors: "zorp" is read as "zorp zorp_1"
    two = ti.add_tokens(ours, {"zorp": _vectors(2, 64, 5)})
    ids = ti.token_ids(two, ["blorp", "zorp"])["cond_stage"]
    cond, _ = pipeline.encode_prompts(two, ["a zorp blorp"], warn=False)
    np.testing.assert_array_equal(ids, [26, 27, 28])
    np.testing.assert_array_equal(cond[0, :6], [24, 2, 27, 28, 26, 25])
    assert pipeline.inspect_prompts(two, ["a zorp blorp"])[0].n_tokens == 6
    # Saved and loaded through the store (a model with the tokens built in), the tokens and rows come back
    loaded = store.load_model(store.save_model(two, tmp_path / "model"))
    np.testing.assert_array_equal(pipeline.encode_prompts(loaded, ["a zorp blorp"], warn=False)[0], cond)
    np.testing.assert_array_equal(ti.token_vectors(loaded, "zorp"), ti.token_vectors(two, "zorp"))
    assert loaded.config.cond_stage == two.config.cond_stage


def test_init_vectors_and_training_helpers(shapes):
    init = ti.init_vectors(shapes, "circle", 2)
    table = shapes.params["cond_stage"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(init, np.stack([table[shapes.tokenizer.convert_tokens_to_ids("circle")]] * 2))
    model = ti.add_tokens(shapes, {"blorp": init})
    ids = ti.token_ids(model, ["blorp"])["cond_stage"]
    cond, _ = pipeline.encode_prompts(model, ["a blorp"], warn=False)

    def loss(vectors):
        params = ti.set_rows(model.params, "cond_stage", ids, vectors)
        return jnp.sum(ldm.encode_conditioning(model.config, params, cond)["context"] ** 2)

    trained = init + 0.1
    grad = jax.jit(jax.grad(loss))(trained)
    assert grad.shape == (2, 64) and np.all(np.isfinite(grad)) and np.abs(grad).min() > 0
    # The overwritten rows of the frozen table get no gradient; the vectors get the rows' cotangent
    table_grad, vectors_grad = jax.grad(lambda t, v: jnp.sum(ti.set_rows(
        {"cond_stage": {"embeddings": {"token_embedding": {"embedding": t}}}}, "cond_stage", ids, v)[
        "cond_stage"]["embeddings"]["token_embedding"]["embedding"] * 3.0), argnums=(0, 1))(
        model.params["cond_stage"]["embeddings"]["token_embedding"]["embedding"], trained)
    np.testing.assert_array_equal(table_grad[ids], 0)
    np.testing.assert_array_equal(np.delete(table_grad, ids, axis=0), 3.0)
    np.testing.assert_array_equal(vectors_grad, 3.0)
    written = jax.jit(ti.set_rows, static_argnums=1)(model.params, "cond_stage", ids, trained)
    np.testing.assert_allclose(ti.token_vectors(model, "blorp", written), trained, rtol=0, atol=0)
    with pytest.raises(ti.EmbeddingError, match=r"vectors \(3, 64\) must be \[2, 64\]"):
        ti.set_rows(model.params, "cond_stage", ids, np.zeros((3, 64)))


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_embeddings(shapes, tmp_path):
    narrow = tmp_path / "narrow.safetensors"
    embedding_files.save_embedding_file(narrow, "thin", _vectors(1, 32))
    with pytest.raises(ti.EmbeddingError) as err:
        ti.add_embedding_files(shapes, [narrow])
    assert str(err.value) == (f"{narrow}: embedding 'thin' is 32 wide, but the text tower cond_stage is 64 wide "
                              f"(an embedding for another model?)")
    with pytest.raises(ti.EmbeddingError, match=r"token 'red' \(embedding 'red'\) already exists in the tokenizer of "
                                                r"cond_stage \(id 16\)"):
        ti.add_tokens(shapes, {"good": _vectors(1, 64), "red": _vectors(1, 64)})
    assert "good" not in shapes.tokenizer.get_vocab()  # nothing half-applied
    model = ti.add_tokens(shapes, {"blorp": _vectors(2, 64)})
    for embeddings, message in (
            ({"blorp": _vectors(1, 64)}, r"token 'blorp' \(embedding 'blorp'\) already exists"),
            ({"blorp_2": _vectors(1, 64)}, r"token 'blorp_2' cannot be added while the token 'blorp_1' exists"),
            ({"zorp": _vectors(1, 64), "zorp_1": _vectors(1, 64)}, r"cannot be added while the token 'zorp_1' exists"),
            ({"x": np.zeros((2, 2, 64), np.float32)}, r"shape \(2, 2, 64\)"),
            ({"x": np.full((1, 64), np.nan, np.float32)}, r"non-finite"),
            ({" x": _vectors(1, 64)}, r"without surrounding spaces")):
        with pytest.raises(ti.EmbeddingError, match=message):
            ti.add_tokens(model, embeddings)
    for word, message in (("red circle", r"is 2 tokens \[16, 8\]"), ("crimson", "is its unknown token")):
        with pytest.raises(ti.EmbeddingError, match=message):
            ti.init_vectors(shapes, word, 1)
    with pytest.raises(ti.EmbeddingError, match=r"token 'zorp' was not added"):
        ti.token_ids(model, ["zorp"])


def test_bad_files(shapes, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    embedding_files.save_embedding_file(a, "same", _vectors(1, 64))
    embedding_files.save_embedding_file(b, "same", _vectors(1, 64))
    with pytest.raises(ti.EmbeddingError, match=r"b.safetensors: token 'same' is also in .*a.safetensors"):
        ti.add_embedding_files(shapes, [a, b])
    assert "other" in ti.add_embedding_files(shapes, [a, (b, "other")]).tokenizer.get_vocab()
    two = tmp_path / "two.safetensors"
    safetensors_torch.save_file({"p": torch.zeros(1, 64), "q": torch.zeros(1, 64)}, str(two))
    assert sorted(embedding_files.load_embedding_file(two)) == ["p", "q"]
    with pytest.raises(embedding_files.EmbeddingFileError, match=r"holds 2 tokens \['p', 'q'\]"):
        embedding_files.load_embedding_file(two, token="x")
    nested = tmp_path / "nested.pt"
    torch.save({"foo": {"bar": torch.zeros(2)}}, nested)
    with pytest.raises(embedding_files.EmbeddingFileError, match=r"not an embedding file .* found 'foo' \(dict\)"):
        embedding_files.load_embedding_file(nested)
    code = tmp_path / "param_dict.pt"  # older textual_inversion files pickle a torch ParameterDict: refused, not run
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 64))})}, code)
    with pytest.raises(UnsafeCheckpointError, match="ParameterDict"):
        embedding_files.load_embedding_file(code)
    with pytest.raises(embedding_files.EmbeddingFileError, match="unknown embedding file extension '.txt'"):
        embedding_files.load_embedding_file(tmp_path / "x.txt")
    with pytest.raises(embedding_files.EmbeddingFileError, match="written as .safetensors"):
        embedding_files.save_embedding_file(tmp_path / "x.pt", "x", _vectors(1, 64))
