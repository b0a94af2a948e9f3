"""The `captioned_shapes` TFDS dataset: scenes from `shapes.py`, generated locally, readable without TensorFlow.

Splits: train and validation (no held-out colour+shape pair anywhere), heldout (every scene has one).
Features: image (PNG, uint8 (R, R, 3)), caption (text; bytes when read back), objects (a sequence of
colour/shape/size/position class labels, in caption order). Records are array_record files, read back with
`tfds.data_source` / `readers.TfdsSource`. A split depends only on the config (resolution, sizes, seed, varied).

Two worlds: the exact one (configs res32, res64, res128: a caption fixes its image to the pixel) and the varied
one (configs res32_varied, res64_varied; `varied=True`): the same scenes and captions drawn with
`shapes.VARIED` (per object position in the cell, size in its class, rotation and colour jitter; a noisy
background; anti-aliased), so a caption maps to a distribution of images. Each example's generator is
numpy's default_rng([seed, split index, example index]); it draws the scene, then (varied) the render.

    name = prepare_captioned_shapes("/tmp/tfds", resolution=32, num_train=1000)
    source = readers.TfdsSource(name, data_dir="/tmp/tfds", split="train")

Command line: python -m ldm_jax.data.captioned_shapes --data_dir DIR --resolution 32 --num_train 50000 [--varied]
"""
from __future__ import annotations

import dataclasses
import io
import os
import re

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data import shapes

SPLITS: tuple[str, ...] = ("train", "validation", "heldout")


@dataclasses.dataclass(eq=False)
class CaptionedShapesConfig(tfds.core.BuilderConfig):
    """Image resolution, split sizes, the generation seed and the world (varied: `shapes.VARIED` renders, else
    the exact renders) of one `captioned_shapes` variant."""

    resolution: int = 32
    num_train: int = 50_000
    num_validation: int = 1_000
    num_heldout: int = 1_000
    seed: int = 0
    varied: bool = False

    def split_sizes(self) -> dict[str, int]:
        """{split: number of examples} for train, validation and heldout."""
        return {"train": self.num_train, "validation": self.num_validation, "heldout": self.num_heldout}


def _config_name(resolution: int, num_train: int, num_validation: int, num_heldout: int, seed: int,
                 varied: bool = False) -> str:
    world = "_varied" if varied else ""
    return f"res{resolution}{world}_train{num_train}_val{num_validation}_heldout{num_heldout}_seed{seed}"


_CONFIG_NAME = re.compile(r"^res(\d+)(_varied)?(?:_train(\d+)_val(\d+)_heldout(\d+)_seed(\d+))?$")


def prepare_command(name: str, data_dir: str | os.PathLike) -> str | None:
    """The command line that prepares the dataset `name` ("captioned_shapes/<config>[:version]", as
    `prepare_captioned_shapes` returns it) in `data_dir`, with --varied for a varied config, or None for a name that is
    not one of this dataset's."""
    dataset, _, config = name.split(":")[0].partition("/")
    match = _CONFIG_NAME.match(config or "res32")
    if dataset != "captioned_shapes" or not match:
        return None
    flags = [f"--data_dir {os.fspath(data_dir)}", f"--resolution {match[1]}"]
    if match[3] is not None:
        flags += [f"--num_train {match[3]}", f"--num_validation {match[4]}", f"--num_heldout {match[5]}",
                  f"--seed {match[6]}"]
    if match[2]:
        flags.append("--varied")
    return "python -m ldm_jax.data.captioned_shapes " + " ".join(flags)


def world_of(name: str) -> shapes.Variation | None:
    """The world a dataset name ("captioned_shapes/<config>[:version]") was drawn in: `shapes.VARIED` for a varied
    config (res32_varied, custom names with _varied), None for the exact world and for other datasets' names (what
    `shapes_checker.CheckerConfig(variation=...)` reads such images with)."""
    dataset, _, config = name.split(":")[0].partition("/")
    match = _CONFIG_NAME.match(config or "res32")
    return shapes.VARIED if dataset == "captioned_shapes" and match and match[2] else None


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic captioned shapes (see ldm_jax/data/shapes.py for the world and its geometry)."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds derives this from the package through `importlib_resources`, which is not installed here.
    code_path = epath.Path(__file__)
    # The varied configs came later under the same version: the exact configs' records are unchanged.
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        CaptionedShapesConfig(name=f"res{r}", resolution=r, description=f"{r}x{r} images") for r in (32, 64, 128)
    ] + [
        CaptionedShapesConfig(name=f"res{r}_varied", resolution=r, varied=True,
                              description=f"{r}x{r} images of the varied world (shapes.VARIED)") for r in (32, 64)
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        objects = {
            "colour": tfds.features.ClassLabel(names=list(shapes.COLOURS)),
            "shape": tfds.features.ClassLabel(names=list(shapes.SHAPES)),
            "size": tfds.features.ClassLabel(names=list(shapes.SIZES)),
            "position": tfds.features.ClassLabel(names=list(shapes.POSITIONS)),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "objects": tfds.features.Sequence(objects),
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated locally, nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        for index in range(cfg.split_sizes()[split]):
            rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
            scene = shapes.sample_scene(rng, heldout=split == "heldout")
            yield f"{split}_{index:09d}", _example(scene, render_example(scene, cfg.resolution, cfg.varied, rng))


def render_example(scene: shapes.Scene, resolution: int, varied: bool, rng: np.random.Generator) -> np.ndarray:
    """The image of one example: uint8 (resolution, resolution, 3); varied draws it from `rng` (which drew the
    scene) with `shapes.VARIED`, else the exact render (rng unused)."""
    if varied:
        return shapes.render(scene, resolution, variation=shapes.VARIED, rng=rng)
    return shapes.render(scene, resolution)


def _example(scene: shapes.Scene, image: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {
        "image": buffer.getvalue(),
        "caption": shapes.caption(scene),
        "objects": {
            "colour": [o.colour for o in scene],
            "shape": [o.shape for o in scene],
            "size": [o.size for o in scene],
            "position": [o.position for o in scene],
        },
    }


def prepare_captioned_shapes(
    data_dir: str | os.PathLike,
    resolution: int = 32,
    num_train: int = 50_000,
    num_validation: int = 1_000,
    num_heldout: int = 1_000,
    seed: int = 0,
    *,
    varied: bool = False,
) -> str:
    """Generates `captioned_shapes` under `data_dir` (array_record files) unless already there.

    Returns the dataset name ("captioned_shapes/<config>") for `tfds.data_source(name, data_dir=data_dir)`
    or `readers.TfdsSource`. A predefined config (res32, res64, res128; varied: res32_varied, res64_varied) is
    used when the sizes and seed are its defaults; otherwise a custom config whose name spells out every setting
    ("res32_varied_train8_val8_heldout8_seed0"). varied: the varied world (`shapes.VARIED`, module doc).
    """
    shapes.grid_geometry(resolution)  # checks the resolution
    sizes = {"num_train": num_train, "num_validation": num_validation, "num_heldout": num_heldout}
    for key, value in sizes.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    config = CaptionedShapesConfig(
        name=_config_name(resolution, num_train, num_validation, num_heldout, seed, varied),
        resolution=resolution, seed=seed, varied=varied, **sizes,
    )
    for predefined in CaptionedShapes.BUILDER_CONFIGS:
        if (predefined.resolution, predefined.seed, predefined.varied, predefined.split_sizes()) == (
                resolution, seed, varied, config.split_sizes()):
            config = predefined
    builder = CaptionedShapes(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_dir=os.path.join(os.fspath(data_dir), "downloads"))
    return f"{builder.name}/{config.name}"


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m ldm_jax.data.captioned_shapes --data_dir DIR [--resolution 32] [--num_train N]
    [--varied]."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="Generate the captioned_shapes TFDS dataset locally.")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num_train", type=int, default=50_000)
    parser.add_argument("--num_validation", type=int, default=1_000)
    parser.add_argument("--num_heldout", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--varied", action="store_true",
                        help="the varied world (shapes.VARIED): a caption maps to a distribution of images")
    args = parser.parse_args(argv)
    name = prepare_captioned_shapes(args.data_dir, args.resolution, args.num_train, args.num_validation,
                                    args.num_heldout, args.seed, varied=args.varied)
    print(f"prepared {name} in {args.data_dir}")


if __name__ == "__main__":
    main()
