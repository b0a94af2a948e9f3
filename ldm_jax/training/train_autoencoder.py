"""The "autoencoder" stage: a KL or VQ first stage trained with the adversarial-perceptual loss.

One train step is one iteration of the reference: a generator update of the autoencoder (Adam, betas 0.5 /
0.9), then a discriminator update with its own Adam on reconstructions from the updated autoencoder
(`ldm_jax.training.autoencoder_step.make_update`), both inside the one jitted, donated step that
`loop.make_train_step` builds for every stage. The GAN terms count from `loss.disc_start`; with
`loss.disc_factor == 0` the discriminator half is skipped altogether (it would only ever see a zero loss),
which saves its cost in GAN-free runs.

The state is the shared `TrainState` (params {"generator": {"autoencoder", "logvar"}, "discriminator"},
model_state {"discriminator": BatchNorm statistics}), initialised shape-first and sharded by the `mesh` rules
(`state.init_train_state`), with the optimiser path of the LDM stage: `optim.learning_rate` and
`optim.make_optimizer` per part, joined by `optim.partitioned`. So the loop checkpoints, resumes, guards NaNs
and logs it exactly as the LDM stage. LPIPS's frozen VGG params are an argument of the jitted step, not state.

LPIPS needs torchvision's real VGG16 weights: give `--config.loss.lpips_vgg_path=/path/vgg16-397923af.pth`.
Without it the perceptual weight is set to 0 and a warning says so (LPIPS with random VGG features would
train towards nonsense).

Config sections: first_stage (AutoencoderConfig), loss (LossConfig fields + lpips_vgg_path), optimizer
(`AutoencoderOptimizerConfig`: `optim.OptimizerConfig` with Adam's reference betas and a discriminator rate),
train (`AutoencoderTrainConfig`), data, checkpoint, mesh.
`train.max_train_seconds`: a wall-clock budget (`loop.TrainTime`); the export is written where it stops the run.
Outputs (besides the loop's): images/reconstructions_*.png (top rows inputs, bottom rows reconstructions),
a "psnr" line per grid in eval.jsonl, and WORKDIR/autoencoder/ (an autoencoder directory:
`ldm_jax.store.save_first_stage`, read back by `store.load_first_stage`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_jax import parallel, store
from ldm_jax.config import build_dataclass
from ldm_jax.data import pipeline
from ldm_jax.losses.autoencoder_loss import AutoencoderLoss, LossConfig
from ldm_jax.metrics.image_quality import psnr
from ldm_jax.models.autoencoder import AutoencoderConfig, autoencoder_config, build_autoencoder
from ldm_jax.training import autoencoder_step, optim
from ldm_jax.training import main as common
from ldm_jax.training import state as state_lib
from ldm_jax.training.checkpoint import saved_steps
from ldm_jax.training.loop import Hook, host_copy, make_train_step, train_loop
from ldm_jax.training.state import TrainState

log = logging.getLogger("ldm_jax.train")
EXPORT_DIR = "autoencoder"


@dataclasses.dataclass(frozen=True)
class AutoencoderOptimizerConfig(optim.OptimizerConfig):
    """The `optimizer` section: `optim.OptimizerConfig` with the reference's autoencoder defaults (Adam with
    betas 0.5 / 0.9, no weight decay, base rate 4.5e-6 per example with scale_lr: times the global batch),
    for both the generator and the discriminator; disc_learning_rate: the discriminator's base rate (None:
    the same). accumulate_grad_batches must be 1 (an iteration's two updates each see the whole batch)."""

    learning_rate: float = 4.5e-6
    b1: float = 0.5
    b2: float = 0.9
    weight_decay: float = 0.0
    disc_learning_rate: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.disc_learning_rate is not None and not self.disc_learning_rate >= 0:
            raise ValueError(f"optimizer.disc_learning_rate={self.disc_learning_rate}; expected >= 0 or None (the "
                             "generator's)")
        if self.accumulate_grad_batches != 1:
            raise ValueError(f"optimizer.accumulate_grad_batches={self.accumulate_grad_batches}: the autoencoder "
                             "stage updates on whole batches (use 1)")


@dataclasses.dataclass(frozen=True)
class AutoencoderTrainConfig(common.TrainConfig):
    """The `train` section (`main.TrainConfig`'s fields; num_steps counts generator + discriminator
    iterations, image_every / num_images are the reconstruction grids')."""

    image_every: int = 500
    num_images: int = 8


@dataclasses.dataclass(frozen=True)
class Result:
    """What the stage returns: the final state, the export directory and the last grid's PSNR (dB)."""

    state: TrainState
    export_dir: pathlib.Path
    psnr: float


def make_optimizer(cfg: AutoencoderOptimizerConfig, *, global_batch_size: int, num_devices: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule, tuple[float, float]]:
    """(tx, the generator's schedule, (generator, discriminator) peak rates): `optim.partitioned`
    {"generator": `optim.make_optimizer` at the generator's peak rate, "discriminator": the same at the
    discriminator's}; the peak rates by `optim.learning_rate`, as in the LDM stage."""
    disc_cfg = dataclasses.replace(cfg, learning_rate=cfg.learning_rate if cfg.disc_learning_rate is None
                                   else cfg.disc_learning_rate)
    peaks = tuple(optim.learning_rate(c, global_batch_size=global_batch_size, num_devices=num_devices)
                  for c in (cfg, disc_cfg))
    (gen_tx, schedule), (disc_tx, _) = (optim.make_optimizer(c, peak) for c, peak in zip((cfg, disc_cfg), peaks))
    return optim.partitioned({"generator": gen_tx, "discriminator": disc_tx}), schedule, peaks


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything built from the config: model, loss, optimiser, mesh and the settings."""

    config: ml_collections.ConfigDict
    ae_config: AutoencoderConfig
    model: Any
    loss: AutoencoderLoss
    tx: optax.GradientTransformation
    schedule: optax.Schedule
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
    if not ae_config.has_params:
        raise ValueError(f"first_stage.kind={ae_config.kind!r} has no params: there is no autoencoder to train (a "
                         f"pixel-space LDM uses it directly, stage 'ldm')")
    loss_values = config.loss.to_dict()
    vgg_path = loss_values.pop("lpips_vgg_path", "")
    loss_config = build_dataclass(LossConfig, loss_values, where="loss")
    if loss_config.perceptual_weight > 0 and not vgg_path:
        log.warning("loss.lpips_vgg_path is not set: training WITHOUT the LPIPS perceptual loss (perceptual_weight "
                    "%g -> 0). LPIPS needs torchvision's VGG16 weights (vgg16-397923af.pth); pass "
                    "--config.loss.lpips_vgg_path=PATH to use it.", loss_config.perceptual_weight)
        loss_config = dataclasses.replace(loss_config, perceptual_weight=0.0)
    if loss_config.disc_conditional:
        raise ValueError("loss.disc_conditional=True needs a conditioning image in every batch; the data pipeline "
                         "gives images only")
    mesh, rules = common.mesh_and_rules(config)
    if train.num_images % mesh.size:
        raise ValueError(f"train.num_images {train.num_images} is not a multiple of the {mesh.size} devices")
    data = common.data_config(config, ("image",))
    if data.resolution % ae_config.downsample_factor:
        raise ValueError(f"data.resolution {data.resolution} is not a multiple of the first stage's factor "
                         f"{ae_config.downsample_factor}")
    opt = common.section(AutoencoderOptimizerConfig, config, "optimizer")
    tx, schedule, (lr, disc_lr) = make_optimizer(opt, global_batch_size=data.global_batch_size,
                                                 num_devices=mesh.size)
    log.info("autoencoder learning rate %.3g, discriminator %.3g%s", lr, disc_lr,
             f" (base rates x global batch {data.global_batch_size})" if opt.scale_lr else "")
    model = build_autoencoder(ae_config, attention=options.attention, remat=options.remat, dtype=options.dtype)
    loss = AutoencoderLoss(loss_config, kind=ae_config.kind, dtype=options.dtype)
    if loss_config.use_actnorm:
        raise ValueError("loss.use_actnorm=True needs a data-dependent discriminator init, which this stage does not "
                         "do; the LDM autoencoder configs use BatchNorm (use_actnorm=False)")
    common.checkpoint_config(config)  # checked now, used by the loop
    return Stage(config=config, ae_config=ae_config, model=model, loss=loss, tx=tx, schedule=schedule,
                 mesh=mesh, rules=rules, train=train, data=data, lpips_vgg_path=vgg_path)


def check_inputs(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Cheap checks, before the stage is built, that what the config names is there: the data (`main.check_data`)
    and loss.lpips_vgg_path when given. ConfigError / ValueError / OSError naming the config field."""
    del workdir  # nothing of a previous run replaces an input of this stage
    train = common.section(AutoencoderTrainConfig, config, "train")
    common.check_data(common.section(pipeline.DataConfig, config, "data"), train.eval_split)
    vgg = config.loss.get("lpips_vgg_path", "") if "loss" in config else ""
    if vgg and not pathlib.Path(vgg).is_file():
        raise FileNotFoundError(f"loss.lpips_vgg_path {vgg} is not a file (torchvision's vgg16-397923af.pth)")


def init_state(stage: Stage, key: jax.Array, *, abstract: bool = False) -> TrainState:
    """A fresh, sharded state (shape-first: nothing is built on the host); `abstract=True` gives only its
    shapes and shardings (jax.ShapeDtypeStructs, a restore target), compiling, running and allocating nothing."""
    fp32_model = build_autoencoder(stage.ae_config)  # params are float32 whatever the compute dtype

    def init_variables(k):
        return autoencoder_step.init_variables(fp32_model, stage.loss, k, resolution=stage.data.resolution)

    return state_lib.init_train_state(init_variables, key=key, tx=stage.tx, ema_decay=None, with_model_state=True,
                                      mesh=stage.mesh, rules=stage.rules, abstract=abstract)


def reconstruct(stage: Stage, ae_params: Any, images: jax.Array) -> jax.Array:
    """Deterministic reconstructions (posterior mode / quantised), (B, H, W, C) float32 clipped to [-1, 1]."""
    recon, _ = autoencoder_step.reconstruct(stage.model, ae_params, images)
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
        recon = host_copy(recon_fn(state.params["generator"]["autoencoder"], device_images))
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
    stage = common.build_stage(build_stage, config)
    train = stage.train
    batches = common.user_input("data", pipeline.make_iterator, stage.data)  # before any params: fails fast
    eval_images = common.user_input(f"train.eval_split={train.eval_split!r}", _eval_images, stage)
    lpips_params = None
    if stage.loss.config.perceptual_weight > 0:
        from ldm_jax.convert.lpips import load_lpips_params  # noqa: PLC0415 (reads torch files; only when used)

        vgg = common.user_input("loss.lpips_vgg_path", load_lpips_params, stage.lpips_vgg_path)
        lpips_params = jax.device_put(vgg, parallel.replicated(stage.mesh))
    # A resumed run restores every array: it builds only the restore target (no init is compiled or run).
    resume = bool(saved_steps(workdir / "checkpoints"))
    state = init_state(stage, jax.random.key(train.seed), abstract=resume)
    train_step = make_train_step(update_fn=autoencoder_step.make_update(stage.model, stage.loss), mesh=stage.mesh,
                                 state_shardings=state_lib.shardings_of(state), learning_rate_fn=stage.schedule,
                                 frozen=lpips_params)
    psnrs: list[float] = []
    hooks = [_grid_hook(stage, workdir, eval_images, psnrs)]
    common.describe_outputs(workdir, "autoencoder", train.num_steps,
                            f"autoencoder:  {workdir / EXPORT_DIR} (written at the end)")
    state = train_loop(state, train_step, batches, num_steps=train.num_steps, workdir=workdir, mesh=stage.mesh,
                       checkpoint=common.checkpoint_config(config), config=config, log_every=train.log_every,
                       hooks=hooks, progress_bar=train.progress_bar, prefetch=stage.data.prefetch,
                       max_train_seconds=train.max_train_seconds)
    final = int(parallel.fetch_replicated(state.step))  # num_steps, or where train.max_train_seconds stopped it
    if not psnrs or final % train.image_every:
        hooks[0].fn(state, final)  # a final grid and PSNR of the exported weights
    export = workdir / EXPORT_DIR
    ae_params = host_copy(state.params["generator"]["autoencoder"])  # a collective: every process
    if jax.process_index() == 0:
        store.save_first_stage(export, stage.ae_config, ae_params)
        log.info("exported the autoencoder to %s (PSNR %.2f dB)", export, psnrs[-1])
    return Result(state=state, export_dir=export, psnr=psnrs[-1])
