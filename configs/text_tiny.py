"""Tiny conditioning encoders (a few channels) for tests and CPU smoke runs: the `cond_stage` section only.

`get_config()` is a tiny CLIP text transformer (the context of the preset `tiny`, configs/unet_tiny.py);
`get_config("bert")` the LDM BERT-style embedder; `get_config("class")` a class embedder (ldm_jax/presets/tiny.py).
Built and run by its test:
  .venv/bin/python -m pytest -q tests/test_text.py -k text_tiny
"""
import ml_collections

from ldm_jax.presets import tiny


def get_config(kind: str = "clip") -> ml_collections.ConfigDict:
    """Returns a locked ConfigDict with a tiny `cond_stage` of the given kind ("clip", "bert" or "class")."""
    config = ml_collections.ConfigDict({"cond_stage": tiny.cond_stage(kind)})
    config.lock()
    return config
