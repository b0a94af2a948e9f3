"""LatentDiffusion: first stage + cond stage + UNet as pure functions over (config, params).

Config: `LDMConfig` (frozen) holds the four parts: `first_stage` (AutoencoderConfig), `cond_stage`
(ClipTextConfig | BertEmbedderConfig | ClassEmbedderConfig | None), `unet` (UNetConfig) and `diffusion`
(DiffusionConfig: the noise schedule, prediction type, latent scaling, conditioning key and training-loss
options). `ldm_config(config)` builds it from a config file's `first_stage`, `cond_stage`, `unet`,
`diffusion` and `ldm` sections (the `ldm` section's fields are DiffusionConfig fields too).

Params: a dict {"first_stage": ..., "cond_stage": ..., "unet": ...} of Flax param trees without the
"params" level (what the converters return), plus "logvar" (T,) when `diffusion.learn_logvar`. The
"cond_stage" entry is absent when the model has no cond stage.

Latents: KL first stages are sampled (or their mode taken) and multiplied by `scale_factor` (0.18215 for SD);
VQ first stages give the pre-quantisation h, multiplied by `scale_factor` (1.0 in every LDM VQ config);
decoding divides by it and the VQ decoder quantises.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ldm_jax.config import build_dataclass
from ldm_jax.diffusion.schedule import LOSS_WEIGHTINGS, PREDICTION_TYPES, ScheduleConfig
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.text import ClassEmbedderConfig, CondStageConfig, cond_stage_config
from ldm_jax.models.unet import UNetConfig

CONDITIONING_KEYS = ("crossattn", "concat", "hybrid", "adm", None)
LOSS_TYPES = ("l2", "l1")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion stage: schedule, what the UNet predicts, latent scaling, conditioning and loss options.

    schedule: the beta schedule (`ldm_jax.diffusion.schedule.ScheduleConfig`).
    prediction_type: "eps", "x0" or "v" (the reference's parameterization eps / x0 / v).
    scale_factor: latents are multiplied by it after encoding (SD: 0.18215; VQ models: 1.0).
    scale_by_std: the reference's option to set scale_factor = 1 / std of the first training batch's
      latents (see `scale_by_std`); the value is then stored in the config by the training code.
    conditioning_key: "crossattn" (context by cross-attention), "concat" (channels appended to x),
      "hybrid" (both), "adm" (class labels / vectors added to the time embedding) or None (unconditional).
    cond_drop_prob: per-example probability of replacing the conditioning by the null conditioning
      (empty-prompt context, null class, zero vector) during training, for classifier-free guidance.
    loss_type: "l2" (mean squared error) or "l1" per element, averaged per example.
    loss_weighting: "uniform" or "min_snr" (with `min_snr_gamma`), see `schedule.loss_weights`.
    learn_logvar / logvar_init: the reference's per-timestep log-variance (loss / exp(logvar) + logvar).
    image_size, channels: the latent side and channel count (what the sampler draws by default).
    """

    schedule: ScheduleConfig = ScheduleConfig()
    prediction_type: str = "eps"
    scale_factor: float = 0.18215
    scale_by_std: bool = False
    conditioning_key: str | None = "crossattn"
    cond_drop_prob: float = 0.0
    loss_type: str = "l2"
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    learn_logvar: bool = False
    logvar_init: float = 0.0
    image_size: int = 64
    channels: int = 4

    def __post_init__(self):
        errors = []
        if self.prediction_type not in PREDICTION_TYPES:
            errors.append(f"prediction_type={self.prediction_type!r}, expected one of {PREDICTION_TYPES}")
        if self.conditioning_key not in CONDITIONING_KEYS:
            errors.append(f"conditioning_key={self.conditioning_key!r}, expected one of {CONDITIONING_KEYS}")
        if not self.scale_factor > 0:
            errors.append(f"scale_factor={self.scale_factor} must be > 0")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            errors.append(f"cond_drop_prob={self.cond_drop_prob} must be in [0, 1]")
        if self.loss_type not in LOSS_TYPES:
            errors.append(f"loss_type={self.loss_type!r}, expected one of {LOSS_TYPES}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            errors.append(f"loss_weighting={self.loss_weighting!r}, expected one of {LOSS_WEIGHTINGS}")
        if self.image_size < 1 or self.channels < 1:
            errors.append(f"image_size={self.image_size} and channels={self.channels} must be >= 1")
        if errors:
            raise ValueError("invalid DiffusionConfig: " + "; ".join(errors))


def diffusion_config(*sections: Any) -> DiffusionConfig:
    """DiffusionConfig from flat config sections (ConfigDicts or mappings), merged left to right.

    Fields of ScheduleConfig (beta_schedule, num_timesteps, linear_start, ...) go to `schedule`; the others
    must be DiffusionConfig fields. A field given by two sections, or known to neither, is a ValueError.
    """
    schedule_fields = {f.name for f in dataclasses.fields(ScheduleConfig)}
    merged: dict[str, Any] = {}
    for section in sections:
        values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        twice = sorted(set(values) & set(merged))
        if twice:
            raise ValueError(f"diffusion config: field(s) {twice} are set in two sections (diffusion and ldm)")
        merged.update(values)
    schedule = {k: merged.pop(k) for k in list(merged) if k in schedule_fields}
    if isinstance(merged.get("schedule"), ScheduleConfig):
        if schedule:
            raise ValueError(f"diffusion config: schedule fields {sorted(schedule)} given beside a ScheduleConfig")
        schedule_obj = merged.pop("schedule")
    else:
        schedule_obj = build_dataclass(ScheduleConfig, {**merged.pop("schedule", {}), **schedule},
                                       where="diffusion.schedule")
    config = build_dataclass(DiffusionConfig, merged, where="diffusion")
    return dataclasses.replace(config, schedule=schedule_obj)


@dataclasses.dataclass(frozen=True)
class LDMConfig:
    """A whole latent diffusion model: first stage, optional cond stage, UNet and diffusion settings.

    Checked on construction: the UNet's output channels equal the latent channels (first_stage.embed_dim ==
    diffusion.channels); "crossattn"/"hybrid" need a cond stage whose context width is the UNet's
    context_dim; "concat"/"hybrid" need UNet in_channels > latent channels, the others equality; "adm"
    needs UNet num_classes.
    """

    first_stage: AutoencoderConfig
    unet: UNetConfig
    diffusion: DiffusionConfig = DiffusionConfig()
    cond_stage: CondStageConfig | None = None

    def __post_init__(self):
        errors = _ldm_config_errors(self)
        if errors:
            raise ValueError("invalid LDMConfig: " + "; ".join(errors))

    @property
    def latent_channels(self) -> int:
        """Channels of the (scaled) latents the UNet denoises."""
        return self.first_stage.embed_dim

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (the first stage's f)."""
        return self.first_stage.downsample_factor

    @property
    def concat_channels(self) -> int:
        """Channels the caller appends to x for "concat"/"hybrid" models (SD inpainting: 5), else 0."""
        return self.unet.in_channels - self.latent_channels

    @property
    def tokenizer_kind(self) -> str | None:
        """"clip", "bert" or "tokenizer_json" for text cond stages, None otherwise."""
        return getattr(self.cond_stage, "tokenizer_kind", None)

    @property
    def max_length(self) -> int | None:
        """Token length prompts are padded to (77 for CLIP), None without a text cond stage."""
        return getattr(self.cond_stage, "max_length", None) if self.tokenizer_kind else None

    @property
    def pad_token_id(self) -> int | None:
        """Id prompts are padded with (SD v1: 49407, SD v2 / BERT: 0), None without a text cond stage."""
        return getattr(self.cond_stage, "pad_token_id", None) if self.tokenizer_kind else None


def _ldm_config_errors(cfg: LDMConfig) -> list[str]:
    errors = []
    key, unet, latent = cfg.diffusion.conditioning_key, cfg.unet, cfg.first_stage.embed_dim
    if cfg.diffusion.channels != latent:
        errors.append(f"diffusion.channels={cfg.diffusion.channels} but the first stage's latents have "
                      f"embed_dim={latent} channels")
    if unet.out_channels != latent:
        errors.append(f"unet.out_channels={unet.out_channels} but the latents have {latent} channels")
    if key in ("concat", "hybrid"):
        if unet.in_channels <= latent:
            errors.append(f"conditioning_key={key!r} needs unet.in_channels > {latent} latent channels "
                          f"(the concat channels come after them), got {unet.in_channels}")
    elif unet.in_channels != latent:
        errors.append(f"unet.in_channels={unet.in_channels} != {latent} latent channels; with "
                      f"conditioning_key={key!r} nothing is concatenated (9-channel inpainting UNets need "
                      f"conditioning_key='hybrid')")
    if key in ("crossattn", "hybrid"):
        if cfg.cond_stage is None:
            errors.append(f"conditioning_key={key!r} needs a cond_stage")
        elif not unet.use_spatial_transformer or unet.context_dim != cfg.cond_stage.context_dim:
            errors.append(f"the cond stage's context width {cfg.cond_stage.context_dim} != unet.context_dim "
                          f"{unet.context_dim} (use_spatial_transformer={unet.use_spatial_transformer})")
    elif unet.use_spatial_transformer:
        errors.append(f"unet.use_spatial_transformer=True needs conditioning_key 'crossattn' or 'hybrid', "
                      f"got {key!r}")
    if key == "adm" and unet.num_classes is None:
        errors.append("conditioning_key='adm' needs unet.num_classes (labels or 'sequential' vectors)")
    if key != "adm" and unet.num_classes is not None:
        errors.append(f"unet.num_classes={unet.num_classes!r} needs conditioning_key='adm', got {key!r}")
    if key == "adm" and cfg.cond_stage is not None:
        errors.append("conditioning_key='adm' passes labels straight to the UNet; cond_stage must be None")
    if isinstance(cfg.cond_stage, ClassEmbedderConfig) and key not in ("crossattn", "hybrid"):
        errors.append(f"a class cond stage gives a cross-attention context; conditioning_key={key!r}")
    return errors


def ldm_config(config: Any) -> LDMConfig:
    """LDMConfig from a config file's ConfigDict (or mapping) with sections first_stage, unet, diffusion,
    optionally cond_stage and ldm (whose fields are merged into diffusion). Unknown fields raise ValueError."""
    missing = [name for name in ("first_stage", "unet", "diffusion") if name not in config]
    if missing:
        raise ValueError(f"ldm_config: the config lacks section(s) {missing}; it has {sorted(config.keys())}")
    cond = config["cond_stage"] if "cond_stage" in config else None
    diffusion_sections = [config["diffusion"]] + ([config["ldm"]] if "ldm" in config else [])
    return LDMConfig(
        first_stage=build_dataclass(AutoencoderConfig, config["first_stage"], where="first_stage"),
        unet=build_dataclass(UNetConfig, config["unet"], where="unet"),
        diffusion=diffusion_config(*diffusion_sections),
        cond_stage=None if cond is None else cond_stage_config(cond),
    )


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to sample or fine-tune: its config, params (layout in the module docstring), a
    tokenizer (transformers tokenizer object) or None, and where it came from (`model_id`, e.g. a path)."""

    config: LDMConfig
    params: dict[str, Any]
    tokenizer: Any = None
    model_id: str = ""
