"""The "ldm" stage: the latent diffusion model trained on a frozen first stage, and its export.

What trains: the UNet, the cond stage when `train.train_cond_stage` (the captioned-shapes and txt2img-1p4B
text transformers are trained jointly; SD's CLIP stays frozen), and the per-timestep logvar when learned.
Everything else (the first stage, a frozen cond stage) is a frozen input of the jitted step
(`loop.make_train_step(frozen=...)`), sharded by the same `mesh` rules, never in the optimiser. Trained params
sharded over "fsdp" are all-gathered where the step uses them and their gradients reduce-scattered (ZeRO-3; a
no-op for replicated params): the params, AdamW moments and EMA stay sharded between steps. The loss is
`ldm.training_loss` (conditioning dropout for classifier-free guidance with `ldm.cond_drop_prob`); the
optimiser is AdamW with linear warm-up and gradient clipping in one optax chain (`optim`), with the reference's
lr scaling rule (`optimizer.scale_lr`) and gradient accumulation (`optimizer.accumulate_grad_batches`
micro-batches per update); EMA of the trained params with LitEma's warm-up (`train.ema_decay`, None = off);
bf16 compute with `train.dtype="bfloat16"` (params, norms, softmax and the loss stay float32); remat with
`train.remat`, the attention implementation with `train.attention` (run-time options, `ldm.RunOptions`).

Where the params start, all read through the model store (`ldm_jax.store`): `train.init_from` (any
`store.load_model` source: a model directory, a diffusers folder, a CompVis .ckpt / .safetensors file with the
config's architecture, or a shipped model's name: every part, e.g. SD for fine-tuning) or, without it, a fresh
UNet (and cond stage) on the autoencoder of `train.first_stage` (`store.load_first_stage`: an autoencoder
directory, the autoencoder stage's workdir, or any whole model). The frozen params are copied into
WORKDIR/frozen_params.safetensors (`store.save_params`) on the first start, so resuming and exporting need
nothing outside the workdir. A pixel-space LDM (`first_stage.kind="identity"`, the paper's LDM-1) has no
first-stage params: it needs neither train.first_stage (giving one is an error) nor any frozen params unless its
cond stage is frozen; everything below (scale_by_std, precomputed "latents", which are then the images, the export)
works on it unchanged.

SDXL-shaped models (`ldm.LDMConfig.structured_conditioning`: a second text tower, a "text_time" UNet; e.g.
configs/sdxl_finetune.py): the batches hold both towers' ids ("tokens", "tokens_2": each tower's tokenizer, pad
id and length) and each image's "original_size" / "crop_top_left" as the data pipeline recorded them when it
resized and cropped (`batch_keys`); `ldm.training_loss` builds the micro-conditioning from them (the target size
is the training resolution; a refiner's aesthetic score is `train.aesthetic_score`) and drops the text of an
example to zeros (`diffusion.force_zeros_for_empty_prompt`) or to the empty prompt. The tokenizers are
train.tokenizer / train.tokenizer_2, or those of train.init_from (a model directory or diffusers folder),
copied into WORKDIR/tokenizer and WORKDIR/tokenizer_2 on the first start; `train.train_cond_stage` trains both
towers or neither. The export keeps both tokenizers.

scale_by_std (`ldm.scale_by_std=True`): on a fresh start, scale_factor = 1 / std of the first training batch's
latents (posterior samples); it is written into the config that every checkpoint stores, and a resumed run
takes it from there.

Precomputed latents (`train.precompute_latents`): one pass over the training split stores the first stage's
moments (KL mean and logvar, or VQ's h) and the token ids in WORKDIR/latents/ (reused when present); training
then reads those (the same `pipeline.DataIterator` over a `readers.ArraySource`: the same example order and
checkpointable position as the images) and samples the posterior in the step exactly as encoding would.

Periodic sample grids (`train.image_every`): txt2img (`ldm_jax.pipeline`, `train.sampler` with
`train.sample_steps` steps, guidance `train.guidance_scale`) from the EMA params for the first
`train.num_images` captions (or labels) of `train.eval_split`; PNG + TensorBoard; with `train.check_shapes`
each grid is also scored by the captioned-shapes checker (eval.jsonl and the log).

Adapters (`train.adapter`, `ldm_jax.training.adapters`): "lora" trains LoRA factors, "textual_inversion" a new
token's rows, with the whole base model (train.init_from) frozen: the trained params are {"lora": factors} or
{"embeddings": {tower: rows}}, the loss merges them into the frozen params (`Adapter.merge`), and the same loop,
mesh, checkpoints and EMA run. They export WORKDIR/lora.safetensors or WORKDIR/learned_embeds.safetensors (and
the merged model with train.export_merged); "controlnet" trains a ControlNet ({"controlnet": tree}, options in
train.controlnet, `ldm_jax.training.controlnet`) on batches that add "control" images (data.control_key), the UNet
called with its residuals, and exports WORKDIR/controlnet/ (a diffusers ControlNet folder); its sample grids steer
the trained ControlNet with the eval examples' control images (logged beside them). DreamBooth (`train.dreambooth`,
`ldm_jax.training.dreambooth`): instance images with an instance prompt or their own captions, class images
generated by the base model before training, the prior-preservation loss through per-example loss weights; full
fine-tune or LoRA.

Wall-clock budget (`train.max_train_seconds`, `loop.TrainTime`): the run ends at the step where the workdir's
cumulative training time reaches it, with a checkpoint and the export as at num_steps; rerun with a larger budget
to continue.

Export: WORKDIR/model/ at the end (`store.save_model`: a model directory with config.json, params.safetensors
holding the EMA weights, tokenizer/); `export_model(workdir, out_dir)` does the same from the latest checkpoint
of any run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax import ldm, parallel, pipeline as sampling, store
from ldm_jax.control import Control
from ldm_jax.data import pipeline, readers
from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.models.autoencoder import autoencoder_config
from ldm_jax.models.tokenizer import load_tokenizer, save_tokenizer, tokenize
from ldm_jax.training import adapters as adapter_lib
from ldm_jax.training import controlnet as controlnet_lib
from ldm_jax.training import dreambooth
from ldm_jax.training import main as common
from ldm_jax.training import optim
from ldm_jax.training import state as state_lib
from ldm_jax.training.checkpoint import ITEMS, restore_failure, sync_processes
from ldm_jax.training.loop import Hook, host_copy, make_train_step, train_loop
from ldm_jax.training.state import TrainState

log = logging.getLogger("ldm_jax.train")
EXPORT_DIR = "model"
FROZEN_FILE = "frozen_params.safetensors"
TOKENIZER_DIR = "tokenizer"
LATENTS_DIR = "latents"
SHAPES_TOKENIZER = "shapes"


@dataclasses.dataclass(frozen=True)
class LDMTrainConfig(common.TrainConfig):
    """The `train` section of an LDM config: `main.TrainConfig`'s fields (image_every / num_images are the
    sample grids') and the LDM's (see the module doc for what each part does). first_stage / init_from: where
    params come from. tokenizer: a tokenizer directory, "shapes" (train the captioned-shapes word-level
    tokenizer into WORKDIR/tokenizer), "" (no text, or the tokenizer of train.init_from), or for two-tower models
    a folder holding tokenizer/ and tokenizer_2/ (what the store reads an SGM single file's towers with);
    tokenizer_2: the second text tower's (SDXL's tokenizer_2) directory or "" (train.init_from's). sample_posterior: False trains
    on the KL posterior's mean. train_cond_stage: train the text tower(s) with the UNet (SDXL: both towers, or
    neither). aesthetic_score: the micro-conditioning score of a refiner-shaped UNet (5 time ids) for data
    without per-example scores (`ldm.micro_conditioning`).
    adapter: "none", "lora" (train.lora), "textual_inversion" (train.textual_inversion) or "controlnet"
    (train.controlnet): what trains beside the frozen base model (`adapters`; needs train.init_from). frozen_dtype: "float32" or "bfloat16", the dtype
    the frozen UNet / text towers are held in on the devices (the first stage stays float32). export_merged: an
    adapter run also exports the merged model directory WORKDIR/model/. dreambooth: DreamBooth with prior
    preservation (`dreambooth`; on when train.dreambooth.instance_prompt is set or instance_captions true).
    """

    first_stage: str = ""
    init_from: str = ""
    tokenizer: str = ""
    tokenizer_2: str = ""
    train_cond_stage: bool = True
    ema_decay: float | None = 0.9999
    precompute_latents: bool = False
    sample_posterior: bool = True
    sampler: str = "ddim"
    sample_steps: int = 50
    guidance_scale: float = 5.0
    check_shapes: bool = False
    aesthetic_score: float = ldm.DEFAULT_AESTHETIC_SCORE
    adapter: str = "none"
    lora: adapter_lib.LoraTrainConfig = adapter_lib.LoraTrainConfig()
    textual_inversion: adapter_lib.TextualInversionTrainConfig = adapter_lib.TextualInversionTrainConfig()
    frozen_dtype: str = "float32"
    export_merged: bool = False
    dreambooth: dreambooth.DreamBoothConfig = dreambooth.DreamBoothConfig()
    controlnet: controlnet_lib.ControlNetTrainConfig = controlnet_lib.ControlNetTrainConfig()

    def __post_init__(self):
        super().__post_init__()
        if self.adapter not in adapter_lib.ADAPTERS:
            raise ValueError(f"train.adapter={self.adapter!r}; expected one of {adapter_lib.ADAPTERS}")
        if self.frozen_dtype not in adapter_lib.FROZEN_DTYPES:
            raise ValueError(f"train.frozen_dtype={self.frozen_dtype!r}; expected one of "
                             f"{sorted(adapter_lib.FROZEN_DTYPES)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"train.sampler={self.sampler!r}; expected one of {sorted(SAMPLERS)}")
        if self.sample_steps < 1:
            raise ValueError(f"train.sample_steps={self.sample_steps}; expected >= 1")


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything built from the config (nothing allocated). `config` is the run's ConfigDict, with the
    resolved scale_factor once known."""

    config: ml_collections.ConfigDict
    model: ldm.LDMConfig
    train: LDMTrainConfig
    data: pipeline.DataConfig
    optimizer: optim.OptimizerConfig
    mesh: Any
    rules: Any
    options: ldm.RunOptions
    tokenizer: Any
    tokenizer_dir: pathlib.Path | None
    trainable: tuple[str, ...]
    tokenizer_2: Any = None
    tokenizers_from_init: bool = False
    adapter: adapter_lib.Adapter = adapter_lib.Adapter()

    @property
    def frozen_names(self) -> tuple[str, ...]:
        """The LDM param parts that are inputs, not trained (with an adapter: every part)."""
        names = ["first_stage"] if self.model.first_stage.has_params else []  # (the identity has no params)
        names += [n for n in ("cond_stage", "cond_stage_2") if getattr(self.model, n) is not None]
        if self.train.adapter != "none":
            names += ["unet"] + (["logvar"] if self.model.diffusion.learn_logvar else [])
        return tuple(n for n in names if n not in self.trainable)


@dataclasses.dataclass(frozen=True)
class Result:
    """What the stage returns: the final state, the export directory (None when an adapter run exported only its
    adapter file), the last grid's checker scores and the adapter files written (`adapters.write_adapter_files`)."""

    state: TrainState
    export_dir: pathlib.Path | None
    adherence: dict[str, float] | None
    adapter_files: tuple[pathlib.Path, ...] = ()


# -------------------------------------------------------------------------------------------- the stage


def build_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Stage:
    """Parses and checks every section; prepares the tokenizer (WORKDIR/tokenizer for "shapes")."""
    train = common.section(LDMTrainConfig, config, "train")
    model = ldm.ldm_config(config)
    if train.ema_decay is not None and not 0.0 < train.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={train.ema_decay}; expected a value in (0, 1) or None (EMA off)")
    keys = batch_keys(model)
    if keys is None:
        raise ValueError(f"the ldm stage trains conditioning_key crossattn, adm or None (unconditional); got "
                         f"{model.diffusion.conditioning_key!r} (concat/hybrid models need mask or concat inputs "
                         f"the data pipeline does not make)")
    if train.adapter == "controlnet":
        keys += ("control",)
    data = common.data_config(config, keys)
    if train.adapter == "controlnet":
        controlnet_lib.check(train, data, model)
    if train.precompute_latents and (data.random_flip or data.crop == "random"):
        raise ValueError("train.precompute_latents encodes each image once: data.random_flip / data.crop='random' "
                         "would never change it (turn them off, or train on images)")
    if train.first_stage and not model.first_stage.has_params:
        raise ValueError(f"train.first_stage={train.first_stage!r} but first_stage.kind={model.first_stage.kind!r} "
                         f"has no params to load (a pixel-space model): leave train.first_stage empty")
    f = model.downsample_factor
    if data.resolution % f:
        raise ValueError(f"data.resolution {data.resolution} is not a multiple of the first stage's factor {f}")
    if train.dreambooth.enabled:
        dreambooth.check(train, data, model)
    trainable = _trainable_parts(model, train)
    tokenizers = _tokenizers(model, train, workdir)
    mesh, rules = common.mesh_and_rules(config)
    if train.num_images % mesh.size:
        raise ValueError(f"train.num_images {train.num_images} is not a multiple of the {mesh.size} devices")
    common.checkpoint_config(config)  # checked now, used by the loop
    return Stage(config=config, model=model, train=train, data=data,
                 optimizer=common.section(optim.OptimizerConfig, config, "optimizer"), mesh=mesh, rules=rules,
                 options=common.run_options(train), trainable=tuple(trainable), **tokenizers)


def _trainable_parts(model: ldm.LDMConfig, train: LDMTrainConfig) -> list[str]:
    """The keys of the trained params: the parts the stage trains, or the adapter's one key ("lora" /
    "embeddings"). ValueError naming the train field for an adapter recipe that cannot run (checked on shapes
    only: nothing is loaded)."""
    if train.adapter == "none":
        trainable = ["unet"]
        if train.train_cond_stage:
            trainable += [name for name in ("cond_stage", "cond_stage_2") if getattr(model, name) is not None]
        return trainable + (["logvar"] if model.diffusion.learn_logvar else [])
    what = f"train.adapter={train.adapter!r}"
    if model.diffusion.scale_by_std:
        raise ValueError(f"{what} adapts a trained model, whose latent scale is its own: set diffusion.scale_by_std="
                         f"false (and diffusion.scale_factor to the model's)")
    if not train.init_from:
        raise ValueError(f"{what} adapts a trained model: set train.init_from (a model directory, diffusers folder, "
                         f"single file or 'shapes')")
    if train.train_cond_stage:
        hint = " (LoRA on the text encoder: add 'cond_stage' to train.lora.sections)" if train.adapter == "lora" else ""
        raise ValueError(f"train.train_cond_stage=True trains whole text towers; with {what} set it to false{hint}")
    if train.adapter == "lora":
        adapter_lib.lora_modules(adapter_lib.shape_tree(model), train.lora)
    elif train.adapter == "textual_inversion":
        if not model.text_towers:
            raise ValueError(f"{what} needs a text-to-image model (this one has no text tower)")
        train.textual_inversion.check()
    return [adapter_lib.TRAINED_KEY[train.adapter]]


def batch_keys(model: ldm.LDMConfig) -> tuple[str, ...] | None:
    """The batch keys the ldm stage trains `model` on (`data.batch_keys` must be exactly these), or None when
    the stage cannot train its conditioning_key. SDXL-shaped models: both towers' ids and, for "text_time" UNets,
    each image's original size and crop offsets (`ldm_jax.data.pipeline`)."""
    key = model.diffusion.conditioning_key
    if key == "crossattn" and model.structured_conditioning:
        return ("image", "tokens") + (("tokens_2",) if model.cond_stage_2 is not None else ()) + (
            pipeline.GEOMETRY_KEYS if model.text_time else ())
    return {"crossattn": ("image", "tokens") if model.tokenizer_kind else ("image", "label"),
            "adm": ("image", "label"), None: ("image",)}.get(key)


def _tokenizers(model: ldm.LDMConfig, train: LDMTrainConfig, workdir: pathlib.Path) -> dict[str, Any]:
    """Stage fields tokenizer, tokenizer_dir, tokenizer_2 and tokenizers_from_init for the model's text towers.

    Each tower's tokenizer is, in order: the directory train.tokenizer / train.tokenizer_2 names ("shapes" trains
    the captioned-shapes tokenizer into WORKDIR/tokenizer; for a two-tower model train.tokenizer may instead be a
    folder holding tokenizer/ and tokenizer_2/, as `store.load_model` takes for an SGM single file); the copy in
    WORKDIR/tokenizer(_2) that a run from train.init_from made on its first start; else the init model's own
    (tokenizers_from_init: `with_init_tokenizers` adds them once train.init_from is loaded). Each is checked
    against its tower's vocabulary.
    """
    out: dict[str, Any] = dict(tokenizer=None, tokenizer_dir=None, tokenizer_2=None, tokenizers_from_init=False)
    towers = {"cond_stage": ("tokenizer", train.tokenizer, TOKENIZER_DIR),
              "cond_stage_2": ("tokenizer_2", train.tokenizer_2, store.TOKENIZER_2_DIR)}
    for name, (field, given, _) in towers.items():
        if given and name not in model.text_towers:
            raise ValueError(f"train.{field}={given!r} but the model has no text tower {name}")
    folder = _tokenizers_folder(model, train)
    if folder is not None:
        towers = {"cond_stage": ("tokenizer", str(folder / TOKENIZER_DIR), TOKENIZER_DIR),
                  "cond_stage_2": ("tokenizer_2", train.tokenizer_2 or str(folder / store.TOKENIZER_2_DIR),
                                   store.TOKENIZER_2_DIR)}
    for name in model.text_towers:
        field, given, copy = towers[name]
        kind = getattr(model, name).tokenizer_kind
        if given == SHAPES_TOKENIZER and name == "cond_stage":
            directory = workdir / TOKENIZER_DIR
            if not (directory / "tokenizer.json").is_file() and jax.process_index() == 0:
                from ldm_jax.data.train_tokenizer import train_tokenizer  # noqa: PLC0415

                train_tokenizer(directory)
            sync_processes("tokenizer")
        elif given:
            directory = pathlib.Path(given)
        elif train.init_from and (workdir / copy).is_dir():
            directory = workdir / copy
        elif train.init_from:
            out["tokenizers_from_init"] = True
            continue
        else:
            raise ValueError(f"a text model needs train.{field} (the {name} tower's tokenizer directory"
                             + (", or 'shapes' for the captioned-shapes word-level tokenizer" if name == "cond_stage"
                                else "") + "), or train.init_from a model directory or diffusers folder holding it")
        tokenizer = load_tokenizer(directory, kind)
        _check_vocabulary(tokenizer, model, name, str(directory))
        out[field] = tokenizer
        if name == "cond_stage":
            out["tokenizer_dir"] = directory
    return out


def _tokenizers_folder(model: ldm.LDMConfig, train: LDMTrainConfig) -> pathlib.Path | None:
    """train.tokenizer when it is a folder holding tokenizer/ (and tokenizer_2/) for a two-tower model, else None."""
    given = train.tokenizer
    if model.cond_stage_2 is None or not given or given == SHAPES_TOKENIZER:
        return None
    return pathlib.Path(given) if (pathlib.Path(given) / TOKENIZER_DIR).is_dir() else None


def _store_tokenizer(stage: Stage) -> pathlib.Path | None:
    """The `tokenizer` argument `store.load_model` reads a single file's towers with: train.tokenizer's folder of
    both (two-tower models), else the first tower's directory."""
    return _tokenizers_folder(stage.model, stage.train) or stage.tokenizer_dir


def _check_vocabulary(tokenizer: Any, model: ldm.LDMConfig, name: str, where: str) -> None:
    vocab = getattr(model, name).vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer in {where} has {len(tokenizer)} tokens; {name}.vocab_size is {vocab}")


def with_init_tokenizers(stage: Stage, init_model: ldm.LoadedModel, workdir: pathlib.Path) -> Stage:
    """The stage with the tokenizers of the loaded train.init_from model for the towers that have none yet
    (`stage.tokenizers_from_init`), copied into WORKDIR/tokenizer(_2) (so a resumed run and `export_model` need
    nothing outside the workdir)."""
    if not stage.tokenizers_from_init:
        return stage
    fields = {"cond_stage": "tokenizer", "cond_stage_2": "tokenizer_2"}
    missing = {name: tok for name, tok in init_model.tokenizers().items() if getattr(stage, fields[name]) is None}
    for name, tokenizer in missing.items():
        if tokenizer is None:
            raise ValueError(f"train.init_from={stage.train.init_from!r} has no tokenizer for the text tower {name}; "
                             f"give train.{fields[name]}")
        _check_vocabulary(tokenizer, stage.model, name, stage.train.init_from)
    if jax.process_index() == 0:
        for name, tokenizer in missing.items():
            directory = workdir / (store.TOKENIZER_2_DIR if name == "cond_stage_2" else TOKENIZER_DIR)
            save_tokenizer(tokenizer, directory, getattr(stage.model, name).max_length)
    sync_processes("tokenizers")
    changes: dict[str, Any] = {fields[name]: tokenizer for name, tokenizer in missing.items()}
    if "cond_stage" in missing:
        changes["tokenizer_dir"] = workdir / TOKENIZER_DIR
    return dataclasses.replace(stage, tokenizers_from_init=False, **changes)


def with_scale_factor(stage: Stage, value: float) -> Stage:
    """The stage with `diffusion.scale_factor = value`, in its LDMConfig and in the config it saves."""
    config = ml_collections.ConfigDict(stage.config.to_dict())  # an unlocked copy
    config.diffusion.scale_factor = float(value)
    config.lock()
    model = dataclasses.replace(stage.model, diffusion=dataclasses.replace(stage.model.diffusion,
                                                                          scale_factor=float(value)))
    return dataclasses.replace(stage, config=config, model=model)


# ------------------------------------------------------------------------------------------------- params


def load_pretrained(source: str | os.PathLike, config: ldm.LDMConfig, *,
                    tokenizer: str | os.PathLike | None = None) -> dict[str, Any]:
    """Every LDM param of a `store.load_model` source, checked against `config`'s shapes (a ConversionError
    names the first that does not fit). A single file is read with `config` as its architecture (and
    `tokenizer`, the local tokenizer directory, for a text model); other sources carry their own config."""
    return load_init_model(source, config, tokenizer=tokenizer).params


def load_init_model(source: str | os.PathLike, config: ldm.LDMConfig, *,
                    tokenizer: str | os.PathLike | None = None) -> ldm.LoadedModel:
    """`load_pretrained` returning the whole `ldm.LoadedModel` (its tokenizers too), params checked."""
    single_file = store.detect_format(source) == "compvis"
    model = store.load_model(source, config=config if single_file else None,
                             tokenizer=tokenizer if single_file else None)
    params = store.check_params(model.params, store.param_shapes(config), source=str(source))
    return dataclasses.replace(model, params=params)


def _first_stage_source(first_stage: str) -> pathlib.Path:
    """train.first_stage as a `store.load_first_stage` source (the autoencoder stage's workdir -> its export)."""
    if not first_stage:
        raise ValueError("train.first_stage is required without train.init_from: the autoencoder directory "
                         "(or autoencoder workdir) the LDM is trained on")
    path = pathlib.Path(first_stage)
    from ldm_jax.training.train_autoencoder import EXPORT_DIR  # noqa: PLC0415

    return path / EXPORT_DIR if (path / EXPORT_DIR / store.CONFIG_FILE).is_file() else path


def _first_stage_params(stage: Stage) -> dict[str, Any]:
    _, params = store.load_first_stage(_first_stage_source(stage.train.first_stage), expected=stage.model.first_stage)
    return params


def check_inputs(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Cheap checks, before the stage is built, that what the config names is there: the data (`main.check_data`;
    not when its precomputed latents are cached) and the source of train.init_from / train.first_stage (not
    when the workdir already holds the frozen params: a resumed run reads neither). ConfigError / ValueError /
    OSError naming the config field."""
    train = common.section(LDMTrainConfig, config, "train")
    data = common.section(pipeline.DataConfig, config, "data")
    if train.dreambooth.enabled:
        common.user_input("train.dreambooth: the instance images", pipeline.check_source,
                          dreambooth.instance_data(data, train.dreambooth))
    elif not (train.precompute_latents and latents_cache(workdir, data.split).is_file()):
        common.check_data(data, train.eval_split)
    if (workdir / FROZEN_FILE).is_file():
        return
    if train.init_from:
        common.user_input(f"train.init_from={train.init_from!r}", store.detect_format, train.init_from)
    elif train.first_stage and autoencoder_config(config.first_stage).has_params:
        # (none given: `frozen_params` says it is required, once the stage is built; one given for a first stage
        # without params: `build_stage` refuses it)
        source = _first_stage_source(train.first_stage)
        common.user_input(f"train.first_stage={train.first_stage!r}", store.detect_format, source)


def frozen_params(stage: Stage, workdir: pathlib.Path, pretrained: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The frozen parts as numpy arrays: WORKDIR's copy when present, else from their sources (`pretrained`,
    the params of train.init_from when already loaded), then copied into WORKDIR. None at all (a pixel-space
    model training its cond stage): {} and no copy."""
    names = stage.frozen_names
    if not names:
        return {}
    shapes = {p: s for p, s in store.param_shapes(stage.model).items() if p[0] in names}
    copy = workdir / FROZEN_FILE
    if copy.is_file():
        return store.load_params(copy, shapes, source=str(copy))
    if stage.train.init_from:
        if pretrained is None:
            pretrained = load_pretrained(stage.train.init_from, stage.model, tokenizer=_store_tokenizer(stage))
        frozen = {name: pretrained[name] for name in names}
    else:
        if names != ("first_stage",):
            raise ValueError(f"the frozen parts {names} need train.init_from (only the first stage comes from "
                             f"train.first_stage)")
        frozen = {"first_stage": _first_stage_params(stage)}
    if jax.process_index() == 0:
        store.save_params(copy, frozen)
    sync_processes("frozen")
    return frozen


def _trainable_of(params: Mapping[str, Any], stage: Stage) -> dict[str, Any]:
    return {name: params[name] for name in stage.trainable}


def init_state(stage: Stage, key: jax.Array, *, pretrained: Mapping[str, Any] | None = None,
               abstract: bool = False) -> TrainState:
    """The sharded train state: fresh (random trained parts), from `pretrained` numpy params, or only its
    shapes and shardings (`abstract=True`, a restore target that allocates nothing). An adapter run starts from
    `stage.adapter.initial` (`adapters.prepare`)."""
    tx, _ = _optimizer(stage)
    ema = stage.train.ema_decay
    model = stage.model

    def create(key_data, given):
        def init_params(k):
            return _trainable_of(ldm.init_params(model, k) if given is None else given, stage)

        return state_lib.create_train_state(init_params, tx=tx, key=jax.random.wrap_key_data(key_data),
                                            ema_decay=ema)

    key_data = np.asarray(jax.random.key_data(key))
    if stage.train.adapter != "none":
        if stage.adapter.initial is None:
            raise ValueError("init_state: prepare the stage's adapter first (adapters.prepare)")
        pretrained = stage.adapter.initial  # the factors / rows start from the adapter's init, fresh or restored
    given = None if pretrained is None else _trainable_of(pretrained, stage)
    shapes = jax.eval_shape(create, key_data, given)
    shardings = state_lib.state_shardings(shapes, stage.mesh, stage.rules)
    if abstract:
        return state_lib.sharded_shapes(shapes, shardings)
    rep = parallel.replicated(stage.mesh)
    if given is None:
        return jax.jit(lambda kd: create(kd, None), in_shardings=rep, out_shardings=shardings)(key_data)
    return jax.jit(create, in_shardings=(rep, shardings.params), out_shardings=shardings)(key_data, given)


def _optimizer(stage: Stage):
    """(tx, schedule) with the peak rate of `optim.learning_rate` for this global batch and device count."""
    peak = optim.learning_rate(stage.optimizer, global_batch_size=stage.data.global_batch_size,
                               num_devices=stage.mesh.size)
    return optim.make_optimizer(stage.optimizer, peak)


def place(tree: Any, stage: Stage) -> Any:
    """numpy params -> device arrays sharded by the mesh rules."""
    return jax.device_put(tree, parallel.param_shardings(tree, stage.rules, stage.mesh))


def place_frozen(frozen: Mapping[str, Any], stage: Stage) -> Any:
    """The frozen numpy params on the devices (`place`), the UNet and text towers in train.frozen_dtype."""
    return place(adapter_lib.cast_frozen(frozen, stage.train.frozen_dtype), stage)


# --------------------------------------------------------------------------------------------------- data


def _tokenize_fn(stage: Stage):
    """captions -> token ids (B, L), or SDXL's {"tokens": (B, L), "tokens_2": (B, L2)} (each tower's tokenizer,
    pad id and length); None for models without text."""
    if stage.tokenizer is None:
        if stage.tokenizers_from_init:
            raise ValueError("the tokenizers of train.init_from are not loaded yet (with_init_tokenizers)")
        return None
    m = stage.model
    if not m.structured_conditioning:
        return lambda captions: tokenize(stage.tokenizer, list(captions), pad_token_id=m.pad_token_id,
                                         max_length=m.max_length)
    tokenizers = {"cond_stage": stage.tokenizer, "cond_stage_2": stage.tokenizer_2}
    towers = {key: (tokenizers[name], getattr(m, name)) for key, name in zip(("tokens", "tokens_2"), m.text_towers)}
    return lambda captions: {key: tokenize(tok, list(captions), pad_token_id=tower.pad_token_id,
                                           max_length=tower.max_length) for key, (tok, tower) in towers.items()}


def image_iterator(stage: Stage, source: Any = None) -> pipeline.DataIterator:
    """The training batches as images (+ tokens / labels), from `source` (None: the one data config names)."""
    return pipeline.make_iterator(stage.data, source=source, tokenizer=_tokenize_fn(stage))


def latents_cache(workdir: pathlib.Path, split: str) -> pathlib.Path:
    """WORKDIR/latents/<split>.npz: where `precompute_latents` keeps its pass over the training split."""
    return workdir / LATENTS_DIR / f"{split}.npz"


def precompute_latents(stage: Stage, frozen: Mapping[str, Any], workdir: pathlib.Path, *,
                       batch_size: int = 256, source: Any = None) -> dict[str, np.ndarray]:
    """One pass over the training split (`source`; None: the one the data config names): {"moments": (N, h, w,
    2C or C) float32, + "tokens" / "label"} in dataset-index order, cached in `latents_cache` (every process
    computes and reads the whole set)."""
    cache = latents_cache(workdir, stage.data.split)
    cond_key = [k for k in stage.data.batch_keys if k != "image"]
    if cache.is_file():
        with np.load(cache) as f:
            arrays = {name: f[name] for name in f.files}
        log.info("precomputed latents: %d examples from %s", len(arrays["moments"]), cache)
        return arrays
    one_pass = dataclasses.replace(stage.data, shuffle=False, num_epochs=1, drop_remainder=False,
                                   global_batch_size=batch_size, batch_keys=("index", *stage.data.batch_keys))
    it = pipeline.make_iterator(one_pass, source=source, tokenizer=_tokenize_fn(stage), process_index=0,
                                process_count=1)
    encode = jax.jit(lambda p, x: ldm.first_stage_moments(stage.model, p, x, options=stage.options))
    fs = jax.device_put(_first_stage_of(frozen), jax.local_devices()[0])
    parts: dict[str, list[np.ndarray]] = {"index": [], "moments": [], **{k: [] for k in cond_key}}
    for batch in it:
        n = len(batch["index"])
        images = np.zeros((batch_size, *batch["image"].shape[1:]), np.float32)
        images[:n] = batch["image"]  # padded to one shape: one compilation
        parts["moments"].append(np.asarray(encode(fs, images))[:n])
        for k in ("index", *cond_key):
            parts[k].append(np.asarray(batch[k]))
        done = sum(len(i) for i in parts["index"])
        if len(parts["index"]) % 20 == 0 or done == it.num_examples:
            log.info("precomputing latents: %d / %d examples", done, it.num_examples)
    order = np.argsort(np.concatenate(parts.pop("index")))
    arrays = {k: np.concatenate(v)[order] for k, v in parts.items()}
    if len(arrays["moments"]) != it.num_examples:
        raise pipeline.DataError(f"precomputed {len(arrays['moments'])} latents for {it.num_examples} examples: "
                                 f"unreadable images cannot be precomputed (train on images instead); "
                                 f"{it.skipped.summary() if it.skipped is not None else ''}")
    if jax.process_index() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
        log.info("precomputed latents of %d examples -> %s", it.num_examples, cache)
    sync_processes("latents")
    return arrays


def latent_iterator(stage: Stage, arrays: Mapping[str, np.ndarray]) -> pipeline.DataIterator:
    """The training batches from precomputed moments: {"moments", + "tokens" / "label"}, read in the order and
    with the position the image pipeline has for the same data config (global batch split over processes)."""
    keys = ("moments", *(k for k in stage.data.batch_keys if k != "image"))
    source = readers.ArraySource(dict(arrays), name=f"precomputed latents of {stage.data.name} ({stage.data.split})")
    return pipeline.make_iterator(dataclasses.replace(stage.data, batch_keys=keys), source=source)


def _first_stage_of(frozen: Mapping[str, Any]) -> dict[str, Any]:
    """{"first_stage": its params} of the frozen params, or {} for a first stage without params (the identity)."""
    return {name: frozen[name] for name in ("first_stage",) if name in frozen}


# ------------------------------------------------------------------------------------------ scale_by_std


def saved_config(workdir: pathlib.Path) -> dict[str, Any] | None:
    """The config JSON of WORKDIR's newest checkpoint whose config reads (a corrupt newer one is skipped here;
    the train loop sets it aside), or None when there is none."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return None
    manager = ocp.CheckpointManager(directory, item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
            except Exception as err:  # any failure: try the step before
                log.warning("the config of checkpoint step %d does not read: %s", step,
                            restore_failure(directory / str(step), err))
        return None
    finally:
        manager.close()


def first_batch_scale(stage: Stage, frozen: Mapping[str, Any], batches: Any, key: jax.Array) -> float:
    """scale_by_std: 1 / std (ddof 1) of the first global batch's unscaled latents (posterior samples when
    training samples them). The iterator is left where it was."""
    position = batches.get_state()
    batch = next(batches)
    batches.set_state(position)
    unit = dataclasses.replace(stage.model, diffusion=dataclasses.replace(stage.model.diffusion, scale_factor=1.0))
    sample_key = key if stage.train.sample_posterior else None

    def inv_std(fs, batch):
        if "moments" in batch:
            z = ldm.latents_from_moments(unit, batch["moments"], sample_key)
        else:
            z = ldm.encode_first_stage(unit, fs, batch["image"], sample_key, options=stage.options)
        return 1.0 / jnp.std(z, ddof=1)

    inputs = {k: v for k, v in batch.items() if k in ("image", "moments")}
    value = jax.jit(inv_std)(_first_stage_of(frozen), parallel.host_local_to_global(inputs, stage.mesh))
    return float(parallel.fetch_replicated(value))


# ----------------------------------------------------------------------------------------- sample grids


def _eval_conditioning(stage: Stage, prompts: dreambooth.Prompts | None = None) -> tuple[Any, Any, list[str] | None,
                                                                                   np.ndarray | None]:
    """(cond, uncond, captions, control) for the sample grids from the first examples of eval_split (DreamBooth: its
    instance and class `prompts`); control: a ControlNet run's control images of the same examples (B, H, W, 3) in
    [0, 1] (the eval iterator with "control" in its batch_keys), else None."""
    m, n = stage.model, stage.train.num_images
    split = stage.train.eval_split or stage.data.split
    cfg = common.eval_data_config(stage.data, split, n)
    extra = ("control",) if stage.train.adapter == "controlnet" else ()

    def first(*keys: str) -> dict[str, Any]:
        return next(pipeline.make_iterator(dataclasses.replace(cfg, batch_keys=(*keys, *extra))))

    if m.diffusion.conditioning_key is None:
        return None, None, None, first()["control"] if extra else None
    if m.tokenizer_kind is not None:
        control = None
        if stage.train.dreambooth.enabled:
            captions = dreambooth.eval_prompts(prompts, n)
        else:
            batch = first("caption")
            captions, control = list(batch["caption"]), batch.get("control")
        if m.structured_conditioning:  # SDXL: each tower's ids; without a negative prompt, as the pipelines do
            model = ldm.LoadedModel(config=m, params={}, tokenizer=stage.tokenizer, tokenizer_2=stage.tokenizer_2)
            cond, uncond = sampling.encode_prompts(model, captions, warn=False)
            return cond, uncond, captions, control
        cond = _tokenize_fn(stage)(captions)
        return cond, np.repeat(ldm.empty_prompt_ids(m, stage.tokenizer), n, axis=0), captions, control
    batch = first("label")
    return batch["label"], None, None, batch.get("control")  # the pipeline guides class models with the null class


def _sample_hook(stage: Stage, frozen: Mapping[str, Any], workdir: pathlib.Path, scores: list,
                 conditioning: tuple[Any, Any, list[str] | None, np.ndarray | None]) -> Hook:
    train = stage.train
    cond, uncond, captions, control_images = conditioning
    sampler = sampling.make_model_sampler(stage.model, train.sampler, train.sample_steps)

    def fn(state: TrainState, step: int):
        trained = state.ema_params if state.ema_params is not None else state.params
        params = stage.adapter.merge(trained, frozen)
        control = None
        if stage.adapter.kind == "controlnet":  # the validation examples' control images steer the trained net
            control = Control(nets=[(stage.adapter.controlnet, trained[controlnet_lib.TRAINED_KEY])],
                              images=[control_images])
        images = sampling.txt2img(stage.model, params, sampler, cond, uncond, guidance_scale=train.guidance_scale,
                                  seed=train.seed, batch_size=None if cond is not None else train.num_images,
                                  mesh=stage.mesh, options=stage.options, control=control)
        if train.check_shapes and captions is not None:
            from ldm_jax.data.captioned_shapes import world_of  # noqa: PLC0415
            from ldm_jax.metrics.shapes_checker import CheckerConfig, prompt_adherence  # noqa: PLC0415

            checker = CheckerConfig(variation=world_of(stage.data.name))  # the varied world's checker for its data
            summary = prompt_adherence(sampling.to_uint8(host_copy(images)), captions, checker)
            scores.append(summary)
            if jax.process_index() == 0:
                log.info("step %d: prompt adherence %.1f%% of %d %s prompts (object accuracy %.1f%%)", step,
                         100 * summary["accuracy"], len(captions), train.eval_split, 100 * summary["object_accuracy"])
                with open(workdir / "eval.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, **summary}) + "\n")
        if control is not None:  # beside the samples, the control images that steered them
            return {"samples": images, "control": control_images * 2.0 - 1.0}
        return {"samples": images}

    return Hook(every_steps=train.image_every, fn=fn)


def make_stage_loss(stage: Stage):
    """The train step's `loss_fn(params, batch, key, frozen) -> (loss, metrics)`: `ldm.training_loss` of the
    model params `stage.adapter.merge(params, frozen)` (the trained parts beside the frozen ones, or the LoRA
    merged into / the textual-inversion rows written into the frozen base; a ControlNet run's frozen base, the UNet
    adding the trained ControlNet's residuals: `controlnet.residuals_fn`)."""
    train = stage.train
    empty = ldm.empty_prompt_ids(stage.model, stage.tokenizer, stage.tokenizer_2) if stage.tokenizer is not None else None
    base_loss = ldm.make_loss_fn(stage.model, empty_prompt=empty, options=stage.options,
                                 sample_posterior=train.sample_posterior, aesthetic_score=train.aesthetic_score)
    gathered = parallel.replicated(stage.mesh)
    merge = stage.adapter.merge
    controlnet = stage.adapter.kind == "controlnet"

    def loss_fn(params, batch, key, frozen_params):
        # FSDP as ZeRO-3: each trained param is all-gathered where the step uses it and its gradient
        # reduce-scattered back to the param's shards. Left to itself, GSPMD resharded the UNet's activations to
        # the kernels' "fsdp" layout in the backward pass instead ("involuntary full rematerialization" on a
        # data=2 x fsdp=4 mesh). A no-op when params are replicated (fsdp=1).
        params = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, gathered), params)
        residuals = controlnet_lib.residuals_fn(stage, params) if controlnet else None
        return base_loss(merge(params, frozen_params), batch, key, residuals)

    return loss_fn


# ------------------------------------------------------------------------------------------- the run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Result:
    """Trains (or resumes) the LDM in `workdir`, then exports WORKDIR/model/ (adapter runs: the adapter file, and
    the merged model with train.export_merged)."""
    stage = common.build_stage(build_stage, config, workdir)
    train = stage.train
    cached = train.precompute_latents and latents_cache(workdir, stage.data.split).is_file()
    source = None if cached else common.user_input("data", _make_source, stage)  # before any params
    prompts = None
    if train.dreambooth.enabled:  # (captions: read from the instance images, checked before any params)
        prompts = common.user_input("train.dreambooth", dreambooth.prompts, train.dreambooth, source)
    saved = saved_config(workdir)
    pretrained = None
    # A resumed run restores every trained param from its checkpoint (and has the tokenizers in the workdir).
    if train.init_from and (saved is None or stage.tokenizers_from_init):
        what = f"train.init_from={train.init_from!r}"
        init_model = common.user_input(what, load_init_model, train.init_from, stage.model,
                                       tokenizer=_store_tokenizer(stage))
        common.user_input(what, _check_adapted_scale, stage, init_model)
        stage = common.user_input(what, with_init_tokenizers, stage, init_model, workdir)
        pretrained = init_model.params if saved is None else None
        del init_model
    where = f"train.init_from={train.init_from!r}" if train.init_from else f"train.first_stage={train.first_stage!r}"
    frozen_np = common.user_input(where, frozen_params, stage, workdir, pretrained)
    key = jax.random.key(train.seed)
    stage, frozen_np = common.user_input("", with_adapter, stage, frozen_np, key)
    conditioning = common.user_input(f"train.eval_split={train.eval_split!r}", _eval_conditioning, stage, prompts)
    frozen = place_frozen(frozen_np, stage)
    if train.dreambooth.enabled:
        batches = common.user_input("train.dreambooth", _dreambooth_batches, stage, workdir, source,
                                    {**(pretrained or {}), **frozen_np}, prompts)
    elif train.precompute_latents:
        batches = latent_iterator(stage, precompute_latents(stage, frozen_np, workdir, source=source))
    else:
        batches = common.user_input("data", image_iterator, stage, source)
    if saved is not None:
        stage = _resumed_scale(stage, saved)
    elif stage.model.diffusion.scale_by_std:
        value = first_batch_scale(stage, frozen, batches, jax.random.fold_in(key, 1))
        log.info("scale_by_std: scale_factor = %.6g (1 / std of the first batch's latents)", value)
        stage = with_scale_factor(stage, value)
    # A resumed run restores every array: it builds only the restore target (no random init is compiled or run).
    state = init_state(stage, key, pretrained=pretrained, abstract=saved is not None)
    del pretrained
    tx_schedule = _optimizer(stage)[1]
    step = make_train_step(make_stage_loss(stage), mesh=stage.mesh, state_shardings=state_lib.shardings_of(state),
                           accumulate_grad_batches=stage.optimizer.accumulate_grad_batches,
                           learning_rate_fn=tx_schedule, frozen=frozen)
    scores: list[dict[str, float]] = []
    hooks = [_sample_hook(stage, frozen, workdir, scores, conditioning)]
    common.describe_outputs(workdir, "ldm", train.num_steps, _outputs_line(stage, workdir))
    state = train_loop(state, step, batches, num_steps=train.num_steps, workdir=workdir, mesh=stage.mesh,
                       checkpoint=common.checkpoint_config(stage.config), config=stage.config,
                       log_every=train.log_every, hooks=hooks, progress_bar=train.progress_bar,
                       prefetch=stage.data.prefetch, max_train_seconds=train.max_train_seconds)
    out = workdir / EXPORT_DIR
    trained = host_copy(state.ema_params if state.ema_params is not None else state.params)
    files = adapter_lib.write_adapter_files(stage, trained, workdir)
    sync_processes("adapter files")
    merged = stage.adapter.kind == "none" or train.export_merged
    if merged:
        write_export(stage, state, frozen_np, out)
    return Result(state=state, export_dir=out if merged else None, adherence=scores[-1] if scores else None,
                  adapter_files=tuple(files))


def _check_adapted_scale(stage: Stage, init_model: ldm.LoadedModel) -> None:
    """An adapter or DreamBooth run's latent scale must be its base model's: ValueError naming both when the config's
    diffusion.scale_factor differs from the one train.init_from's model directory / diffusers folder carries."""
    ours, theirs = stage.model.diffusion.scale_factor, init_model.config.diffusion.scale_factor
    adapting = stage.train.adapter != "none" or stage.train.dreambooth.enabled
    if adapting and not np.isclose(ours, theirs, rtol=1e-6, atol=0.0):
        raise ValueError(f"diffusion.scale_factor={ours:.7g} differs from the model's {theirs:.7g}: an adapter or "
                         f"DreamBooth trains on the base model's latents (set --config.diffusion.scale_factor="
                         f"{theirs!r})")


def with_adapter(stage: Stage, frozen: Mapping[str, Any], key: jax.Array) -> tuple[Stage, dict[str, Any]]:
    """(stage with its prepared `adapters.Adapter`, frozen numpy params): `adapters.prepare` (textual inversion:
    the grown model, tokenizers and tables)."""
    stage, frozen, adapter = adapter_lib.prepare(stage, frozen, key)
    return dataclasses.replace(stage, adapter=adapter), frozen


def _outputs_line(stage: Stage, workdir: pathlib.Path) -> str:
    files = {"lora": adapter_lib.LORA_FILE, "textual_inversion": adapter_lib.EMBEDDING_FILE,
             "controlnet": controlnet_lib.CONTROLNET_DIR}
    if stage.adapter.kind == "none":
        return f"model:       {workdir / EXPORT_DIR} (written at the end)"
    merged = f" and the merged model {workdir / EXPORT_DIR}" if stage.train.export_merged else ""
    return f"adapter:     {workdir / files[stage.adapter.kind]}{merged} (written at the end)"


def _make_source(stage: Stage) -> Any:
    """The training data source: the data section's, or DreamBooth's instance images (`dreambooth.instance_data`)."""
    if stage.train.dreambooth.enabled:
        return pipeline.make_source(dreambooth.instance_data(stage.data, stage.train.dreambooth))
    return pipeline.make_source(stage.data)


def _dreambooth_batches(stage: Stage, workdir: pathlib.Path, source: Any, base: Mapping[str, Any],
                        prompts: dreambooth.Prompts) -> Any:
    """DreamBooth's batches, after generating the class images of `prompts` the run lacks (prior preservation)
    with the base model: `base` when it holds every part (a fresh start, or LoRA's frozen model), else
    train.init_from again."""
    cfg, train = stage.train.dreambooth, stage.train
    directory = dreambooth.class_dir(workdir, cfg)
    if cfg.prior_preservation and dreambooth.cached_class_images(directory, cfg, prompts) < cfg.num_class_images:
        params = dict(base)
        first_stage = ("first_stage",) if stage.model.first_stage.has_params else ()
        needed = (*first_stage, "unet", *stage.model.text_towers)
        if not all(name in params for name in needed):
            params = load_init_model(train.init_from, stage.model, tokenizer=_store_tokenizer(stage)).params
        dreambooth.generate_class_images(
            dreambooth.base_model(stage.model, params, stage), directory, cfg, prompts,
            resolution=stage.data.resolution, sampler=train.sampler, steps=train.sample_steps,
            guidance_scale=train.guidance_scale, seed=train.seed, mesh=stage.mesh, options=stage.options)
        sync_processes("class images")
    return dreambooth.make_batches(stage.data, cfg, directory, tokenizer=_tokenize_fn(stage), source=source)


def _resumed_scale(stage: Stage, saved: Mapping[str, Any]) -> Stage:
    """The stage with the scale_factor a previous run of this workdir stored (its checkpoint's config)."""
    value = ldm.ldm_config(saved).diffusion.scale_factor
    if value == stage.model.diffusion.scale_factor:
        return stage
    log.info("resuming with the stored scale_factor %.6g", value)
    return with_scale_factor(stage, value)


def write_export(stage: Stage, state: TrainState, frozen: Mapping[str, Any], out_dir: pathlib.Path) -> pathlib.Path:
    """Writes the model directory (`store.save_model`): EMA (or live) trained params + frozen params (an adapter
    run: the base with the LoRA merged in / the new token rows written, `Adapter.merge`), the model's config
    (with the run's scale_factor; textual inversion: the grown vocabulary), the tokenizer(s)."""
    trained = state.ema_params if state.ema_params is not None else state.params
    params = jax.tree.map(np.asarray, stage.adapter.merge(host_copy(trained), host_copy(dict(frozen))))
    if jax.process_index() == 0:
        model = ldm.LoadedModel(config=stage.model, params=params, tokenizer=stage.tokenizer,
                                model_id=str(out_dir), tokenizer_2=stage.tokenizer_2)
        store.save_model(model, out_dir)
        log.info("exported the model to %s (ldm-jax sample --checkpoint %s; ldm_jax.store.load_model)", out_dir,
                 out_dir)
    sync_processes("export")
    return out_dir


def export_model(workdir: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Exports the latest checkpoint of an LDM run in `workdir` as a model directory (`store.save_model`; an
    adapter run's: the base model with its LoRA merged in / its token added; a ControlNet run's: its diffusers
    ControlNet folder).

    The config, the scale factor and the frozen params come from the workdir itself; the EMA params are used
    when the run kept them. Raises FileNotFoundError when the workdir has no checkpoint.
    """
    from ldm_jax.training.checkpoint import Checkpointer  # noqa: PLC0415

    workdir = pathlib.Path(workdir).absolute()
    saved = saved_config(workdir)
    if saved is None:
        raise FileNotFoundError(f"{workdir} holds no LDM checkpoint (expected {workdir / 'checkpoints'})")
    config = ml_collections.ConfigDict(saved)
    config.lock()
    stage = build_stage(config, workdir)
    frozen = frozen_params(stage, workdir)
    key = jax.random.key(stage.train.seed)
    stage, frozen = with_adapter(stage, frozen, key)
    target = init_state(stage, key, abstract=True)
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        state = ckpt.restore(target).state
    finally:
        ckpt.close()
    if stage.adapter.kind == "controlnet":  # its export is the ControlNet folder, not a model directory
        trained = host_copy(state.ema_params if state.ema_params is not None else state.params)
        return controlnet_lib.write_controlnet(stage, trained, pathlib.Path(out_dir))
    return write_export(stage, state, frozen, pathlib.Path(out_dir))


__all__ = ["LDMTrainConfig", "Result", "batch_keys", "build_stage", "export_model", "frozen_params", "init_state",
           "load_init_model", "load_pretrained", "make_stage_loss", "place_frozen", "precompute_latents",
           "train_and_evaluate", "with_adapter", "with_init_tokenizers", "write_export"]
