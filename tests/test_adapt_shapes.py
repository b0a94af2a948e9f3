"""The new-colour concept of the adaptation demo (bench/adapt_shapes.py): white scenes render, caption and check
exactly, the default checker is untouched and refuses them, the bench writes data the recipes' image-folder
reader reads back, and its DreamBooth recipes train on those captions.

Run: .venv/bin/python -m pytest -q tests/test_adapt_shapes.py
"""
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
from scipy import ndimage

from ldm_jax.data import readers, shapes
from ldm_jax.metrics.shapes_checker import NEW_COLOUR_CHECKER, CheckerConfig, check_image, classify_pixels

ROOT = pathlib.Path(__file__).resolve().parent.parent
Obj = shapes.ShapeObject


def _bench():
    spec = importlib.util.spec_from_file_location("adapt_shapes", ROOT / "bench" / "adapt_shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _common():
    """bench/common.py, as the bench scripts import it (the `common` module of the bench/ folder)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("common")


def _new_scenes(n: int, seed: int) -> list[shapes.Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_new_colour_scene(rng, "white") for _ in range(n)]


def test_new_colour_is_outside_the_world():
    assert set(shapes.NEW_COLOURS).isdisjoint(shapes.COLOURS)
    palette = [shapes.BACKGROUND, *shapes.COLOURS.values(), *shapes.NEW_COLOURS.values()]
    for i, a in enumerate(palette):  # white keeps the world's margins: every pair 255 apart in a channel
        for b in palette[i + 1:]:
            assert np.abs(np.subtract(a, b)).max() == 255, (a, b)
    rng = np.random.default_rng(0)
    assert all(o.colour in shapes.COLOURS for _ in range(300) for o in shapes.sample_scene(rng, heldout=True))


def test_new_colour_scenes_render_and_round_trip():
    for scene in _new_scenes(200, seed=0):
        white = [o for o in scene if o.colour == "white"]
        assert len(white) == 1
        assert all(o.colour in shapes.COLOURS and not shapes.is_heldout(o) for o in scene if o.colour != "white")
        text = shapes.caption(scene)
        assert shapes.parse_caption(text) == scene and " white " in text
        image = shapes.render(scene, 32)
        np.testing.assert_array_equal(image[shapes.object_mask(white[0], 32)], 255)
    with pytest.raises(ValueError, match="colour 'pink'"):
        shapes.parse_caption("a small pink circle at the top")
    with pytest.raises(ValueError, match="'red' is not a new colour"):
        shapes.sample_new_colour_scene(np.random.default_rng(0), "red")


@pytest.mark.parametrize("resolution", [24, 32, 64])
def test_new_colour_checker_is_exact_on_clean_renders(resolution):
    rng = np.random.default_rng(resolution)
    scenes = _new_scenes(30, seed=resolution) + [shapes.sample_scene(rng, heldout=i % 2) for i in range(30)]
    for scene in scenes:
        result = check_image(shapes.render(scene, resolution), shapes.caption(scene), NEW_COLOUR_CHECKER)
        assert result.adheres and [o.detection.iou for o in result.objects] == [1.0] * len(scene)


def test_new_colour_checker_reads_degraded_white_and_judges_colours():
    rng = np.random.default_rng(1)
    right = 0
    scenes = _new_scenes(100, seed=2)
    for scene in scenes:  # blur 0.5 px and noise sigma 12, as tests/test_metrics.py degrades the world's images
        image = ndimage.gaussian_filter(shapes.render(scene, 32).astype(float), (0.5, 0.5, 0))
        image = np.clip(np.round(image + rng.normal(0, 12, image.shape)), 0, 255).astype(np.uint8)
        right += check_image(image, shapes.caption(scene), NEW_COLOUR_CHECKER).adheres
    assert right >= 95
    white = (Obj("white", "circle", "large", "top"),)
    yellow = (Obj("yellow", "circle", "large", "top"),)
    verdict = check_image(shapes.render(white, 32), yellow, NEW_COLOUR_CHECKER)
    assert not verdict.adheres and not verdict.objects[0].colour and verdict.objects[0].shape
    assert not check_image(shapes.render(yellow, 32), white, NEW_COLOUR_CHECKER).adheres


def test_default_checker_is_unchanged_and_refuses_new_colours():
    assert CheckerConfig().colours == tuple(shapes.COLOURS)
    image = shapes.render((Obj("white", "square", "large", "centre"), Obj("red", "circle", "small", "top")), 32)
    labels = classify_pixels(image.astype(float), 0.4)
    assert set(np.unique(labels)) == {0, 1}  # white is no colour of the world: background
    extended = classify_pixels(image.astype(float), 0.4, NEW_COLOUR_CHECKER.colours)
    assert set(np.unique(extended)) == {0, 1, 7}
    with pytest.raises(ValueError, match=r"colour\(s\) \['white'\] that this checker does not read"):
        check_image(image, "a large white square in the centre")
    with pytest.raises(ValueError, match="CheckerConfig.colours must be distinct names"):
        CheckerConfig(colours=("red", "pink"))
    with pytest.raises(ValueError, match="CheckerConfig.colours must be distinct names"):
        CheckerConfig(colours=("red", "red"))


def test_bench_data_reads_back_as_an_image_folder(tmp_path):
    bench = _bench()
    captions = bench.write_image_folder(tmp_path / "instance", bench.instance_scenes(6))
    assert len(set(captions)) == 6 and all(" white " in c for c in captions)
    source = readers.ImageFolderSource(tmp_path / "instance")
    assert [source[i]["caption"] for i in range(len(source))] == captions
    for i, text in enumerate(captions):
        np.testing.assert_array_equal(source[i]["image"], shapes.render(shapes.parse_caption(text), 32))
    prompts = bench.new_concept_prompts(40, captions)
    assert len(set(prompts)) == 40 and not set(prompts) & set(captions)
    assert bench.new_concept_prompts(40, captions) == prompts  # seeded


def test_bench_scores_and_table():
    bench = _bench()
    prompts = ["a large white circle at the top", "a small red square on the left"]
    images = np.stack([shapes.render(shapes.parse_caption(p), 32) for p in prompts])
    good = bench.score(images, prompts)
    assert good["accuracy"] == 1.0 and good["new_colour"] == 1.0
    swapped = bench.score(images[::-1], prompts)
    assert swapped["accuracy"] == 0.0 and swapped["new_colour"] == 0.0
    results = [{"label": "before", "new": swapped, "old": good, "taught": swapped},
               {"label": "LoRA", "trained_params": 1234, "steps": 10, "wall_s": 1.6, "cpu_s": 2.9, "peak_rss_gib": 0.5,
                "new": good, "old": swapped, "taught": good}]
    rows = bench.table_rows(results)
    assert rows[0][1:7] == ["-"] * 5 + ["0.0%"]
    assert rows[1] == ["LoRA", 1234, 10, "2", "3", "0.50", "100.0%", "100.0%", "100.0%", "0.0%"]
    assert "| LoRA | 1,234 | 10 | 2 | 3 | 0.50 | 100.0% | 100.0% | 100.0% | 0.0% |" in bench.markdown(rows)


def test_bench_measures_its_subprocess(tmp_path):
    """common.train_in_subprocess (the launcher every bench/ training run goes through): the peak RSS is the
    command's own, not this process's: with 512 MiB held here, a direct child's ru_maxrss
    would read at least that (Linux counts the parent's RSS up to the child's exec)."""
    common = _common()
    held = np.ones(2**29 // 8)
    wall, peak, cpu = common.train_in_subprocess(["-c", "import numpy; numpy.ones(2**28 // 8).sum()"], tmp_path / "a.log")
    assert 0 < wall < 60 and 0 < cpu < 60 and 0.25 <= peak < 0.5, peak  # a 256 MiB array: that process's own peak, not the test's
    del held
    with pytest.raises(SystemExit, match="(?s)failed \\(exit 3\\).*boom"):
        common.train_in_subprocess(["-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "b.log")


def test_bench_dreambooth_recipes_train_on_the_captions(tmp_path):
    """Both DreamBooth recipes (the config and the bench's overrides, as the run reads them) train on the instance
    captions with "white" as the identifier, each class prompt the caption with "yellow" instead."""
    from ldm_jax.data import pipeline
    from ldm_jax.training import dreambooth, main, train_ldm

    bench = _bench()
    captions = bench.write_image_folder(tmp_path / bench.INSTANCE_DIR, bench.instance_scenes(4))
    for name, weight in (("dreambooth", 1.0), ("dreambooth_no_prior", 0.0)):
        recipe = bench.RECIPES[name]
        config = main.load_config(ROOT / recipe.config, recipe.overrides(tmp_path))
        cfg = main.section(train_ldm.LDMTrainConfig, config, "train").dreambooth
        assert cfg.enabled and cfg.instance_captions and cfg.prior_loss_weight == weight
        data = dreambooth.instance_data(main.section(pipeline.DataConfig, config, "data"), cfg)
        prompts = dreambooth.prompts(cfg, pipeline.make_source(data))
        assert prompts.pairs == tuple((c, c.replace(" white ", " yellow ")) for c in captions)


def test_bad_input_exits_2_with_a_one_line_message(tmp_path, capsys):
    bench = _bench()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(SystemExit, match=r"prompts.txt holds 1 prompts; --num-prompts 4 asks for more") as error:
        bench.old_prompts(prompts, 4)
    assert error.value.code == 2
    assert capsys.readouterr().err.strip().endswith("--num-prompts 4 asks for more")
