"""Training metrics: a tqdm progress bar, TensorBoard event files (tensorboardX) and a JSONL file.

`MetricWriter(workdir)` writes, on the primary process only (others get a no-op writer):
- `workdir/tensorboard/`: scalars and image grids;
- `workdir/metrics.jsonl`: one JSON object per logged step, `{"step": n, "name": value, ...}`;
- `workdir/images/{name}_{step:08d}.png`: image grids from the periodic hooks.
On resume (`start_step` > 0) entries written after `start_step` by the interrupted run are dropped from
the JSONL file and purged from TensorBoard, so each step is logged once.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np
import tensorboardX
import tqdm
from PIL import Image

from ldm_jax.images import image_grid


class ProgressBar:
    """A tqdm bar over training steps showing the loss and images/s (silent when not enabled)."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True):
        self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def update(self, step: int, *, loss: float, images_per_sec: float) -> None:
        """Moves the bar to `step` and shows the latest loss and throughput."""
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{images_per_sec:.1f}", refresh=False)

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()


class MetricWriter:
    """Scalars and images to TensorBoard + JSONL + PNG under `workdir`; a no-op on non-primary processes."""

    def __init__(self, workdir: str | os.PathLike, *, start_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = os.fspath(workdir)
        if not self.enabled:
            return
        os.makedirs(os.path.join(self.workdir, "images"), exist_ok=True)
        self._jsonl_path = os.path.join(self.workdir, "metrics.jsonl")
        if start_step > 0:
            _truncate_jsonl(self._jsonl_path, start_step)
        self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")
        self._tb = tensorboardX.SummaryWriter(os.path.join(self.workdir, "tensorboard"),
                                              purge_step=start_step + 1 if start_step > 0 else None)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Logs float scalars at `step` (TensorBoard + one JSONL line)."""
        if not self.enabled:
            return
        values = {name: float(value) for name, value in scalars.items()}
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Logs each (N, H, W, C) batch in [-1, 1] as one grid: a TensorBoard image and a PNG file."""
        if not self.enabled:
            return
        for name, batch in images.items():
            grid = image_grid(batch)
            self._tb.add_image(name, grid, step, dataformats="HWC")
            png = grid[..., 0] if grid.shape[-1] == 1 else grid
            Image.fromarray(png).save(os.path.join(self.workdir, "images", f"{name.replace('/', '_')}_{step:08d}.png"))

    def flush(self) -> None:
        """Flushes TensorBoard and JSONL to disk."""
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes the files."""
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drops the lines of `path` logged after `last_step` (left by an interrupted run)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= last_step]
    if len(keep) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(keep)
