"""Captioned-shapes text-to-image LDM (the embedded model): 8x8x4 latents of configs/shapes_autoencoder.py.

UNet: model_channels 32, channel_mult (1, 2, 4), 2 res blocks per level, a spatial transformer (16-channel heads)
at every level (8x8, 4x4, 2x2) cross-attending to the text, and a learned 8x8 position embedding after conv_in
(`unet.position_embedding`, not in SD); 6.2M parameters; v prediction on the cosine schedule (1000 steps).
Text: a CLIP-style transformer (2 layers, width 64, 4 heads, causal) over the captioned-shapes word-level
tokenizer (26 ids, prompts padded to 32 with 0), trained jointly with the UNet. scale_by_std (the factor comes
from the first batch), 10% prompt dropout for classifier-free guidance, EMA 0.999 (with LitEma's warm-up),
AdamW 1e-3 (not scaled by the batch) after 500 linear warm-up steps, gradient clipping at 1.0, batch 64, 6000
steps, training on precomputed latents (one encoder pass over the dataset instead of one per step). Sample grids
every 500 steps: 64 validation prompts, DDIM 50 steps, guidance 5, scored by the shapes checker (eval.jsonl).

Why v and cosine rather than SD's eps and linear schedule: with those, the model learned colour, shape and size
but placed objects at random (README, "The embedded model"): eps weighs the high-noise steps that decide the
layout by their tiny signal-to-noise ratio, and SD's schedule leaves the layout visible in the noise at t = T.

Measured on the 2-core CPU (quiet): 0.5 s/step (130 images/s), 6000 steps in about 56 minutes plus 80 s of latent
precomputation. The 64 training-time prompts are all followed from step 2500 on (97% at 2000, 55% at 1000).

Train the autoencoder first (configs/shapes_autoencoder.py), then:
    python train.py --config configs/shapes_ldm.py --workdir runs/shapes_ldm \\
        --config.data.data_dir=runs/tfds --config.train.first_stage=runs/shapes_autoencoder
The exported model is runs/shapes_ldm/model/ (`ldm_jax.model_dir.load_model`).
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.data import train_tokenizer

CONFIGS = pathlib.Path(__file__).parent


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(CONFIGS / "sd_v1.py")
    autoencoder = load_config_file(CONFIGS / "shapes_autoencoder.py")
    config.first_stage = autoencoder.first_stage
    unet = config.unet
    unet.model_channels = 32
    unet.channel_mult = (1, 2, 4)
    unet.num_res_blocks = 2
    unet.attention_resolutions = (1, 2, 4)
    unet.num_heads = -1
    unet.num_head_channels = 16
    unet.context_dim = 64
    unet.remat = False
    n_words = len(train_tokenizer.caption_words())
    vocab = n_words + 4  # <|pad|>, <|unk|>, the words, <|startoftext|>, <|endoftext|>
    cond = config.cond_stage
    cond.vocab_size = vocab
    cond.hidden_size = 64
    cond.intermediate_size = 256
    cond.num_layers = 2
    cond.num_heads = 4
    cond.max_length = 32
    cond.eos_token_id = vocab - 1
    cond.pad_token_id = 0
    cond.tokenizer_kind = "tokenizer_json"
    ldm = config.ldm
    ldm.image_size = 8
    with config.unlocked():
        unet.position_embedding = (8, 8)  # a learned absolute-position table: "at the top left" needs it
        ldm.scale_by_std = True
        ldm.prediction_type = "v"  # with eps the loss barely weighs the high-noise steps that decide layout
        config.diffusion.beta_schedule = "cosine"  # terminal SNR ~2e-9: at t = T only the text says where
        ldm.cond_drop_prob = 0.1
        config.stage = "ldm"
        config.data = autoencoder.data
        config.data.global_batch_size = 64
        config.data.batch_keys = ("image", "tokens")
        config.optimizer = ml_collections.ConfigDict(dict(
            learning_rate=1e-3, scale_lr=False, warmup_steps=500, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
            grad_clip_norm=1.0, accumulate_grad_batches=1))
        config.train = ml_collections.ConfigDict(dict(
            num_steps=6000, seed=0, log_every=100, image_every=500, num_images=64, eval_split="validation",
            dtype="float32", progress_bar=True, first_stage="", init_from="", tokenizer="shapes",
            train_cond_stage=True, ema_decay=0.999, precompute_latents=True, sample_posterior=True,
            sampler="ddim", sample_steps=50, guidance_scale=5.0, check_shapes=True))
        config.checkpoint = autoencoder.checkpoint
        config.checkpoint.every_steps = 500
        config.mesh = autoencoder.mesh
    config.lock()
    return config
