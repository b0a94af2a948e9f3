"""Run-time options are not architecture (`ldm.RunOptions`: attention, remat, dtype, param_dtype).

- Old saved configs whose unet / first_stage / cond_stage sections hold run-time keys (attention, remat,
  attention_impl, attention_implementation, implementation) build the same LDMConfig as without them; the
  embedded model (whose config.json was written with `attention` and `remat`) still loads.
- `RunOptions.attention` reaches the attention function of all three modules (UNet, autoencoder, text encoder),
  and `RunOptions.remat` the UNet and the autoencoder.
- Training builds its RunOptions from the train section (train.attention, train.remat, train.dtype).

Run: .venv/bin/python -m pytest -q tests/test_run_options.py
"""
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import pytest

from ldm_jax import config as config_lib
from ldm_jax import ldm
from ldm_jax.models import attention as attention_lib
from ldm_jax.models import autoencoder as autoencoder_lib
from ldm_jax.models import text as text_lib
from test_ldm import tiny_config

EMBEDDED_CONFIG = pathlib.Path(ldm.__file__).parent / "assets" / "shapes_model" / "config.json"
LEGACY = {"unet": {"attention": "chunked", "remat": True},
          "first_stage": {"attention_impl": "chunked", "remat": True},
          "cond_stage": {"attention_implementation": "jax_nn", "implementation": "chunked"}}


def _sections() -> dict:
    data = json.loads(EMBEDDED_CONFIG.read_text())
    return {name: config_lib.drop_runtime_keys(data[name]) if name in LEGACY else data[name] for name in data}


def test_legacy_run_time_keys_build_the_same_config(caplog):
    clean = _sections()
    legacy = {name: {**section, **LEGACY.get(name, {})} for name, section in clean.items()}
    with caplog.at_level(logging.DEBUG, logger="ldm_jax.config"):
        assert ldm.ldm_config(legacy) == ldm.ldm_config(clean)
    assert "unet: ignoring run-time option(s) {'attention': 'chunked', 'remat': True}" in caplog.text
    assert all(key not in section for section in clean.values() for key in config_lib.RUNTIME_KEYS)


def test_embedded_model_loads_with_default_or_given_options():
    from ldm_jax import store

    assert ldm.ldm_config(json.loads(EMBEDDED_CONFIG.read_text())) == ldm.ldm_config(_sections())
    model = store.load_model()
    assert model.options == ldm.RunOptions()
    assert store.load_model(attention="jax_nn", remat=True).options.attention == "jax_nn"


def test_run_options_reach_every_attention_call(monkeypatch):
    """Each module's calls of `attend` record the implementation they were given."""
    config = tiny_config()
    params = jax.eval_shape(lambda key: ldm.init_params(config, key), jax.random.key(0))  # before recording
    calls = []

    def recording(module):
        name, original = module.__name__.rsplit(".", 1)[-1], module.attend

        def attend(*args, **kwargs):
            calls.append((name, kwargs["attention"]))
            return original(*args, **kwargs)

        return attend

    for module in (attention_lib, autoencoder_lib, text_lib):  # the UNet's blocks live in attention.py
        monkeypatch.setattr(module, "attend", recording(module))
    options = ldm.RunOptions(attention="jax_nn")
    images, tokens = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32)
    z = jax.eval_shape(lambda p: ldm.encode_first_stage(config, p, images, options=options), params)
    jax.eval_shape(lambda p: ldm.decode_first_stage(config, p, jnp.zeros(z.shape), options=options), params)
    cond = jax.eval_shape(lambda p: ldm.encode_conditioning(config, p, tokens, options=options), params)
    jax.eval_shape(lambda p: ldm.apply_unet(config, p, jnp.zeros(z.shape), jnp.zeros((1,)),
                                            {"context": jnp.zeros(cond["context"].shape)}, options=options), params)
    assert {name for name, _ in calls} == {"attention", "autoencoder", "text"}
    assert {impl for _, impl in calls} == {"jax_nn"}


def test_run_options_build_the_modules():
    config = tiny_config()
    m = ldm.modules(config, ldm.RunOptions(attention="chunked", remat="dots_saveable", dtype=jnp.bfloat16))
    assert (m.unet.attention, m.unet.remat, m.unet.dtype) == ("chunked", "dots_saveable", jnp.bfloat16)
    assert (m.first_stage.attention, m.first_stage.remat, m.first_stage.dtype) == ("chunked", "dots_saveable",
                                                                                   jnp.bfloat16)
    assert (m.cond_stage.attention, m.cond_stage.dtype) == ("chunked", jnp.bfloat16)
    assert ldm.modules(config).unet.attention == "xla"
    with pytest.raises(ValueError, match=r"build_\w+: attention='flash'; expected one of"):
        ldm.modules(config, ldm.RunOptions(attention="flash"))
    with pytest.raises(ValueError, match=r"remat='sometimes'"):
        ldm.modules(config, ldm.RunOptions(remat="sometimes"))


def test_training_run_options_come_from_the_train_section():
    from ldm_jax.training import main as common
    from ldm_jax.training.train_autoencoder import AutoencoderTrainConfig
    from ldm_jax.training.train_ldm import LDMTrainConfig

    train = LDMTrainConfig(attention="jax_nn", remat=True, dtype="bfloat16")
    assert common.run_options(train) == ldm.RunOptions(attention="jax_nn", remat=True, dtype=jnp.bfloat16)
    assert common.run_options(AutoencoderTrainConfig()) == ldm.RunOptions()
    with pytest.raises(ValueError, match=r"train.attention: attention='flash'; expected one of"):
        common.run_options(LDMTrainConfig(attention="flash"))
    with pytest.raises(ValueError, match=r"train.remat: remat='always'"):
        common.run_options(AutoencoderTrainConfig(remat="always"))
