"""The ControlNet demonstration bench (bench/controlnet_shapes.py): its per-object mask IoU, layout adherence and
scores, the table and markdown, the evaluation scenes (seeded, disjoint from the training split, which the bench
regenerates as the dataset's generator draws it), the conflict pairing, and the training command it runs (no
training here: the bench's smoke run does that).

Run: .venv/bin/python -m pytest -q tests/test_controlnet_shapes_bench.py
"""
import dataclasses
import importlib.util
import pathlib
import sys

import numpy as np
import pytest

from ldm_jax.data import shapes

ROOT = pathlib.Path(__file__).resolve().parent.parent
Obj = shapes.ShapeObject
SCENE = (Obj("red", "circle", "large", "top left"), Obj("blue", "triangle", "small", "centre"),
         Obj("yellow", "square", "small", "bottom right"))


def _bench():
    spec = importlib.util.spec_from_file_location("controlnet_shapes", ROOT / "bench" / "controlnet_shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


def test_object_iou_of_renders_shifts_and_blanks(bench):
    image = shapes.render(SCENE, 32)
    assert bench.object_ious(image, SCENE) == [1.0, 1.0, 1.0]
    recoloured = tuple(dataclasses.replace(o, colour="green") for o in SCENE)  # colour-blind: the layout only
    assert bench.object_ious(shapes.render(recoloured, 32), SCENE) == [1.0, 1.0, 1.0]
    shifted = image.copy()
    top, bottom, left, right = shapes.cell_bounds("centre", 32)
    shifted[top:bottom, left:right] = np.roll(image[top:bottom, left:right], 2, axis=1)  # the triangle 2 px right
    ious = bench.object_ious(shifted, SCENE)
    assert ious[0] == ious[2] == 1.0 and 0 < ious[1] < 0.75, ious
    assert bench.object_ious(np.zeros_like(image), SCENE) == [0.0, 0.0, 0.0]
    elsewhere = shapes.render((dataclasses.replace(SCENE[0], position="bottom left"),), 32)  # the wrong cell
    assert bench.object_ious(elsewhere, SCENE[:1]) == [0.0]
    noisy = image.copy()
    noisy[top, left] = (0, 255, 0)  # a stray pixel in the triangle's cell counts against it
    assert bench.object_ious(noisy, SCENE)[1] < 1.0


def test_scores_of_renders(bench):
    other = (Obj("green", "square", "large", "top right"), Obj("magenta", "circle", "small", "bottom left"))
    images = np.stack([shapes.render(SCENE, 32), shapes.render(other, 32)])
    exact = bench.score(images, [SCENE, other], [SCENE, other], conflict=False)
    assert exact == {"mean_iou": 1.0, "iou_ge_0.5": 1.0, "layout_adherence": 1.0, "caption_adherence": 1.0,
                     "caption_colour": 1.0, "num_objects": 5}
    recoloured = np.stack([shapes.render(tuple(dataclasses.replace(o, colour="cyan") for o in s), 32)
                           for s in (SCENE, other)])
    layout_only = bench.score(recoloured, [SCENE, other], [SCENE, other], conflict=False)
    assert layout_only["layout_adherence"] == 1.0 and layout_only["mean_iou"] == 1.0
    assert layout_only["caption_adherence"] == 0.0
    # conflict: the images follow the captions' scenes (other, SCENE), the controls asked for (SCENE, other)
    swapped = bench.score(images[::-1], [SCENE, other], [SCENE, other][::-1], conflict=True)
    assert swapped["caption_adherence"] == 1.0 and swapped["caption_layout_iou"] == 1.0
    assert swapped["mean_iou"] == 0.0 and swapped["layout_adherence"] == 0.0
    extra = shapes.render(SCENE[:2] + (Obj("red", "square", "large", "top"),), 32)  # one object more than asked
    assert not bench.score(extra[None], [SCENE[:2]], [SCENE[:2]], conflict=False)["layout_adherence"]


def test_table_and_markdown(bench):
    base = {"mean_iou": 0.0712, "iou_ge_0.5": 0.083, "layout_adherence": 0.0, "caption_adherence": 0.0156}
    results = [{"condition": "empty prompt", "controlnet": False, **base},
               {"condition": "conflict", "controlnet": True, **base, "caption_layout_iou": 0.5}]
    rows = bench.table_rows(results)
    assert rows == [["empty prompt", "without", "0.071", "8.3%", "0.0%", "1.6%", "-"],
                    ["conflict", "with", "0.071", "8.3%", "0.0%", "1.6%", "0.500"]]
    text = bench.markdown(rows)
    assert text.splitlines()[0] == "| " + " | ".join(bench.HEADER) + " |"
    assert "| conflict | with | 0.071 | 8.3% | 0.0% | 1.6% | 0.500 |" in text
    run = {"steps": 20, "trained_params": 2838704, "wall_s": 61.4, "cpu_s": 100.2, "peak_rss_gib": 1.5}
    assert bench.training_line(run) == ("training: 20 steps, 2,838,704 trained parameters, wall 61 s, CPU 100 s, "
                                        "peak RSS 1.50 GiB")


def test_evaluation_scenes_are_seeded_and_held_out(bench):
    train = bench.training_scenes()
    assert len(train) == bench.NUM_TRAIN
    scenes = bench.evaluation_scenes(64, train)
    assert scenes == bench.evaluation_scenes(64, train)
    assert len({frozenset(s) for s in scenes}) == 64
    assert not {frozenset(s) for s in scenes} & {frozenset(s) for s in train}
    assert all(2 <= len(s) <= 3 and not any(shapes.is_heldout(o) for o in s) for s in scenes)
    assert bench.evaluation_scenes(8, train) == scenes[:8]  # a smaller set is a prefix
    partners = bench.conflict_partners(scenes)
    cells = [{o.position for o in s} for s in scenes]
    assert all(j != i for i, j in enumerate(partners))
    assert sum(not cells[i] & cells[j] for i, j in enumerate(partners)) >= 60  # nearly all disjoint layouts


def test_training_scenes_are_the_datasets(bench, tmp_path):
    """`training_scenes` draws what the captioned_shapes generator writes (a small split of the same seed)."""
    from ldm_jax.data import captioned_shapes, readers

    name = captioned_shapes.prepare_captioned_shapes(tmp_path, 32, num_train=12, num_validation=1, num_heldout=1)
    source = readers.TfdsSource(name, data_dir=str(tmp_path), split="train")
    captions = [source[i]["caption"] for i in range(len(source))]
    assert sorted(captions) == sorted(shapes.caption(s) for s in bench.training_scenes(12))


def test_training_command_overrides_the_steps(bench, tmp_path, monkeypatch):
    """The run the bench starts (its argv, read back as the training's config) and what it reports; the launcher
    itself is tested in tests/test_adapt_shapes.py."""
    from ldm_jax.training import main

    calls = []

    def fake_train(argv, log_path):
        calls.append(list(argv))
        workdir = pathlib.Path(argv[argv.index("--workdir") + 1])
        workdir.mkdir(parents=True)
        (workdir / "metrics.jsonl").write_text('{"step": 10}\n{"step": 20}\n')
        return 12.34, 1.234, 20.0

    monkeypatch.setattr(bench, "train_in_subprocess", fake_train)
    run = bench.train(tmp_path, 20, "runs/tfds")
    assert run == {"wall_s": 12.3, "cpu_s": 20.0, "peak_rss_gib": 1.23, "steps": 20, "command": run["command"],
                   "controlnet": str(tmp_path / "train" / "controlnet")}
    argv = calls[0]
    assert argv[:3] == ["-m", "ldm_jax", "train"] and run["command"] == "python " + " ".join(argv)
    config = main.load_config(ROOT / argv[argv.index("--config") + 1], argv[argv.index("--workdir") + 2:])
    assert config.train.num_steps == 20 and config.data.data_dir == "runs/tfds"
    assert config.train.adapter == "controlnet" and config.data.control_key == "shapes_mask"
    with pytest.raises(SystemExit, match="exists"):
        bench.train(tmp_path, 20, "runs/tfds")
    bench.train(tmp_path / "default", None, "runs/tfds")
    assert not any(a.startswith("--config.train.num_steps") for a in calls[-1])


def test_arguments(bench):
    args = bench.parse_args([])
    assert (args.steps, args.num_scenes, args.scale, args.picture) == (None, 64, 1.0, "docs/controlnet_shapes.png")
    with pytest.raises(SystemExit):
        bench.parse_args(["--num-scenes", "1"])
