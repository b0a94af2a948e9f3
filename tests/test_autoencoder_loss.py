"""Autoencoder loss terms vs PyTorch: the reference formulas of CompVis `LPIPSWithDiscriminator` /
`VQLPIPSWithDiscriminator`, with lpips' LPIPS, a torch PatchGAN written from taming's definition, and the
adaptive weight taken with torch.autograd. Float32 on both sides; tolerance 1e-5, relative to the largest
entry of each compared array (measured ~1e-7 on losses and d_weight, <1e-6 on gradients through LPIPS)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_jax.config import build_dataclass
from ldm_jax.convert.common import conv_kernel, convert_state_dict, expected_shapes
from ldm_jax.convert.lpips import convert_lpips_state_dict
from ldm_jax.losses.autoencoder_loss import (AutoencoderLoss, LossConfig, adaptive_weight, adopt_weight,
                                             hinge_d_loss, vanilla_d_loss)
from ldm_jax.losses.discriminator import ActNorm, NLayerDiscriminator, patch_grid_size
from ldm_jax.losses.lpips import LPIPS
from tests import reference_vgg

B, H, FEAT, LATENT = 2, 32, 8, 4
RTOL = 1e-5


# ---- torch references --------------------------------------------------------------------------------

class TorchActNorm(torch.nn.Module):
    """taming ActNorm: data-dependent init on the first training forward."""

    def __init__(self, c):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(1, c, 1, 1))
        self.scale = torch.nn.Parameter(torch.ones(1, c, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x):
        if self.training and self.initialized.item() == 0:
            with torch.no_grad():
                flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
                self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
                self.scale.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


def torch_discriminator(in_ch, ndf, n_layers, actnorm):
    """taming NLayerDiscriminator + weights_init (random conv biases kept)."""
    norm = TorchActNorm if actnorm else torch.nn.BatchNorm2d
    seq = [torch.nn.Conv2d(in_ch, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        seq += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=actnorm),
                norm(ndf * mult), torch.nn.LeakyReLU(0.2, True)]
    seq += [torch.nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    disc = torch.nn.Sequential(*seq)
    for m in disc.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.02)
            torch.nn.init.constant_(m.bias, 0)
    return disc.train()


def convert_discriminator(disc, model, x_shape):
    """torch `main.N.*` state dict -> (our params, our state), via the shared strict converter."""
    sd = {f"main.{k}": v.detach().numpy().copy() for k, v in disc.state_dict().items()}  # torch updates in place
    buffers = ("running_mean", "running_var", "num_batches_tracked", "initialized")
    params_sd = {k: (v.reshape(-1) if k.endswith((".loc", ".scale")) else v) for k, v in sd.items()
                 if not k.endswith(buffers)}
    expected = expected_shapes(functools.partial(model.init, train=True), jax.random.key(0), jnp.ones(x_shape))
    params = convert_state_dict(params_sd, expected, source="torch PatchGAN")
    state = {}
    if not model.use_actnorm:
        stats = {}
        for k, v in sd.items():
            if k.endswith(("running_mean", "running_var")):
                name = "main_" + k.split(".")[1]
                stats.setdefault(name, {})["mean" if k.endswith("mean") else "var"] = v
        state = {"batch_stats": stats}
    return params, state


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def assert_close(got, want, rtol=RTOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-30))


# ---- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lpips_pair():
    model = reference_vgg.lpips_module(seed=1)
    return model, convert_lpips_state_dict(model.state_dict())


@pytest.fixture(scope="module")
def problem():
    """Inputs and a stand-in autoencoder: recon = conv3x3(silu(h)) (the decoder's conv_out) and a
    Gaussian posterior (mean, logvar) as free parameters."""
    rng = np.random.default_rng(0)
    return dict(
        x=rng.uniform(-1, 1, (B, H, H, 3)).astype(np.float32),
        h=rng.normal(0, 1, (B, H, H, FEAT)).astype(np.float32),
        w=rng.normal(0, 0.2, (3, FEAT, 3, 3)).astype(np.float32),  # torch OIHW
        b=rng.normal(0, 0.1, (3,)).astype(np.float32),
        mean=rng.normal(0, 1, (B, 8, 8, LATENT)).astype(np.float32),
        lv=rng.normal(0, 0.5, (B, 8, 8, LATENT)).astype(np.float32),
        q=np.float32(0.37),
    )


def ae_params(p):
    return {"h": p["h"], "mean": p["mean"], "lv": p["lv"], "q": p["q"],
            "decoder": {"conv_out": {"kernel": conv_kernel(p["w"]), "bias": p["b"]}}}


def jax_forward(kind):
    def forward(params):
        conv = params["decoder"]["conv_out"]
        recon = jax.lax.conv_general_dilated(jax.nn.silu(params["h"]), conv["kernel"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
        if kind == "vq":
            return recon, params["q"]
        kl = 0.5 * jnp.sum(jnp.square(params["mean"]) + jnp.exp(params["lv"]) - 1.0 - params["lv"])
        return recon, kl / params["h"].shape[0]
    return forward


def torch_generator(cfg, kind, p, lpips_model, disc, step, logvar):
    """The reference generator pass: loss, logs, grads of {h, w, b, mean, lv, q} and logvar."""
    t = {k: torch.tensor(v, requires_grad=True) for k, v in p.items() if k != "x"}
    t["h"] = nchw(p["h"]).requires_grad_(True)
    t["mean"] = nchw(p["mean"]).requires_grad_(True)
    t["lv"] = nchw(p["lv"]).requires_grad_(True)
    logvar = torch.tensor(logvar, requires_grad=True)
    x = nchw(p["x"])
    recon = F.conv2d(F.silu(t["h"]), t["w"], t["b"], padding=1)
    pix = (x - recon).abs() if cfg.pixel_loss == "l1" else (x - recon) ** 2
    rec = cfg.pixelloss_weight * pix
    p_loss = lpips_model(x, recon)
    rec = rec + cfg.perceptual_weight * p_loss
    if kind == "kl":
        nll = torch.sum(rec / torch.exp(logvar) + logvar) / rec.shape[0]
        reg = 0.5 * torch.sum(t["mean"] ** 2 + torch.exp(t["lv"]) - 1.0 - t["lv"], dim=[1, 2, 3])
        reg = torch.sum(reg) / reg.shape[0]
        reg_w = cfg.kl_weight
    else:
        nll = torch.mean(rec)
        reg, reg_w = t["q"], cfg.codebook_weight
    g_loss = -torch.mean(disc(recon))
    if kind == "vq" or cfg.disc_factor > 0:
        nll_grads = torch.autograd.grad(nll, t["w"], retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, t["w"], retain_graph=True)[0]
        d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach()
        d_weight = d_weight * cfg.disc_weight
    else:
        d_weight = torch.tensor(0.0)
    disc_factor = cfg.disc_factor if step >= cfg.disc_start else 0.0
    loss = nll + reg_w * reg + d_weight * disc_factor * g_loss
    loss.backward()
    grads = {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in t.items()}  # unused -> 0
    grads = {"h": nhwc(grads["h"]), "mean": nhwc(grads["mean"]), "lv": nhwc(grads["lv"]),
             "q": grads["q"].numpy(), "kernel": conv_kernel(grads["w"].numpy()), "bias": grads["b"].numpy()}
    logs = dict(total_loss=loss.item(), nll_loss=nll.item(), rec_loss=rec.mean().item(), g_loss=g_loss.item(),
                p_loss=p_loss.mean().item(), d_weight=float(d_weight), disc_factor=disc_factor, reg=reg.item())
    return logs, grads, 0.0 if logvar.grad is None else logvar.grad.item()


def flax_generator(cfg, kind, p, lpips_params, disc_params, disc_state, step, logvar, lpips_model=None):
    loss = AutoencoderLoss(cfg, kind)
    fn = jax.jit(lambda *a: loss.generator_loss_and_grads(jax_forward(kind), *a))
    return fn(ae_params(p), jnp.float32(logvar), lpips_params, disc_params, disc_state, p["x"], step)


CASES = [
    # (kind, config overrides, step, discriminator layers)
    ("kl", dict(disc_start=10, kl_weight=1e-3, disc_weight=0.5, logvar_init=0.3), 10, 2),
    ("kl", dict(disc_start=10, kl_weight=0.2, disc_factor=0.0), 50, 1),  # no adaptive weight computed
    ("vq", dict(disc_start=100, codebook_weight=0.7, disc_weight=0.6, pixel_loss="l2",
                pixelloss_weight=0.8, perceptual_weight=0.5, disc_loss="vanilla"), 99, 2),  # before disc_start
]


@pytest.mark.parametrize("kind,overrides,step,n_layers", CASES)
def test_generator_matches_reference(lpips_pair, problem, kind, overrides, step, n_layers):
    lpips_model, lpips_params = lpips_pair
    cfg = LossConfig(disc_num_layers=n_layers, disc_ndf=8, **overrides)
    torch.manual_seed(2)
    disc = torch_discriminator(3, 8, n_layers, actnorm=False)
    disc_params, disc_state = convert_discriminator(disc, AutoencoderLoss(cfg, kind).discriminator, (B, H, H, 3))
    logvar = cfg.logvar_init
    want_logs, want_grads, want_logvar_grad = torch_generator(cfg, kind, problem, lpips_model, disc, step, logvar)
    loss, (grads, logvar_grad), logs, new_state = flax_generator(cfg, kind, problem, lpips_params, disc_params,
                                                                 disc_state, step, logvar)
    assert bool(logs["finite"])
    assert_close(loss, want_logs["total_loss"])
    for name in ("total_loss", "nll_loss", "rec_loss", "g_loss", "p_loss", "d_weight", "disc_factor"):
        assert_close(logs[name], want_logs[name])
    assert_close(logs["kl_loss" if kind == "kl" else "quant_loss"], want_logs["reg"])
    if (kind == "vq" or cfg.disc_factor > 0):
        assert float(logs["d_weight"]) > 0
    for name in ("h", "mean", "lv", "q"):
        assert_close(grads[name], want_grads[name])
    for name in ("kernel", "bias"):
        assert_close(grads["decoder"]["conv_out"][name], want_grads[name])
    assert_close(logvar_grad, want_logvar_grad if kind == "kl" else 0.0)
    # The discriminator ran once, in training mode: BatchNorm running means moved as torch's did
    # (running variances differ by design: torch uses the unbiased batch variance, flax the biased one).
    for name, stats in new_state["batch_stats"].items():
        assert_close(stats["mean"], disc[int(name.split("_")[1])].running_mean.numpy())


def test_discriminator_loss_matches_reference(problem):
    cfg = LossConfig(disc_start=5, disc_num_layers=2, disc_ndf=8, disc_factor=0.9)
    loss = AutoencoderLoss(cfg, "kl")
    torch.manual_seed(3)
    disc = torch_discriminator(3, 8, 2, actnorm=False)
    params, state = convert_discriminator(disc, loss.discriminator, (B, H, H, 3))
    x, recon = problem["x"], np.tanh(problem["h"][..., :3])
    fn = jax.jit(jax.value_and_grad(loss.discriminator_loss, has_aux=True))
    for step in (4, 5):
        disc.zero_grad()
        logits_real, logits_fake = disc(nchw(x)), disc(nchw(recon))
        factor = cfg.disc_factor if step >= cfg.disc_start else 0.0
        d_loss = factor * 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
        d_loss.backward()
        (got, (logs, new_state)), grads = fn(params, state, x, recon, step)
        assert_close(got, d_loss.item())
        assert_close(logs["logits_real"], logits_real.mean().item())
        assert_close(logs["logits_fake"], logits_fake.mean().item())
        if step >= cfg.disc_start:
            assert_close(grads["main_0"]["kernel"], conv_kernel(disc[0].weight.grad.numpy()))
            assert_close(grads["main_3"]["scale"], disc[3].weight.grad.numpy())
            assert_close(grads["main_5"]["kernel"], conv_kernel(disc[5].weight.grad.numpy()))
        else:
            assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
        # Two training-mode calls (real, then fake) moved the running mean twice, as in torch.
        assert_close(new_state["batch_stats"]["main_3"]["mean"], disc[3].running_mean.numpy())
        state = new_state


def test_actnorm_discriminator_matches_reference(problem):
    x = problem["x"]
    torch.manual_seed(4)
    disc = torch_discriminator(3, 8, 2, actnorm=True)
    want = nhwc(disc(nchw(x)))  # first training forward: ActNorm initialises from this batch
    model = NLayerDiscriminator(n_layers=2, ndf=8, use_actnorm=True)
    params, state = convert_discriminator(disc, model, x.shape)
    assert state == {}
    got = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    assert got.shape == (B, 6, 6, 1) == (B, patch_grid_size(H, 2), patch_grid_size(H, 2), 1)
    assert_close(got, want)
    # Our data-dependent init equals taming's on the same activations.
    act = torch.tensor(np.random.default_rng(5).normal(2, 3, (4, 6, 5, 5)).astype(np.float32))
    ref = TorchActNorm(6).train()
    out = ref(act)
    variables = ActNorm().init(jax.random.key(0), nhwc(act))
    assert_close(variables["params"]["loc"], ref.loc.detach().numpy().reshape(-1))
    assert_close(variables["params"]["scale"], ref.scale.detach().numpy().reshape(-1))
    assert_close(ActNorm().apply(variables, nhwc(act)), nhwc(out))


def test_discriminator_init_statistics():
    model = NLayerDiscriminator(n_layers=3, ndf=64)
    variables = jax.jit(lambda k, x: model.init(k, x))(jax.random.key(6), jnp.zeros((1, 32, 32, 3)))
    p = variables["params"]
    kernels = np.concatenate([np.ravel(p[n]["kernel"]) for n in ("main_0", "main_2", "main_5", "main_8", "main_11")])
    assert abs(kernels.std() - 0.02) < 1e-3 and abs(kernels.mean()) < 1e-3
    scales = np.concatenate([np.ravel(p[n]["scale"]) for n in ("main_3", "main_6", "main_9")])
    assert abs(scales.mean() - 1.0) < 5e-3 and abs(scales.std() - 0.02) < 5e-3
    assert "bias" not in p["main_2"] and np.all(np.asarray(p["main_3"]["bias"]) == 0)
    bound = 1 / np.sqrt(3 * 16)
    assert 0.5 * bound < np.abs(np.asarray(p["main_0"]["bias"])).max() <= bound
    assert set(variables["batch_stats"]) == {"main_3", "main_6", "main_9"}
    with pytest.raises(ValueError, match="too small"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_gan_losses_and_weights():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(3, 4, 4, 1)).astype(np.float32), rng.normal(size=(3, 4, 4, 1)).astype(np.float32)
    tr, tf = torch.tensor(real), torch.tensor(fake)
    assert_close(hinge_d_loss(real, fake), 0.5 * (F.relu(1 - tr).mean() + F.relu(1 + tf).mean()).item())
    assert_close(vanilla_d_loss(real, fake), 0.5 * (F.softplus(-tr).mean() + F.softplus(tf).mean()).item())
    assert float(adopt_weight(0.7, 9, 10)) == 0.0 and float(adopt_weight(0.7, 10, 10)) == np.float32(0.7)
    traced = jax.jit(lambda s: adopt_weight(0.7, s, 10))
    assert float(traced(9)) == 0.0 and float(traced(10)) == np.float32(0.7)
    a, b = rng.normal(size=(3, 3, 8, 3)), rng.normal(size=(3, 3, 8, 3))
    assert_close(adaptive_weight(a, b, 0.5), 0.5 * np.linalg.norm(a) / (np.linalg.norm(b) + 1e-4))
    assert float(adaptive_weight(a, np.zeros_like(b), 1.0)) == 1e4  # clamped


def test_nonfinite_inputs_are_named(problem):
    loss = AutoencoderLoss(LossConfig(disc_start=0, disc_num_layers=2, disc_ndf=8), "kl", lpips=LPIPS((2,) * 5))
    x = problem["x"].copy()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="inputs contains NaN"):
        loss.generator_loss_and_grads(jax_forward("kl"), ae_params(problem), 0.0, {}, {}, {}, x, 0)
    with pytest.raises(ValueError, match="reconstructions contains NaN"):
        loss.discriminator_loss({}, {}, problem["x"], x, 0)


def test_config_validation_and_conditioning():
    cfg = build_dataclass(LossConfig, {"disc_start": 50001, "kl_weight": 1e-6, "disc_weight": 0.5})
    assert cfg.disc_start == 50001 and cfg.perceptual_weight == 1.0 and not cfg.learn_logvar
    with pytest.raises(ValueError, match="unknown field"):
        build_dataclass(LossConfig, {"disc_start": 1, "disc_weigth": 0.5})
    with pytest.raises(ValueError, match="disc_loss"):
        LossConfig(disc_start=0, disc_loss="wgan")
    with pytest.raises(ValueError, match="pixel_loss"):
        LossConfig(disc_start=0, pixel_loss="l3")
    with pytest.raises(ValueError, match="kind"):
        AutoencoderLoss(LossConfig(disc_start=0), "vae")
    loss = AutoencoderLoss(LossConfig(disc_start=0, disc_num_layers=2, disc_ndf=4), "kl")
    images = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="cond is given"):
        loss.init_discriminator(jax.random.key(0), images, cond=images)
    cond_loss = AutoencoderLoss(dataclasses.replace(loss.config, disc_conditional=True, disc_in_channels=4), "kl")
    with pytest.raises(ValueError, match="cond is missing"):
        cond_loss.init_discriminator(jax.random.key(0), images)
    with pytest.raises(ValueError, match="4"):
        cond_loss.init_discriminator(jax.random.key(0), images, cond=images)
    params, state = cond_loss.init_discriminator(jax.random.key(0), images, cond=images[..., :1])
    assert params["main_0"]["kernel"].shape == (4, 4, 4, 4) and "batch_stats" in state
