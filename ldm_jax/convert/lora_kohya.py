"""The kohya (sd-scripts) LoRA file format <-> `ldm_jax.adapters.lora.Lora`.

One module per key stem, torch layout, as kohya-ss sd-scripts' `networks/lora.py` saves it:

    lora_unet_<module, "." -> "_">.lora_down.weight   [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
    lora_unet_<module, "." -> "_">.lora_up.weight     [out, r] (Linear) or [out, r, 1, 1]
    lora_unet_<module, "." -> "_">.alpha              a scalar (absent: alpha = rank)

UNet module names come in two namings: diffusers' blocks (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_
attn1_to_q`: sd-scripts trains SD 1.x/2.x on a diffusers-named UNet) and CompVis / SGM blocks
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_middle_block_1_...`,
`lora_unet_output_blocks_...`, ResBlock convs as `in_layers_2` / `out_layers_3`, `emb_layers_1`, `skip_connection`:
sd-scripts trains SDXL on SGM's UNet). Text towers use transformers' names with the `text_model` level:
`lora_te_text_model_encoder_layers_0_self_attn_q_proj` (one tower), `lora_te1_` / `lora_te2_` (SDXL's
text_encoder / text_encoder_2).

Underscores are ambiguous (`to_out_0`, `transformer_blocks`), so names are never parsed: `kohya_module_names`
builds the table of every adaptable module of the model under each naming (the diffusers names from
`lora_peft.diffusers_module_names`, the CompVis names from `compvis.compvis_layout`, the converters' own key maps)
and keys are looked up in it. Both namings are read for every model; writing uses CompVis naming for SDXL models
(`compvis.is_sgm`) and diffusers naming otherwise, what sd-scripts writes, and every module's `.alpha`.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from ldm_jax.adapters.lora import Lora, LoraError, ModulePath
from ldm_jax.convert.compvis import UNET_PREFIX as COMPVIS_UNET_PREFIX
from ldm_jax.convert.compvis import compvis_layout, is_sgm
from ldm_jax.convert.lora_peft import (build_lora, describe_model, diffusers_module_names, factors_from_torch,
                                       factors_to_torch, rank_and_alpha, text_components, text_model_name)
from ldm_jax.ldm import LDMConfig

KOHYA_FACTORS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
UNET = "lora_unet_"
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
NAMINGS = ("diffusers", "compvis")


def text_prefixes(config: LDMConfig) -> dict[str, str]:
    """{diffusers text component: kohya prefix}: "lora_te_" for an SD model's one tower; SDXL "lora_te1_" for
    text_encoder and "lora_te2_" for text_encoder_2."""
    if config.structured_conditioning:
        names = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    else:
        names = {"text_encoder": "lora_te_"}
    return {component: names[component] for component in text_components(config)}


def compvis_unet_names(config: LDMConfig) -> dict[str, ModulePath]:
    """{CompVis / SGM UNet module name (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`, without
    `model.diffusion_model.`): our module path} for every kernel the CompVis layout stores as it is."""
    out = {}
    for entry in compvis_layout(config).entries:
        path = entry.paths[0]
        if (len(entry.paths) == 1 and path[0] == "unet" and path[-1] == "kernel" and entry.codec.name == "leaf"
                and entry.key.startswith(COMPVIS_UNET_PREFIX)):
            out[entry.key[len(COMPVIS_UNET_PREFIX):].removesuffix(".weight")] = path[:-1]
    return out


@functools.lru_cache(maxsize=8)
def kohya_module_names(config: LDMConfig, naming: str) -> dict[str, ModulePath]:
    """{kohya module name (`lora_unet_...`, `lora_te*_...`): our module path} for every adaptable module, UNet
    names in `naming` ("diffusers" or "compvis" blocks). Raises RuntimeError if two modules share a name."""
    if naming not in NAMINGS:
        raise ValueError(f"kohya naming {naming!r}; expected one of {NAMINGS}")
    tables = diffusers_module_names(config)
    unet = tables["unet"] if naming == "diffusers" else compvis_unet_names(config)
    named = [(UNET + name.replace(".", "_"), path) for name, path in unet.items()]
    for component, prefix in text_prefixes(config).items():
        named += [(prefix + text_model_name(name).replace(".", "_"), path) for name, path in tables[component].items()]
    out: dict[str, ModulePath] = {}
    for name, path in named:
        if name in out:
            raise RuntimeError(f"internal: kohya name {name} for both {'/'.join(out[name])} and {'/'.join(path)}")
        out[name] = path
    return out


def default_naming(config: LDMConfig) -> str:
    """The UNet naming sd-scripts writes for this model: "compvis" for SDXL (SGM) models, else "diffusers"."""
    return "compvis" if is_sgm(config) else "diffusers"


# ---------------------------------------------------------------------------------------------- reading


def parse_kohya_key(key: str) -> tuple[str, str] | None:
    """`lora_unet_X.lora_down.weight` -> ("lora_unet_X", "down") (`lora_up.weight` "up", `alpha` "alpha"), also
    for the `lora_te_` / `lora_te1_` / `lora_te2_` prefixes; None for other keys."""
    name, dot, suffix = key.partition(".")
    if dot and suffix in KOHYA_FACTORS and name.startswith((UNET, *TEXT_PREFIXES)):
        return name, KOHYA_FACTORS[suffix]
    return None


def _resolve(name: str, config: LDMConfig, key: str) -> ModulePath:
    for naming in NAMINGS:
        path = kohya_module_names(config, naming).get(name)
        if path is not None:
            return path
    prefixes = ", ".join([UNET, *text_prefixes(config).values()])
    raise LoraError(f"key {key} matches no module of {describe_model(config)} (its kohya prefixes: {prefixes}; "
                    "UNet names in diffusers or CompVis block naming)")


def _alpha(value: np.ndarray, key: str) -> float:
    value = np.asarray(value)
    if value.size != 1:
        raise LoraError(f"key {key}: alpha must be a scalar, got shape {value.shape}")
    return float(value.reshape(()))


def lora_from_kohya(state_dict: Mapping[str, np.ndarray], config: LDMConfig) -> Lora:
    """A kohya LoRA state dict (torch layout; keys `<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`) -> a
    `Lora` for `config`.

    Raises LoraError naming the first key that is not of this format, matches no module of the model (with the
    model kind), lacks its partner, has a rank mismatch (both shapes) or a delta whose shape differs from the
    module's kernel (both shapes), or two names for one module.
    """
    grouped: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key in sorted(state_dict):
        parsed = parse_kohya_key(key)
        if parsed is None:
            raise LoraError(f"key {key} is not a kohya LoRA key (lora_unet_* / lora_te*_* with .lora_down.weight, "
                            ".lora_up.weight, .alpha)")
        grouped.setdefault(parsed[0], {})[parsed[1]] = (key, state_dict[key])
    modules: dict[ModulePath, tuple[str, dict[str, np.ndarray], float | None]] = {}
    for name, factors in grouped.items():
        key = next(iter(factors.values()))[0]
        path = _resolve(name, config, key)
        absent = [f"{name}.lora_{f}.weight" for f in ("down", "up") if f not in factors]
        if absent:
            raise LoraError(f"key {key} has no partner {absent[0]}")
        if path in modules:
            raise LoraError(f"key {key} adapts {'/'.join(path)}, as {modules[path][0]} does")
        pair = factors_from_torch(factors["down"][1], factors["up"][1], factors["down"][0])
        alpha = _alpha(factors["alpha"][1], factors["alpha"][0]) if "alpha" in factors else None
        modules[path] = (key, pair, alpha)
    return build_lora(modules, config)


# ---------------------------------------------------------------------------------------------- writing


def lora_to_kohya(lora: Lora, config: LDMConfig, naming: str | None = None) -> dict[str, np.ndarray]:
    """The kohya state dict of `lora` for `config` (float32 torch layout, every module's `.alpha` a 0-d array);
    UNet names in `naming` (default `default_naming(config)`). Raises LoraError naming the first module of `lora`
    that is not an adaptable module of the model."""
    reverse = {path: name for name, path in kohya_module_names(config, naming or default_naming(config)).items()}
    ranks = rank_and_alpha(lora)
    out: dict[str, np.ndarray] = {}
    for path, pair in sorted(lora.modules().items()):
        if path not in reverse:
            raise LoraError(f"LoRA module {'/'.join(path)} is not an adaptable module of {describe_model(config)}")
        name = reverse[path]
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = factors_to_torch(pair)
        out[f"{name}.alpha"] = np.asarray(ranks[path][1], np.float32)
    return out
