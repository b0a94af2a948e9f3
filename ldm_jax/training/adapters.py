"""Adapter training in the ldm stage (`train.adapter`): what is trained is a small tree beside a frozen base model.

- "none": the stage trains whole parts (the UNet, text towers with train.train_cond_stage), as it always did.
- "lora": the trained params are {"lora": factors} (`adapters.lora.Lora.factors`: rank `train.lora.rank`, alpha
  `train.lora.alpha`, on the kernels of `train.lora.sections` whose paths match `train.lora.targets`), initialised
  as PEFT does (down Kaiming-uniform, up zero: the model starts equal to the base). The loss merges them into the
  frozen base at scale 1 (`apply_loras`, float32 arithmetic), so the gradient of a factor is the full-parameter
  gradient of its kernel projected on it (d/d down = coef * G @ up^T, d/d up = coef * down^T @ G).
- "textual_inversion": the trained params are {"embeddings": {tower: [n, width]}}: the rows of a new token
  (`train.textual_inversion.token`, n = num_vectors: token, token_1, ...) in every text tower's table, started from
  the embedding of `init_word`. The base model with the grown vocabulary (`adapters.textual_inversion.add_tokens`;
  the tokenizers are grown copies) is frozen; the loss writes the rows into its table (`set_rows`), so only they get
  gradients. Prompts name the token (the data's captions, or `data.prompt` for one prompt, e.g. "a <my-shape>").
- "controlnet": the trained params are {"controlnet": tree}, a ControlNet beside the frozen base model; the loss
  calls the UNet with its residuals (`ldm_jax.training.controlnet`, options `train.controlnet`); merging leaves the
  base as it is.

Everything else is the stage's: the one step builder, mesh and sharding rules (the factors / rows are sharded by
`mesh.param_rules` like any param), AdamW, checkpoints with exact resume, EMA of the factors / rows. The whole base
model is a frozen input of the step (WORKDIR/frozen_params.safetensors, float32), held on the devices in
`train.frozen_dtype` ("bfloat16" halves its memory; the merged kernels are then bfloat16, the factors float32).

Export (`write_adapter_files`): WORKDIR/lora.safetensors (diffusers / PEFT format; with `train.lora.kohya` also
WORKDIR/lora_kohya.safetensors) or WORKDIR/learned_embeds.safetensors (diffusers' textual-inversion file), from the
EMA params; `train.export_merged` also writes the merged model directory WORKDIR/model/. A ControlNet exports the
diffusers ControlNet folder WORKDIR/controlnet/.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from ml_collections import config_dict

from ldm_jax import ldm
from ldm_jax.adapters import lora as lora_lib

ADAPTERS = ("none", "lora", "textual_inversion", "controlnet")
# the one key of the trained params
TRAINED_KEY = {"lora": "lora", "textual_inversion": "embeddings", "controlnet": "controlnet"}
LORA_FILE = "lora.safetensors"
LORA_KOHYA_FILE = "lora_kohya.safetensors"
EMBEDDING_FILE = "learned_embeds.safetensors"
FROZEN_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}

log = logging.getLogger("ldm_jax.train")


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig:
    """`train.lora`: rank >= 1; alpha (None: alpha = rank; the delta is alpha / rank * down @ up); targets: module
    groups ("attention", "feed_forward", "conv": `adapters.lora.TARGET_GROUPS`) or regular expressions fully
    matched against a module's path inside its section (e.g. r".*/attn2/to_(k|v)"), each matching some module;
    sections: the model parts adapted ("unet", "cond_stage", "cond_stage_2": LoRA on the text encoders); kohya:
    also export WORKDIR/lora_kohya.safetensors (kohya / A1111 layout)."""

    rank: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = ("attention",)
    sections: tuple[str, ...] = ("unet",)
    kohya: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"train.lora.rank={self.rank}; expected an integer >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"train.lora.alpha={self.alpha}; expected a number > 0 (or None: alpha = rank)")
        if not self.targets:
            raise ValueError(f"train.lora.targets is empty; give groups {sorted(lora_lib.TARGET_GROUPS)} or patterns")
        unknown = [s for s in self.sections if s not in lora_lib.SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"train.lora.sections={self.sections}; expected some of {lora_lib.SECTIONS}")
        for target in self.targets:
            _patterns(target)


@dataclasses.dataclass(frozen=True)
class TextualInversionTrainConfig:
    """`train.textual_inversion`: token: the new token (e.g. "<my-shape>"; not already in a tokenizer); init_word:
    a word that is one known token, whose embedding the vectors start from; num_vectors >= 1 (the tokens token,
    token_1, ...; a prompt's "token" is read as all of them). Every text tower learns its vectors (SDXL: both)."""

    token: str = ""
    init_word: str = ""
    num_vectors: int = 1

    def check(self) -> None:
        """ValueError naming the field unless the recipe is complete (called when train.adapter selects it)."""
        for name in ("token", "init_word"):
            value = getattr(self, name)
            if not value.strip() or value != value.strip() or len(value.split()) != 1:
                raise ValueError(f"train.textual_inversion.{name}={value!r}; expected one word without spaces")
        if self.num_vectors < 1:
            raise ValueError(f"train.textual_inversion.num_vectors={self.num_vectors}; expected an integer >= 1")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """What a run trains beside its frozen params, once prepared (`prepare`). kind: one of ADAPTERS; initial: the
    trained params' numpy start ({"lora": factors} / {"embeddings": {tower: [n, width]}} / {"controlnet": tree};
    None for "none"); alphas: the LoRA's per-module alphas (static); ids: ((tower, token ids), ...) of the
    textual-inversion rows; controlnet: a ControlNet's `ControlNetConfig`."""

    kind: str = "none"
    initial: Any = None
    alphas: tuple = ()
    ids: tuple[tuple[str, tuple[int, ...]], ...] = ()
    controlnet: Any = None

    def merge(self, trained: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
        """The model params the loss, the sample grids and the export use: trained parts beside the frozen ones
        ("none"), the LoRA merged into the frozen kernels, or the rows written into the frozen tables; a ControlNet's
        base model is the frozen params as they are (its residuals enter in the loss). Pure."""
        if self.kind == "none":
            return {**trained, **frozen}
        if self.kind == "controlnet":
            return dict(frozen)
        if self.kind == "lora":
            return lora_lib.apply_loras(frozen, [(self.lora(trained), 1.0)])
        from ldm_jax.adapters import textual_inversion  # noqa: PLC0415

        params = dict(frozen)
        for tower, ids in self.ids:
            params = textual_inversion.set_rows(params, tower, np.asarray(ids, np.int32),
                                                trained["embeddings"][tower])
        return params

    def lora(self, trained: Mapping[str, Any]) -> lora_lib.Lora:
        """The trained factors as a `Lora` (with this run's alphas)."""
        return lora_lib.Lora(factors=dict(trained["lora"]), alphas=self.alphas)


def train_fields() -> ml_collections.ConfigDict:
    """The adapter and DreamBooth fields of the `train` section with their defaults, for a training config to add
    (`config.train.update(train_fields())` inside `config.unlocked()`) and then set: adapter, lora, textual_inversion,
    frozen_dtype, export_merged, dreambooth (alpha is a float placeholder: None means alpha = rank)."""
    from ldm_jax.training.controlnet import ControlNetTrainConfig  # noqa: PLC0415
    from ldm_jax.training.dreambooth import DreamBoothConfig  # noqa: PLC0415

    lora = dataclasses.asdict(LoraTrainConfig())
    lora["alpha"] = config_dict.placeholder(float)
    return ml_collections.ConfigDict(dict(
        adapter="none", lora=lora, textual_inversion=dataclasses.asdict(TextualInversionTrainConfig()),
        frozen_dtype="float32", export_merged=False, dreambooth=dataclasses.asdict(DreamBoothConfig()),
        controlnet=dataclasses.asdict(ControlNetTrainConfig())))


def textual_inversion_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns a Stable Diffusion fine-tune config (configs/sd_v1_finetune.py, sdxl_finetune.py) into diffusers'
    textual_inversion*.py recipe, in place: the token "<my-concept>" (one vector per tower) started from "toy", every
    image of data.path captioned "a photo of <my-concept>", the frozen model in bfloat16, AdamW 5e-3 without weight
    decay or warm-up, batch 4, 3000 steps, EMA off, no caption dropout. Returns `config`."""
    with config.unlocked():
        config.train.update(train_fields())
        config.data.prompt = ""
    config.train.update(dict(adapter="textual_inversion", frozen_dtype="bfloat16", num_steps=3000, ema_decay=None))
    config.train.textual_inversion.update(dict(token="<my-concept>", init_word="toy", num_vectors=1))
    config.diffusion.cond_drop_prob = 0.0
    config.data.update(dict(prompt="a photo of <my-concept>", caption_key="", global_batch_size=4))
    config.optimizer.update(dict(learning_rate=5e-3, weight_decay=0.0, warmup_steps=0, accumulate_grad_batches=1))
    return config


def controlnet_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns a Stable Diffusion fine-tune config (configs/sd_v1_finetune.py, sdxl_finetune.py) into diffusers'
    train_controlnet*.py recipe, in place: `train.adapter="controlnet"` started from the base UNet (from_unet) with
    the (16, 32, 96, 256) hint encoder, control images `<stem>.conditioning_image.<ext>` (added to the batch keys),
    the text towers frozen, the frozen model in bfloat16, AdamW 1e-5 (not scaled, weight decay 1e-2) constant
    without warm-up, clipping 1.0, batch 4, no prompt dropout, no flips, no EMA, checkpoints every 500 steps.
    Returns `config`."""
    with config.unlocked():
        config.train.update(train_fields())
        config.data.control_key = "conditioning_image"
    config.train.update(dict(adapter="controlnet", train_cond_stage=False, frozen_dtype="bfloat16", ema_decay=None))
    config.train.controlnet.update(dict(init_from="", conditioning_embedding_out_channels=(16, 32, 96, 256)))
    config.diffusion.cond_drop_prob = 0.0
    config.data.update(dict(random_flip=False, global_batch_size=4,
                            batch_keys=tuple(config.data.batch_keys) + ("control",)))
    config.optimizer.update(dict(learning_rate=1e-5, scale_lr=False, warmup_steps=0, weight_decay=1e-2,
                                 grad_clip_norm=1.0))
    config.checkpoint.every_steps = 500
    return config


# ------------------------------------------------------------------------------------------------- LoRA


def _patterns(target: str) -> tuple[str, ...]:
    """The regular expressions of one train.lora.targets entry (a group name or a pattern)."""
    if target in lora_lib.TARGET_GROUPS:
        return lora_lib.TARGET_GROUPS[target]
    try:
        re.compile(target)
    except re.error as err:
        raise ValueError(f"train.lora.targets: {target!r} is neither a group {sorted(lora_lib.TARGET_GROUPS)} nor a "
                         f"regular expression ({err})") from None
    return (target,)


def shape_tree(model: ldm.LDMConfig) -> dict[str, Any]:
    """The model's params as a tree of float32 `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return traverse_util.unflatten_dict({path: jax.ShapeDtypeStruct(shape, np.float32)
                                         for path, shape in ldm.param_shapes(model).items()})


def lora_modules(params: Mapping[str, Any], cfg: LoraTrainConfig) -> list[tuple[str, ...]]:
    """The module paths train.lora adapts in `params` (arrays or shapes), sorted. ValueError naming the field when
    a section is not in the model or a target matches no module of the sections."""
    missing = [s for s in cfg.sections if s not in params]
    if missing:
        raise ValueError(f"train.lora.sections: {missing} not in this model (its parts are {sorted(params)})")
    found: set[tuple[str, ...]] = set()
    for target in cfg.targets:
        try:
            found.update(lora_lib.target_modules(params, _patterns(target), cfg.sections))
        except lora_lib.LoraError:
            raise ValueError(f"train.lora.targets: {target!r} matches no 2-D / 4-D kernel of sections "
                             f"{list(cfg.sections)}") from None
    return sorted(found)


def _prepare_lora(stage: Any, key: jax.Array) -> Adapter:
    cfg = stage.train.lora
    shapes = shape_tree(stage.model)
    lora = lora_lib.init_lora(shapes, lora_modules(shapes, cfg), rank=cfg.rank, alpha=cfg.alpha, key=key)
    factors = jax.tree.map(np.asarray, lora.factors)
    count = lora.num_params()
    log.info("LoRA: rank %d, alpha %g, %d modules of %s, %d trained parameters", cfg.rank,
             cfg.rank if cfg.alpha is None else cfg.alpha, len(lora.modules()), list(cfg.sections), count)
    return Adapter(kind="lora", initial={"lora": factors}, alphas=lora.alphas)


# ------------------------------------------------------------------------------------ textual inversion


def _prepare_textual_inversion(stage: Any, frozen: Mapping[str, Any]) -> tuple[Any, dict[str, Any], Adapter]:
    from ldm_jax.adapters import textual_inversion as ti  # noqa: PLC0415

    cfg = stage.train.textual_inversion
    base = ldm.LoadedModel(config=stage.model, params=dict(frozen), tokenizer=stage.tokenizer,
                           tokenizer_2=stage.tokenizer_2, model_id=stage.train.init_from)
    try:
        vectors = ti.init_vectors(base, cfg.init_word, cfg.num_vectors)
    except ti.EmbeddingError as err:
        raise ValueError(f"train.textual_inversion.init_word: {err}") from None
    try:
        grown = ti.add_tokens(base, {cfg.token: vectors})
    except ti.EmbeddingError as err:
        raise ValueError(f"train.textual_inversion.token: {err}") from None
    ids = ti.token_ids(grown, [cfg.token])
    per_tower = vectors if isinstance(vectors, Mapping) else {stage.model.text_towers[0]: vectors}
    initial = {"embeddings": {tower: np.asarray(v, np.float32) for tower, v in per_tower.items()}}
    stage = dataclasses.replace(stage, model=grown.config, tokenizer=grown.tokenizer, tokenizer_2=grown.tokenizer_2)
    log.info("textual inversion: token %r (%d vector(s) per tower, ids %s), from %r; %d trained parameters",
             cfg.token, cfg.num_vectors, {t: i.tolist() for t, i in ids.items()}, cfg.init_word,
             sum(v.size for v in initial["embeddings"].values()))
    adapter = Adapter(kind="textual_inversion", initial=initial,
                      ids=tuple((tower, tuple(int(i) for i in ids[tower])) for tower in per_tower))
    return stage, dict(grown.params), adapter


# --------------------------------------------------------------------------------------------- the stage


def prepare(stage: Any, frozen: Mapping[str, Any], key: jax.Array) -> tuple[Any, dict[str, Any], Adapter]:
    """(stage, frozen numpy params, Adapter) for the run's train.adapter, from the stage (`train_ldm.Stage`), its
    frozen params (numpy, as stored in the workdir) and the run's key. Textual inversion returns the stage with the
    grown model config and tokenizers and the frozen params with the grown tables; LoRA and "none" return both as
    given. Deterministic: a resumed run and `export_model` prepare the same adapter. ValueError naming the
    train field for a bad recipe (a target that matches nothing, an init word of several tokens, a token that
    exists)."""
    kind = stage.train.adapter
    if kind == "lora":
        return stage, dict(frozen), _prepare_lora(stage, jax.random.fold_in(key, 2))
    if kind == "textual_inversion":
        return _prepare_textual_inversion(stage, frozen)
    if kind == "controlnet":
        from ldm_jax.training import controlnet  # noqa: PLC0415

        return stage, dict(frozen), controlnet.prepare(stage, frozen, jax.random.fold_in(key, 3))
    return stage, dict(frozen), Adapter()


def cast_frozen(frozen: Mapping[str, Any], dtype_name: str) -> dict[str, Any]:
    """The frozen params with the floating arrays of the UNet and text towers in `dtype_name` (train.frozen_dtype);
    the first stage stays float32 (latents are encoded at full precision)."""
    dtype = FROZEN_DTYPES[dtype_name]
    if dtype == np.float32:
        return dict(frozen)

    def cast(x):
        x = np.asarray(x)
        return x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x

    return {name: part if name == "first_stage" else jax.tree.map(cast, part) for name, part in frozen.items()}


def write_adapter_files(stage: Any, trained: Mapping[str, Any], workdir: pathlib.Path) -> list[pathlib.Path]:
    """Writes the adapter files of a LoRA / textual-inversion run from `trained` (numpy: the EMA or live params)
    into `workdir` (on the primary process) and logs how to sample with them. Returns their paths."""
    adapter, model = stage.adapter, stage.model
    if adapter.kind == "lora":
        from ldm_jax.convert.lora_files import save_lora_file  # noqa: PLC0415

        lora = adapter.lora(trained)
        paths = [workdir / LORA_FILE] + ([workdir / LORA_KOHYA_FILE] if stage.train.lora.kohya else [])
        if jax.process_index() == 0:
            for path, fmt in zip(paths, ("peft", "kohya")):
                save_lora_file(lora, path, model, format=fmt)
        _log_sampling(stage, [f"--lora {paths[0]}:1.0"])
        return paths
    if adapter.kind == "textual_inversion":
        from ldm_jax.convert.embedding_files import save_embedding_file  # noqa: PLC0415

        token = stage.train.textual_inversion.token
        vectors = {tower: np.asarray(v, np.float32) for tower, v in trained["embeddings"].items()}
        path = workdir / EMBEDDING_FILE
        if jax.process_index() == 0:
            save_embedding_file(path, token, vectors if len(vectors) > 1 else next(iter(vectors.values())))
        _log_sampling(stage, [f"--embedding {path}", f'--prompt "... {token} ..."'])
        return [path]
    if adapter.kind == "controlnet":
        from ldm_jax.training import controlnet  # noqa: PLC0415

        return [controlnet.write_controlnet(stage, trained, workdir / controlnet.CONTROLNET_DIR)]
    return []


def _log_sampling(stage: Any, flags: list[str]) -> None:
    if jax.process_index() == 0:
        log.info("sample with it: ldm-jax sample --checkpoint %s %s", stage.train.init_from, " ".join(flags))


__all__ = ["ADAPTERS", "Adapter", "EMBEDDING_FILE", "LORA_FILE", "LORA_KOHYA_FILE", "LoraTrainConfig",
           "TextualInversionTrainConfig", "cast_frozen", "controlnet_recipe", "lora_modules", "prepare", "shape_tree",
           "textual_inversion_recipe", "train_fields", "write_adapter_files"]
