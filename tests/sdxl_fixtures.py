"""Parts of tiny random diffusers SDXL pipelines for tests (no downloads): tokenizers, the two text towers, a
VAE with SDXL's scale factor, every parameter randomised, SDXL's Euler scheduler.

Two widths are in use: 32 / 48-wide towers (tests/test_sdxl_pipeline.py: heads of 8 and 12) and 64 / 128-wide
ones (tests/test_sgm_single_file.py: 64-wide heads, what inferring a config from an SGM file's weights
needs). diffusers tells SDXL's towers apart by width, so the two must differ.
"""
from __future__ import annotations

import pathlib

from tokenizer_fixtures import write_clip_tokenizer


def tokenizers(directory: str | pathlib.Path, max_length: int = 77):
    """(tokenizer, tokenizer_2): a tiny CLIP BPE tokenizer written to `directory`, loaded twice; the second pads
    with "!" (id 0) as OpenCLIP's (SDXL's tokenizer_2) does, the first with the end-of-text token."""
    import transformers

    directory = write_clip_tokenizer(directory)
    kw = dict(local_files_only=True, model_max_length=max_length)
    tok = transformers.CLIPTokenizer.from_pretrained(str(directory), **kw)
    tok_2 = transformers.CLIPTokenizer.from_pretrained(str(directory), pad_token="!", **kw)
    return tok, tok_2


def text_encoders(tok, *, widths=(32, 48), heads=(4, 4), projection_dim=24, layers=3):
    """(CLIPTextModel, CLIPTextModelWithProjection): tower 1 as CLIP ViT-L (quick_gelu, eos pooling by id) and
    tower 2 as OpenCLIP bigG (gelu, eos_token_id 2 = argmax pooling as SDXL's config, a projection)."""
    import transformers

    common = dict(vocab_size=len(tok), intermediate_size=37, num_hidden_layers=layers, max_position_embeddings=77,
                  bos_token_id=tok.bos_token_id, layer_norm_eps=1e-5)
    clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=widths[0], num_attention_heads=heads[0], eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **common))
    big_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=widths[1], num_attention_heads=heads[1], hidden_act="gelu", eos_token_id=2, pad_token_id=1,
        projection_dim=projection_dim, **common))
    return clip_l, big_g


def vae(size: int = 16):
    """A 2-level AutoencoderKL (factor 2) with SDXL's scaling factor; its posterior std is ~exp(-15), so
    diffusers' sampled encodings equal the mode we use."""
    import diffusers
    import torch

    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=size,
        scaling_factor=0.13025)
    with torch.no_grad():
        model.quant_conv.weight[4:] = 0
        model.quant_conv.bias[4:] = -30.0
    return model


def randomise(*modules, scale: float = 0.05) -> None:
    """Adds noise to every parameter (zero-initialised layers such as conv_out and proj_out included), except
    the VAE's quant_conv (see `vae`); puts the modules in eval mode."""
    import torch

    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if not name.startswith("quant_conv"):
                    p.add_(scale * torch.randn_like(p))
            module.eval()


def scheduler():
    """SDXL's EulerDiscreteScheduler settings (scaled_linear 0.00085..0.012, leading spacing, steps_offset 1)."""
    import diffusers

    return diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            timestep_spacing="leading", steps_offset=1)


def unet(cross_attention_dim: int = 32 + 48, num_time_ids: int = 6, *, size: int = 16, in_channels: int = 4,
         block_out_channels=(32, 64), attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
         time_dim: int = 8, pooled: int = 24):
    """A 2-level SDXL-style UNet2DConditionModel (text_time addition embedding) for `size` x `size` images of the
    factor-2 `vae`: base (context 32 + 48, 6 time ids) by default, refiner with (48, 5)."""
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=size // 2, in_channels=in_channels, out_channels=4, block_out_channels=block_out_channels,
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim, use_linear_projection=True,
        transformer_layers_per_block=transformer_layers_per_block, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=pooled + num_time_ids * time_dim)


def base_and_refiner(tokenizer_dir: str | pathlib.Path, *, size: int = 16, **unet_kw):
    """(base StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline refiner sharing its VAE and big-G tower),
    every parameter randomised (call torch.manual_seed first); `unet_kw` goes to both `unet`s."""
    import diffusers

    tok, tok_2 = tokenizers(tokenizer_dir)
    clip_l, big_g = text_encoders(tok)
    base_unet, refiner_unet = unet(size=size, **unet_kw), unet(48, 5, size=size, **unet_kw)
    autoencoder = vae(size)
    randomise(clip_l, big_g, base_unet, refiner_unet, autoencoder)
    base = diffusers.StableDiffusionXLPipeline(vae=autoencoder, text_encoder=clip_l, text_encoder_2=big_g,
                                               tokenizer=tok, tokenizer_2=tok_2, unet=base_unet, scheduler=scheduler())
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=autoencoder, text_encoder=None, text_encoder_2=big_g, tokenizer=None, tokenizer_2=tok_2,
        unet=refiner_unet, scheduler=scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    return base, refiner
