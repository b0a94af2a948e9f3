"""The "autoencoder" stage: a KL or VQ first stage trained with the adversarial-perceptual loss.

One train step is one iteration of the reference: a generator update of the autoencoder (Adam, betas 0.5 /
0.9), then a discriminator update with its own Adam on reconstructions from the updated autoencoder
(`ldm_jax.training.autoencoder_step`), both inside one jitted, donated step over the mesh. The GAN terms
count from `loss.disc_start`; with `loss.disc_factor == 0` the discriminator half is skipped altogether
(it would only ever see a zero loss), which saves its cost in GAN-free runs.

The state is the generic `TrainState` of the loop: params {"ae", "logvar", "disc", "disc_state"} (the
discriminator's BatchNorm statistics ride along as untrained params so that they are checkpointed),
opt_state {"ae": generator Adam over {"ae", "logvar"}, "disc": discriminator Adam}, tx = `paired_optimizer`.
So the generic loop checkpoints, resumes, guards NaNs and logs it unchanged, and init is shape-first and
sharded by the `mesh` rules. LPIPS's frozen VGG params are an argument of the jitted step, not state.

LPIPS needs torchvision's real VGG16 weights: give `--config.loss.lpips_vgg_path=/path/vgg16-397923af.pth`.
Without it the perceptual weight is set to 0 and a warning says so (LPIPS with random VGG features would
train towards nonsense).

Config sections: first_stage (AutoencoderConfig), loss (LossConfig fields + lpips_vgg_path), optimizer
(`AutoencoderOptimizerConfig`), train (`AutoencoderTrainConfig`), data, checkpoint, mesh.
Outputs (besides the loop's): images/reconstructions_*.png (top rows inputs, bottom rows reconstructions),
a "psnr" line per grid in eval.jsonl, and WORKDIR/autoencoder/ (`ldm_jax.model_dir` first-stage directory).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_jax import model_dir, parallel
from ldm_jax.config import build_dataclass
from ldm_jax.data import pipeline
from ldm_jax.losses.autoencoder_loss import AutoencoderLoss, LossConfig
from ldm_jax.metrics.image_quality import psnr
from ldm_jax.models.autoencoder import AutoencoderConfig, autoencoder_config, build_autoencoder, init_autoencoder
from ldm_jax.training import autoencoder_step, optim
from ldm_jax.training import main as common
from ldm_jax.training import state as state_lib
from ldm_jax.training.autoencoder_step import AutoencoderTrainState
from ldm_jax.training.loop import Hook, train_loop
from ldm_jax.training.state import TrainState

log = logging.getLogger("ldm_jax.train")
EXPORT_DIR = "autoencoder"


@dataclasses.dataclass(frozen=True)
class AutoencoderOptimizerConfig:
    """learning_rate: the base rate (per example with scale_lr, the reference's rule: times the global batch);
    disc_learning_rate: the discriminator's base rate (None: the same)."""

    learning_rate: float = 4.5e-6
    scale_lr: bool = True
    disc_learning_rate: float | None = None


@dataclasses.dataclass(frozen=True)
class AutoencoderTrainConfig:
    """num_steps: iterations (generator + discriminator updates); log_every: scalars interval; image_every:
    reconstruction-grid interval; num_images: examples in the grid (a multiple of the device count), taken
    from `eval_split` of the data; dtype: compute dtype ("float32" / "bfloat16"; params stay float32);
    attention / remat: the run-time options of the autoencoder (`ldm.RunOptions`, never saved with it)."""

    num_steps: int = 1000
    seed: int = 0
    log_every: int = 50
    image_every: int = 500
    num_images: int = 8
    eval_split: str = "validation"
    dtype: str = "float32"
    attention: str = "xla"
    remat: bool | str = False
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class Result:
    """What the stage returns: the final state, the export directory and the last grid's PSNR (dB)."""

    state: TrainState
    export_dir: pathlib.Path
    psnr: float


def paired_optimizer(ae_tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation
                     ) -> optax.GradientTransformation:
    """The stage's two optimisers as one transformation over {"ae", "logvar", "disc", "disc_state"} params.

    State {"ae": ae_tx state over {"ae", "logvar"}, "disc": disc_tx state over "disc"}, the layout
    `autoencoder_step` updates half by half; `update` applies both to a full gradient tree at once (and leaves
    "disc_state" unchanged).
    """
    def init(params):
        return {"ae": ae_tx.init({"ae": params["ae"], "logvar": params["logvar"]}),
                "disc": disc_tx.init(params["disc"])}

    def update(grads, state, params=None):
        gen = {"ae": grads["ae"], "logvar": grads["logvar"]}
        gen_params = None if params is None else {"ae": params["ae"], "logvar": params["logvar"]}
        gen_updates, ae_state = ae_tx.update(gen, state["ae"], gen_params)
        disc_updates, disc_state = disc_tx.update(grads["disc"], state["disc"],
                                                  None if params is None else params["disc"])
        updates = {**gen_updates, "disc": disc_updates,
                   "disc_state": jax.tree.map(jnp.zeros_like, grads["disc_state"])}
        return updates, {"ae": ae_state, "disc": disc_state}

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything built from the config: model, loss, optimisers, mesh and the settings."""

    config: ml_collections.ConfigDict
    ae_config: AutoencoderConfig
    model: Any
    loss: AutoencoderLoss
    ae_tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    mesh: Any
    rules: Any
    train: AutoencoderTrainConfig
    data: pipeline.DataConfig
    lpips_vgg_path: str


def build_stage(config: ml_collections.ConfigDict) -> Stage:
    """Parses and checks every section of an autoencoder config (no data is read, nothing is allocated)."""
    train = common.section(AutoencoderTrainConfig, config, "train")
    options = common.run_options(train)
    ae_config = autoencoder_config(config.first_stage)
    loss_values = config.loss.to_dict()
    vgg_path = loss_values.pop("lpips_vgg_path", "")
    loss_config = build_dataclass(LossConfig, loss_values, where="loss")
    if loss_config.perceptual_weight > 0 and not vgg_path:
        log.warning("loss.lpips_vgg_path is not set: training WITHOUT the LPIPS perceptual loss (perceptual_weight "
                    "%g -> 0). LPIPS needs torchvision's VGG16 weights (vgg16-397923af.pth); pass "
                    "--config.loss.lpips_vgg_path=PATH to use it.", loss_config.perceptual_weight)
        loss_config = dataclasses.replace(loss_config, perceptual_weight=0.0)
    if loss_config.use_actnorm:
        raise ValueError("loss.use_actnorm=True needs a data-dependent discriminator init, which this stage does not "
                         "do; the LDM autoencoder configs use BatchNorm (use_actnorm=False)")
    if loss_config.disc_conditional:
        raise ValueError("loss.disc_conditional=True needs a conditioning image in every batch; the data pipeline "
                         "gives images only")
    mesh, rules = common.mesh_and_rules(config)
    data = common.data_config(config, ("image",))
    if data.resolution % ae_config.downsample_factor:
        raise ValueError(f"data.resolution {data.resolution} is not a multiple of the first stage's factor "
                         f"{ae_config.downsample_factor}")
    opt = common.section(AutoencoderOptimizerConfig, config, "optimizer")
    disc_base = opt.learning_rate if opt.disc_learning_rate is None else opt.disc_learning_rate
    lr, disc_lr = (optim.learning_rate(optim.OptimizerConfig(learning_rate=base, scale_lr=opt.scale_lr),
                                       global_batch_size=data.global_batch_size, num_devices=mesh.size)
                   for base in (opt.learning_rate, disc_base))
    log.info("autoencoder learning rate %.3g, discriminator %.3g%s", lr, disc_lr,
             f" (base rates x global batch {data.global_batch_size})" if opt.scale_lr else "")
    model = build_autoencoder(ae_config, attention=options.attention, remat=options.remat, dtype=options.dtype)
    loss = AutoencoderLoss(loss_config, kind=ae_config.kind, dtype=options.dtype)
    return Stage(config=config, ae_config=ae_config, model=model, loss=loss,
                 ae_tx=autoencoder_step.make_optimizer(lr), disc_tx=autoencoder_step.make_optimizer(disc_lr),
                 mesh=mesh, rules=rules, train=train, data=data, lpips_vgg_path=vgg_path)


def _uses_gan(stage: Stage) -> bool:
    return stage.loss.config.disc_factor > 0


def init_state(stage: Stage, key: jax.Array, *, abstract: bool = False) -> TrainState:
    """A fresh, sharded state (shape-first: nothing is built on the host); `abstract=True` gives only its
    shapes (jax.ShapeDtypeStructs), allocating nothing."""
    cfg, res = stage.ae_config, stage.data.resolution
    fp32_model = build_autoencoder(cfg)  # params are float32 whatever the compute dtype

    def init_params(k):
        k_ae, k_disc = jax.random.split(k)
        disc_input = jnp.zeros((1, res, res, stage.loss.config.disc_in_channels), jnp.float32)
        disc_params, disc_state = stage.loss.init_discriminator(k_disc, disc_input)
        return {"ae": init_autoencoder(fp32_model, k_ae)["params"], "logvar": stage.loss.init_logvar(),
                "disc": disc_params, "disc_state": disc_state}

    tx = paired_optimizer(stage.ae_tx, stage.disc_tx)
    if abstract:
        def create(key_data):
            return state_lib.create_train_state(init_params, tx=tx, key=jax.random.wrap_key_data(key_data),
                                                ema_decay=None)

        return jax.eval_shape(create, np.asarray(jax.random.key_data(key)))
    return state_lib.init_train_state(init_params, tx=tx, key=key, ema_decay=None, mesh=stage.mesh, rules=stage.rules)


def _as_step_state(stage: Stage, state: TrainState, lpips_params: Any) -> AutoencoderTrainState:
    p, o = state.params, state.opt_state
    return AutoencoderTrainState(step=state.step, ae_params=p["ae"], logvar=p["logvar"], lpips_params=lpips_params,
                                 disc_params=p["disc"], disc_state=p["disc_state"], ae_opt_state=o["ae"],
                                 disc_opt_state=o["disc"], model=stage.model, loss=stage.loss, ae_tx=stage.ae_tx,
                                 disc_tx=stage.disc_tx)


def make_train_step(stage: Stage, state: TrainState, lpips_params: Any):
    """The jitted `(state, batch, key) -> (state, metrics)` of one iteration (state donated).

    metrics: the generator's and discriminator's logs (total_loss, rec_loss, kl_loss / quant_loss, g_loss,
    d_weight, disc_loss, logits, grad and param norms); "loss" is total_loss, NaN when any gradient or
    parameter went non-finite (so the loop's guard stops the run).
    """
    gan = _uses_gan(stage)

    def step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, lpips: Any):
        s = _as_step_state(stage, state, lpips)
        if gan:
            s, metrics = autoencoder_step.train_step(s, batch, key)
        else:
            s, metrics = autoencoder_step.generator_step(s, batch, key)
            s = s.replace(step=s.step + 1)
        metrics = dict(metrics)
        finite = metrics.pop("finite")
        metrics["loss"] = jnp.where(finite, metrics["total_loss"], jnp.nan).astype(jnp.float32)
        params = {"ae": s.ae_params, "logvar": s.logvar, "disc": s.disc_params, "disc_state": s.disc_state}
        new = state.replace(step=s.step, params=params, opt_state={"ae": s.ae_opt_state, "disc": s.disc_opt_state})
        return new, {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}

    shardings = state_lib.shardings_of(state)
    rep = parallel.replicated(stage.mesh)
    lpips_sh = jax.tree.map(lambda _: rep, lpips_params)
    jitted = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(stage.mesh), rep, lpips_sh),
                     out_shardings=(shardings, rep), donate_argnums=0)
    return lambda state, batch, key: jitted(state, batch, key, lpips_params)


def reconstruct(stage: Stage, ae_params: Any, images: jax.Array) -> jax.Array:
    """Deterministic reconstructions (posterior mode / quantised), (B, H, W, C) float32 clipped to [-1, 1]."""
    variables = {"params": ae_params}
    if stage.ae_config.kind == "kl":
        recon, _ = stage.model.apply(variables, images, sample_posterior=False)
    else:
        recon, _, _ = stage.model.apply(variables, images)
    return jnp.clip(recon.astype(jnp.float32), -1.0, 1.0)


def _eval_images(stage: Stage) -> np.ndarray:
    """The fixed images of the reconstruction grids: the first `num_images` of eval_split (train if "")."""
    split = stage.train.eval_split or stage.data.split
    it = pipeline.make_iterator(common.eval_data_config(stage.data, split, stage.train.num_images))
    return next(it)["image"]


def _grid_hook(stage: Stage, workdir: pathlib.Path, images: np.ndarray, psnrs: list[float]) -> Hook:
    recon_fn = jax.jit(lambda p, x: reconstruct(stage, p, x))
    device_images = parallel.host_local_to_global(images, stage.mesh)

    def fn(state: TrainState, step: int):
        recon = common.host_copy(recon_fn(state.params["ae"], device_images))
        value = float(np.mean(psnr(images, recon)))
        psnrs.append(value)
        if jax.process_index() == 0:
            log.info("step %d: reconstruction PSNR %.2f dB on %d %s images", step, value, len(images),
                     stage.train.eval_split or "train")
            with open(workdir / "eval.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "psnr": value}) + "\n")
        return {"reconstructions": np.concatenate([images, recon])}

    return Hook(every_steps=stage.train.image_every, fn=fn)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Result:
    """Trains (or resumes) the autoencoder in `workdir`, then exports WORKDIR/autoencoder/."""
    stage = build_stage(config)
    train = stage.train
    if train.num_images % stage.mesh.size:
        raise ValueError(f"train.num_images {train.num_images} is not a multiple of the {stage.mesh.size} devices")
    lpips_params = None
    if stage.loss.config.perceptual_weight > 0:
        from ldm_jax.convert.lpips import load_lpips_params  # noqa: PLC0415 (reads torch files; only when used)

        lpips_params = jax.device_put(load_lpips_params(stage.lpips_vgg_path), parallel.replicated(stage.mesh))
    state = init_state(stage, jax.random.key(train.seed))
    train_step = make_train_step(stage, state, lpips_params)
    batches = pipeline.make_iterator(stage.data)
    psnrs: list[float] = []
    hooks = [_grid_hook(stage, workdir, _eval_images(stage), psnrs)]
    common.describe_outputs(workdir, "autoencoder", train.num_steps,
                            f"autoencoder:  {workdir / EXPORT_DIR} (written at the end)")
    state = train_loop(state, train_step, batches, num_steps=train.num_steps, workdir=workdir, mesh=stage.mesh,
                       checkpoint=common.checkpoint_config(config), config=config, log_every=train.log_every,
                       hooks=hooks, progress_bar=train.progress_bar)
    if not psnrs or train.num_steps % train.image_every:
        hooks[0].fn(state, train.num_steps)  # a final grid and PSNR of the exported weights
    export = workdir / EXPORT_DIR
    ae_params = common.host_copy(state.params["ae"])  # a collective: every process
    if jax.process_index() == 0:
        model_dir.write_first_stage_dir(export, stage.ae_config, ae_params)
        log.info("exported the autoencoder to %s (PSNR %.2f dB)", export, psnrs[-1])
    return Result(state=state, export_dir=export, psnr=psnrs[-1])
