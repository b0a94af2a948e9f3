"""CompVis config.yaml files (the LDM model zoo, Stable Diffusion's v1/v2 inference yamls) -> our config.

`load_ldm_yaml(path, text_encoder_config=None)` reads the file with `yaml.safe_load` (no tags, no code) and
`config_from_ldm_yaml(data, text_encoder_config)` turns its `model:` entry into a locked ConfigDict with the
sections of the presets (`ldm_jax.presets`): `first_stage`, `unet`, `diffusion` (every DiffusionConfig field:
schedule, parameterization, scale_factor, conditioning key, ...) and `cond_stage` (absent for unconditional
models). `ldm_jax.ldm.ldm_config(config)` then gives the LDMConfig, e.g. for
`ldm_jax.convert.compvis.load_compvis_checkpoint`.

Understood `target:` classes (anything else is refused, naming the entry and the known targets):
- model: ldm.models.diffusion.ddpm.LatentDiffusion, LatentInpaintDiffusion (SD inpainting: concat channels
  [mask, masked-image latent]);
- unet_config: ldm.modules.diffusionmodules.openaimodel.UNetModel;
- first_stage_config: ldm.models.autoencoder.AutoencoderKL (kind "kl"), VQModelInterface / VQModel ("vq");
- cond_stage_config: ldm.modules.encoders.modules.FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, BERTEmbedder
  (LDM txt2img), ClassEmbedder (LDM cin256), or "__is_unconditional__".

Text encoders: a yaml names a CLIP text tower by `version=` (FrozenCLIPEmbedder, a Hugging Face model id) or
`arch=` (FrozenOpenCLIPEmbedder, an open_clip architecture) without its sizes. Two are known without help:
openai/clip-vit-large-patch14 (SD v1: the preset sd_v1's cond_stage) and ViT-H-14 (SD 2.x: the preset sd_v2's,
24 blocks). Any other needs `text_encoder_config`: a transformers CLIP config.json (a CLIPTextConfig, or a
CLIPConfig whose `text_config` is used; fields it leaves out take CLIPTextConfig's defaults) or a directory
holding one (its config.json, or text_encoder/config.json of a diffusers pipeline folder), e.g. the model's
Hugging Face snapshot directory, which also holds its tokenizer. Given, it describes the tower whatever the
version. How the embedders use the tower is fixed by the reference, not by the json: FrozenCLIPEmbedder pads
prompts with the end-of-text token and takes the last layer; FrozenOpenCLIPEmbedder pads with 0, and its
layer "penultimate" becomes (blocks - 1) blocks with output_layer "last" (the json counts every block of the
open_clip tower, e.g. 24 for ViT-H-14), as the preset sd_v2; a CompVis file's unused last block is dropped
on import (`ldm_jax.convert.compvis`).

Every `params` entry is either read, or listed in an explicit table of entries that do not change the model
(training-only settings such as `monitor`, `scheduler_config`, `use_ema`, `ckpt_path`), or required to have
the one value we implement (e.g. `dims: 2`); an unknown entry or an unsupported value is a ValueError naming
its place in the file (`model.params.unet_config.params.dims`).
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections

from ldm_jax.convert.transformers_clip import LEGACY_EOS_TOKEN_ID, clip_text_config_from_transformers
from ldm_jax.presets import get_preset
from ldm_jax.presets.sections import diffusion

LDM_TARGETS = ("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.models.diffusion.ddpm.LatentInpaintDiffusion")
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
FIRST_STAGE_TARGETS = {"ldm.models.autoencoder.AutoencoderKL": "kl", "ldm.models.autoencoder.VQModelInterface": "vq",
                       "ldm.models.autoencoder.VQModel": "vq"}
_ENCODERS = "ldm.modules.encoders.modules."
COND_TARGETS = tuple(_ENCODERS + n for n in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "BERTEmbedder",
                                               "ClassEmbedder"))
UNCONDITIONAL = "__is_unconditional__"

# Entries that do not change the model or its sampling (training, logging and loading options).
_LDM_IGNORED = {
    "first_stage_key", "cond_stage_key", "cond_stage_trainable", "log_every_t", "monitor", "use_ema",
    "scheduler_config", "ckpt_path", "ignore_keys", "load_only_unet", "clip_denoised", "reset_ema",
    "reset_num_ema_updates", "make_it_fit", "ucg_training", "load_ema", "unet_trainable",
    # LatentInpaintDiffusion: which batch entries fill the concat channels (fixed to [mask, masked image]).
    "masked_image_key", "finetune_keys", "keep_finetune_dims", "c_concat_log_start", "c_concat_log_end",
}
# Entries with the only value we implement (reference default first).
_LDM_REQUIRED = {
    "num_timesteps_cond": (1, None), "given_betas": (None,), "use_positional_encodings": (False,),
    "original_elbo_weight": (0.0,), "l_simple_weight": (1.0,), "cond_stage_forward": (None,),
    "concat_keys": (("mask", "masked_image"),),
}
_UNET_IGNORED = {
    "image_size",  # "unused" in the reference too: the UNet accepts any size divisible by its factor
    "use_fp16", "use_bf16",  # compute dtype is chosen at run time (`dtype=`)
    "use_checkpoint",  # remat is a run-time option (`ldm.RunOptions.remat`)
    "legacy",  # only changes how head dims are derived; with num_heads or num_head_channels both give ours
}
_UNET_REQUIRED = {
    "dims": (2,), "n_embed": (None,), "disable_self_attentions": (None,), "num_attention_blocks": (None,),
    "disable_middle_self_attn": (False,), "use_new_attention_order": (False,),
}
_FIRST_STAGE_IGNORED = {"monitor", "ckpt_path", "ignore_keys", "image_key", "lossconfig", "scheduler_config",
                        "lr_g_factor", "sane_index_shape", "use_ema", "base_learning_rate"}
_FIRST_STAGE_REQUIRED = {"colorize_nlabels": (None,), "remap": (None,), "batch_resize_range": (None,)}
_DDCONFIG_REQUIRED = {"attn_type": ("vanilla", "vanilla-xformers"), "tanh_out": (False,), "give_pre_end": (False,),
                      "resamp_with_conv": (True,), "use_linear_attn": (False,)}
_COND_IGNORED = {"device", "freeze", "key", "use_tokenizer"}

CLIP_L14_VERSION = "openai/clip-vit-large-patch14"  # FrozenCLIPEmbedder's default version (SD v1)
OPENCLIP_H14_ARCH = "ViT-H-14"  # FrozenOpenCLIPEmbedder's default arch (SD 2.x)
# transformers CLIPTextConfig's defaults, for the fields a saved json leaves out (a CLIPConfig's text_config
# often holds only the fields that differ from them).
CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, attention_dropout=0.0, eos_token_id=49407)
TEXT_ENCODER_CONFIG_FILES = ("config.json", "text_encoder/config.json")  # looked for in a directory, in order


def load_ldm_yaml(path: str | os.PathLike, text_encoder_config: str | os.PathLike | None = None
                  ) -> ml_collections.ConfigDict:
    """Reads a CompVis config.yaml (yaml.safe_load) and returns `config_from_ldm_yaml` of it.

    text_encoder_config: a transformers CLIP config.json, or a directory holding one, for a text encoder the
    reader does not know by name (module docstring). Errors are one-line ValueErrors naming the yaml file.
    """
    import yaml  # noqa: PLC0415 (PyYAML: only needed for this entry point)

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    try:
        text = None if text_encoder_config is None else read_text_encoder_config(text_encoder_config)
        return config_from_ldm_yaml(data, text)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def read_text_encoder_config(path: str | os.PathLike) -> dict[str, Any]:
    """The transformers CLIPTextConfig fields of a config.json (or a directory holding one, see
    TEXT_ENCODER_CONFIG_FILES): a CLIPConfig's `text_config`, else the file's own fields, over
    CLIP_TEXT_DEFAULTS. ValueError (one line, naming the path) when there is no such file or it is no CLIP
    text config."""
    path = pathlib.Path(path)
    if path.is_dir():
        found = [path / name for name in TEXT_ENCODER_CONFIG_FILES if (path / name).is_file()]
        if not found:
            raise ValueError(f"text_encoder_config {path}: the directory holds none of "
                             f"{list(TEXT_ENCODER_CONFIG_FILES)}")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"text_encoder_config {path}: no such file or directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"text_encoder_config {path}: not a JSON file ({err})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"text_encoder_config {path}: expected a JSON object, got {type(data).__name__}")
    if isinstance(data.get("text_config"), Mapping):
        data = data["text_config"]
    elif "hidden_size" not in data:
        raise ValueError(f"text_encoder_config {path}: neither a CLIPTextConfig (no hidden_size) nor a CLIPConfig "
                         f"(no text_config); it has {sorted(data)}")
    model_type = data.get("model_type", "clip_text_model")
    if model_type not in ("clip_text_model", "clip"):
        raise ValueError(f"text_encoder_config {path}: model_type {model_type!r} is not a CLIP text model")
    return {**CLIP_TEXT_DEFAULTS, **{k: v for k, v in data.items() if v is not None}, "source": str(path)}


def config_from_ldm_yaml(data: Mapping[str, Any], text_encoder_config: Mapping[str, Any] | None = None
                         ) -> ml_collections.ConfigDict:
    """A parsed CompVis config (a mapping with a `model` entry) -> locked ConfigDict (see module docstring).

    text_encoder_config: transformers CLIPTextConfig fields (`read_text_encoder_config`) describing the yaml's
    CLIP text tower; needed when its version/arch is not known, an error beside a non-CLIP cond stage.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        raise ValueError("expected a CompVis config with a top-level `model:` entry (target + params)")
    model = data["model"]
    params = _params(model, "model", LDM_TARGETS)
    p = _Section(params, "model.params", ignored=_LDM_IGNORED, required=_LDM_REQUIRED)
    cond_cfg = p.need("cond_stage_config")
    unconditional = cond_cfg == UNCONDITIONAL
    config = ml_collections.ConfigDict()
    config.first_stage = _first_stage(p.need("first_stage_config"))
    config.unet = _unet(p.need("unet_config"))
    if not unconditional:
        config.cond_stage = _cond_stage(cond_cfg, text_encoder_config)
    elif text_encoder_config is not None:
        raise ValueError(f"text_encoder_config {text_encoder_config.get('source', '')} given, but the model is "
                         f"unconditional (cond_stage_config: {UNCONDITIONAL})")
    config.diffusion = diffusion(
        beta_schedule=p.get("beta_schedule", "linear"),
        num_timesteps=int(p.get("timesteps", 1000)),
        linear_start=float(p.get("linear_start", 1e-4)),
        linear_end=float(p.get("linear_end", 2e-2)),
        cosine_s=float(p.get("cosine_s", 8e-3)),
        v_posterior=float(p.get("v_posterior", 0.0)),
        conditioning_key=_conditioning_key(p, unconditional, model.get("target")),
        prediction_type=p.get("parameterization", "eps"),
        scale_factor=float(p.get("scale_factor", 1.0)),
        scale_by_std=bool(p.get("scale_by_std", False)),
        image_size=int(p.get("image_size", 256)),
        channels=int(p.get("channels", 3)),
        loss_type=p.get("loss_type", "l2"),
        learn_logvar=bool(p.get("learn_logvar", False)),
        logvar_init=float(p.get("logvar_init", 0.0)),
    )
    p.done()
    config.lock()
    return config


class _Section:
    """The `params` of one yaml entry: reads values, and at `done()` refuses anything unread and not ignored."""

    def __init__(self, params: Mapping[str, Any], where: str, *, ignored=frozenset(), required=None):
        self.params, self.where, self.ignored = dict(params), where, set(ignored)
        self.read: set[str] = set()
        for name, allowed in (required or {}).items():
            if name in self.params:
                value = _plain(self.params[name])
                if value not in allowed:
                    raise ValueError(f"{where}.{name}={value!r} is not supported (supported: "
                                     f"{' or '.join(repr(a) for a in allowed)})")
                self.read.add(name)

    def get(self, name: str, default: Any = None) -> Any:
        self.read.add(name)
        return _plain(self.params.get(name, default))

    def need(self, name: str) -> Any:
        if self.params.get(name) is None:
            raise ValueError(f"{self.where}.{name} is missing; the reference has no default for it")
        return self.get(name)

    def done(self) -> None:
        unknown = sorted(set(self.params) - self.read - self.ignored)
        targets = [f"{n} (target {self.params[n]['target']})" for n in unknown
                   if isinstance(self.params[n], Mapping) and "target" in self.params[n]]
        if targets:
            raise ValueError(f"{self.where}: {', '.join(targets)}: not a part this reader understands")
        if unknown:
            raise ValueError(f"{self.where}: unknown entr{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                             f"this reader understands {sorted(self.read | self.ignored)}")


def _plain(value: Any) -> Any:
    """YAML lists -> tuples (configs hold tuples), recursively."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _params(entry: Any, where: str, targets: Any) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping) or "target" not in entry:
        raise ValueError(f"{where}: expected a mapping with `target:` (one of {sorted(targets)}), got {entry!r}")
    target = entry["target"]
    if target not in targets:
        raise ValueError(f"{where}.target={target!r} is not a class this reader understands; known: {sorted(targets)}")
    unknown = sorted(set(entry) - {"target", "params", "base_learning_rate"})
    if unknown:
        raise ValueError(f"{where}: unknown entr{'y' if len(unknown) == 1 else 'ies'} {unknown} beside target/params")
    params = entry.get("params") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}.params must be a mapping, got {type(params).__name__}")
    return params


def _conditioning_key(p: _Section, unconditional: bool, target: str) -> str | None:
    """LatentDiffusion.__init__: None -> "concat" if concat_mode (default True) else "crossattn";
    an unconditional cond stage forces None."""
    key = p.get("conditioning_key")
    concat_mode = p.get("concat_mode", True)
    if unconditional:
        return None
    if key is None:
        key = "concat" if concat_mode else "crossattn"
    if target.endswith("LatentInpaintDiffusion") and key != "hybrid":
        raise ValueError(f"model.params.conditioning_key={key!r}: LatentInpaintDiffusion needs 'hybrid'")
    return key


def _unet(entry: Any) -> ml_collections.ConfigDict:
    where = "model.params.unet_config"
    p = _Section(_params(entry, where, (UNET_TARGET,)), f"{where}.params", ignored=_UNET_IGNORED,
                 required=_UNET_REQUIRED)
    num_heads = int(p.get("num_heads", -1))
    upsample_heads = p.get("num_heads_upsample", -1)
    if upsample_heads not in (-1, num_heads):
        raise ValueError(f"{where}.params.num_heads_upsample={upsample_heads} != num_heads={num_heads} is not "
                         "supported")
    context_dim = p.get("context_dim")
    if isinstance(context_dim, tuple):
        if len(set(context_dim)) != 1:
            raise ValueError(f"{where}.params.context_dim={list(context_dim)}: one width per level is not supported")
        context_dim = context_dim[0]
    depth = p.get("transformer_depth", 1)
    if isinstance(depth, tuple):
        if len(set(depth)) != 1:
            raise ValueError(f"{where}.params.transformer_depth={list(depth)}: one depth per level is not supported")
        depth = depth[0]
    section = dict(
        in_channels=int(p.need("in_channels")),
        out_channels=int(p.need("out_channels")),
        model_channels=int(p.need("model_channels")),
        channel_mult=tuple(int(m) for m in p.get("channel_mult", (1, 2, 4, 8))),
        num_res_blocks=int(p.need("num_res_blocks")),
        attention_resolutions=tuple(int(r) for r in p.need("attention_resolutions")),
        num_heads=num_heads,
        num_head_channels=int(p.get("num_head_channels", -1)),
        use_spatial_transformer=bool(p.get("use_spatial_transformer", False)),
        transformer_depth=int(depth),
        context_dim=None if context_dim is None else int(context_dim),
        use_linear_in_transformer=bool(p.get("use_linear_in_transformer", False)),
        conv_resample=bool(p.get("conv_resample", True)),
        use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
        resblock_updown=bool(p.get("resblock_updown", False)),
        num_classes=p.get("num_classes"),
        adm_in_channels=p.get("adm_in_channels"),
        dropout=float(p.get("dropout", 0.0)),
        flip_sin_to_cos=True,
        freq_shift=0.0,
    )
    p.done()
    return ml_collections.ConfigDict(section)


def _first_stage(entry: Any) -> ml_collections.ConfigDict:
    where = "model.params.first_stage_config"
    p = _Section(_params(entry, where, FIRST_STAGE_TARGETS), f"{where}.params", ignored=_FIRST_STAGE_IGNORED,
                 required=_FIRST_STAGE_REQUIRED)
    kind = FIRST_STAGE_TARGETS[entry["target"]]
    dd = _Section(p.get("ddconfig") or {}, f"{where}.params.ddconfig", required=_DDCONFIG_REQUIRED)
    section = dict(
        kind=kind,
        in_channels=int(dd.need("in_channels")),
        out_ch=int(dd.need("out_ch")),
        ch=int(dd.need("ch")),
        ch_mult=tuple(int(m) for m in dd.get("ch_mult", (1, 2, 4, 8))),
        num_res_blocks=int(dd.need("num_res_blocks")),
        attn_resolutions=tuple(int(r) for r in dd.need("attn_resolutions")),
        resolution=int(dd.need("resolution")),
        z_channels=int(dd.need("z_channels")),
        embed_dim=int(p.need("embed_dim")),
        double_z=bool(dd.get("double_z", True)),
        dropout=float(dd.get("dropout", 0.0)),
        n_embed=int(p.need("n_embed")) if kind == "vq" else 0,
        beta=0.25,  # taming VectorQuantizer2 default, which VQModel does not override
        legacy=True,
    )
    dd.done()
    p.done()
    return ml_collections.ConfigDict(section)


def _cond_stage(entry: Any, text: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
    where = "model.params.cond_stage_config"
    if entry == "__is_first_stage__":
        raise ValueError(f"{where}=__is_first_stage__ (conditioning on the first stage's latents) is not supported")
    params = _params(entry, where, COND_TARGETS)
    name = entry["target"][len(_ENCODERS):]
    p = _Section(params, f"{where}.params", ignored=_COND_IGNORED)
    if name in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"):
        section = (_clip if name == "FrozenCLIPEmbedder" else _openclip)(p, f"{where}.params", text)
    elif text is not None:
        raise ValueError(f"text_encoder_config {text.get('source', '')} given, but the yaml's text encoder is "
                         f"{name}, not a CLIP text tower")
    else:
        section = {"BERTEmbedder": _bert, "ClassEmbedder": _class}[name](p, f"{where}.params")
    p.done()
    return ml_collections.ConfigDict(section)


def _unknown_text_encoder(where: str, name: str, value: str, known: str) -> ValueError:
    return ValueError(f"{where}.{name}={value!r} is not a text encoder this reader knows (known: {known!r}); pass "
                      f"its transformers CLIP config.json, or a directory holding one (e.g. its Hugging Face "
                      f"snapshot), as text_encoder_config (ldm-jax sample --text-encoder-config)")


def _from_text_encoder_config(text: Mapping[str, Any], where: str, max_length: int, *, pad_token_id: int
                              ) -> dict[str, Any]:
    """Our cond_stage section (CLIP) from transformers CLIPTextConfig fields; the yaml's max_length must be
    the tower's number of positions (our position table is the padded length)."""
    if text["max_position_embeddings"] != max_length:
        raise ValueError(f"{where}.max_length={max_length} but text_encoder_config {text.get('source', '')} has "
                         f"max_position_embeddings={text['max_position_embeddings']}; they must be equal")
    fields = {k: v for k, v in text.items() if k != "source"}
    try:
        config = clip_text_config_from_transformers(fields, pad_token_id=pad_token_id)
    except (ValueError, KeyError) as err:
        raise ValueError(f"text_encoder_config {text.get('source', '')}: {err}") from None
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def _max_length(p: _Section, where: str, name: str = "max_length", known: bool = True) -> int:
    value = int(p.get(name, 77))
    if known and value != 77:
        raise ValueError(f"{where}.{name}={value}: the text encoders known here have 77 positions")
    return value


def _clip(p: _Section, where: str, text: Mapping[str, Any] | None) -> dict[str, Any]:
    """FrozenCLIPEmbedder(version, layer="last", max_length=77): transformers CLIPTextModel, prompts padded with
    the end-of-text token (the id `eos_token_id`, or the last id of the vocabulary for configs with the legacy
    eos_token_id 2: CLIP's BPE vocabulary ends with <|endoftext|>)."""
    version = p.get("version", CLIP_L14_VERSION)
    if text is None and version != CLIP_L14_VERSION:
        raise _unknown_text_encoder(where, "version", version, CLIP_L14_VERSION)
    layer = p.get("layer", "last")
    if layer != "last":
        raise ValueError(f"{where}.layer={layer!r} is not supported (supported: 'last')")
    p.get("layer_idx")
    max_length = _max_length(p, where, known=text is None)
    if text is None:
        return get_preset("sd_v1").cond_stage.to_dict()
    eos = text["eos_token_id"]
    end_of_text = text["vocab_size"] - 1 if eos == LEGACY_EOS_TOKEN_ID else eos
    return _from_text_encoder_config(text, where, max_length, pad_token_id=end_of_text)


def _openclip(p: _Section, where: str, text: Mapping[str, Any] | None) -> dict[str, Any]:
    """FrozenOpenCLIPEmbedder(arch, version, layer, max_length=77): open_clip's text tower, prompts padded with 0;
    layer "penultimate" drops the last block (our output_layer "last" on one block fewer)."""
    arch = p.get("arch", OPENCLIP_H14_ARCH)
    if text is None and arch != OPENCLIP_H14_ARCH:
        raise _unknown_text_encoder(where, "arch", arch, OPENCLIP_H14_ARCH)
    p.get("version")  # the pretrained tag (laion2b_s32b_b79k): the weights come from the checkpoint
    layer = p.get("layer", "last")
    if layer not in ("last", "penultimate"):
        raise ValueError(f"{where}.layer={layer!r} is not supported (supported: 'last', 'penultimate')")
    max_length = _max_length(p, where, known=text is None)
    if text is None:
        section = get_preset("sd_v2").cond_stage.to_dict()
        section["num_layers"] = 24  # ViT-H-14's text tower (the preset holds the 23 that SD 2.x evaluates)
    else:
        section = _from_text_encoder_config(text, where, max_length, pad_token_id=0)
    if layer == "penultimate":
        if section["num_layers"] < 2:
            raise ValueError(f"{where}.layer='penultimate' needs a tower of 2 or more blocks; the text encoder "
                             f"has {section['num_layers']}")
        section["num_layers"] -= 1  # the last block is never evaluated; see ldm_jax.convert.compvis
    return section


def _bert(p: _Section, where: str) -> dict[str, Any]:
    dropout = float(p.get("embedding_dropout", 0.0))
    if dropout:
        raise ValueError(f"{where}.embedding_dropout={dropout}: dropout in the BERT embedder is not implemented")
    return dict(kind="bert", vocab_size=int(p.get("vocab_size", 30522)),
                max_length=_max_length(p, where, "max_seq_len"), n_embed=int(p.need("n_embed")),
                n_layer=int(p.need("n_layer")), pad_token_id=0, tokenizer_kind="bert")


def _class(p: _Section, where: str) -> dict[str, Any]:
    rate = float(p.get("ucg_rate", 0.0))
    if rate:
        raise ValueError(f"{where}.ucg_rate={rate}: set diffusion cond_drop_prob instead (class dropout)")
    return dict(kind="class", n_classes=int(p.get("n_classes", 1000)), embed_dim=int(p.need("embed_dim")))


__all__ = ["COND_TARGETS", "FIRST_STAGE_TARGETS", "LDM_TARGETS", "UNET_TARGET", "config_from_ldm_yaml", "load_ldm_yaml"]
