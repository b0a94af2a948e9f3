"""First-stage autoencoders: parity with diffusers AutoencoderKL / VQModel (PyTorch, float32, random weights
converted by our converter), VQ loss/perplexity against numpy, strict conversion errors, bad input.

The references are built and randomised in float32, converted from their float32 state dicts, then run in
float64: torch's own float32 decoder is ~1.2e-5 away from its float64 result at these sizes, ours ~4e-6, so a
float64 reference lets the float32 implementation be held to REL = 1e-5. Errors are measured relative to the
largest magnitude of the reference tensor, max|ours - ref| / max|ref|.
"""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DModel
from diffusers import VQModel as TorchVQModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm_jax.config import load_config_file
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.diffusers_autoencoder import (
    config_from_diffusers,
    convert_diffusers_autoencoder,
    load_diffusers_autoencoder,
    to_diffusers_config,
)
from ldm_jax.models.autoencoder import (
    AutoencoderConfig,
    DiagonalGaussian,
    VectorQuantizer,
    autoencoder_config,
    build_autoencoder,
    decoder_last_layer,
    decoder_last_layer_path,
    init_autoencoder,
)

REL = 1e-5
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
# Two levels (32 -> 16), attention at the 16x16 level, 2 resnets per level: every block type is exercised.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(16,), resolution=32)
KL_CONFIG = AutoencoderConfig(kind="kl", z_channels=4, embed_dim=4, **TINY)
VQ_CONFIG = AutoencoderConfig(kind="vq", z_channels=4, embed_dim=3, double_z=False, n_embed=64, **TINY)


def assert_rel_close(actual, expected, rel=REL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def nchw(x, dtype=torch.float64):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))).to(dtype)


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _randomize(model, seed):
    """Non-trivial GroupNorm scales/offsets and biases (the default init has ones/zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
    return model


def _images(seed, shape=(2, 32, 32, 3)):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


@pytest.fixture(scope="module")
def kl():
    torch.manual_seed(0)
    ref = _randomize(TorchAutoencoderKL(**to_diffusers_config(KL_CONFIG)), 1).eval()
    params = convert_diffusers_autoencoder(ref.state_dict(), KL_CONFIG)
    return ref.double(), build_autoencoder(KL_CONFIG), {"params": params}


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    ref = _randomize(TorchVQModel(**to_diffusers_config(VQ_CONFIG), lookup_from_codebook=True), 2).eval()
    with torch.no_grad():  # a codebook on the scale of the encoder output, so that quantisation is non-trivial
        h = ref.encode(nchw(_images(3), torch.float32)).latents
        mean, std = h.mean((0, 2, 3)), h.std((0, 2, 3))
        gen = torch.Generator().manual_seed(4)
        ref.quantize.embedding.weight.copy_(mean + std * torch.randn(VQ_CONFIG.n_embed, 3, generator=gen))
    params = convert_diffusers_autoencoder(ref.state_dict(), VQ_CONFIG)
    return ref.double(), build_autoencoder(VQ_CONFIG), {"params": params}


def test_kl_matches_diffusers(kl):
    ref, model, variables = kl
    x = _images(0)
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
    posterior = model.apply(variables, x, method="encode")
    assert_rel_close(posterior.mean, nhwc(dist.mean))
    assert_rel_close(posterior.logvar, nhwc(dist.logvar))
    assert_rel_close(posterior.std, nhwc(dist.std))

    # Sampling with the same noise: ours draws eps from the key; give torch the same eps.
    key = jax.random.key(5)
    z = posterior.sample(key)
    eps = np.asarray(jax.random.normal(key, posterior.mean.shape))
    assert_rel_close(z, nhwc(dist.mean + dist.std * nchw(eps)))

    with torch.no_grad():
        ref_kl, ref_nll = dist.kl(), dist.nll(nchw(z))
        other = DiagonalGaussianDistribution(ref.quant_conv(ref.encoder(nchw(_images(1)))))
        ref_kl_other = dist.kl(other)
        recon_ref = ref.decode(nchw(z)).sample
        forward_ref = ref(nchw(x), sample_posterior=False).sample
    assert_rel_close(posterior.kl(), ref_kl.numpy())
    assert_rel_close(posterior.nll(z), ref_nll.numpy())
    assert_rel_close(posterior.kl(model.apply(variables, _images(1), method="encode")), ref_kl_other.numpy())

    recon = model.apply(variables, z, method="decode")
    assert recon.shape == x.shape and recon.dtype == jnp.float32
    assert_rel_close(recon, nhwc(recon_ref))
    forward, _ = model.apply(variables, x, sample_posterior=False)
    assert_rel_close(forward, nhwc(forward_ref))
    sampled, _ = model.apply(variables, x, key=key)
    np.testing.assert_array_equal(sampled, recon)  # __call__ decodes posterior.sample(key)


def test_diagonal_gaussian_clips_logvar_like_reference():
    moments = np.random.default_rng(0).normal(0.0, 20.0, (2, 3, 3, 8)).astype(np.float32)
    ours = DiagonalGaussian.from_moments(jnp.asarray(moments))
    ref = DiagonalGaussianDistribution(nchw(moments, torch.float32))
    assert float(ours.logvar.max()) == 20.0 and float(ours.logvar.min()) == -30.0
    assert_rel_close(ours.logvar, nhwc(ref.logvar))
    assert_rel_close(ours.var, nhwc(ref.var))
    assert_rel_close(ours.kl(), ref.kl().numpy())
    np.testing.assert_array_equal(ours.mode(), nhwc(ref.mode()))


def test_vq_matches_diffusers(vq):
    ref, model, variables = vq
    x = _images(3)
    with torch.no_grad():
        h_ref = ref.encode(nchw(x)).latents
        zq_ref, loss_ref, (_, _, idx_ref) = ref.quantize(h_ref)
        dec_ref = ref.decode(h_ref, force_not_quantize=False)
        unquantized_ref = ref.decoder(ref.post_quant_conv(h_ref))
        forward_ref, commit_ref = ref(nchw(x), return_dict=False)
    h = model.apply(variables, x, method="encode")
    assert h.shape == (2, 16, 16, 3)
    assert_rel_close(h, nhwc(h_ref))

    z_q, loss, info = model.apply(variables, h, method=lambda m, h: m.quantize(h))
    indices = info["indices"]
    np.testing.assert_array_equal(indices, idx_ref.numpy().reshape(2, 16, 16))
    assert len(np.unique(indices)) > 8, "quantisation should use many codes for this test to mean something"
    assert_rel_close(z_q, nhwc(zq_ref))
    assert_rel_close(loss, loss_ref.numpy())

    assert_rel_close(model.apply(variables, h, method="decode"), nhwc(dec_ref.sample))
    assert_rel_close(model.apply(variables, h, force_not_quantize=True, method="decode"), nhwc(unquantized_ref))
    with torch.no_grad():  # diffusers' lookup_from_codebook path: force_not_quantize with indices
        lookup_ref = ref.decode(idx_ref, force_not_quantize=True, shape=(2, 16, 16, 3)).sample
    assert_rel_close(model.apply(variables, indices, method="decode_indices"), nhwc(lookup_ref))

    recon, vq_loss, info2 = model.apply(variables, x)
    assert_rel_close(recon, nhwc(forward_ref))
    assert_rel_close(vq_loss, commit_ref.numpy())
    np.testing.assert_array_equal(info2["indices"], indices)


def _numpy_vq(z, codebook, beta, legacy):
    flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
    dist = ((flat[:, None, :] - codebook[None].astype(np.float64)) ** 2).sum(-1)
    idx = dist.argmin(1)
    z_q = codebook[idx]
    mse = np.mean((z_q - flat) ** 2)
    n = flat.size
    # d loss / d z and d loss / d codebook: the commitment term pulls z, the codebook term pulls the codes.
    w_commit, w_code = (1.0, beta) if legacy else (beta, 1.0)
    grad_z = (w_commit * 2.0 * (flat - z_q) / n).reshape(z.shape)
    grad_codebook = np.zeros_like(codebook, np.float64)
    np.add.at(grad_codebook, idx, w_code * 2.0 * (z_q - flat) / n)
    probs = np.bincount(idx, minlength=len(codebook)) / len(idx)
    perplexity = np.exp(-np.sum(probs * np.log(probs + 1e-10)))
    return idx, z_q.reshape(z.shape), (1.0 + beta) * mse, grad_z, grad_codebook, perplexity, (probs > 0).sum()


@pytest.mark.parametrize("legacy", [True, False])
def test_vector_quantizer_loss_forms_and_perplexity_match_numpy(legacy):
    rng = np.random.default_rng(7)
    z = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    codebook = rng.normal(size=(16, 3)).astype(np.float32)
    beta = 0.25
    vq = VectorQuantizer(n_embed=16, embed_dim=3, beta=beta, legacy=legacy)

    def run(z, codebook):
        return vq.apply({"params": {"embedding": {"embedding": codebook}}}, z)

    z_q, loss, info = run(z, codebook)
    idx, zq_np, loss_np, grad_z_np, grad_cb_np, perplexity_np, usage_np = _numpy_vq(z, codebook, beta, legacy)
    np.testing.assert_array_equal(info["indices"], idx.reshape(2, 5, 6))
    np.testing.assert_allclose(z_q, zq_np, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss, loss_np, rtol=1e-5)
    np.testing.assert_allclose(info["perplexity"], perplexity_np, rtol=1e-5)
    assert int(info["codebook_usage"]) == usage_np and 1 < usage_np < 16

    grad_z, grad_cb = jax.grad(lambda z, c: run(z, c)[1], argnums=(0, 1))(z, codebook)
    np.testing.assert_allclose(grad_z, grad_z_np, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(grad_cb, grad_cb_np, rtol=1e-5, atol=1e-8)
    # Straight-through: the gradient of a function of z_q flows to z unchanged.
    g = rng.normal(size=z.shape).astype(np.float32)
    np.testing.assert_allclose(jax.grad(lambda z: jnp.sum(run(z, codebook)[0] * g))(z), g, rtol=1e-6)


def test_config_round_trips_through_diffusers(kl, vq):
    assert config_from_diffusers(dict(kl[0].config), kind="kl") == KL_CONFIG
    assert config_from_diffusers({**vq[0].config, "_class_name": "VQModel"}) == VQ_CONFIG
    with pytest.raises(ValueError, match="cannot tell kl from vq"):
        config_from_diffusers(dict(kl[0].config))
    with pytest.raises(ValueError, match="norm_type='spatial'"):
        config_from_diffusers({**dict(vq[0].config), "norm_type": "spatial"}, kind="vq")
    with pytest.raises(ValueError, match=r"unknown entries \['frobnicate'\]"):
        config_from_diffusers({**dict(kl[0].config), "frobnicate": 1}, kind="kl")


def test_conversion_errors_list_the_keys(kl, vq):
    kl_state, vq_state = kl[0].state_dict(), vq[0].state_dict()
    with pytest.raises(ConversionError) as err:  # a VQ checkpoint for a KL model
        convert_diffusers_autoencoder(vq_state, KL_CONFIG)
    msg = str(err.value)
    assert "unexpected (1): quantize.embedding.weight" in msg
    assert "quant_conv.weight: checkpoint (1, 1, 4, 3) vs model (1, 1, 8, 8)" in msg

    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1)
    with pytest.raises(ConversionError) as err:
        convert_diffusers_autoencoder(unet.state_dict(), KL_CONFIG)
    msg = str(err.value)
    assert "missing (206): decoder/conv_in/bias, decoder/conv_in/kernel" in msg
    assert "unexpected (" in msg and "conv_in.weight (-> conv_in/kernel)" in msg

    # The same checkpoint against a config with one resnet per level: the extra resnets are listed.
    with pytest.raises(ConversionError, match=r"unexpected \(52\): .*decoder\.up_blocks\.0\.resnets\.2\.conv1\.weight"):
        convert_diffusers_autoencoder(kl_state, dataclasses.replace(KL_CONFIG, num_res_blocks=1))
    with pytest.raises(ConversionError, match=r"shape mismatch"):
        convert_diffusers_autoencoder(kl_state, dataclasses.replace(KL_CONFIG, ch_mult=(1, 1)))


def test_deprecated_attention_names_and_diffusers_folder(kl, tmp_path):
    ref, _, variables = kl
    renamed = {}
    for key, value in ref.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert any(".proj_attn." in key for key in renamed)
    params = convert_diffusers_autoencoder(renamed, KL_CONFIG)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, variables["params"])

    ref.save_pretrained(tmp_path / "vae")  # config.json + diffusion_pytorch_model.safetensors
    config, loaded = load_diffusers_autoencoder(tmp_path / "vae")
    assert config == KL_CONFIG
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables["params"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_autoencoder(tmp_path)


def test_bad_input_is_refused(kl, vq):
    _, model, variables = kl
    for shape, hint in (((32, 32, 3), ""), ((2, 3, 32, 32), "NCHW"), ((2, 31, 32, 3), ""), ((2, 32, 32, 1), "")):
        with pytest.raises(ValueError, match=rf"\(batch, H, W, 3\).*factor 2; got shape \({shape[0]}.*{hint}"):
            model.apply(variables, jnp.zeros(shape), method="encode")
    with pytest.raises(ValueError, match=r"expected latents of shape \(batch, h, w, 4\); got shape \(2, 8, 8, 3\)"):
        model.apply(variables, jnp.zeros((2, 8, 8, 3)), method="decode")
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)))
    _, vq_model, vq_variables = vq
    with pytest.raises(ValueError, match=r"integer indices \(batch, h, w\)"):
        vq_model.apply(vq_variables, jnp.zeros((2, 8, 8, 3)), method="decode_indices")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(kind="gan"), r"kind='gan', expected one of \('kl', 'vq', 'identity'\)"),
        (dict(ch=48), r"\[48\] channels, not divisible by GroupNorm's 32 groups"),
        (dict(attn_resolutions=(8,)), r"attn_resolutions \[8\] match no level.*\(32, 16\)"),
        (dict(double_z=False), "kind='kl' needs double_z=True"),
        (dict(kind="vq", double_z=False), "kind='vq' needs n_embed >= 1"),
        (dict(resolution=33), "resolution=33 is not divisible by the factor 2"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(KL_CONFIG, **changes)


def test_build_autoencoder_from_sections():
    section = {**dataclasses.asdict(KL_CONFIG), "ch_mult": [1, 2], "attn_resolutions": [16]}
    assert build_autoencoder(section).config == KL_CONFIG
    with pytest.raises(ValueError, match=r"first_stage: unknown field\(s\) \['z_chanels'\]"):
        build_autoencoder({**section, "z_chanels": 4})
    # Sections saved when attention and remat were config fields still build the same config.
    legacy = {**section, "attention_impl": "chunked", "remat": True}
    assert autoencoder_config(legacy) == KL_CONFIG
    assert build_autoencoder(legacy).attention == "xla"  # the saved value is not a run-time option


@pytest.mark.parametrize("options, message", [
    (dict(attention="flash"), r"build_autoencoder: attention='flash'; expected one of \('xla', 'jax_nn', 'chunked'\)"),
    (dict(remat="sometimes"), r"build_autoencoder: remat='sometimes'; expected False, True or one of"),
])
def test_bad_run_time_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_autoencoder(KL_CONFIG, **options)


def test_remat_and_dropout():
    """Remat keeps the param tree and gives the same gradients (with dropout active, same dropout key)."""
    cfg = AutoencoderConfig(kind="kl", ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=4,
                            dropout=0.5)
    plain, remat = build_autoencoder(cfg), build_autoencoder(cfg, remat=True)
    shapes = jax.eval_shape(lambda k: init_autoencoder(plain, k), jax.random.key(0))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
        jax.eval_shape(lambda k: init_autoencoder(remat, k), jax.random.key(0)))
    rng = np.random.default_rng(0)  # random params without compiling an init
    variables = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32), shapes)
    x = jnp.asarray(_images(0, (1, 4, 4, 3)))

    def loss(model, v, deterministic):
        recon, _ = model.apply(v, x, sample_posterior=False, deterministic=deterministic,
                               rngs={"dropout": jax.random.key(1)})
        return jnp.mean(recon**2)

    g_plain = jax.jit(jax.grad(lambda v: loss(plain, v, False)))(variables)
    g_remat = jax.jit(jax.grad(lambda v: loss(remat, v, False)))(variables)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_plain, g_remat)
    assert jax.tree_util.tree_reduce(lambda acc, g: acc + float(jnp.abs(g).sum()), g_plain, 0.0) > 0
    with_dropout, without = jax.jit(lambda v: (loss(plain, v, False), loss(plain, v, True)))(variables)
    assert not np.isclose(with_dropout, without)


def test_kl_f8_shapes_and_dtypes():
    """Stable Diffusion's VAE (kl-f8): 256x256 images <-> 32x32x4 latents; bf16 compute keeps float32 outputs."""
    cfg = load_config_file(CONFIGS / "autoencoder_kl_f8.py").first_stage
    model = build_autoencoder(cfg, dtype=jnp.bfloat16)
    assert model.config.downsample_factor == 8
    variables = jax.eval_shape(lambda k: init_autoencoder(model, k), jax.random.key(0))
    assert decoder_last_layer_path() == ("decoder", "conv_out", "kernel")
    assert decoder_last_layer(variables).shape == (3, 3, 128, 3)
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    posterior = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), variables, x)
    assert posterior.mean.shape == (1, 32, 32, 4) and posterior.mean.dtype == jnp.float32
    recon = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), variables, posterior.mean)
    assert recon.shape == (1, 256, 256, 3) and recon.dtype == jnp.float32
    n_params = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(variables))
    assert n_params == 83_653_863  # diffusers' SD-v1 AutoencoderKL has 83,653,863 parameters
