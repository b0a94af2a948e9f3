"""Autoencoder losses: reconstruction (L1/L2 + LPIPS), KL or codebook term, PatchGAN with adaptive weight.

Semantics of CompVis `LPIPSWithDiscriminator` (KL, `ldm/modules/losses/contperceptual.py`) and
`VQLPIPSWithDiscriminator` (`ldm/modules/losses/vqperceptual.py`), as pure functions of params and arrays.
With x the inputs and x' the reconstructions (NHWC, [-1, 1]), per element:
  rec  = pixelloss_weight * |x - x'| (or (x - x')^2) + perceptual_weight * LPIPS(x, x')  (broadcast per image)
  KL:  nll = sum(rec / exp(logvar) + logvar) / B,  loss = nll + kl_weight * sum(KL) / B + d_w * f * g_loss
  VQ:  nll = mean(rec),                            loss = nll + codebook_weight * q_loss + d_w * f * g_loss
  g_loss = -mean(D(x')),  f = adopt_weight(disc_factor, step, disc_start),
  d_w = disc_weight * clip(||dnll/dW|| / (||dg_loss/dW|| + 1e-4), 0, 1e4), held constant (no gradient),
with W the decoder's last conv kernel. The KL loss computes d_w only when disc_factor > 0 (else 0).
Discriminator: d_loss = f * {hinge, vanilla}(D(x), D(x')), with D in training mode on the two batches
separately (BatchNorm statistics per batch, as the reference's two calls).
(The reference stores `pixelloss_weight` but never applies it; here it scales the pixel term, which agrees
at its default 1.0.)

Efficiency of d_w: the model's forward is linearised once (`jax.vjp`). Gradients w.r.t. W of nll and g_loss
are that VJP applied to their cotangents at x' (read off at W; under jit the unused parts of those two
backward passes are dead code), and the parameter gradient of the total loss is one more VJP with the
combined cotangent  dnll/dx' + d_w * f * dg/dx'  (plus the regulariser's weight). This is exact.

Non-finite values: `generator_loss_and_grads` checks its inputs eagerly (ValueError naming the array) when
they are concrete; under jit it cannot: the logs carry the NaN (and `finite` False), and training checks its
step's metrics on the host (`ldm_jax.training.loop.check_finite`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.losses.discriminator import NLayerDiscriminator
from ldm_jax.losses.lpips import LPIPS

DISC_LOSSES = ("hinge", "vanilla")
PIXEL_LOSSES = ("l1", "l2")
KINDS = ("kl", "vq")
DEFAULT_LAST_LAYER = ("decoder", "conv_out", "kernel")

Forward = Callable[[Any], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the autoencoder loss (the reference's `lossconfig.params`).

    disc_start: step from which the GAN terms count (adopt_weight threshold). logvar_init: initial
    log-variance of the KL loss's nll; learn_logvar: train it with the autoencoder (the CompVis optimiser
    leaves it out, so it stays at logvar_init: default False). disc_loss: "hinge" | "vanilla";
    pixel_loss: "l1" | "l2". disc_conditional: the discriminator also sees a conditioning image
    concatenated on channels (disc_in_channels counts both).
    """

    disc_start: int
    logvar_init: float = 0.0
    kl_weight: float = 1.0
    pixelloss_weight: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_factor: float = 1.0
    disc_weight: float = 1.0
    perceptual_weight: float = 1.0
    use_actnorm: bool = False
    disc_conditional: bool = False
    disc_loss: str = "hinge"
    codebook_weight: float = 1.0
    pixel_loss: str = "l1"
    disc_ndf: int = 64
    learn_logvar: bool = False

    def __post_init__(self):
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"LossConfig.disc_loss must be one of {DISC_LOSSES}, got {self.disc_loss!r}")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"LossConfig.pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        for name in ("disc_num_layers", "disc_ndf", "disc_in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"loss.{name}={getattr(self, name)}; expected >= 1")
        for name in ("perceptual_weight", "disc_weight", "disc_factor", "kl_weight", "pixelloss_weight",
                     "codebook_weight", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name}={getattr(self, name)}; expected >= 0")


def adopt_weight(weight: float, step: Any, threshold: int, value: float = 0.0) -> jax.Array:
    """`value` while step < threshold, else `weight` (float32 scalar; step may be traced)."""
    return jnp.where(jnp.asarray(step) < threshold, jnp.float32(value), jnp.float32(weight))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))); logits of any shape -> float32 scalar."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake))); logits of any shape -> float32 scalar."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """disc_weight * clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4), with no gradient (float32 scalar)."""
    ratio = _norm(nll_grad) / (_norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4)) * disc_weight


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def check_finite(name: str, x: Any) -> None:
    """Raises ValueError if concrete array `x` holds NaN/inf; does nothing for traced values (under jit)."""
    if x is None or isinstance(x, jax.core.Tracer):
        return
    if not np.all(np.isfinite(np.asarray(x))):
        raise ValueError(f"autoencoder loss: {name} contains NaN or inf")


@dataclasses.dataclass(frozen=True)
class AutoencoderLoss:
    """The loss of a KL (`kind="kl"`) or VQ (`kind="vq"`) autoencoder, with its LPIPS and discriminator.

    All methods are pure: params and discriminator state come in, values and new state go out.
    Discriminator state is the dict of its non-param collections ({"batch_stats": ...} with BatchNorm,
    {} with ActNorm). `lpips` may be a narrower LPIPS for tests; pretrained weights need the default.
    """

    config: LossConfig
    kind: str = "kl"
    lpips: LPIPS = dataclasses.field(default_factory=LPIPS)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"AutoencoderLoss.kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def discriminator(self) -> NLayerDiscriminator:
        cfg = self.config
        return NLayerDiscriminator(n_layers=cfg.disc_num_layers, ndf=cfg.disc_ndf, use_actnorm=cfg.use_actnorm,
                                   dtype=self.dtype, param_dtype=self.param_dtype)

    # ---- set-up ---------------------------------------------------------------------------------------

    def init_logvar(self) -> jax.Array:
        """The nll log-variance scalar at `logvar_init` (float32)."""
        return jnp.float32(self.config.logvar_init)

    def init_discriminator(self, key: jax.Array, images: jax.Array, cond: jax.Array | None = None
                           ) -> tuple[Any, dict[str, Any]]:
        """(params, state) of the discriminator. ActNorm is initialised from `images` (taming initialises it
        on its first training forward, the first batch of reconstructions); BatchNorm stats start at 0/1."""
        variables = dict(self.discriminator.init(key, self._disc_input(images, cond), train=True))
        params = variables.pop("params")
        return params, variables

    # ---- terms ----------------------------------------------------------------------------------------

    def reconstruction_terms(self, lpips_params: Any, inputs: jax.Array, recon: jax.Array
                             ) -> tuple[jax.Array, jax.Array]:
        """(rec (B, H, W, C) float32 per element, p_loss (B,) LPIPS per image; zeros when unweighted)."""
        cfg = self.config
        if inputs.shape != recon.shape:
            raise ValueError(f"autoencoder loss: inputs {inputs.shape} and reconstructions {recon.shape} differ")
        x, y = inputs.astype(jnp.float32), recon.astype(jnp.float32)
        pixel = jnp.abs(x - y) if cfg.pixel_loss == "l1" else jnp.square(x - y)
        rec = cfg.pixelloss_weight * pixel
        if cfg.perceptual_weight > 0:
            p_loss = self.lpips.apply({"params": jax.lax.stop_gradient(lpips_params)}, x, y)
            rec = rec + cfg.perceptual_weight * p_loss[:, None, None, None]
        else:
            p_loss = jnp.zeros(x.shape[:1], jnp.float32)
        return rec, p_loss

    def nll(self, rec: jax.Array, logvar: jax.Array) -> jax.Array:
        """KL: sum(rec / exp(logvar) + logvar) / B; VQ: mean(rec) (logvar unused). Float32 scalar."""
        if self.kind == "vq":
            return jnp.mean(rec)
        return jnp.sum(rec / jnp.exp(logvar) + logvar) / rec.shape[0]

    def discriminate(self, disc_params: Any, disc_state: Mapping[str, Any], images: jax.Array,
                     cond: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """Discriminator logits (B, h, w, 1) in training mode and its updated state."""
        variables = {"params": disc_params, **disc_state}
        x = self._disc_input(images, cond)
        if not disc_state:
            return self.discriminator.apply(variables, x, train=True), {}
        logits, new_state = self.discriminator.apply(variables, x, train=True, mutable=list(disc_state))
        return logits, dict(new_state)

    def _disc_input(self, images: jax.Array, cond: jax.Array | None) -> jax.Array:
        cfg = self.config
        if cfg.disc_conditional != (cond is not None):
            raise ValueError(
                f"autoencoder loss: disc_conditional={cfg.disc_conditional} but cond is "
                f"{'missing' if cond is None else 'given'}"
            )
        x = images if cond is None else jnp.concatenate([images, cond.astype(images.dtype)], axis=-1)
        if x.shape[-1] != cfg.disc_in_channels:
            raise ValueError(
                f"autoencoder loss: the discriminator input has {x.shape[-1]} channels, "
                f"LossConfig.disc_in_channels is {cfg.disc_in_channels}"
            )
        return x

    # ---- the two losses -------------------------------------------------------------------------------

    def generator_loss_and_grads(
        self,
        forward: Forward,
        ae_params: Any,
        logvar: jax.Array,
        lpips_params: Any,
        disc_params: Any,
        disc_state: Mapping[str, Any],
        inputs: jax.Array,
        step: Any,
        *,
        cond: jax.Array | None = None,
        last_layer: tuple[str, ...] = DEFAULT_LAST_LAYER,
    ) -> tuple[jax.Array, tuple[Any, jax.Array], dict[str, jax.Array], dict[str, Any]]:
        """The generator (autoencoder) loss and its exact gradients.

        forward(ae_params) -> (reconstructions (B, H, W, C), reg): reg is the scalar regulariser,
          sum(posterior.kl()) / B for KL, the codebook loss for VQ.
        inputs: (B, H, W, C) in [-1, 1]; step: the global step (int, may be traced).
        last_layer: path of the decoder's last conv kernel inside ae_params.
        Returns (loss, (ae_grads, logvar_grad), logs, new discriminator state). Gradients do not flow into
        LPIPS or the discriminator. logs: total_loss, nll_loss, rec_loss, p_loss, kl_loss + logvar (KL) or
        quant_loss (VQ), d_weight, disc_factor, g_loss, finite.
        """
        cfg = self.config
        check_finite("inputs", inputs)
        check_finite("logvar", logvar)
        (recon, reg), ae_vjp = jax.vjp(forward, ae_params)
        check_finite("reconstructions", recon)
        check_finite("regulariser (KL / codebook loss)", reg)
        disc_params = jax.lax.stop_gradient(disc_params)

        def nll_of(x_rec, lv):
            rec, p_loss = self.reconstruction_terms(lpips_params, inputs, x_rec)
            return self.nll(rec, lv), (jnp.mean(rec), jnp.mean(p_loss))

        def g_loss_of(x_rec):
            logits, state = self.discriminate(disc_params, disc_state, x_rec, cond)
            return -jnp.mean(logits), state

        (nll, (rec_mean, p_mean)), (ct_nll, logvar_grad) = jax.value_and_grad(
            nll_of, argnums=(0, 1), has_aux=True)(recon, logvar)
        (g_loss, new_disc_state), ct_g = jax.value_and_grad(g_loss_of, has_aux=True)(recon)

        def last_layer_grad(ct_recon):
            return _at_path(ae_vjp((ct_recon, jnp.zeros_like(reg)))[0], last_layer)

        if self.kind == "vq" or cfg.disc_factor > 0:
            d_weight = adaptive_weight(last_layer_grad(ct_nll), last_layer_grad(ct_g), cfg.disc_weight)
        else:
            d_weight = jnp.float32(0.0)
        disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)
        reg_weight = cfg.kl_weight if self.kind == "kl" else cfg.codebook_weight
        g_scale = d_weight * disc_factor
        loss = nll + reg_weight * reg + g_scale * g_loss
        ct_recon = ct_nll + (g_scale * ct_g).astype(ct_nll.dtype)
        (ae_grads,) = ae_vjp((ct_recon, jnp.asarray(reg_weight, reg.dtype)))

        logs = {"total_loss": loss, "nll_loss": nll, "rec_loss": rec_mean, "p_loss": p_mean,
                "d_weight": d_weight, "disc_factor": disc_factor, "g_loss": g_loss}
        if self.kind == "kl":
            logs.update(kl_loss=reg, logvar=jnp.asarray(logvar, jnp.float32))
        else:
            logs.update(quant_loss=reg)
        logs["finite"] = jnp.isfinite(loss) & _tree_finite(ae_grads)
        return loss, (ae_grads, logvar_grad), logs, new_disc_state

    def discriminator_loss(
        self,
        disc_params: Any,
        disc_state: Mapping[str, Any],
        inputs: jax.Array,
        recon: jax.Array,
        step: Any,
        *,
        cond: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
        """f * d_loss(D(inputs), D(recon)) with recon held constant; differentiable in disc_params.

        Returns (d_loss, (logs {disc_loss, logits_real, logits_fake}, new discriminator state)); D sees the
        real batch first, then the fake one, each with its own BatchNorm statistics.
        """
        cfg = self.config
        check_finite("inputs", inputs)
        check_finite("reconstructions", recon)
        recon = jax.lax.stop_gradient(recon)
        logits_real, state = self.discriminate(disc_params, disc_state, inputs, cond)
        logits_fake, state = self.discriminate(disc_params, state, recon, cond)
        loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
        d_loss = adopt_weight(cfg.disc_factor, step, cfg.disc_start) * loss_fn(logits_real, logits_fake)
        logs = {"disc_loss": d_loss, "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}
        return d_loss, (logs, state)


def _at_path(tree: Any, path: tuple[str, ...]) -> jax.Array:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            raise KeyError(f"autoencoder loss: the params have no last layer at {'/'.join(path)} (missing {name!r})")
        tree = tree[name]
    return tree


def _tree_finite(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.bool_(True)
