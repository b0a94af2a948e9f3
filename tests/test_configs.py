"""Every file in configs/ loads, and each of its model sections builds and initialises (shapes only).

To cover a new kind of section, add `name: builder` to SECTION_BUILDERS, where `builder(section)` returns
the abstract variables `jax.eval_shape` gives for that model's init (nothing is allocated). Sections that
hold no model go in NON_MODEL_SECTIONS. A section in neither place fails the test; one in
PENDING_SECTIONS is reported as skipped (with the reason) until its builder lands.
"""
import pathlib

import jax
import pytest

from ldm_jax.config import load_config_file
from ldm_jax.models.autoencoder import build_autoencoder, init_autoencoder
from ldm_jax.models.text import build_cond_stage, cond_stage_config, cond_stage_inputs_shape
from ldm_jax.models.unet import build_unet, init_unet

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _first_stage(section):
    model = build_autoencoder(section)
    return jax.eval_shape(lambda key: init_autoencoder(model, key), jax.random.key(0))


def _unet(section):
    model = build_unet(section)
    return jax.eval_shape(lambda key: init_unet(model, key), jax.random.key(0))


def _cond_stage(section):
    config = cond_stage_config(section)
    inputs = jax.ShapeDtypeStruct(cond_stage_inputs_shape(config, 1), jax.numpy.int32)
    return jax.eval_shape(build_cond_stage(config).init, jax.random.key(0), inputs)


SECTION_BUILDERS = {
    "first_stage": _first_stage,
    "cond_stage": _cond_stage,
    "unet": _unet,
}
NON_MODEL_SECTIONS = {"diffusion", "sampler", "loss", "train", "data", "mesh", "eval", "sample", "ldm",
                      "stage", "optimizer", "checkpoint"}  # the last three: training configs (train.py)
PENDING_SECTIONS = {
}

CONFIG_FILES = sorted(CONFIGS.glob("*.py"))


def test_there_are_configs():
    names = {path.stem for path in CONFIG_FILES}
    assert {"autoencoder_kl_f8", "autoencoder_vq_f8", "autoencoder_tiny_kl"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_builds(path):
    config = load_config_file(path)
    assert config.is_locked, f"{path.name}: get_config() must return a locked ConfigDict"
    assert path.read_text().lstrip().startswith('"""'), f"{path.name}: a config needs a docstring"
    unknown = sorted(set(config) - set(SECTION_BUILDERS) - NON_MODEL_SECTIONS - set(PENDING_SECTIONS))
    assert not unknown, f"{path.name}: sections {unknown} have no builder in tests/test_configs.py SECTION_BUILDERS"
    pending = []
    for name, section in config.items():
        if name in SECTION_BUILDERS:
            variables = SECTION_BUILDERS[name](section)
            assert jax.tree_util.tree_leaves(variables), f"{path.name}: section {name!r} built no parameters"
        elif name in PENDING_SECTIONS:
            pending.append(f"{name!r} ({PENDING_SECTIONS[name]})")
    if pending:
        pytest.skip(f"{path.name}: not built yet: {', '.join(pending)}")
