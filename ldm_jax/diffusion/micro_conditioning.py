"""SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2): the image sizes and crop a UNet with
`addition_embed_type="text_time"` is told about, as the numbers diffusers' SDXL pipelines pass (`time_ids`).

Plain numpy and dataclasses (no JAX), so that `ldm-jax sample` can hold and check these settings before JAX
starts; `pipeline` adds the numbers to the conditioning inputs for the image size.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def last_entry(num_time_ids: int) -> str:
    """What follows [original height, width, crop top, left] in a UNet's time ids: "target_size" (6 numbers, the
    base) or "aesthetic_score" (5, the refiner). ValueError for any other count. Sampling (`MicroConditioning`)
    and training (`ldm.micro_conditioning`) both lay the numbers out by it."""
    if num_time_ids == 6:
        return "target_size"
    if num_time_ids == 5:
        return "aesthetic_score"
    raise ValueError(f"the UNet takes {num_time_ids} micro-conditioning numbers; SDXL's are 6 (base) or 5 "
                     "(refiner, with the aesthetic score)")


@dataclasses.dataclass(frozen=True)
class MicroConditioning:
    """SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2), in pixels, with diffusers' defaults.

    original_size, target_size: (height, width); None means the image size. crops_coords_top_left: (top, left).
    The negative_* values condition the unconditional branch of classifier-free guidance; as in diffusers'
    StableDiffusionXLPipeline they are used only when both negative sizes are given (else the positive
    numbers), while the img2img / refiner pipeline defaults each one separately (sizes to the positive ones,
    crops to (0, 0)). aesthetic_score / negative_aesthetic_score replace the target size for UNets that take
    five numbers (the refiner, `requires_aesthetics_score`).
    """

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def time_ids(self, num_time_ids: int, height: int, width: int, *, img2img: bool) -> tuple[np.ndarray, np.ndarray]:
        """(positive, negative) micro-conditioning vectors (num_time_ids,) float32 for an image of this size:
        6 numbers (original h, w, crop top, left, target h, w) or 5 (original, crop, aesthetic score)."""
        size = (height, width)
        original, target = self.original_size or size, self.target_size or size
        if img2img:
            neg_original = self.negative_original_size or original
            neg_target = self.negative_target_size or target
            neg_crops = self.negative_crops_coords_top_left
        elif self.negative_original_size is not None and self.negative_target_size is not None:
            neg_original, neg_target = self.negative_original_size, self.negative_target_size
            neg_crops = self.negative_crops_coords_top_left
        else:
            neg_original, neg_target, neg_crops = original, target, self.crops_coords_top_left
        if last_entry(num_time_ids) == "aesthetic_score":
            pos = (*original, *self.crops_coords_top_left, self.aesthetic_score)
            neg = (*neg_original, *neg_crops, self.negative_aesthetic_score)
        else:
            pos = (*original, *self.crops_coords_top_left, *target)
            neg = (*neg_original, *neg_crops, *neg_target)
        return np.asarray(pos, np.float32), np.asarray(neg, np.float32)
