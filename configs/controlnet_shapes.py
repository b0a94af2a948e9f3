"""ControlNet on the embedded captioned-shapes model: the layout of a scene as a control image, base weights frozen.

configs/lora_shapes.py (the shipped model from `train.init_from="shapes"`, its tokenizer and latent scale, every
base weight frozen) with what differs: `train.adapter="controlnet"`. The ControlNet is diffusers' from_unet copy of
the shapes UNet's encoder and mid block (model_channels 32, channel_mult (1, 2, 4), without the UNet's learned
position table: the control image says where), zero convolutions, and a hint encoder of widths (16, 32, 64) that
downsamples the 32x32 control image by 4 to the 8x8 latents (the shapes autoencoder's f = 4): 2,838,704 trained
parameters.

Data: the captioned-shapes TFDS set (configs/data_captioned_shapes.py; prepare it with
`python -m ldm_jax.data.captioned_shapes --data_dir runs/tfds --resolution 32`) with each scene's control image
rendered from its caption (`data.control_key="shapes_mask"`: white-on-black masks of every object,
`shapes.render_mask`): it fixes each object's position, size and shape; the caption still names the colours.
No flips (captions say left and right). Prompt dropout 10% (the base's diffusion.cond_drop_prob, diffusers'
proportion_empty_prompts), AdamW 1e-4 (not scaled) after 50 warm-up steps, clipping 1.0, batch 32, 1000 steps,
EMA 0.995 of the ControlNet. Measured (bench/controlnet_shapes.py, the 2 cores mostly to itself): 1000 steps in 537 s
wall (873 s CPU, start-up and compilation included), peak RSS 2.11 GiB; with the empty prompt, samples follow the
control masks (mean per-object mask IoU 0.12 -> 0.70; see the README's ControlNet demonstration). Sample grids of
the validation scenes with their control images every train.image_every steps. The export is WORKDIR/controlnet/
(a diffusers ControlNet folder):

    python train.py --config configs/controlnet_shapes.py --workdir runs/controlnet_shapes \\
        --config.data.data_dir=runs/tfds
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_controlnet.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("lora_shapes.py"))
    data = load_config_file(pathlib.Path(__file__).with_name("data_captioned_shapes.py")).data
    with config.unlocked():
        config.data.control_key = "shapes_mask"
    config.data.update(dict(source="tfds", name=data.name, data_dir="", path="", caption_key="caption",
                            random_flip=False, global_batch_size=32, batch_keys=("image", "tokens", "control")))
    config.train.adapter = "controlnet"
    config.train.controlnet.update(dict(init_from="", conditioning_embedding_out_channels=(16, 32, 64)))
    config.train.update(dict(num_steps=1000, image_every=1000, num_images=16, eval_split="validation",
                             ema_decay=0.995, log_every=25))
    config.optimizer.update(dict(learning_rate=1e-4, scale_lr=False, warmup_steps=50, grad_clip_norm=1.0))
    config.checkpoint.update(dict(every_steps=250, keep=2))
    return config
