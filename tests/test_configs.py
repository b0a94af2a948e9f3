"""Every file in configs/ loads, and each of its model sections builds and initialises (shapes only).

To cover a new kind of section, add `name: builder` to SECTION_BUILDERS, where `builder(section)` returns
the abstract variables `jax.eval_shape` gives for that model's init (nothing is allocated). Sections that
hold no model go in NON_MODEL_SECTIONS. A section in neither place fails the test; one in
PENDING_SECTIONS is reported as skipped (with the reason) until its builder lands.
"""
import ast
import dataclasses
import json
import pathlib
import re

import jax
import pytest

from ldm_jax import ldm, presets
from ldm_jax.config import build_dataclass, load_config_file
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
    "cond_stage_2": _cond_stage,
    "unet": _unet,
}
NON_MODEL_SECTIONS = {"diffusion", "sampler", "loss", "train", "data", "mesh", "eval", "sample",
                      "stage", "optimizer", "checkpoint"}  # the last three: training configs (train.py)
PENDING_SECTIONS = {
}

CONFIG_FILES = sorted(CONFIGS.glob("*.py"))
_BUILT: dict[tuple[str, str], object] = {}


def _build(name, section):
    """SECTION_BUILDERS[name](section), once per distinct section: many files share a preset's model sections
    (sdxl_base, sdxl_finetune, lora_sdxl, textual_inversion_sdxl: one SDXL UNet), and tracing a full-size init
    takes seconds."""
    key = (name, json.dumps(section.to_dict(), sort_keys=True, default=repr))
    if key not in _BUILT:
        _BUILT[key] = SECTION_BUILDERS[name](section)
    return _BUILT[key]


def test_there_are_configs():
    names = {path.stem for path in CONFIG_FILES}
    assert {"autoencoder_kl_f8", "autoencoder_vq_f8", "autoencoder_tiny_kl"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_builds(path):
    config = load_config_file(path)
    assert config.is_locked, f"{path.name}: get_config() must return a locked ConfigDict"
    assert path.read_text().lstrip().startswith('"""'), f"{path.name}: a config needs a docstring"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert re.search(r"(python |pytest |ldm-jax )", doc), f"{path.name}: the docstring needs the command that runs it"
    unknown = sorted(set(config) - set(SECTION_BUILDERS) - NON_MODEL_SECTIONS - set(PENDING_SECTIONS))
    assert not unknown, f"{path.name}: sections {unknown} have no builder in tests/test_configs.py SECTION_BUILDERS"
    pending = []
    for name, section in config.items():
        if name in SECTION_BUILDERS:
            variables = _build(name, section)
            assert jax.tree_util.tree_leaves(variables), f"{path.name}: section {name!r} built no parameters"
        elif name in PENDING_SECTIONS:
            pending.append(f"{name!r} ({PENDING_SECTIONS[name]})")
    if pending:
        pytest.skip(f"{path.name}: not built yet: {', '.join(pending)}")


# ---------------------------------------------------------------------------------------------------- presets

# configs/ files that are exactly a preset (the preset's name when it differs from the file's).
PRESET_FILES = {name: name for name in presets.PRESET_NAMES if (CONFIGS / f"{name}.py").is_file()}
PRESET_FILES["unet_tiny"] = "tiny"


def test_preset_files_are_the_presets():
    assert set(PRESET_FILES.values()) == set(presets.PRESET_NAMES)
    for file, name in PRESET_FILES.items():
        assert load_config_file(CONFIGS / f"{file}.py").to_dict() == presets.get_preset(name).to_dict(), file


@pytest.mark.parametrize("name", presets.MODEL_PRESET_NAMES)
def test_model_presets_build_and_match_themselves(name):
    config = presets.get_preset(name)
    assert config.is_locked and set(config) <= {"first_stage", "cond_stage", "cond_stage_2", "unet", "diffusion"}
    model = ldm.ldm_config(config)
    assert presets.matching_preset(model) == name
    config.diffusion.image_size = 3  # a fresh copy each time: changing one changes no other
    assert presets.get_preset(name).diffusion.image_size != 3


def test_first_stage_presets_and_unknown_names():
    for name in presets.FIRST_STAGE_PRESET_NAMES:
        assert set(presets.get_preset(name)) == {"first_stage"}
    with pytest.raises(ValueError, match=r"unknown preset 'sd_v3'; the presets are: sd_v1, sd_v1_inpainting"):
        presets.get_preset("sd_v3")


def test_no_config_has_a_legacy_ldm_section_and_training_configs_use_the_base():
    for path in CONFIG_FILES:
        assert "ldm" not in load_config_file(path), f"{path.name}: diffusion settings belong in `diffusion`"
    base = load_config_file(CONFIGS / "ldm_training.py")
    for name in ("sd_v1_finetune", "txt2img_1p4b_train", "celebahq_ldm_vq4_train", "shapes_ldm"):
        config = load_config_file(CONFIGS / f"{name}.py")
        assert set(base) <= set(config) and config.is_locked
        ldm.ldm_config(config)


def test_v_prediction_is_only_the_768_v_preset():
    v = ldm.ldm_config(presets.get_preset("sd_v2_768_v"))
    eps = ldm.ldm_config(presets.get_preset("sd_v2"))
    assert (v.diffusion.prediction_type, eps.diffusion.prediction_type) == ("v", "eps")
    assert v.unet == eps.unet and v.cond_stage == eps.cond_stage and v.first_stage == eps.first_stage


def test_build_dataclass_refuses_non_finite_floats():
    @dataclasses.dataclass(frozen=True)
    class Section:
        rate: float = 1.0

    assert build_dataclass(Section, {"rate": 0.5}).rate == 0.5
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"optimizer\.rate is .*; expected a finite number"):
            build_dataclass(Section, {"rate": value}, where="optimizer")
