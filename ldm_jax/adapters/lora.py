"""LoRA (low-rank adaptation) as pure functions over a model's params.

A LoRA adds `coef * down @ up` to some kernels of the params (`coef = alpha / rank * scale`):
- a Dense kernel `[in, out]` takes `down [in, r]` and `up [r, out]`;
- a Conv kernel `[kh, kw, in, out]` ("LoCon") takes `down [kh, kw, in, r]` (a conv with the base kernel's size)
  and `up [r, out]` (a 1x1 conv), i.e. `delta = tensordot(down, up, 1)`.
This is our layout of PEFT's `lora_A [r, in(, kh, kw)]` / `lora_B [out, r(, 1, 1)]` and of kohya's
`lora_down` / `lora_up`; `ldm_jax.convert.lora_files` maps the files onto it.

`Lora.factors` mirrors the params tree down to the adapted module (the dict that holds "kernel"), where it holds
{"down": ..., "up": ...}: e.g. factors["unet"]["down_blocks_1"][...]["attn1"]["to_q"] = {"down", "up"}. It is
the trainable tree of LoRA training. `Lora.alphas` ((module path, alpha) pairs, static) hold each module's alpha.

Applying a LoRA merges it: `apply_loras(params, [(lora, scale), ...])` returns params whose kernels include every
delta (float32 arithmetic, cast back to the kernel's dtype); the model then runs unchanged, so sampling, training
and export need nothing LoRA-specific. `unmerge` subtracts what `apply_loras` added (exact up to float32 rounding:
within 1e-7 relative). Merging equals PEFT's un-fused `x @ W + scale * (x @ A^T) @ B^T` to float32 rounding.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

ModulePath = tuple[str, ...]

# Module-name patterns (regular expressions matched against the whole "/"-joined module path inside a section).
# Attention projections: the UNet's transformer blocks (diffusers names) and the CLIP text layers.
ATTENTION_TARGETS = (r".*/attn[12]/to_(q|k|v|out_0)", r".*/self_attn/(q|k|v|out)_proj")
FEED_FORWARD_TARGETS = (r".*/ff/net_0/proj", r".*/ff/net_2", r".*/mlp/fc[12]")
# LoCon: the UNet's ResNet convolutions and the transformers' proj_in / proj_out (conv or linear).
CONV_TARGETS = (r".*/resnets_\d+/conv[12]", r".*/proj_(in|out)")
TARGET_GROUPS = {"attention": ATTENTION_TARGETS, "feed_forward": FEED_FORWARD_TARGETS, "conv": CONV_TARGETS}
SECTIONS = ("unet", "cond_stage", "cond_stage_2")


class LoraError(ValueError):
    """A LoRA that does not fit the params it is applied to (one line naming the module and the shapes)."""


@struct.dataclass
class Lora:
    """LoRA factors (a pytree: `factors` are leaves, `alphas` static). See the module docstring for layouts."""

    factors: dict[str, Any]
    alphas: tuple[tuple[ModulePath, float], ...] = struct.field(pytree_node=False, default=())

    def modules(self) -> dict[ModulePath, dict[str, Any]]:
        """{module path (section first): {"down": array, "up": array}}."""
        flat = traverse_util.flatten_dict(self.factors)
        out: dict[ModulePath, dict[str, Any]] = {}
        for path, value in flat.items():
            out.setdefault(path[:-1], {})[path[-1]] = value
        return out

    def alpha_of(self) -> dict[ModulePath, float]:
        """{module path: alpha}; a module without an entry has alpha = rank."""
        return dict(self.alphas)

    def num_params(self) -> int:
        """How many numbers the factors hold."""
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.factors))


def make_lora(modules: Mapping[ModulePath, Mapping[str, Any]], alphas: Mapping[ModulePath, float] | None = None
              ) -> Lora:
    """A `Lora` from {module path: {"down", "up"}} and optional {module path: alpha} (missing: alpha = rank).

    Raises LoraError when a module's factors do not share a rank or an alpha is given for a module with no factors.
    """
    alphas = dict(alphas or {})
    for path, pair in modules.items():
        _rank(path, pair)
    extra = sorted(set(alphas) - set(modules))
    if extra:
        raise LoraError(f"LoRA alpha given for {'/'.join(extra[0])}, which has no lora factors")
    factors = traverse_util.unflatten_dict({(*path, name): value for path, pair in modules.items()
                                            for name, value in pair.items()})
    return Lora(factors=factors, alphas=tuple(sorted((p, float(a)) for p, a in alphas.items())))


def _rank(path: ModulePath, pair: Mapping[str, Any]) -> int:
    if set(pair) != {"down", "up"}:
        raise LoraError(f"LoRA module {'/'.join(path)} has factors {sorted(pair)}, expected down and up")
    down, up = pair["down"], pair["up"]
    if np.ndim(up) != 2 or down.shape[-1] != up.shape[0]:
        raise LoraError(f"LoRA module {'/'.join(path)}: rank mismatch, down {tuple(down.shape)} and up "
                        f"{tuple(up.shape)} (expected down [..., in, r] and up [r, out] with the same r)")
    return int(up.shape[0])


def target_modules(params: Mapping[str, Any], targets: Iterable[str] = ATTENTION_TARGETS,
                   sections: Iterable[str] = ("unet",)) -> list[ModulePath]:
    """The module paths of `params` (section first) that hold a 2-D or 4-D "kernel" and whose path inside the
    section fully matches one of the `targets` regular expressions, sorted. Raises LoraError when none match."""
    sections = tuple(sections)
    patterns = [re.compile(t) for t in targets]
    found = []
    for path, leaf in traverse_util.flatten_dict(dict(params)).items():
        if path[0] not in sections or path[-1] != "kernel" or np.ndim(leaf) not in (2, 4):
            continue
        inner = "/".join(path[1:-1])
        if any(p.fullmatch(inner) for p in patterns):
            found.append(path[:-1])
    if not found:
        raise LoraError(f"no module of sections {list(sections)} matches the LoRA targets {list(targets)}")
    return sorted(found)


def init_lora(params: Mapping[str, Any], modules: Sequence[ModulePath], *, rank: int, alpha: float | None,
              key: jax.Array) -> Lora:
    """Fresh LoRA factors for training, PEFT's default init: `down` Kaiming-uniform (bound 1/sqrt(fan_in), what
    `kaiming_uniform_(a=sqrt(5))` gives), `up` zeros, so the adapted model starts equal to the base.

    params: the model's params (only shapes and dtypes are read; float32 factors). modules: from `target_modules`.
    rank >= 1; alpha None means alpha = rank (coef 1).
    """
    if rank < 1:
        raise LoraError(f"LoRA rank must be >= 1, got {rank}")
    flat = traverse_util.flatten_dict(dict(params))
    out, alphas = {}, {}
    for i, path in enumerate(modules):
        kernel = flat.get((*path, "kernel"))
        if kernel is None:
            raise LoraError(f"LoRA target {'/'.join(path)} is not a module with a kernel in these params")
        *window, fan_in_ch, out_ch = kernel.shape
        fan_in = fan_in_ch * math.prod(window)
        bound = 1.0 / math.sqrt(fan_in)
        down = jax.random.uniform(jax.random.fold_in(key, i), (*window, fan_in_ch, rank), jnp.float32, -bound, bound)
        out[path] = {"down": down, "up": jnp.zeros((rank, out_ch), jnp.float32)}
        alphas[path] = float(rank if alpha is None else alpha)
    return make_lora(out, alphas)


def deltas(lora: Lora, scale: Any = 1.0) -> dict[ModulePath, jax.Array]:
    """{module path: float32 kernel delta `alpha / rank * scale * tensordot(down, up, 1)`}. `scale` may be traced."""
    alpha_of = lora.alpha_of()
    out = {}
    for path, pair in lora.modules().items():
        rank = _rank(path, pair)
        coef = alpha_of.get(path, float(rank)) / rank
        delta = jnp.tensordot(jnp.asarray(pair["down"], jnp.float32), jnp.asarray(pair["up"], jnp.float32), axes=1)
        out[path] = delta * (coef * jnp.asarray(scale, jnp.float32))
    return out


def apply_loras(params: Mapping[str, Any], loras: Sequence[tuple[Lora, Any]]) -> dict[str, Any]:
    """`params` with every LoRA merged in at its scale: kernel + sum of deltas, computed in float32 and cast to
    the kernel's dtype. Pure (jit- and grad-friendly; scales may be traced). Untouched leaves are shared.

    Raises LoraError naming the first module that is not in params or whose delta's shape differs from the
    kernel's, before anything is computed (nothing is half-applied: the input is never modified).
    """
    return _add(params, loras, sign=1.0)


def unmerge(params: Mapping[str, Any], loras: Sequence[tuple[Lora, Any]]) -> dict[str, Any]:
    """The inverse of `apply_loras` with the same LoRAs and scales (float32 rounding: within 1e-7 relative)."""
    return _add(params, list(reversed(loras)), sign=-1.0)


def _add(params: Mapping[str, Any], loras: Sequence[tuple[Lora, Any]], sign: float) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(dict(params))
    check_fits(params, [lora for lora, _ in loras])
    totals: dict[ModulePath, jax.Array] = {}
    for lora, scale in loras:
        for path, delta in deltas(lora, scale).items():
            totals[path] = delta if path not in totals else totals[path] + delta
    for path, delta in totals.items():
        kernel = flat[(*path, "kernel")]
        flat[(*path, "kernel")] = (jnp.asarray(kernel, jnp.float32) + sign * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def check_fits(params: Mapping[str, Any], loras: Sequence[Lora]) -> None:
    """Raises LoraError naming the first module of `loras` that has no kernel in `params`, or whose delta shape
    differs from that kernel's shape. Reads shapes only."""
    flat = traverse_util.flatten_dict(dict(params))
    for lora in loras:
        for path, pair in lora.modules().items():
            rank = _rank(path, pair)
            kernel = flat.get((*path, "kernel"))
            name = "/".join(path)
            if kernel is None:
                raise LoraError(f"LoRA module {name} matches no kernel of this model")
            want = (*pair["down"].shape[:-1], pair["up"].shape[1])
            if tuple(kernel.shape) != want:
                raise LoraError(f"LoRA module {name}: factors of rank {rank} give a delta of shape {want}, the "
                                f"model's kernel is {tuple(kernel.shape)}")


def merge_mask(params: Mapping[str, Any], lora: Lora) -> dict[str, Any]:
    """A params-shaped tree of bools, True at the kernels `lora` changes (for tests and optimiser masks)."""
    touched = {(*path, "kernel") for path in lora.modules()}
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict({path: path in touched for path in flat})
