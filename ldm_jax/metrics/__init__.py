"""Evaluation metrics: the captioned-shapes prompt checker (`shapes_checker`), PSNR/SSIM/LPIPS
(`image_quality`), the Frechet distance behind FID (`fid`) and CLIP score (`clip_score`)."""
