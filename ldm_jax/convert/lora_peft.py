"""The diffusers / PEFT LoRA file format <-> `ldm_jax.adapters.lora.Lora`.

What `StableDiffusionPipeline.save_lora_weights` / `StableDiffusionXLPipeline.save_lora_weights` write (diffusers
0.42 with peft): one safetensors file, a pair of tensors per adapted module in torch layout,

    <component>.<diffusers module name>.lora_A.weight   [r, in] (Linear) or [r, in, kh, kw] (Conv2d: the base kernel)
    <component>.<diffusers module name>.lora_B.weight   [out, r] (Linear) or [out, r, 1, 1] (Conv2d, 1x1)

with components `unet`, `text_encoder` and (SDXL) `text_encoder_2` (an SDXL refiner's one tower is its
`text_encoder_2`). UNet module names are diffusers' (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`),
which are ours with numbered children split (`common.path_to_diffusers_key`); text-encoder module names are
transformers' with or without the `text_model.` level (transformers 4's CLIPTextModel and every
CLIPTextModelWithProjection have it, transformers 5's CLIPTextModel not): both are read, `text_model.` is written
(diffusers strips it for encoders that lack the level), the top-level `text_projection` never has it.
The files diffusers' training scripts save (`convert_state_dict_to_diffusers` of peft's state dict) spell some
pairs `.lora.down.weight` / `.lora.up.weight` (UNet attention projections, `text_projection`) or
`.lora_linear_layer.down.weight` / `.up.weight` (text-encoder layers): read too. (diffusers 0.42 itself loads such a
file's UNet only partly when its first key is a `lora_A` one: it converts the spellings only when the first is not.)
We write peft's spelling.

Alpha: the file's `__metadata__["lora_adapter_metadata"]` is JSON of each component's peft `LoraConfig` kwargs
flattened as `"<component>.<field>"` (`unet.r`, `unet.lora_alpha`, `unet.alpha_pattern`, `unet.rank_pattern`,
`unet.use_rslora`, ...). A module's alpha is the first `alpha_pattern` key matching its name (peft's rule: the
regex `(.*\\.)?(KEY)$`), else `lora_alpha` (peft default 8); its rank must be the `rank_pattern` / `r` value.
`use_rslora` (coef alpha / sqrt(r)) is read as the alpha alpha * sqrt(r) of the same coefficient; `use_dora`,
`lora_bias` and the other options of `UNSUPPORTED_OPTIONS` are refused. A component without metadata has
alpha = rank (what diffusers' loader then assumes).
Writing puts r / lora_alpha (the most common values), rank_pattern / alpha_pattern (the others, by full module
name), target_modules (every module) in that metadata, so `load_lora_weights` builds the exact config and loads
every tensor.

The module tables and the torch <-> ours factor layouts here are shared with the kohya format (`lora_kohya`).
"""
from __future__ import annotations

import collections
import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.adapters.lora import Lora, LoraError, ModulePath, make_lora
from ldm_jax.convert.common import conv_kernel, dense_kernel, flax_to_torch_leaf, path_to_diffusers_key
from ldm_jax.convert.diffusers_unet import LITERAL_NAMES
from ldm_jax.ldm import LDMConfig, param_shapes

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
# Factor key suffixes: PEFT's, and the spellings diffusers' `convert_state_dict_to_diffusers` gives some modules in
# the files its training scripts save (UNet attention projections `.lora.down`, text-encoder `.lora_linear_layer.`).
PEFT_FACTORS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
                "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up"}
WRITTEN_FACTORS = {"down": "lora_A.weight", "up": "lora_B.weight"}
TEXT_MODEL = "text_model."  # transformers' CLIPTextModel level, absent in transformers 5's CLIPTextModel
TOP_LEVEL_TEXT_MODULES = ("text_projection",)  # CLIPTextModelWithProjection modules outside text_model
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft LoraConfig's defaults for fields a metadata entry leaves out
# LoraConfig options that, when set, change what the factors compute (not implemented: refused).
UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens",
                       "layer_replication")
Shape = tuple[int, ...]


# ------------------------------------------------------------------------------------------ module tables


def text_components(config: LDMConfig) -> dict[str, str]:
    """{diffusers component: our params section} of the model's text towers, as diffusers folders name them:
    SD {"text_encoder": "cond_stage"}; SDXL base adds {"text_encoder_2": "cond_stage_2"}; the SDXL refiner's one
    tower is {"text_encoder_2": "cond_stage"}; {} without a text tower."""
    towers = config.text_towers
    if not towers:
        return {}
    if config.structured_conditioning and len(towers) == 1:  # the refiner: bigG alone, diffusers' text_encoder_2
        return {"text_encoder_2": towers[0]}
    return dict(zip(("text_encoder", "text_encoder_2"), towers))


@functools.lru_cache(maxsize=8)
def adaptable_modules(config: LDMConfig) -> dict[ModulePath, Shape]:
    """{our module path (section first): kernel shape} of every module a LoRA may adapt: each 2-D (Dense) or 4-D
    (Conv) kernel of the UNet and the text towers."""
    sections = {"unet", *text_components(config).values()}
    return {path[:-1]: shape for path, shape in param_shapes(config).items()
            if path[0] in sections and path[-1] == "kernel" and len(shape) in (2, 4)}


@functools.lru_cache(maxsize=8)
def diffusers_module_names(config: LDMConfig) -> dict[str, dict[str, ModulePath]]:
    """{component: {diffusers / transformers module name: our module path}}: "unet" names as diffusers'
    UNet2DConditionModel names its modules, text components (`text_components`) by transformers' names without
    the `text_model.` level (`encoder.layers.0.self_attn.q_proj`, `text_projection`)."""
    section_of = {"unet": "unet", **text_components(config)}
    component_of = {section: component for component, section in section_of.items()}
    out: dict[str, dict[str, ModulePath]] = {component: {} for component in section_of}
    for path in adaptable_modules(config):
        literal = LITERAL_NAMES if path[0] == "unet" else ()
        out[component_of[path[0]]][path_to_diffusers_key(path[1:], literal=literal)] = path
    return out


def text_model_name(name: str) -> str:
    """A text module's name with transformers' `text_model.` level (what is written; not for `text_projection`)."""
    return name if name in TOP_LEVEL_TEXT_MODULES else TEXT_MODEL + name


def describe_model(config: LDMConfig) -> str:
    """One phrase naming the model kind for error messages, e.g. "an SD 1.x/2.x-style model (UNet context 768;
    LoRA components unet, text_encoder)"."""
    if config.cond_stage_2 is not None:
        kind = "an SDXL base-style model"
    elif config.text_time:
        kind = "an SDXL refiner-style model"
    else:
        kind = "an SD 1.x/2.x-style model"
    components = ", ".join(["unet", *text_components(config)])
    return f"{kind} (UNet context {config.unet.context_dim}; LoRA components {components})"


# ------------------------------------------------------------------------------------------ factor layouts


def factors_from_torch(down: np.ndarray, up: np.ndarray, where: str) -> dict[str, np.ndarray]:
    """Torch-layout LoRA factors -> ours (float32).

    down: [r, in] (Linear) or [r, in, kh, kw] (Conv2d); up: [out, r] or [out, r, 1, 1]. Returns {"down": [in, r]
    or [kh, kw, in, r], "up": [r, out]}. Raises LoraError naming `where` (the file's key) and both shapes when the
    ranks differ or the layouts are not these.
    """
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    shapes = f"down {down.shape}, up {up.shape}"
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if down.ndim not in (2, 4) or up.ndim != 2:
        raise LoraError(f"{where}: LoRA factors of unsupported layout ({shapes}; expected [r, in] / [out, r] or "
                        "[r, in, kh, kw] / [out, r, 1, 1])")
    if down.shape[0] != up.shape[1]:
        raise LoraError(f"{where}: rank mismatch, {shapes} (the down factor's first and the up factor's second "
                        "dimension are the rank)")
    return {"down": dense_kernel(down) if down.ndim == 2 else conv_kernel(down), "up": dense_kernel(up)}


def factors_to_torch(pair: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Our factors {"down": [in, r] or [kh, kw, in, r], "up": [r, out]} -> torch layout (down [r, in] or
    [r, in, kh, kw], up [out, r] or [out, r, 1, 1] for convs), float32."""
    down = flax_to_torch_leaf(("kernel",), np.asarray(pair["down"], np.float32))[1]
    up = flax_to_torch_leaf(("kernel",), np.asarray(pair["up"], np.float32))[1]
    return down, (up[:, :, None, None] if down.ndim == 4 else up)


def check_delta_shape(pair: Mapping[str, np.ndarray], kernel: Shape, where: str, config: LDMConfig) -> None:
    """LoraError naming `where` and both shapes when our factors' delta does not have the kernel's shape."""
    delta = (*pair["down"].shape[:-1], pair["up"].shape[1])
    if tuple(delta) != tuple(kernel):
        raise LoraError(f"{where}: factors give a delta of shape {delta} (our layout), the module's kernel in "
                        f"{describe_model(config)} is {tuple(kernel)}")


def build_lora(modules: Mapping[ModulePath, tuple[str, dict[str, np.ndarray], float | None]],
               config: LDMConfig) -> Lora:
    """A `Lora` from {our path: (file key, our factors, alpha or None = rank)}, every delta shape checked."""
    shapes = adaptable_modules(config)
    for path, (where, pair, _) in modules.items():
        check_delta_shape(pair, shapes[path], where, config)
    alphas = {path: alpha for path, (_, _, alpha) in modules.items() if alpha is not None}
    return make_lora({path: pair for path, (_, pair, _) in modules.items()}, alphas)


def rank_and_alpha(lora: Lora) -> dict[ModulePath, tuple[int, float]]:
    """{module path: (rank, alpha)} of a Lora (alpha = rank where it has none)."""
    alpha_of = lora.alpha_of()
    out = {}
    for path, pair in lora.modules().items():
        rank = int(np.shape(pair["up"])[0])
        out[path] = (rank, float(alpha_of.get(path, rank)))
    return out


# ---------------------------------------------------------------------------------------------- reading


def parse_peft_key(key: str) -> tuple[str, str, str] | None:
    """`<component>.<module>.lora_A.weight` -> (component, module, "down"); `lora_B` -> "up" (and diffusers'
    spellings, `PEFT_FACTORS`); None for other keys."""
    for suffix, factor in sorted(PEFT_FACTORS.items(), key=lambda item: -len(item[0])):
        if key.endswith("." + suffix):
            component, _, module = key[: -len(suffix) - 1].partition(".")
            if component and module:
                return component, module, factor
    return None


def component_metadata(metadata: Mapping[str, Any] | None, component: str) -> dict[str, Any] | None:
    """The LoraConfig kwargs of one component from the parsed `lora_adapter_metadata` ({"unet.r": 4, ...}), or
    None when the file has none for it."""
    if not metadata:
        return None
    prefix = component + "."
    found = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
    return found or None


def parse_metadata(file_metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    """The JSON of `__metadata__["lora_adapter_metadata"]` (None when absent). LoraError for invalid JSON."""
    raw = (file_metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraError(f"metadata {METADATA_KEY} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise LoraError(f"metadata {METADATA_KEY} is {type(value).__name__}, expected a JSON object")
    return value


def _pattern_value(patterns: Mapping[str, Any] | None, name: str) -> Any:
    """peft's `get_pattern_key`: the value of the first key K with `re.match(rf"(.*\\.)?({K})$", name)`."""
    for key, value in (patterns or {}).items():
        try:
            found = re.match(rf"(.*\.)?({key})$", name)
        except re.error as err:
            raise LoraError(f"metadata pattern {key!r} is not a regular expression ({err})") from err
        if found:
            return value
    return None


def peft_alpha(meta: Mapping[str, Any] | None, name: str, rank: int, where: str) -> float:
    """The alpha of module `name` (as named in the file, after the component) of rank `rank` under a component's
    LoraConfig kwargs `meta` (None: alpha = rank). LoraError when the metadata's rank differs or it asks for an
    unsupported option."""
    if meta is None:
        return float(rank)
    for option in UNSUPPORTED_OPTIONS:
        if meta.get(option):
            raise LoraError(f"{where}: metadata {option}={meta[option]!r} is not supported (plain LoRA only)")
    pattern_rank = _pattern_value(meta.get("rank_pattern"), name)
    want = int(pattern_rank if pattern_rank is not None else meta.get("r", PEFT_DEFAULTS["r"]))
    if want != rank:
        raise LoraError(f"{where}: rank mismatch, the file's factors have rank {rank}, its metadata says {want}")
    pattern_alpha = _pattern_value(meta.get("alpha_pattern"), name)
    alpha = float(pattern_alpha if pattern_alpha is not None else meta.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"]))
    return alpha * math.sqrt(rank) if meta.get("use_rslora") else alpha  # rsLoRA: coef alpha / sqrt(r)


def _resolve_peft(component: str, module: str, config: LDMConfig, key: str) -> ModulePath:
    tables = diffusers_module_names(config)
    if component not in tables:
        raise LoraError(f"key {key}: component {component!r} is not part of {describe_model(config)}")
    table = tables[component]
    name = module.removeprefix(TEXT_MODEL) if component != "unet" else module
    if name not in table:
        raise LoraError(f"key {key} matches no module of {describe_model(config)}")
    return table[name]


def lora_from_peft(state_dict: Mapping[str, np.ndarray], file_metadata: Mapping[str, str] | None,
                   config: LDMConfig) -> Lora:
    """A diffusers / PEFT LoRA state dict (torch layout, every key `<component>.<module>.lora_A|B.weight`) and its
    file metadata -> a `Lora` for `config`.

    Raises LoraError naming the first key that is not of this format, matches no module of the model (with the
    model kind), lacks its partner, has a rank mismatch (both shapes) or a delta whose shape differs from the
    module's kernel (both shapes).
    """
    metadata = parse_metadata(file_metadata)
    grouped: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
    for key in sorted(state_dict):
        parsed = parse_peft_key(key)
        if parsed is None:
            raise LoraError(f"key {key} is not a diffusers/PEFT LoRA key (<component>.<module>.lora_A.weight / "
                            "lora_B.weight)")
        component, module, factor = parsed
        group = grouped.setdefault((component, module), {})
        if factor in group:
            raise LoraError(f"key {key} holds the same factor as {group[factor][0]}")
        group[factor] = (key, state_dict[key])
    modules: dict[ModulePath, tuple[str, dict[str, np.ndarray], float | None]] = {}
    for (component, module), factors in grouped.items():
        key = next(iter(factors.values()))[0]
        path = _resolve_peft(component, module, config, key)
        absent = [name for factor, name in WRITTEN_FACTORS.items() if factor not in factors]
        if absent:
            raise LoraError(f"key {key} has no partner {component}.{module}.{absent[0]}")
        if path in modules:
            raise LoraError(f"key {key} adapts {'/'.join(path)}, as {modules[path][0]} does")
        pair = factors_from_torch(factors["down"][1], factors["up"][1], key)
        rank = pair["up"].shape[0]
        alpha = peft_alpha(component_metadata(metadata, component), module, rank, key)
        modules[path] = (key, pair, alpha)
    return build_lora(modules, config)


# ---------------------------------------------------------------------------------------------- writing


def _module_names(config: LDMConfig) -> dict[ModulePath, tuple[str, str]]:
    """{our module path: (component, module name as written)} (text modules with `text_model.`)."""
    out = {}
    for component, table in diffusers_module_names(config).items():
        for name, path in table.items():
            out[path] = (component, name if component == "unet" else text_model_name(name))
    return out


def _lora_config(entries: Mapping[str, tuple[int, float]]) -> dict[str, Any]:
    """LoraConfig kwargs reproducing {module name: (rank, alpha)}: the most common rank / alpha as r / lora_alpha,
    the others by full module name in rank_pattern / alpha_pattern."""
    r = collections.Counter(rank for rank, _ in entries.values()).most_common(1)[0][0]
    alpha = collections.Counter(a for _, a in entries.values()).most_common(1)[0][0]
    number = lambda x: int(x) if float(x).is_integer() else float(x)  # noqa: E731
    return {
        "r": r, "lora_alpha": number(alpha), "target_modules": sorted(entries),
        "rank_pattern": {name: rank for name, (rank, _) in sorted(entries.items()) if rank != r},
        "alpha_pattern": {name: number(a) for name, (_, a) in sorted(entries.items()) if a != alpha},
        "use_rslora": False, "use_dora": False, "lora_bias": False, "init_lora_weights": True,
    }


def lora_to_peft(lora: Lora, config: LDMConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, lora_adapter_metadata) of `lora` in the diffusers / PEFT format for `config` (float32 torch
    layout; metadata {"<component>.<field>": value}, to be JSON-encoded into the file's metadata).

    Raises LoraError naming the first module of `lora` that is not an adaptable module of the model.
    """
    names = _module_names(config)
    state: dict[str, np.ndarray] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    ranks = rank_and_alpha(lora)
    for path, pair in sorted(lora.modules().items()):
        if path not in names:
            raise LoraError(f"LoRA module {'/'.join(path)} is not an adaptable module of {describe_model(config)}")
        component, name = names[path]
        down, up = factors_to_torch(pair)
        state[f"{component}.{name}.{WRITTEN_FACTORS['down']}"] = down
        state[f"{component}.{name}.{WRITTEN_FACTORS['up']}"] = up
        per_component.setdefault(component, {})[name.removeprefix(TEXT_MODEL)] = ranks[path]
    metadata = {f"{component}.{field}": value for component, entries in per_component.items()
                for field, value in _lora_config(entries).items()}
    return state, metadata
