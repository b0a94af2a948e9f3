"""Fine-tuning SDXL 1.0 (base, or the refiner with the argument "refiner") on captioned images at 1024x1024.

Model: the preset sdxl_base (or sdxl_refiner; `ldm_jax/presets/sdxl.py`); training sections:
configs/ldm_training.py with what differs. Every param starts from --config.train.init_from (required): a diffusers
SDXL folder (stabilityai/stable-diffusion-xl-base-1.0 layout: unet/, vae/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/) or a model directory; the tokenizers come from the same folder (copied into
WORKDIR/tokenizer and WORKDIR/tokenizer_2 on the first start), unless train.tokenizer / train.tokenizer_2 name
other directories (needed for an SGM single file). The VAE and both text towers stay frozen; the 2.6B UNet trains
(remat on; bf16 compute, params, AdamW moments and EMA float32).

Micro-conditioning from the data: each image's original (height, width) and the (top, left) of its random
1024x1024 crop after the shorter side is resized to 1024 are recorded by the data pipeline (batch keys
original_size, crop_top_left) and become the UNet's time ids [orig h, w, crop top, left, 1024, 1024] (the
refiner's: [orig h, w, crop top, left, train.aesthetic_score]). 10% of the examples drop their text: to zeros
(context and pooled, force_zeros_for_empty_prompt, the base) or to the empty prompt (the refiner), keeping their
size / crop numbers (SGM's size embedders have no dropout).

Sharding: a (data, fsdp=8) mesh; PARAM_RULES shard every conv / dense kernel and embedding table over "fsdp" (the
largest dimension that divides; `parallel.FSDP_AUTO`) and replicate biases and norm scales, so the UNet's params,
AdamW moments and EMA (3 x 2.57B float32 = 31 GB) are split over the 8 devices of a group (3.9 GB each), as are
the frozen towers (bigG 695M) and the VAE. Within a step the UNet's params are all-gathered and their gradients
reduce-scattered (ZeRO-3, `train_ldm`): each device holds the whole UNet (10.3 GB float32) and its gradient for the
step, plus the bf16 activations that remat keeps. Set --config.mesh.fsdp to the devices that must share the model
(a divisor of the device count); data takes the rest. AdamW 1e-5 (not scaled by the batch), 500
warm-up steps, clipping at 1.0, 4 micro-batches of 8 per update (global batch 32). Neither memory nor speed was
measured at full size here (no accelerator); what was run is the tiny SDXL-shaped model in
tests/test_train_sdxl.py (8 fake CPU devices, data=2 x fsdp=4).

    python train.py --config configs/sdxl_finetune.py --workdir runs/sdxl_finetune \\
        --config.train.init_from=/models/stable-diffusion-xl-base-1.0 --config.data.path=/data/my_images
    python train.py --config configs/sdxl_finetune.py:refiner --workdir runs/sdxl_refiner_finetune \\
        --config.train.init_from=/models/stable-diffusion-xl-refiner-1.0 --config.data.path=/data/my_images
(a folder of images with .txt captions; data.source=tar for webdataset shards.) The export is WORKDIR/model/ (a
model directory with both tokenizers: `ldm-jax sample --checkpoint WORKDIR/model`).
Built (shapes only, full size) by: .venv/bin/python -m pytest -q tests/test_train_sdxl.py -k full_size
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.presets import get_preset

VARIANTS = {"base": "sdxl_base", "refiner": "sdxl_refiner"}
# FSDP: every kernel (convs HWIO, dense (in, out)) and embedding table is sharded over "fsdp" along its largest
# dimension the fsdp size divides (ties: the later, output, dimension); 1-D params (biases, norm scales: 0.1% of
# the UNet) stay replicated, sparing XLA a few thousand tiny all-gathers per step.
PARAM_RULES = ((r"(kernel|embedding)$", "fsdp_auto"), (r".*", ()))


def get_config(variant: str = "base") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/sdxl_finetune.py: variant {variant!r}; expected one of {sorted(VARIANTS)}")
    config = load_config_file(pathlib.Path(__file__).with_name("ldm_training.py"))
    with config.unlocked():
        config.update(get_preset(VARIANTS[variant]))
        config.train.tokenizer_2 = ""
        config.train.aesthetic_score = 6.0
    two_towers = "cond_stage_2" in config
    config.diffusion.cond_drop_prob = 0.1
    config.data.update(dict(
        source="folder", name="", data_dir="", resolution=1024, crop="random", random_flip=False,
        global_batch_size=32,
        batch_keys=("image", "tokens") + (("tokens_2",) if two_towers else ()) + ("original_size", "crop_top_left")))
    config.optimizer.update(dict(learning_rate=1e-5, scale_lr=False, warmup_steps=500, grad_clip_norm=1.0,
                                 accumulate_grad_batches=4))
    config.train.update(dict(num_steps=10_000, log_every=50, image_every=1000, num_images=8, dtype="bfloat16",
                             remat=True, sampler="euler", sample_steps=30, guidance_scale=5.0))
    config.checkpoint.update(dict(every_steps=500, keep=2))
    config.mesh.update(dict(data=-1, fsdp=8, param_rules=PARAM_RULES))
    return config
