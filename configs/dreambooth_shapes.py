"""DreamBooth with prior preservation on the embedded captioned-shapes model: a new shape under an identifier.

configs/lora_shapes.py (the shipped model; its scale_factor and tokenizer) with what differs: `train.dreambooth`
with the instance prompt "a large red sks in the centre" ("sks" is not a word of the model's tokenizer: it reads as
<|unk|>, a token the training captions never used, the rare identifier) for the images of data.path (no caption
files), and prior preservation on 64 images of "a large red circle in the centre" that the shipped model generates
first (WORKDIR/class_images/, DDIM 50, guidance 5; reused by reruns), weight 1. The UNet trains (full fine-tune;
--config.train.adapter=lora trains LoRA factors instead), the text tower stays frozen. AdamW 2e-4 (not scaled),
300 steps of 8 instance + 8 class images, EMA off; grids of the two prompts every 100 steps.

    python train.py --config configs/dreambooth_shapes.py --workdir runs/dreambooth_shapes \\
        --config.data.path=runs/new_shape_instances
The export is runs/dreambooth_shapes/model/ (`ldm-jax sample --checkpoint runs/dreambooth_shapes/model
--prompt "a large red sks in the centre"`).
From captioned instance images instead (each image's NNNNN.txt names the subject with the identifier; the class
prompts are the captions with it replaced by the class word, 64 class images shared round-robin among them), as
bench/adapt_shapes.py runs it on its 12 "white" scenes:

    python train.py --config configs/dreambooth_shapes.py --workdir runs/dreambooth_captions \\
        --config.data.path=runs/adapt_shapes/instance --config.train.dreambooth.instance_prompt= \\
        --config.train.dreambooth.class_prompt= --config.train.dreambooth.instance_captions=true \\
        --config.train.dreambooth.identifier=white --config.train.dreambooth.class_word=yellow
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_adapters.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("lora_shapes.py"))
    config.train.adapter = "none"
    config.train.dreambooth.update(dict(instance_prompt="a large red sks in the centre",
                                        class_prompt="a large red circle in the centre", num_class_images=64,
                                        prior_loss_weight=1.0, sample_batch_size=32))
    config.data.update(dict(caption_key="", global_batch_size=8))
    config.train.update(dict(num_steps=300, ema_decay=None, num_images=8))
    config.optimizer.learning_rate = 2e-4
    return config
