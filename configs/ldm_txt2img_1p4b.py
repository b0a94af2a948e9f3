"""LDM-KL-8-G text-to-image, 1.45B (txt2img-1p4B-eval.yaml): the paper's LAION-400M model.

256x256 images, 32x32x4 KL-f8 latents; the UNet is SD v1's with context width 1280, from a BERT-style
transformer (n_embed 1280, 32 layers, bert-base-uncased tokenizer) trained jointly (the `cond_stage`).
Schedule: linear 0.00085..0.012, 1000 steps; scale_factor 0.18215. The preset `ldm_txt2img_1p4b`
(ldm_jax/presets/ldm_zoo.py); trained by configs/txt2img_1p4b_train.py.

    python sample.py --ckpt /models/txt2img-f8-large.ckpt --config configs/ldm_txt2img_1p4b.py \\
        --tokenizer /models/bert-base-uncased --prompt "a virus monster is playing guitar, oil on canvas"
Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k ldm_txt2img_1p4b`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("ldm_txt2img_1p4b")
