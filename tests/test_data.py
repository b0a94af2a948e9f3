"""Data: captioned-shapes world and TFDS builder, folder/tar/TFDS readers, and the input pipeline.

Everything is generated here (a few dozen 32x32 images); nothing is downloaded, TensorFlow is never imported.
"""
import io
import json
import pathlib
import sys
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax import parallel
from ldm_jax.config import build_dataclass, load_config_file
from ldm_jax.data import captioned_shapes, pipeline, readers, shapes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _scenes(n, heldout, seed=0):
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, heldout=heldout) for _ in range(n)]


# ---------------------------------------------------------------- the captioned-shapes world


def test_caption_roundtrip_and_rendering_is_checkable():
    for scene in _scenes(150, heldout=False) + _scenes(50, heldout=True):
        text = shapes.caption(scene)
        assert shapes.parse_caption(text) == scene
        image = shapes.render(scene, 32)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        painted = np.zeros((32, 32), bool)
        for obj in scene:
            mask = shapes.object_mask(obj, 32)
            assert mask.any()
            assert (image[mask] == shapes.COLOURS[obj.colour]).all()
            # The mask lies strictly inside the object's cell.
            top, bottom, left, right = shapes.cell_bounds(obj.position, 32)
            rows, cols = np.nonzero(mask)
            assert rows.min() + 0.5 > top and rows.max() + 0.5 < bottom
            assert cols.min() + 0.5 > left and cols.max() + 0.5 < right
            painted |= mask
        assert (image[~painted] == shapes.BACKGROUND).all()


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes_are_distinguishable_and_alike_in_every_cell(resolution):
    """Filled fraction of the object's box (the checker's shape cue): square 1, circle ~pi/4, triangle ~1/2."""
    sides = {}
    for size in shapes.SIZES:
        for shape in shapes.SHAPES:
            masks = []
            for position in shapes.POSITIONS:
                obj = shapes.ShapeObject(colour="red", shape=shape, size=size, position=position)
                top, bottom, left, right = shapes.object_box(obj, resolution)
                mask = shapes.object_mask(obj, resolution)
                assert not mask[:top].any() and not mask[bottom:].any()
                assert not mask[:, :left].any() and not mask[:, right:].any()
                masks.append(mask[top:bottom, left:right])
            assert all(np.array_equal(masks[0], m) for m in masks)  # identical in every cell
            fraction = masks[0].mean()
            sides[size] = masks[0].shape[0]
            assert {"square": fraction == 1.0, "circle": 0.65 < fraction < 0.8,
                    "triangle": 0.45 < fraction < 0.55}[shape], (shape, fraction)
            if shape == "triangle":  # apex up: the rows widen downwards
                widths = masks[0].sum(1)
                assert (np.diff(widths) >= 0).all() and widths[-1] == masks[0].shape[1]
    assert sides["large"] >= sides["small"] + 2
    assert sides["large"] ** 2 > 1.7 * sides["small"] ** 2
    with pytest.raises(ValueError, match="at least 24 pixels, got 16"):
        shapes.render((shapes.ShapeObject("red", "circle", "small", "top"),), 16)


def test_caption_format_and_parse_errors():
    scene = (shapes.ShapeObject("red", "circle", "small", "top left"),
             shapes.ShapeObject("blue", "square", "large", "bottom"))
    assert shapes.caption(scene) == "a small red circle at the top left and a large blue square at the bottom"
    with pytest.raises(ValueError, match="'a small red circel at the top'"):
        shapes.parse_caption("a small red circel at the top")
    with pytest.raises(ValueError, match="somewhere"):
        shapes.parse_caption("a small red circle somewhere")
    with pytest.raises(ValueError, match="distinct cells"):
        shapes.parse_caption("a small red circle at the top and a large blue square at the top")
    with pytest.raises(ValueError, match="colour 'pink'"):
        shapes.ShapeObject("pink", "circle", "small", "top")


def test_heldout_pairs_only_in_heldout_scenes():
    for scene in _scenes(300, heldout=False):
        assert not any(shapes.is_heldout(o) for o in scene)
    for scene in _scenes(100, heldout=True):
        assert any(shapes.is_heldout(o) for o in scene)
    # Every colour and every shape still appears in training pairs.
    train_pairs = {(o.colour, o.shape) for s in _scenes(300, heldout=False) for o in s}
    assert {c for c, _ in train_pairs} == set(shapes.COLOURS)
    assert {s for _, s in train_pairs} == set(shapes.SHAPES)


# ---------------------------------------------------------------- TFDS builder, read back without TF


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    name = captioned_shapes.prepare_captioned_shapes(data_dir, resolution=32, num_train=24, num_validation=8,
                                                     num_heldout=8, seed=3)
    return name, data_dir


def test_builder_builds_and_reads_back_without_tensorflow(tfds_dir):
    name, data_dir = tfds_dir
    assert name == "captioned_shapes/res32_train24_val8_heldout8_seed3"
    assert captioned_shapes.prepare_captioned_shapes(data_dir, 32, 24, 8, 8, 3) == name  # already there
    sizes = {"train": 24, "validation": 8, "heldout": 8}
    captions = {}
    for split, size in sizes.items():
        source = readers.TfdsSource(name, data_dir=data_dir, split=split)
        assert len(source) == size
        captions[split] = []
        for i in range(size):
            example = source[i]
            assert set(example) == {"image", "caption"}
            scene = shapes.parse_caption(example["caption"])
            np.testing.assert_array_equal(example["image"], shapes.render(scene, 32))
            assert any(shapes.is_heldout(o) for o in scene) == (split == "heldout")
            captions[split].append(example["caption"])
    assert len(set(captions["train"])) > 20  # scenes differ
    # The structured labels agree with the caption.
    import tensorflow_datasets as tfds

    raw = tfds.data_source(name, data_dir=data_dir, split="validation")
    info = raw.dataset_info.features["objects"]
    for record in raw:
        scene = shapes.parse_caption(record["caption"].decode())
        for field in ("colour", "shape", "size", "position"):
            names = [info[field].int2str(int(v)) for v in record["objects"][field]]
            assert names == [getattr(o, field) for o in scene]
    assert "tensorflow" not in sys.modules


def test_tfds_source_errors(tfds_dir, tmp_path):
    name, data_dir = tfds_dir
    with pytest.raises(ValueError, match="no feature 'text'.*caption_key"):
        readers.TfdsSource(name, data_dir=data_dir, split="train", caption_key="text")
    with pytest.raises(ValueError, match="no split 'test'"):
        readers.TfdsSource(name, data_dir=data_dir, split="test")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        readers.TfdsSource("captioned_shapes/res32", data_dir=tmp_path, split="train")
    assert len(readers.TfdsSource(name, data_dir=data_dir, split="train[:10]")) == 10


# ---------------------------------------------------------------- image folder and tar readers


def _png(rng, height=40, width=48):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bad_files(rng):
    """name -> (image bytes, caption): two corrupt and one zero-byte image, all with captions."""
    return {
        "corrupt.png": (b"not an image at all" * 10, "corrupt"),
        "truncated.png": (_png(rng)[:300], "truncated"),
        "empty.jpg": (b"", "empty"),
    }


def _good_files(rng, n):
    return {f"img_{i:02d}.png": (_png(rng), f"caption {i}") for i in range(n)}


def _write_folder(root, files):
    for name, (data, text) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if text is not None:
            path.with_suffix(".txt").write_text(text + "\n")


def _write_tar(path, files):
    with tarfile.open(path, "w") as tar:
        for name, (data, text) in files.items():
            stem = name.rsplit(".", 1)[0]
            members = [(name, data), (f"{stem}.json", b"{}")] + ([(f"{stem}.txt", text.encode())] if text else [])
            for member, payload in members:
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _read_all(source):
    """All examples of one unshuffled epoch through the pipeline, as {caption: index}."""
    iterator = pipeline.DataIterator(source, batch_size=1, resolution=32, seed=0, shuffle=False, num_epochs=1,
                                     process_index=0, process_count=1)
    out = {}
    for batch in iterator:
        assert batch["image"].shape == (1, 32, 32, 3) and batch["image"].dtype == np.float32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        out[batch["caption"][0]] = int(batch["index"][0])
    return out


def test_image_folder_skips_and_counts_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    good = _good_files(rng, 5)
    _write_folder(tmp_path, {**good, **_bad_files(rng), "sub/no_caption.png": (_png(rng), None)})
    source = readers.ImageFolderSource(tmp_path)
    assert len(source) == 7  # 5 good + 2 corrupt; the zero-byte and caption-less images are not indexed
    assert source.skipped.count == 2
    assert _read_all(source).keys() == {f"caption {i}" for i in range(5)}
    assert source.skipped.count == 4
    summary = source.skipped.summary()
    assert summary.startswith("skipped 4 unreadable images: first few ")
    for name in ("empty.jpg (zero bytes)", "no_caption.png (no caption file", "corrupt.png", "truncated.png"):
        assert name in summary
    _read_all(source)  # a second epoch counts nothing twice
    assert source.skipped.count == 4
    example = source[source._files.index(next(f for f in source._files if f[0].name == "img_03.png"))]
    assert example["caption"] == "caption 3" and example["image"].shape == (40, 48, 3)


def test_image_folder_labels_from_dirs(tmp_path):
    rng = np.random.default_rng(1)
    _write_folder(tmp_path, {f"{cls}/{i}.png": (_png(rng, 8, 8), None) for cls in ("cat", "dog") for i in range(2)})
    source = readers.ImageFolderSource(tmp_path, caption_extension=None, labels_from_dirs=True)
    assert source.class_names == ["cat", "dog"]
    assert [source[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    assert "caption" not in source[0]


def test_tar_shards_skip_and_count_bad_members(tmp_path):
    rng = np.random.default_rng(2)
    good = _good_files(rng, 6)
    items = list(good.items())
    _write_tar(tmp_path / "00000.tar", dict(items[:3] + list(_bad_files(rng).items())))
    _write_tar(tmp_path / "00001.tar", dict(items[3:] + [("nocap.jpg", (_png(rng), None))]))
    source = readers.TarShardsSource(tmp_path)
    assert source.shards == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert len(source) == 8 and source.skipped.count == 2  # zero-byte and caption-less found while indexing
    assert _read_all(source).keys() == {f"caption {i}" for i in range(6)}
    assert source.skipped.count == 4
    assert "00000.tar:empty.jpg (zero bytes)" in source.skipped.summary()
    assert "00000.tar:truncated.png" in source.skipped.names
    # The same bytes as the files that went in.
    example = source[0]
    np.testing.assert_array_equal(example["image"], np.asarray(Image.open(io.BytesIO(items[0][1][0]))))
    assert len(readers.TarShardsSource(str(tmp_path / "*1.tar"))) == 3
    source.close()


def test_empty_datasets_raise_naming_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"image folder {empty} has no readable images"):
        readers.ImageFolderSource(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        readers.ImageFolderSource(tmp_path / "missing")
    only_bad = tmp_path / "bad"
    _write_folder(only_bad, {"a.png": (b"", "x")})
    with pytest.raises(ValueError, match=rf"{only_bad} has no readable.*skipped 1 unreadable images.*a.png \(zero"):
        readers.ImageFolderSource(only_bad)
    with pytest.raises(ValueError, match="no .tar shards found"):
        readers.TarShardsSource(empty)
    _write_tar(tmp_path / "x.tar", {"a.png": (b"", "x")})
    with pytest.raises(ValueError, match="x.tar hold no readable examples"):
        readers.TarShardsSource(tmp_path / "x.tar")
    (tmp_path / "junk.tar").write_bytes(b"\x1f\x8b" + b"0" * 600)
    with pytest.raises(ValueError, match="junk.tar cannot be read as an uncompressed tar"):
        readers.TarShardsSource(tmp_path / "junk.tar")
    # A source whose every record is unreadable: the iterator says so instead of spinning.
    _write_folder(tmp_path / "corrupt", {"a.png": (b"junk", "x")})
    iterator = pipeline.DataIterator(readers.ImageFolderSource(tmp_path / "corrupt"), batch_size=1,
                                     resolution=8, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no readable example.*skipped 1 unreadable"):
        next(iterator)


# ---------------------------------------------------------------- pipeline


class ListSource:
    """In-memory source: example i is a 16x12 image whose pixels encode i; None for indices in `bad`."""

    def __init__(self, n, bad=()):
        self.n, self.bad, self.name = n, set(bad), f"list of {n}"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            return None
        rng = np.random.default_rng(i)
        return {"image": rng.integers(0, 256, (16, 12, 3), dtype=np.uint8), "caption": f"example {i}"}


def _iterator(source, **kwargs):
    defaults = dict(batch_size=4, resolution=8, seed=0, process_index=0, process_count=1)
    return pipeline.DataIterator(source, **{**defaults, **kwargs})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
        assert x["caption"] == y["caption"]


def test_preprocess_image():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = pipeline.preprocess_image(image, 8)
    np.testing.assert_allclose(out, image / 127.5 - 1.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pipeline.preprocess_image(image, 8, flip=True), out[:, ::-1])
    tall = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    centre = pipeline.preprocess_image(tall, 10)
    assert centre.shape == (10, 10, 3) and centre.dtype == np.float32
    assert -1.0 <= centre.min() and centre.max() <= 1.0
    resized = np.asarray(Image.fromarray(tall).resize((10, 15), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(centre, resized[2:12] / 127.5 - 1.0, atol=1e-6)
    crops = {pipeline.preprocess_image(tall, 10, crop="random", rng=np.random.default_rng(s)).tobytes()
             for s in range(20)}
    assert len(crops) > 1
    with pytest.raises(ValueError, match="crop must be one of"):
        pipeline.preprocess_image(image, 8, crop="centre")
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\) image, got float32"):
        pipeline.preprocess_image(image.astype(np.float32), 8)


def test_shuffling_is_deterministic_by_seed():
    epoch0 = [b["index"] for b in _take(_iterator(ListSource(20), seed=7), 5)]
    again = [b["index"] for b in _take(_iterator(ListSource(20), seed=7), 5)]
    other = [b["index"] for b in _take(_iterator(ListSource(20), seed=8), 5)]
    np.testing.assert_array_equal(np.concatenate(epoch0), np.concatenate(again))
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(other))
    assert sorted(np.concatenate(epoch0)) == list(range(20))  # one epoch is a permutation
    e0, e1 = (pipeline.epoch_order(20, e, seed=7) for e in (0, 1))
    assert sorted(e1) == list(range(20)) and not np.array_equal(e0, e1)
    unshuffled = np.concatenate([b["index"] for b in _take(_iterator(ListSource(20), shuffle=False), 5)])
    np.testing.assert_array_equal(unshuffled, np.arange(20))


@pytest.mark.parametrize("augment", [False, True])
def test_iterator_state_restore_gives_identical_batches(augment):
    kwargs = dict(crop="random", random_flip=True) if augment else {}
    source = ListSource(10, bad={3, 7})
    first = _iterator(source, seed=1, **kwargs)
    _take(first, 3)  # 12 reads of an 8-readable-per-epoch stream: the next batches span epochs 1 and 2
    state = json.loads(json.dumps(first.get_state()))
    following = _take(first, 4)
    resumed = _iterator(source, seed=1, **kwargs)
    resumed.set_state(state)
    _assert_same_batches(following, _take(resumed, 4))
    assert {int(i) for b in following for i in b["index"]}.isdisjoint({3, 7})
    with pytest.raises(ValueError, match="seed=1 but this iterator has seed=2"):
        _iterator(source, seed=2).set_state(state)
    with pytest.raises(ValueError, match="lacks"):
        resumed.set_state({"seed": 1})


def test_finite_epochs_and_remainder():
    batches = list(_iterator(ListSource(10, bad={0}), batch_size=4, num_epochs=2))
    assert [len(b["index"]) for b in batches] == [4, 4, 4, 4]  # 18 readable: the last 2 dropped
    batches = list(_iterator(ListSource(10, bad={0}), batch_size=4, num_epochs=2, drop_remainder=False))
    assert [len(b["index"]) for b in batches] == [4, 4, 4, 4, 2]


def test_per_host_sharding_is_disjoint_and_covers_everything():
    for n, hosts in ((24, 3), (26, 4)):
        per_epoch = []
        for epoch in range(2):
            shards = [pipeline.host_indices(n, epoch, seed=5, process_index=p, process_count=hosts)
                      for p in range(hosts)]
            assert {len(s) for s in shards} == {n // hosts}
            union = np.concatenate(shards)
            assert len(set(union)) == len(union) == n - n % hosts
            per_epoch.append(set(union))
        if n % hosts == 0:
            assert per_epoch[0] == set(range(n))
        else:  # the dropped tail changes between epochs
            assert per_epoch[0] != per_epoch[1]
    # Through the iterator: 3 hosts x 2 batches of 4 read one epoch of 24 exactly once.
    seen = []
    for p in range(3):
        iterator = _iterator(ListSource(24), batch_size=4, seed=5, process_index=p, process_count=3)
        seen.append(np.concatenate([b["index"] for b in _take(iterator, 2)]))
    assert sorted(np.concatenate(seen)) == list(range(24))
    with pytest.raises(ValueError, match="fewer than the 3 processes"):
        _iterator(ListSource(2), process_count=3)


def test_tokenizer_and_config():
    tokenizer = lambda captions: [[len(c), ord(c[-1])] for c in captions]  # noqa: E731
    batch = next(_iterator(ListSource(6), tokenizer=tokenizer, shuffle=False))
    np.testing.assert_array_equal(batch["tokens"], [[9, ord(str(i))] for i in range(4)])
    arrays_only = next(_iterator(ListSource(6), tokenizer=tokenizer, keys=("image", "tokens")))
    assert set(arrays_only) == {"image", "tokens"}
    with pytest.raises(ValueError, match=r"batch keys \['label'\] were asked for"):
        next(_iterator(ListSource(6), keys=("image", "label")))
    config = load_config_file(ROOT / "configs" / "data_captioned_shapes.py")
    cfg = build_dataclass(pipeline.DataConfig, config.data, where="data")
    assert cfg.name == "captioned_shapes/res32" and cfg.num_epochs is None and not cfg.random_flip
    iterator = pipeline.make_iterator(cfg.__class__(**{**cfg.__dict__, "global_batch_size": 8}),
                                      source=ListSource(10), process_index=1, process_count=2)
    assert next(iterator)["image"].shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match="global_batch_size 8 is not divisible by the 3 processes"):
        pipeline.make_iterator(cfg.__class__(**{**cfg.__dict__, "global_batch_size": 8}), source=ListSource(10),
                               process_count=3)


def test_make_iterator_reads_captioned_shapes(tfds_dir):
    name, data_dir = tfds_dir
    cfg = pipeline.DataConfig(name=name, data_dir=str(data_dir), split="heldout", global_batch_size=4)
    batch = next(pipeline.make_iterator(cfg, process_index=0, process_count=1))
    for image, text in zip(batch["image"], batch["caption"]):
        expected = shapes.render(shapes.parse_caption(text), 32)
        np.testing.assert_allclose(image, expected / 127.5 - 1.0, atol=1e-6)


@pytest.mark.parametrize("size", [0, 2])
def test_device_prefetch_shards_batches_and_tracks_state(size):
    mesh = parallel.make_mesh(data=8)
    sharding = parallel.batch_sharding(mesh)
    source = ListSource(20)
    prefetcher = pipeline.DevicePrefetcher(_iterator(source, batch_size=8, seed=3), mesh, size=size)
    reference = _iterator(source, batch_size=8, seed=3)
    for _ in range(2):
        batch, expected = next(prefetcher), next(reference)
        assert isinstance(batch["image"], jax.Array) and batch["image"].sharding == sharding
        assert batch["image"].shape == (8, 8, 8, 3)
        assert len(batch["image"].addressable_shards) == 8
        assert isinstance(batch["caption"], list) and isinstance(batch["index"], np.ndarray)
        _assert_same_batches([batch], [expected])
        assert prefetcher.get_state() == reference.get_state()  # not the read-ahead position
    state = prefetcher.get_state()
    following = _take(prefetcher, 3)
    prefetcher.set_state(state)
    _assert_same_batches(following, _take(prefetcher, 3))
    # close() puts the iterator back after the last returned batch: nothing read ahead is lost.
    prefetcher.close()
    _assert_same_batches(_take(prefetcher, 2), _take(reference, 5)[3:])
    prefetcher.close()


def test_device_prefetch_ends_and_reports_reader_errors():
    mesh = parallel.make_mesh(data=8)
    one_epoch = _iterator(ListSource(20), batch_size=8, seed=0, num_epochs=1)
    prefetcher = pipeline.DevicePrefetcher(one_epoch, mesh, size=2)
    assert len(_take(prefetcher, 2)) == 2
    with pytest.raises(StopIteration):
        next(prefetcher)

    class Broken(ListSource):
        def __getitem__(self, i):
            if i == 9:
                raise RuntimeError("disk on fire")
            return super().__getitem__(i)

    prefetcher = pipeline.DevicePrefetcher(_iterator(Broken(20), batch_size=8, shuffle=False), mesh, size=2)
    next(prefetcher)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(prefetcher)
    prefetcher.close()


def test_array_source_reads_in_the_image_order():
    """Precomputed arrays through the same DataIterator: the order, epochs and position of the images'."""
    arrays = {"moments": np.arange(10 * 2, dtype=np.float32).reshape(10, 2), "tokens": np.arange(10)[:, None] * 3}
    images = _iterator(ListSource(10), batch_size=4, seed=5)
    latents = _iterator(readers.ArraySource(arrays), batch_size=4, seed=5, keys=("moments", "tokens"))
    for _ in range(4):  # past the end of the first epoch
        a, b = next(images), next(latents)
        assert set(b) == {"moments", "tokens"} and b["moments"].shape == (4, 2)
        np.testing.assert_array_equal(b["tokens"][:, 0], a["index"] * 3)
    assert latents.get_state() == images.get_state()
    with pytest.raises(ValueError, match="share a leading size"):
        readers.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})
