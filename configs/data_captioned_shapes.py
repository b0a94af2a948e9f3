"""The `data` section for training on captioned shapes (32x32), prepared locally first:

    python -m ldm_jax.data.captioned_shapes --data_dir ~/tensorflow_datasets --resolution 32

Training configs import `data_config()` and set it as their `data` section; `pipeline.DataConfig` is its
dataclass (`build_dataclass(DataConfig, config.data)`).
"""
import os

import ml_collections
from ml_collections import config_dict


def data_config() -> ml_collections.ConfigDict:
    """The captioned-shapes data section (unlocked, for embedding in a larger config)."""
    return ml_collections.ConfigDict({
        "source": "tfds",
        "name": "captioned_shapes/res32",
        "data_dir": os.path.expanduser("~/tensorflow_datasets"),
        "split": "train",
        "path": "",
        "image_key": "image",
        "caption_key": "caption",
        "label_key": "",
        "resolution": 32,
        "crop": "center",
        "random_flip": False,  # a flip would swap "left" and "right" in the captions
        "global_batch_size": 64,
        "shuffle": True,
        "seed": 0,
        "num_epochs": config_dict.placeholder(int),
        "drop_remainder": True,
        "batch_keys": (),  # () keeps every key; e.g. ("image", "tokens") once a tokenizer is passed
        "prefetch": 2,  # batches read and placed on the devices ahead of the step, on a thread (0: none)
    })


def get_config() -> ml_collections.ConfigDict:
    """A config holding only the data section."""
    config = ml_collections.ConfigDict({"data": data_config()})
    config.lock()
    return config
