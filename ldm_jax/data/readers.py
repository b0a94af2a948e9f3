"""Random-access example sources: prepared TFDS datasets, image folders with .txt captions, webdataset tars,
and arrays already in memory (precomputed latents).

Every source has `len(source)`, `source.name` and `source[i]` -> an example
{"image": uint8 (H, W, 3), "caption": str (when the source has captions), "label": int (when it has labels),
"control": uint8 (H, W, 3) (when the source has control images, ControlNet training)}
(an `ArraySource` gives its own named arrays instead of an image), or None when record i cannot be read (a corrupt image, an undecodable caption). Unreadable records are never
fatal: each is recorded once in `source.skipped` (a `SkipLog`; log `source.skipped.summary()`) and the
pipeline moves on to the next index. Zero-byte images and images without a caption are found while
indexing, so they are never indexed; they are counted in the same log. A source with nothing readable to
index raises a ValueError naming its path.

Control images (`control_key`, e.g. "conditioning_image", diffusers' column name in its fill50k ControlNet
example): one beside every image, named `<stem>.<control_key>.<ext>` (any image extension), the same layout in a
folder (`0001.png`, `0001.txt`, `0001.conditioning_image.png`) and in webdataset shards (members of key `0001`;
a folder tarred is a shard). Such files are never indexed as images. Unlike a missing caption, a missing control
image is the user's error (a ValueError naming the image and the file expected, while indexing), and so is a
control image whose size differs from its image's (`DataError` naming the file, when read). The captioned-shapes
world renders its control images instead (`ShapesControlSource`).
"""
from __future__ import annotations

import glob
import os
import pathlib
import tarfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ldm_jax.images import CONTROL_ALPHA, ImageFileError, decode_image

Example = dict[str, Any]
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")


class DataError(ValueError):
    """The data cannot be trained on as configured (e.g. no record of a source is readable, a control image of
    another size than its image): the user's to fix. (`ldm_jax.data.pipeline.DataError` is this class.)"""


class SkipLog:
    """Unreadable records, each counted once by name; `summary()` is the line a caller logs. Thread-safe: the
    device prefetch thread adds while the train loop reads the count."""

    def __init__(self, max_names: int = 5):
        self.max_names = max_names
        self._reasons: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, name: str, reason: str) -> None:
        """Records that `name` was skipped because of `reason` (repeats of a name count once)."""
        with self._lock:
            self._reasons.setdefault(name, reason)

    @property
    def count(self) -> int:
        return len(self._reasons)

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._reasons)

    def first(self) -> list[tuple[str, str]]:
        """The first `max_names` (name, reason) pairs, in the order they were found."""
        with self._lock:
            return list(self._reasons.items())[: self.max_names]

    def summary(self) -> str:
        """E.g. "skipped 2 unreadable images: first few a.png (zero bytes), b.jpg (image file is truncated)"."""
        count, first = self.count, self.first()
        if not count:
            return "skipped 0 unreadable images"
        return f"skipped {count} unreadable images: first few " + ", ".join(f"{n} ({r})" for n, r in first)


def _decode_example(name: str, image_bytes: bytes, caption_bytes: bytes | None, skipped: SkipLog,
                    control: tuple[str, bytes] | None = None) -> Example | None:
    """Decodes one record, or records it in `skipped` and returns None. Images are decoded by
    `images.decode_image` with transparency composited onto white, control images with `images.CONTROL_ALPHA`
    (as `ldm-jax sample` reads --control-image). control: (its file name, its bytes), the record's control image;
    one of another size than the image is a DataError naming both files."""
    example: Example = {}
    try:
        example["image"] = decode_image(image_bytes, alpha="white", name=name)
        if caption_bytes is not None:
            example["caption"] = caption_bytes.decode("utf-8").strip()
        if control is not None:
            example["control"] = decode_image(control[1], alpha=CONTROL_ALPHA, name=control[0])
    except ImageFileError as error:
        skipped.add(name, error.reason if error.name == name else f"{error.name}: {error.reason}")
        return None
    except UnicodeDecodeError as error:
        skipped.add(name, str(error))
        return None
    if control is not None:
        check_control_size(example["image"], example["control"], f"{control[0]} (the control image of {name})")
    return example


def check_control_size(image: np.ndarray, control: np.ndarray, what: str) -> None:
    """DataError naming `what` unless the control image (H, W, 3) has the image's height and width (both are
    resized and cropped together)."""
    if control.shape[:2] != image.shape[:2]:
        raise DataError(f"{what} is {control.shape[1]}x{control.shape[0]} (width x height) but its image is "
                        f"{image.shape[1]}x{image.shape[0]}: a control image must have its image's size")


def control_files(stem: str, control_key: str, extensions: Sequence[str]) -> list[str]:
    """The names the control image of the image `<stem>.<ext>` may have: `<stem>.<control_key>.<ext2>` for each
    image extension, in order of preference."""
    return [f"{stem}.{control_key}.{ext}" for ext in extensions]


def _check_control_key(control_key: str | None) -> str | None:
    if control_key is not None and (not control_key or "." in control_key or "/" in control_key):
        raise ValueError(f"control_key={control_key!r}: expected a name without dots or slashes, e.g. "
                         "'conditioning_image'")
    return control_key


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    return tuple(e.lower().lstrip(".") for e in extensions)


class ImageFolderSource:
    """Images under a folder (recursively, sorted by path), each with a sidecar caption `<stem>.txt`.

    Args:
      root: the folder.
      caption_extension: sidecar caption extension, or None for a source without captions.
      labels_from_dirs: if True, `label` is the index of the image's parent folder (relative to root) in the
        sorted list of such folders (`class_names`).
      extensions: image file extensions (case-insensitive).
      control_key: None, or the name of the control image beside every image, `<stem>.<control_key>.<ext>`
        (module doc); a missing one is a ValueError naming the image and the file expected.
    """

    def __init__(self, root: str | os.PathLike, *, caption_extension: str | None = "txt",
                 labels_from_dirs: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 control_key: str | None = None):
        self.root = pathlib.Path(root)
        self.name = str(self.root)
        self.skipped = SkipLog()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        extensions = _normalise_extensions(extensions)
        self._caption_ext = None if caption_extension is None else caption_extension.lstrip(".")
        self._control_key = _check_control_key(control_key)
        self._files: list[tuple[pathlib.Path, pathlib.Path | None, pathlib.Path | None]] = []
        images = [p for p in sorted(self.root.rglob("*")) if p.is_file() and p.suffix.lower().lstrip(".") in extensions]
        controls: dict[tuple[pathlib.Path, str], pathlib.Path] = {}
        if control_key is not None:
            tail = "." + control_key
            controls = {(p.parent, p.stem[:-len(tail)]): p for p in reversed(images) if p.stem.endswith(tail)}
            images = [p for p in images if not p.stem.endswith(tail)]
        for path in images:
            self._index(path, controls, extensions)
        if not self._files:
            raise ValueError(
                f"image folder {self.root} has no readable images with extensions {list(extensions)}"
                + (f" and .{self._caption_ext} captions" if self._caption_ext else "")
                + f"; {self.skipped.summary()}"
            )
        self.class_names: list[str] = []
        self._labels: list[int] | None = None
        if labels_from_dirs:
            dirs = [str(p.parent.relative_to(self.root)) for p, _, _ in self._files]
            self.class_names = sorted(set(dirs))
            self._labels = [self.class_names.index(d) for d in dirs]

    def _index(self, path: pathlib.Path, controls: dict[tuple[pathlib.Path, str], pathlib.Path],
               extensions: Sequence[str]) -> None:
        rel = str(path.relative_to(self.root))
        control = None
        if self._control_key is not None:
            control = controls.get((path.parent, path.stem))
            if control is None:
                expected = " or ".join(control_files(path.stem, self._control_key, extensions[:3])) + " ..."
                raise ValueError(f"image {path} has no control image beside it (expected {expected}: every image "
                                 f"needs one, named <stem>.{self._control_key}.<ext>)")
        if path.stat().st_size == 0:
            self.skipped.add(rel, "zero bytes")
            return
        caption_path = None
        if self._caption_ext is not None:
            caption_path = path.with_suffix("." + self._caption_ext)
            if not caption_path.is_file():
                self.skipped.add(rel, f"no caption file {caption_path.name}")
                return
        self._files.append((path, caption_path, control))

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Example | None:
        path, caption_path, control_path = self._files[index]
        name = str(path.relative_to(self.root))
        control = None if control_path is None else (str(control_path.relative_to(self.root)), control_path.read_bytes())
        example = _decode_example(name, path.read_bytes(),
                                  None if caption_path is None else caption_path.read_bytes(), self.skipped, control)
        if example is not None and self._labels is not None:
            example["label"] = self._labels[index]
        return example


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The .tar shard paths of a folder (its *.tar, sorted), a glob pattern (sorted) or a list of paths (as given)."""
    if isinstance(shards, (str, os.PathLike)):
        pattern = os.fspath(shards)
        if os.path.isdir(pattern):
            return sorted(glob.glob(os.path.join(pattern, "*.tar")))
        return sorted(glob.glob(pattern))
    return [os.fspath(s) for s in shards]


class TarShardsSource:
    """Webdataset-style .tar shards (the img2dataset layout: `<key>.jpg`/`.png` + `<key>.txt` per example).

    The members of every shard are indexed once, on construction (key = member path up to the first dot of
    its file name); reads then go straight to each member's byte range. Shards must be uncompressed tars.

    Args:
      shards: a folder (all its *.tar), a glob pattern, or a list of paths.
      caption_extension: caption member extension, or None for a source without captions.
      extensions: image member extensions, in order of preference when a key has several.
      control_key: None, or the name of every example's control image member `<key>.<control_key>.<ext>` (module
        doc); a key without one is a ValueError naming the shard and member.
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *,
                 caption_extension: str | None = "txt", extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 control_key: str | None = None):
        self._fds: dict[int, int] = {}
        self.shards = expand_shards(shards)
        self.name = os.fspath(shards) if isinstance(shards, (str, os.PathLike)) else f"{len(self.shards)} shards"
        self.skipped = SkipLog()
        if not self.shards:
            raise ValueError(f"no .tar shards found for {shards!r}")
        self._caption_ext = None if caption_extension is None else caption_extension.lstrip(".")
        self._extensions = _normalise_extensions(extensions)
        self._control_key = _check_control_key(control_key)
        # One record per example: (shard, name, image (offset, size), caption (offset, size) or None,
        # control (member name, (offset, size)) or None).
        self._records: list[tuple[int, str, tuple[int, int], tuple[int, int] | None, Any]] = []
        for shard_index, path in enumerate(self.shards):
            self._index_shard(shard_index, path)
        if not self._records:
            raise ValueError(
                f"tar shards {self.name} hold no readable examples (images {list(self._extensions)}"
                + (f" with .{self._caption_ext} captions" if self._caption_ext else "")
                + f"); {self.skipped.summary()}"
            )

    def _index_shard(self, shard_index: int, path: str) -> None:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for info in tar:
                    if info.isfile():
                        directory, _, base = info.name.rpartition("/")
                        stem, dot, ext = base.partition(".")
                        if dot:
                            key = f"{directory}/{stem}" if directory else stem
                            members.setdefault(key, {})[ext.lower()] = info
        except tarfile.ReadError as error:
            raise ValueError(f"tar shard {path} cannot be read as an uncompressed tar: {error}") from error
        for by_ext in members.values():
            image_ext = next((e for e in self._extensions if e in by_ext), None)
            if image_ext is None:
                continue  # e.g. the .json/.parquet side files of img2dataset
            image = by_ext[image_ext]
            name = f"{os.path.basename(path)}:{image.name}"
            control = self._control_member(path, image.name, by_ext)
            if image.size == 0:
                self.skipped.add(name, "zero bytes")
                continue
            caption = None
            if self._caption_ext is not None:
                info = by_ext.get(self._caption_ext)
                if info is None:
                    self.skipped.add(name, f"no .{self._caption_ext} caption member")
                    continue
                caption = (info.offset_data, info.size)
            self._records.append((shard_index, name, (image.offset_data, image.size), caption, control))

    def _control_member(self, path: str, image: str, by_ext: dict[str, tarfile.TarInfo]) -> Any:
        """(member name, (offset, size)) of an example's control image, or None without control_key."""
        if self._control_key is None:
            return None
        info = next((by_ext[f"{self._control_key}.{e}"] for e in self._extensions
                     if f"{self._control_key}.{e}" in by_ext), None)
        if info is None:
            stem = image.rpartition("/")[2].partition(".")[0]
            expected = " or ".join(control_files(stem, self._control_key, self._extensions[:3])) + " ..."
            raise ValueError(f"tar shard {path}: member {image} has no control image member (expected {expected}: "
                             f"every example needs one, named <key>.{self._control_key}.<ext>)")
        return f"{os.path.basename(path)}:{info.name}", (info.offset_data, info.size)

    def _read(self, shard_index: int, span: tuple[int, int]) -> bytes:
        fd = self._fds.get(shard_index)
        if fd is None:
            fd = self._fds[shard_index] = os.open(self.shards[shard_index], os.O_RDONLY)
        offset, size = span
        return os.pread(fd, size, offset)  # positionless: safe from several threads

    def close(self) -> None:
        """Closes the shard files (they are reopened on the next read)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Example | None:
        shard_index, name, image_span, caption_span, control = self._records[index]
        caption = None if caption_span is None else self._read(shard_index, caption_span)
        if control is not None:
            control = (control[0], self._read(shard_index, control[1]))
        return _decode_example(name, self._read(shard_index, image_span), caption, self.skipped, control)


class TfdsSource:
    """A split of a prepared TFDS dataset (array_record files), read through `tfds.data_source` without TF.

    Args:
      name: "dataset[/config][:version]", e.g. the name `prepare_captioned_shapes` returns.
      data_dir: the folder the dataset was prepared in.
      split: a split name or a TFDS split slice ("train[:90%]").
      image_key, caption_key, label_key: feature names to read; caption_key/label_key None to leave out.
      control_key: the feature holding each example's control image (of the image's size), or None.
    """

    def __init__(self, name: str, *, data_dir: str | os.PathLike, split: str, image_key: str = "image",
                 caption_key: str | None = "caption", label_key: str | None = None, control_key: str | None = None):
        import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy; only this source needs it)

        self.name = f"{name} ({split}) in {os.fspath(data_dir)}"
        self.skipped = SkipLog()
        try:
            builder = tfds.builder(name, data_dir=os.fspath(data_dir))
        except tfds.core.registered.DatasetNotFoundError as error:
            raise FileNotFoundError(_not_prepared(name, data_dir, split)) from error
        if not builder.is_prepared():
            raise FileNotFoundError(_not_prepared(name, data_dir, split))
        features = builder.info.features
        keys = {"image_key": image_key, "caption_key": caption_key, "label_key": label_key,
                "control_key": control_key}
        for arg, key in keys.items():
            if key is not None and key not in features:
                raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} ({arg}); features: {list(features)}")
        split_name = split.split("[")[0]
        if split_name not in builder.info.splits:
            raise ValueError(f"TFDS dataset {name!r} has no split {split_name!r}; splits: {list(builder.info.splits)}")
        self._keys = keys
        self._source = builder.as_data_source(split=split)
        if len(self._source) == 0:
            raise ValueError(f"TFDS dataset {self.name} is empty")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        record = self._source[index]
        image = np.asarray(record[self._keys["image_key"]])
        if image.ndim == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        example: Example = {"image": image}
        if self._keys["caption_key"] is not None:
            caption = record[self._keys["caption_key"]]
            example["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        if self._keys["label_key"] is not None:
            example["label"] = int(record[self._keys["label_key"]])
        if self._keys["control_key"] is not None:
            control = np.asarray(record[self._keys["control_key"]])
            example["control"] = np.repeat(control, 3, axis=-1) if control.shape[-1:] == (1,) else control
            check_control_size(image, example["control"], f"the {self._keys['control_key']!r} control image of "
                                                           f"record {index} of {self.name}")
        return example


def _not_prepared(name: str, data_dir: str | os.PathLike, split: str) -> str:
    """The one-line error for a TFDS dataset missing from `data_dir`, with the command that prepares it."""
    where = os.fspath(data_dir)
    missing = "" if os.path.isdir(where) else " (no such folder)"
    from ldm_jax.data import captioned_shapes  # noqa: PLC0415 (imports tfds; only for this message)

    command = captioned_shapes.prepare_command(name, where)
    how = (f"prepare it with: {command}" if command else
           f"prepare it there with `tfds build {name.split(':')[0]} --data_dir {where}` or point data_dir at the "
           "folder it was prepared in")
    return f"TFDS dataset {name!r} (split {split!r}) is not prepared in data_dir {where}{missing}; {how}"


class ArraySource:
    """Examples from in-memory arrays that share a leading size N: `source[i]` = {name: arrays[name][i]}.

    For what was computed once per dataset example in dataset-index order (the LDM stage's precomputed
    first-stage moments and token ids), so the pipeline reads it in the same order, with the same
    checkpointable position, as the images it came from. Every example is readable.
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, name: str = "arrays"):
        self.arrays = dict(arrays)
        sizes = {key: len(value) for key, value in self.arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"ArraySource {name}: the arrays must share a leading size, got {sizes}")
        self.name = name
        self._size = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> Example:
        return {key: value[index] for key, value in self.arrays.items()}


class FixedCaptionSource:
    """Another source's examples with every caption replaced by (or, for a source without captions, set to) one
    fixed `caption`: DreamBooth's instance images with their instance prompt, textual-inversion images with one
    prompt. Unreadable records stay unreadable (None); `skipped` is the wrapped source's."""

    def __init__(self, source: Any, caption: str):
        if not caption.strip():
            raise ValueError(f"a fixed caption for {getattr(source, 'name', source)} must not be empty")
        self.source, self.caption = source, caption
        self.name = f"{getattr(source, 'name', 'source')} (every caption {caption!r})"
        self.skipped = getattr(source, "skipped", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Example | None:
        example = self.source[index]
        return None if example is None else {**example, "caption": self.caption}


class ShapesControlSource:
    """A captioned-shapes source (TFDS `captioned_shapes`, or a folder of rendered scenes with their captions) with
    each example's control image rendered from its scene: `shapes.render_mask` of `shapes.parse_caption(caption)`
    (the exact inverse of the generator's caption), white-on-black masks of every object at the image's size.
    A caption that does not parse is a DataError naming the record. Unreadable records stay None."""

    def __init__(self, source: Any):
        self.source = source
        self.name = f"{getattr(source, 'name', 'source')} (control: the scenes' object masks)"
        self.skipped = getattr(source, "skipped", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Example | None:
        from ldm_jax.data import shapes  # noqa: PLC0415

        example = self.source[index]
        if example is None:
            return None
        if "caption" not in example:
            raise DataError(f"{self.name}: record {index} has no caption to render its control image from (set "
                            f"data.caption_key)")
        image = example["image"]
        try:
            scene = shapes.parse_caption(example["caption"])
        except ValueError as error:
            raise DataError(f"{self.name}: record {index}: not a captioned-shapes scene ({error})") from None
        if image.shape[0] != image.shape[1]:
            raise DataError(f"{self.name}: record {index} is {image.shape[1]}x{image.shape[0]}; captioned-shapes "
                            f"scenes are square")
        return {**example, "control": shapes.render_mask(scene, image.shape[0])}


class SubsetSource:
    """The first `size` examples of another source (e.g. the class images a DreamBooth run asked for, of a
    folder that holds more). ValueError when the source has fewer."""

    def __init__(self, source: Any, size: int):
        if not 1 <= size <= len(source):
            raise ValueError(f"{getattr(source, 'name', source)} holds {len(source)} examples; {size} were asked for")
        self.source, self.size = source, size
        self.name = getattr(source, "name", "source")
        self.skipped = getattr(source, "skipped", None)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Example | None:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is outside the first {self.size} examples of {self.name}")
        return self.source[index]
