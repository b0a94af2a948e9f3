"""Input pipeline: preprocessing, seeded shuffling, per-host sharding, batching, a checkpointable iterator and
device prefetch (a background thread).

Order of examples. Epoch e uses the permutation `epoch_order(N, e, seed)` of all N indices (identity when
shuffle is off), truncated to a multiple of the process count so every host gets the same number; host p
takes every process_count-th index starting at p (`host_indices`). Hosts therefore read disjoint examples
and, together, every example of an epoch except at most process_count - 1 (a different tail each shuffled
epoch). The host's example stream is its epochs one after another; batches are consecutive runs of
`batch_size` readable examples (unreadable ones are skipped, see readers.py), so a batch may span two epochs.

Checkpointing. The iterator's position is (epoch, position within the host's epoch order); augmentation
randomness is a function of (seed, epoch, example index). `get_state()` returns a small JSON-able dict and
`set_state()` of that dict reproduces exactly the same following batches.

Batches (host-local; the global batch is batch_size * process_count):
  image float32 (B, R, R, 3) in [-1, 1]; index int64 (B,) dataset indices; caption list[str] of B captions
  (when the source has captions); tokens (B, ...) from the optional tokenizer (and tokens_2 when it gives two
  towers' ids); label int32 (B,) (when the source has labels); control float32 (B, R, R, 3) in [0, 1] (when the
  source has control images, `DataConfig.control_key`: resized to its image's size (Lanczos, as sampling resizes
  control images), cropped and flipped as its image, `preprocess_with_control`); any
  other array an example holds (an `ArraySource`'s), stacked (B, ...).
  With every decoded image, its geometry for SDXL's micro-conditioning (`preprocess_image_and_geometry`):
  original_size int32 (B, 2), the (height, width) of the image as read, before resizing; crop_top_left int32
  (B, 2), the (top, left) of the R x R crop in the resized (and, when flipped, mirrored) image. Both follow from
  the same (seed, epoch, index) draws as the crop, so they resume exactly; training configs keep them only when
  `data.batch_keys` names them (SDXL), as every stage asks for exactly its keys.

Device prefetch. `DevicePrefetcher` reads, decodes and places (`ldm_jax.parallel.host_local_to_global`) the
next batches on a background thread while the devices run the current step; its `get_state()` is the position
after the batches it has *returned*, so a checkpoint never skips the read-ahead.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from ldm_jax import parallel
from ldm_jax.data import readers
from ldm_jax.images import CONTROL_RESAMPLE

Batch = dict[str, Any]
CROPS = ("center", "random")
SOURCES = ("tfds", "folder", "tar")
GEOMETRY_KEYS = ("original_size", "crop_top_left")  # recorded per decoded image (SDXL micro-conditioning)
# Fields of the iterator state that define the example order; a state saved under other values is refused.
_ORDER_FIELDS = ("seed", "shuffle", "num_examples", "process_index", "process_count")


DataError = readers.DataError  # the data cannot be trained on as configured: the user's to fix
SHAPES_CONTROL = "shapes_mask"  # data.control_key: render each captioned-shapes scene's object masks


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` config section.

    source: "tfds" (name, data_dir, split, *_key), "folder" (path: a folder of images + .txt captions) or
    "tar" (path: a folder, glob or list of webdataset .tar shards). caption_key/label_key "" to leave out.
    global_batch_size is split evenly over processes; num_epochs None means forever. batch_keys: the keys
    each batch keeps (empty: all of image, index, caption, tokens, label, original_size, crop_top_left that
    exist; SDXL training asks for tokens_2, original_size and crop_top_left too). prefetch: batches the
    training loop reads and places on the devices ahead, on a background thread (0: on the step thread).
    prompt: "" (each example's own caption) or one caption for every example (`readers.FixedCaptionSource`; a
    folder / tar source then needs no caption files): e.g. textual-inversion images, "a photo of <my-token>".
    control_key: "" (no control images), the name of the control image beside every image of a folder / tar
    source (`<stem>.<control_key>.<ext>`, e.g. "conditioning_image": readers' module doc) or a TFDS feature, or
    "shapes_mask" (`SHAPES_CONTROL`: rendered from each captioned-shapes caption, `readers.ShapesControlSource`).
    Batches then hold "control" (ControlNet training).
    """

    source: str = "tfds"
    name: str = "captioned_shapes/res32"
    data_dir: str = ""
    split: str = "train"
    path: str = ""
    image_key: str = "image"
    caption_key: str = "caption"
    label_key: str = ""
    resolution: int = 32
    crop: str = "center"
    random_flip: bool = False
    global_batch_size: int = 64
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    drop_remainder: bool = True
    batch_keys: tuple[str, ...] = ()
    prefetch: int = 2
    prompt: str = ""
    control_key: str = ""

    def __post_init__(self):
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch={self.prefetch}; expected >= 0 (0 = no read-ahead)")
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r}; expected one of {SOURCES}")
        if self.crop not in CROPS:
            raise ValueError(f"data.crop={self.crop!r}; expected one of {CROPS}")
        for name in ("resolution", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)}; expected >= 1")
        if self.seed < 0:
            raise ValueError(f"data.seed={self.seed}; expected >= 0")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data.num_epochs={self.num_epochs}; expected >= 1 or None (forever)")


def preprocess_image(image: np.ndarray, resolution: int, *, crop: str = "center", flip: bool = False,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (resolution, resolution, 3) in [-1, 1].

    Resizes (bicubic, antialiased) so the shorter side is `resolution`, then crops the centre or, with
    crop="random", a window drawn from `rng`; flip=True mirrors left-right. Note that flipping changes the
    meaning of captions that mention left and right (captioned shapes). `preprocess_image_and_geometry` also
    says where the crop was.
    """
    return preprocess_image_and_geometry(image, resolution, crop=crop, flip=flip, rng=rng)[0]


def preprocess_image_and_geometry(image: np.ndarray, resolution: int, *, crop: str = "center", flip: bool = False,
                                  rng: np.random.Generator | None = None
                                  ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """`preprocess_image`, returning (image, original_size, crop_top_left) for SDXL's micro-conditioning.

    original_size: (height, width) of the image as given, before resizing (SGM's `original_size_as_tuple`).
    crop_top_left: (top, left) of the crop window in the resized image's pixels (SGM's `crop_coords_top_left`):
    0 <= top <= resized height - resolution, 0 <= left <= resized width - resolution. With flip=True, left is
    measured in the mirrored resized image (resized width - left - resolution), so the numbers describe the image
    the model sees; this equals diffusers' train_text_to_image_sdxl.py, which mirrors before resizing and
    cropping (diffusers PR 6547). The target size (SGM's `target_size_as_tuple`) is (resolution, resolution).
    """
    image, _, original_size, crop_top_left = preprocess_with_control(image, None, resolution, crop=crop, flip=flip,
                                                                      rng=rng)
    return image, original_size, crop_top_left


def preprocess_with_control(image: np.ndarray, control: np.ndarray | None, resolution: int, *, crop: str = "center",
                            flip: bool = False, rng: np.random.Generator | None = None
                            ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int], tuple[int, int]]:
    """`preprocess_image_and_geometry` of an image and its control image (uint8 (H, W, 3), the image's size, or
    None) under one transform: the same resize, crop window and flip. Returns (image float32 (R, R, 3) in [-1, 1],
    control float32 (R, R, 3) in [0, 1] or None, original_size, crop_top_left).

    The image is resized bicubic; the control image with `images.CONTROL_RESAMPLE` (Lanczos), the filter
    `ldm-jax sample` resizes --control-image with (diffusers' pipelines), so a net sees control images filtered
    alike in training and sampling. The geometry (shorter side to R, then a crop) is sampling's
    `--control-resize crop` for the centre crop, up to a pixel of rounding."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    for name, array in (("image", image), ("control image", control)):
        if array is not None and (array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8):
            raise ValueError(f"expected a uint8 (H, W, 3) {name}, got {array.dtype} {array.shape}")
    if control is not None and control.shape != image.shape:
        raise DataError(f"the control image is {control.shape[:2]} (H, W) but its image {image.shape[:2]}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng")
    height, width = image.shape[:2]
    size = None
    if min(height, width) != resolution:
        scale = resolution / min(height, width)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        height, width = size[1], size[0]
    if crop == "random":
        top = int(rng.integers(height - resolution + 1))
        left = int(rng.integers(width - resolution + 1))
    else:
        top, left = (height - resolution) // 2, (width - resolution) // 2

    def transform(array: np.ndarray, resample: int) -> np.ndarray:  # uint8 (H, W, 3) -> uint8 (R, R, 3)
        if size is not None:
            array = np.asarray(Image.fromarray(array).resize(size, resample))
        array = array[top:top + resolution, left:left + resolution]
        return array[:, ::-1] if flip else array

    out = transform(image, Image.Resampling.BICUBIC).astype(np.float32) / 127.5 - 1.0
    out_control = None if control is None else transform(control, CONTROL_RESAMPLE).astype(np.float32) / 255.0
    original_size = (int(image.shape[0]), int(image.shape[1]))
    return out, out_control, original_size, (top, width - left - resolution if flip else left)


def epoch_order(num_examples: int, epoch: int, *, seed: int, shuffle: bool = True) -> np.ndarray:
    """int64 (num_examples,): the global order of dataset indices in `epoch` (same on every host)."""
    if not shuffle:
        return np.arange(num_examples, dtype=np.int64)
    return np.random.default_rng([seed, 0, epoch]).permutation(num_examples).astype(np.int64)


def host_indices(num_examples: int, epoch: int, *, seed: int, shuffle: bool = True, process_index: int = 0,
                 process_count: int = 1) -> np.ndarray:
    """int64 (num_examples // process_count,): this host's dataset indices for `epoch`, in reading order."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    order = epoch_order(num_examples, epoch, seed=seed, shuffle=shuffle)
    usable = num_examples - num_examples % process_count
    return order[process_index:usable:process_count]


class DataIterator:
    """Host-local batches from a random-access source (see the module docstring for order and contents).

    Args:
      source: `len(source)` and `source[i]` -> example dict or None (unreadable, skipped).
      batch_size: examples per host-local batch.
      resolution, crop, random_flip: preprocessing (`preprocess_image`).
      seed: drives shuffling and augmentation.
      shuffle: a fresh permutation per epoch; False reads in index order.
      num_epochs: stop after this many epochs; None for forever.
      drop_remainder: with num_epochs, drop (True) or return (False) a last short batch.
      process_index, process_count: this host and the number of hosts (default: from jax).
      tokenizer: optional callable list[str] -> array (B, ...) stored as batch["tokens"], or -> a dict of such
        arrays merged into the batch (two text towers: {"tokens": ..., "tokens_2": ...}).
      keys: the batch keys to return (e.g. ("image", "tokens") for an all-array batch); None for all.
    """

    def __init__(self, source: Any, *, batch_size: int, resolution: int, crop: str = "center",
                 random_flip: bool = False, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, process_index: int | None = None, process_count: int | None = None,
                 tokenizer: Callable[[Sequence[str]], Any] | None = None, keys: Sequence[str] | None = None):
        self.source = source
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.num_examples = len(source)
        if self.num_examples < self.process_count:
            raise ValueError(f"dataset {getattr(source, 'name', source)} has {self.num_examples} examples, fewer "
                             f"than the {self.process_count} processes reading it")
        self.batch_size, self.resolution, self.crop, self.random_flip = batch_size, resolution, crop, random_flip
        self.seed, self.shuffle, self.num_epochs, self.drop_remainder = seed, shuffle, num_epochs, drop_remainder
        self.tokenizer = tokenizer
        self.keys = None if keys is None else tuple(keys)
        self._epoch, self._position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, host indices) cache

    @property
    def skipped(self) -> readers.SkipLog | None:
        """The source's log of unreadable records (`readers.SkipLog`), or None for a source without one."""
        return getattr(self.source, "skipped", None)

    def get_state(self) -> dict[str, Any]:
        """A JSON-able dict of the position: epoch, position, and the settings that define the order."""
        state = {"epoch": self._epoch, "position": self._position}
        state.update({field: getattr(self, field) for field in _ORDER_FIELDS})
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state()` dict; the next batches are those that followed when it was saved."""
        for field in _ORDER_FIELDS:
            if field in state and state[field] != getattr(self, field):
                raise ValueError(f"iterator state has {field}={state[field]!r} but this iterator has "
                                 f"{field}={getattr(self, field)!r}; the saved position would mean other examples")
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"iterator state lacks {sorted(missing)}; got keys {sorted(state)}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    def _host_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self._epoch:
            self._order = (self._epoch, host_indices(
                self.num_examples, self._epoch, seed=self.seed, shuffle=self.shuffle,
                process_index=self.process_index, process_count=self.process_count))
        return self._order[1]

    def _next_index(self) -> int | None:
        """The next dataset index of this host's stream, or None once num_epochs are done."""
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            return None
        order = self._host_order()
        if self._position >= len(order):
            self._epoch, self._position = self._epoch + 1, 0
            return self._next_index()
        self._position += 1
        return int(order[self._position - 1])

    def _prepare(self, example: readers.Example, index: int) -> readers.Example:
        if "image" not in example:  # an ArraySource's arrays: nothing to decode
            return {**example, "index": index}
        rng = None
        if self.crop == "random" or self.random_flip:
            rng = np.random.default_rng([self.seed, 1, self._epoch, index])
        flip = bool(self.random_flip and rng.integers(2))
        image, control, original_size, crop_top_left = preprocess_with_control(
            example["image"], example.get("control"), self.resolution, crop=self.crop, flip=flip, rng=rng)
        out = {**example, "image": image, "index": index, "original_size": original_size,
               "crop_top_left": crop_top_left}
        return out if control is None else {**out, "control": control}

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        examples, unreadable_in_a_row = [], 0
        while len(examples) < self.batch_size:
            index = self._next_index()
            if index is None:
                break
            example = self.source[index]
            if example is None:
                unreadable_in_a_row += 1
                if unreadable_in_a_row > self.num_examples:
                    skipped = self.skipped
                    raise DataError(f"no readable example in a whole epoch of {getattr(self.source, 'name', '?')}"
                                     + (f"; {skipped.summary()}" if skipped is not None else ""))
                continue
            unreadable_in_a_row = 0
            examples.append(self._prepare(example, index))
        if not examples or (len(examples) < self.batch_size and self.drop_remainder):
            raise StopIteration
        return self._collate(examples)

    def _collate(self, examples: list[readers.Example]) -> Batch:
        batch: Batch = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if key == "caption":
                batch[key] = values
            elif key in ("index", "label"):
                batch[key] = np.array(values, np.int64 if key == "index" else np.int32)
            elif key in GEOMETRY_KEYS:
                batch[key] = np.array(values, np.int32).reshape(len(values), 2)
            else:
                batch[key] = np.stack(values)
        if self.tokenizer is not None:
            if "caption" not in batch:
                raise ValueError("a tokenizer was given but the source has no captions")
            tokens = self.tokenizer(batch["caption"])
            if isinstance(tokens, dict):  # several towers' ids (SDXL: "tokens", "tokens_2")
                batch.update({name: np.asarray(ids) for name, ids in tokens.items()})
            else:
                batch["tokens"] = np.asarray(tokens)
        if self.keys is not None:
            missing = [k for k in self.keys if k not in batch]
            if missing:
                raise ValueError(f"batch keys {missing} were asked for but batches hold {sorted(batch)}")
            batch = {k: batch[k] for k in self.keys}
        return batch


class WeightedConcatIterator:
    """Batches made of several iterators' batches, concatenated in the given order, with per-example loss weights.

    parts: (name, iterator, weight) triples; the iterators give host-local batches with the same keys (e.g. two
    `DataIterator`s). Each batch gains "loss_weight" float32 (B,): part k's examples get weight_k * B / n_k (n_k
    its examples in the batch), so mean(loss_weight * loss_e) over the batch is the sum over parts of weight_k *
    (mean loss of part k): DreamBooth's instance loss + prior_loss_weight * class loss (`ldm.training_loss`). Every
    process holds the same composition, so the host-local weights are the global ones. `get_state()` is
    {name: that iterator's state}; `skipped` is the first part's unreadable-record log. Stops when any part stops.
    """

    def __init__(self, parts: Sequence[tuple[str, Any, float]]):
        names = [name for name, _, _ in parts]
        if not parts or len(set(names)) != len(names):
            raise ValueError(f"WeightedConcatIterator needs parts with distinct names, got {names}")
        self.parts = list(parts)

    @property
    def skipped(self) -> readers.SkipLog | None:
        """The first part's log of unreadable records."""
        return getattr(self.parts[0][1], "skipped", None)

    def get_state(self) -> dict[str, Any]:
        """{part name: its iterator's state} (JSON-able)."""
        return {name: it.get_state() for name, it, _ in self.parts}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state()` dict."""
        missing = [name for name, _, _ in self.parts if name not in state]
        if missing:
            raise ValueError(f"iterator state lacks the parts {missing}; got {sorted(state)}")
        for name, it, _ in self.parts:
            it.set_state(state[name])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batches = [(next(it), weight) for _, it, weight in self.parts]
        sizes = [len(next(iter(batch.values()))) for batch, _ in batches]
        keys = [set(batch) for batch, _ in batches]
        if any(k != keys[0] for k in keys):
            raise ValueError(f"the parts' batches hold different keys: {[sorted(k) for k in keys]}")
        total = sum(sizes)
        out: Batch = {}
        for key in batches[0][0]:
            values = [batch[key] for batch, _ in batches]
            out[key] = sum(values, []) if isinstance(values[0], list) else np.concatenate(values)
        out["loss_weight"] = np.concatenate([np.full(n, weight * total / n, np.float32)
                                             for n, (_, weight) in zip(sizes, batches)])
        return out


def to_device(batch: Batch, mesh: jax.sharding.Mesh, *, host_keys: Sequence[str] = ("index",)) -> Batch:
    """Host-local batch -> global batch: numeric arrays become jax.Arrays split over the mesh's devices
    (`parallel.host_local_to_global`); `host_keys` (int64 dataset indices) and python lists (captions) stay
    on the host."""
    arrays = {key: value for key, value in batch.items() if isinstance(value, np.ndarray) and key not in host_keys}
    return {**batch, **parallel.host_local_to_global(arrays, mesh)}


_END = object()


class DevicePrefetcher:
    """Iterates `to_device(batch, mesh)` of an iterator's batches, read `size` batches ahead on a thread.

    size 0: no thread; each batch is read and placed when asked for. `get_state()` is the wrapped iterator's
    state after the last batch *returned* (not the read-ahead), so a checkpoint taken between steps resumes at
    the next unseen batch; `set_state()` drops the read-ahead. An error in the reading thread is raised by the
    `next()` that would have returned its batch. While the thread runs the wrapped iterator belongs to it:
    use this object's get_state/set_state, and `close()` (stops the thread) when done.
    """

    def __init__(self, iterator: Any, mesh: jax.sharding.Mesh, *, size: int = 2):
        if size < 0:
            raise ValueError(f"prefetch size must be >= 0, got {size}")
        self.iterator, self.mesh, self.size = iterator, mesh, size
        self._state = iterator.get_state()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._finished = False

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.size == 0:
            batch = next(self.iterator)
            self._state = self.iterator.get_state()
            return to_device(batch, self.mesh)
        if self._finished:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        batch, self._state = item
        return batch

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.size)
        self._thread = threading.Thread(target=self._read, args=(self._queue, self._stop), daemon=True,
                                        name="DevicePrefetcher")
        self._thread.start()

    def _read(self, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        try:
            while not stop.is_set():
                batch = next(self.iterator)
                put((to_device(batch, self.mesh), self.iterator.get_state()))
        except StopIteration:
            put(_END)
        except Exception as err:  # not swallowed: handed to the consumer, whose next() raises it
            put(err)

    def get_state(self) -> dict[str, Any]:
        """The state after the last returned batch (JSON-able)."""
        return dict(self._state)

    def set_state(self, state: dict[str, Any]) -> None:
        """Drops the read-ahead (stopping the thread) and restores the wrapped iterator."""
        self.close()
        self.iterator.set_state(state)
        self._state = self.iterator.get_state()
        self._finished = False

    def close(self) -> None:
        """Stops the reading thread (if any) and drops what it read ahead; the wrapped iterator is put back at
        `get_state()`, so iterating again continues with the next unseen batch."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None
        self.iterator.set_state(self._state)


def check_source(cfg: DataConfig) -> None:
    """Checks cheaply (nothing is indexed or decoded) that the data a DataConfig names is there: the TFDS dataset
    prepared in data_dir with its split and features; the image folder or the .tar shards; and any data.path
    given, even one the source does not read. FileNotFoundError / ValueError naming the path otherwise."""
    if cfg.path and cfg.source != "tar" and not os.path.exists(cfg.path):
        unused = "" if cfg.source == "folder" else (f" (data.source={cfg.source!r} does not read it: set data.source "
                                                   "to 'folder' or 'tar' to train on it, or leave data.path empty)")
        raise FileNotFoundError(f"data.path {cfg.path} does not exist{unused}")
    if cfg.source == "tfds":
        make_source(cfg)  # opens the builder and the split's record files; reads no record
    elif cfg.source == "folder" and not os.path.isdir(cfg.path):
        raise FileNotFoundError(f"data.path {cfg.path!r} is not a folder of images (data.source='folder')")
    elif cfg.source == "tar" and not readers.expand_shards(cfg.path):
        raise FileNotFoundError(f"data.path {cfg.path!r} matches no .tar shards (data.source='tar')")


def make_source(cfg: DataConfig) -> Any:
    """The example source a DataConfig names (see DataConfig.source)."""
    if cfg.source == "tfds":
        if not cfg.data_dir:
            raise ValueError(f"data.data_dir is empty: it must name the folder the TFDS dataset {cfg.name!r} was "
                             "prepared in (python -m ldm_jax.data.captioned_shapes --data_dir DIR for captioned_shapes)")
        source = readers.TfdsSource(cfg.name, data_dir=cfg.data_dir, split=cfg.split, image_key=cfg.image_key,
                                    caption_key=(cfg.caption_key or None) if not cfg.prompt else None,
                                    label_key=cfg.label_key or None, control_key=_control_files_key(cfg))
        return _with_control(cfg, readers.FixedCaptionSource(source, cfg.prompt) if cfg.prompt else source)
    caption_ext = "txt" if cfg.caption_key and not cfg.prompt else None
    control = dict(control_key=_control_files_key(cfg))
    if cfg.source == "folder":
        source = readers.ImageFolderSource(cfg.path, caption_extension=caption_ext, **control)
    elif cfg.source == "tar":
        source = readers.TarShardsSource(cfg.path, caption_extension=caption_ext, **control)
    else:
        raise ValueError(f"data.source must be 'tfds', 'folder' or 'tar', got {cfg.source!r}")
    return _with_control(cfg, readers.FixedCaptionSource(source, cfg.prompt) if cfg.prompt else source)


def _control_files_key(cfg: DataConfig) -> str | None:
    """The control_key the reader reads control images by (None: none, or rendered from the captions)."""
    return None if cfg.control_key in ("", SHAPES_CONTROL) else cfg.control_key


def _with_control(cfg: DataConfig, source: Any) -> Any:
    """`source`, with the captioned-shapes control images rendered (`readers.ShapesControlSource`) when
    data.control_key is "shapes_mask"."""
    if cfg.control_key != SHAPES_CONTROL:
        return source
    if cfg.prompt:
        raise ValueError(f"data.control_key={SHAPES_CONTROL!r} renders each scene from its caption; data.prompt="
                         f"{cfg.prompt!r} replaces the captions (leave it empty)")
    return readers.ShapesControlSource(source)


def make_iterator(cfg: DataConfig, *, source: Any = None, tokenizer: Callable[[Sequence[str]], Any] | None = None,
                  process_index: int | None = None, process_count: int | None = None) -> DataIterator:
    """This host's DataIterator for a DataConfig (global_batch_size split evenly over processes)."""
    process_count = jax.process_count() if process_count is None else process_count
    if cfg.global_batch_size % process_count:
        raise ValueError(f"data.global_batch_size {cfg.global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    return DataIterator(
        make_source(cfg) if source is None else source,
        batch_size=cfg.global_batch_size // process_count, resolution=cfg.resolution, crop=cfg.crop,
        random_flip=cfg.random_flip, seed=cfg.seed, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs,
        drop_remainder=cfg.drop_remainder, process_index=process_index, process_count=process_count,
        tokenizer=tokenizer, keys=cfg.batch_keys or None,
    )
