"""How much a captioned-shapes model's denoising loss depends on each part of the prompt.

For a batch of captioned images, the training loss (against the model's own target: eps, x0 or v) is measured
at fixed timesteps and fixed noise with the true captions, with one attribute of every object changed
(position: the objects moved to other cells; colour / shape / size: each object's value replaced by another),
and with the empty prompt. A model that reads an attribute from the text loses much more when that attribute is
wrong; one that ignores it loses nothing. This is how the embedded model's first recipe was found to ignore the
position words (README, "The embedded model").
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from ldm_jax import ldm, pipeline
from ldm_jax.data import shapes

CORRUPTIONS: tuple[str, ...] = ("position", "colour", "shape", "size")
_VOCABULARIES = {"colour": tuple(shapes.COLOURS), "shape": shapes.SHAPES, "size": shapes.SIZES}


def corrupt_scene(scene: shapes.Scene, attribute: str, rng: np.random.Generator) -> shapes.Scene:
    """The scene with `attribute` wrong for every object.

    "position": the objects go to distinct cells, each different from its own; "colour", "shape", "size": each
    object's value is replaced by a different one of the vocabulary.
    """
    if attribute == "position":
        cells = list(shapes.POSITIONS)
        while True:
            moved = [str(c) for c in rng.choice(cells, len(scene), replace=False)]
            if all(new != obj.position for new, obj in zip(moved, scene)):
                return tuple(dataclasses.replace(obj, position=new) for obj, new in zip(scene, moved))
    if attribute not in _VOCABULARIES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {CORRUPTIONS}")
    vocabulary = _VOCABULARIES[attribute]
    others = [[v for v in vocabulary if v != getattr(obj, attribute)] for obj in scene]
    return tuple(dataclasses.replace(obj, **{attribute: str(rng.choice(o))}) for obj, o in zip(scene, others))


def prompt_sensitivity(model: ldm.LoadedModel, images: np.ndarray, captions: Sequence[str],
                       timesteps: Sequence[int], *, seed: int = 0) -> dict[str, list[float]]:
    """Mean denoising loss per timestep for the true, corrupted and empty prompts.

    images: (B, H, W, 3) float in [-1, 1]; captions: B captioned-shapes captions; timesteps: training timesteps
    in [0, T). Latents are the first stage's (posterior mode), the noise one draw from `seed`, the same for every
    prompt variant; all images go through the model as one batch. Returns {"correct", "position", "colour",
    "shape", "size", "empty": [loss per timestep]}.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from ldm_jax.diffusion.schedule import q_sample, training_target  # noqa: PLC0415

    config = model.config
    if len(images) != len(captions):
        raise ValueError(f"prompt_sensitivity: {len(images)} images but {len(captions)} captions")
    num_t = config.diffusion.schedule.num_timesteps
    bad = [t for t in timesteps if not 0 <= t < num_t]
    if bad:
        raise ValueError(f"timesteps {bad} are outside the model's [0, {num_t})")
    rng = np.random.default_rng(seed)
    scenes = [shapes.parse_caption(c) for c in captions]
    prompts = {"correct": list(captions)}
    for attribute in CORRUPTIONS:
        prompts[attribute] = [shapes.caption(corrupt_scene(s, attribute, rng)) for s in scenes]
    prompts["empty"] = [""] * len(captions)
    ids = {name: pipeline.encode_prompts(model, texts)[0] for name, texts in prompts.items()}
    schedule = ldm.noise_schedule(config)
    params = jax.device_put(model.params)
    options = model.options
    z = jax.jit(functools.partial(ldm.encode_first_stage, config, options=options))(params,
                                                                                    jnp.asarray(images, jnp.float32))
    noise = jax.random.normal(jax.random.key(seed), z.shape, jnp.float32)
    target_type = config.diffusion.prediction_type

    @jax.jit
    def loss(params, z, noise, tokens, t):  # arrays as arguments, not constants baked into the program
        t = jnp.full((z.shape[0],), t, jnp.int32)
        pred = ldm.apply_unet(config, params, q_sample(schedule, z, t, noise), t,
                              ldm.encode_conditioning(config, params, tokens, options=options), options=options)
        return jnp.mean(jnp.square(pred - training_target(schedule, z, noise, t, target_type)))

    return {name: [float(loss(params, z, noise, tokens, t)) for t in timesteps] for name, tokens in ids.items()}
