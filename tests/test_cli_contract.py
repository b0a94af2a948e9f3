"""The command-line error contract, table-driven over every flag of `sample`, `train`, `evaluate` and `convert`.

Each flag gets the bad values its kind calls for: a value of the wrong type, values out of range, NaN and
+-inf where it is a number, a path that does not exist where it names a file, a directory that cannot be
created where output goes, an unknown name where it picks one of several. Every case must end with exit
status 2 and exactly one line `PROG: error: ...` on stderr (the last one; progress lines before it are
allowed), naming the flag (or the bad path), and no traceback.

The tables classify every flag: `test_every_flag_is_classified` fails when a command gains a flag the tables
do not know, so a new flag arrives with its bad values. Commands run in-process (`main(argv)`), nothing is
sampled or trained: every case is refused before the work starts.
"""
from __future__ import annotations

import argparse
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm_jax import cli, evaluate, sampling, store
from ldm_jax.data.captioned_shapes import prepare_captioned_shapes
from ldm_jax.training import main as train_main
from ldm_jax.training import train_autoencoder, train_ldm

ROOT = pathlib.Path(__file__).resolve().parent.parent
MISSING = "/nonexistent/ldm-jax-contract/missing"
OTHER_MISSING = "/nonexistent/ldm-jax-contract/other"
NUMBERS = {"int": ["abc", "1.5"], "float": ["abc", "nan", "inf", "-inf"]}
SPECIAL = {"path": [MISSING], "dir": ["<FILE>/sub"], "choice": ["bogus"],
           "lora": [MISSING, f"{MISSING}:0.5", "<FILE>:abc", "<FILE>:nan"]}  # FILE[:SCALE]

# kind: "text" / "switch" (no bad value), "path" (must exist), "dir" (output: must be creatable), "choice",
# or (number kind, out-of-range values).
SAMPLE_FLAGS = {
    "prompt": "text", "negative_prompt": "text", "plms": "switch",
    "prompts_file": "path", "init_image": "path", "mask": "path", "latents": "path", "checkpoint": "path",
    "tokenizer": "path", "config": "path", "text_encoder_config": "path", "outdir": "dir",
    "sampler": "choice", "precision": "choice", "param_dtype": "choice", "attention": "choice", "timestep_spacing": "choice",
    "steps": ("int", ["0", "-1"]), "n": ("int", ["0"]), "height": ("int", ["0", "64", "100000"]),
    "width": ("int", ["0", "63", "100000"]), "seed": ("int", ["-2", str(2**32)]), "steps_offset": ("int", ["-1"]),
    "batch_size": ("int", ["0"]), "guidance": ("float", []), "eta": ("float", ["-0.5"]),
    "strength": ("float", ["-0.1", "1.5"]), "clip_skip": ("int", ["-1", "50"]), "distilled": "choice",
    # SDXL micro-conditioning: two integers each (one bad token is "expected 2 arguments"); the embedded model
    # takes no micro-conditioning, so a good value is refused too.
    "original_size": ("int", ["0"]), "target_size": ("int", ["0"]), "crops_coords_top_left": ("int", ["-1"]),
    "negative_original_size": ("int", []), "negative_target_size": ("int", []),
    "negative_crops_coords_top_left": ("int", []), "aesthetic_score": ("float", ["7"]),
    "negative_aesthetic_score": ("float", ["2"]), "refiner": "path", "denoising_end": ("float", ["0", "1.5"]),
    "loras": "lora", "embedding_files": "path", "tokens": "text",
    # ControlNet: --controlnet / --control-image are given with a valid partner (see _argv), so the case is refused
    # for its own value and not for the pairing.
    "controlnets": "lora", "control_images": "path", "control_starts": ("float", ["-0.1", "1"]),
    "control_ends": ("float", ["0", "1.5"]), "guess_mode": "switch", "control_resize": "choice",
    "compile_cache": "switch",
}
CONVERT_FLAGS = {
    "source": "path", "dest": "dir", "to": "choice", "dtype": "choice", "config": "path", "tokenizer": "path",
    "text_encoder_config": "path", "use_ema": "switch", "lora": "lora", "embedding": "path", "token": "text",
    "controlnet": "switch", "base": "path",
}
EVALUATE_FLAGS = {  # per sub-command
    "split": {"data_dir": "path", "split": "choice", "name": "choice", "num": ("int", ["0", "-1"]), "outdir": "dir"},
    "autoencode": {"checkpoint": "path", "attention": "choice", "images": "path", "outdir": "dir",
                   "compile_cache": "switch"},
    "adherence": {"images": "path", "per_image": "switch", "world": "choice"},
    "reconstruction": {"images": "path", "reconstructions": "path", "lpips_vgg": "path", "lpips_heads": "path",
                       "compile_cache": "switch"},
    "fid": {"stats": "path", "images": "path", "inception": "path", "batch_size": ("int", ["0"]),
            "compile_cache": "switch"},
    "clip-score": {"images": "path", "clip": "path", "per_image": "switch", "batch_size": ("int", ["0"]),
                   "compile_cache": "switch"},
    "sensitivity": {"checkpoint": "path", "attention": "choice", "images": "path",
                    "timesteps": ("text", ["a,b", "5000", "-1"]), "seed": ("int", ["-1", str(2**32)]),
                    "compile_cache": "switch"},
    "distribution": {"images": "path", "reference": "path", "resolution": ("int", ["0"]), "k": ("int", ["0"]),
                     "batch_size": ("int", ["0"]), "compile_cache": "switch"},
}
TRAIN_FLAGS = {"config": "path", "workdir": "dir", "coordinator": ("text", ["localhost", "host:0"]),
               "num_processes": ("int", ["0"]), "process_id": ("int", ["-1"])}
# The training sections' fields of configs/shapes_ldm.py (the LDM stage) and configs/shapes_autoencoder.py
# (its `loss`), then the LDM's model sections: out-of-range values per numeric field ([] where every value of
# the type means something: -1 heads = "use head channels", 0 dropout, ...); str fields are paths, choices or
# names read with the data.
TRAIN_FIELDS = {
    "checkpoint.every_steps": ["0"], "checkpoint.keep": ["0"], "checkpoint.async_save": [],
    "data.global_batch_size": ["0"], "data.prefetch": ["-1"], "data.resolution": ["0"], "data.seed": ["-1"],
    "data.drop_remainder": [], "data.random_flip": [], "data.shuffle": [], "data.num_epochs": [],
    "data.batch_keys": [], "data.caption_key": "text", "data.image_key": "text", "data.label_key": "text",
    "data.crop": "choice", "data.source": "choice", "data.data_dir": "path", "data.path": "path",
    "data.name": "text", "data.split": "text",
    "mesh.data": ["0"], "mesh.fsdp": ["0"], "mesh.param_rules": [],
    "optimizer.accumulate_grad_batches": ["0"], "optimizer.b1": ["1.5"], "optimizer.b2": ["-0.5"],
    "optimizer.eps": ["-1.0"], "optimizer.grad_clip_norm": ["-1.0"], "optimizer.learning_rate": ["-1.0"],
    "optimizer.warmup_steps": ["-1"], "optimizer.weight_decay": ["-1.0"], "optimizer.scale_lr": [],
    "train.num_steps": ["-1"], "train.seed": ["-1"], "train.log_every": ["0"], "train.image_every": ["0"],
    "train.num_images": ["0"], "train.sample_steps": ["0"], "train.ema_decay": ["1.5"],
    "train.guidance_scale": [], "train.attention": "choice", "train.dtype": "choice", "train.sampler": "choice",
    "train.first_stage": "path", "train.init_from": "path", "train.tokenizer": "path", "train.eval_split": "text",
    "train.remat": [], "train.check_shapes": [], "train.precompute_latents": [], "train.progress_bar": [],
    "train.sample_posterior": [], "train.train_cond_stage": [], "train.compile_cache": [],
    "train.max_train_seconds": ["-1.0"],
}
TRAIN_FIELDS.update({
    "loss.disc_factor": ["-1.0"], "loss.disc_ndf": ["0"], "loss.disc_num_layers": ["0"], "loss.disc_start": ["-1"],
    "loss.disc_weight": ["-1.0"], "loss.kl_weight": ["-1.0"], "loss.perceptual_weight": ["-1.0"],
    "loss.lpips_vgg_path": "path", "loss.pixel_loss": "choice", "optimizer.disc_learning_rate": [],
})
# The model sections of configs/shapes_ldm.py (the architecture; its first stage comes from train.first_stage).
TRAIN_FIELDS.update({
    "unet.adm_in_channels": [], "unet.attention_resolutions": [], "unet.channel_mult": [], "unet.context_dim": [],
    "unet.conv_resample": [], "unet.dropout": ["-1", "1.0"], "unet.flip_sin_to_cos": [], "unet.freq_shift": [],
    "unet.in_channels": ["0"], "unet.model_channels": ["0", "-1"], "unet.num_classes": [],
    "unet.num_head_channels": ["7"], "unet.num_heads": [], "unet.num_res_blocks": ["0"], "unet.out_channels": [],
    "unet.position_embedding": [], "unet.resblock_updown": [], "unet.transformer_depth": ["0"],
    "unet.use_linear_in_transformer": [], "unet.use_scale_shift_norm": [], "unet.use_spatial_transformer": [],
    "cond_stage.eos_token_id": ["-1", "26"], "cond_stage.hidden_act": "choice", "cond_stage.hidden_size": ["0"],
    "cond_stage.intermediate_size": ["0"], "cond_stage.kind": "choice", "cond_stage.layer_norm_eps": ["0.0"],
    "cond_stage.max_length": ["0"], "cond_stage.num_heads": ["0", "-1", "3"], "cond_stage.num_layers": ["0"],
    "cond_stage.output_layer": "choice", "cond_stage.pad_token_id": ["-1", "26"], "cond_stage.pooling": "choice",
    "cond_stage.tokenizer_kind": "choice", "cond_stage.vocab_size": ["0"],
    "diffusion.beta_schedule": "choice", "diffusion.channels": ["0"], "diffusion.cond_drop_prob": ["-0.1", "1.5"],
    "diffusion.conditioning_key": "choice", "diffusion.cosine_s": ["0.0"], "diffusion.image_size": ["0"],
    "diffusion.learn_logvar": [], "diffusion.linear_end": [], "diffusion.linear_start": [],
    "diffusion.logvar_init": [], "diffusion.loss_type": "choice", "diffusion.loss_weighting": "choice",
    "diffusion.min_snr_gamma": ["0.0"], "diffusion.num_timesteps": ["0"], "diffusion.prediction_type": "choice",
    "diffusion.scale_by_std": [], "diffusion.scale_factor": ["0.0"], "diffusion.v_posterior": ["1.5"],
})
TRAIN_SECTIONS = ("checkpoint", "data", "mesh", "optimizer", "train", "loss", "unet", "cond_stage", "diffusion")
MODEL_SECTIONS = ("unet", "cond_stage", "diffusion")


# ---------------------------------------------------------------------------------------------- tables


def _parser_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of every flag and positional of `parser` (not help)."""
    return {a.dest: a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))}


def _evaluate_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = evaluate.build_parser()
    return dict(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


def _training_fields() -> dict[str, tuple[object, str]]:
    """'section.field' -> (default value, config file) of the training sections of both stages' configs (the
    LDM's where both have the field) and the LDM config's model sections."""
    fields = {}
    for name in ("shapes_autoencoder.py", "shapes_ldm.py"):
        config = train_main.load_config(ROOT / "configs" / name)
        for section in TRAIN_SECTIONS:
            if section in config and (name == "shapes_ldm.py" or section not in MODEL_SECTIONS):
                fields.update({f"{section}.{k}": (v, name) for k, v in config[section].items()})
    return fields


def _bad_values(kind) -> list[str]:
    """The bad values of a flag of `kind` (see the tables)."""
    if isinstance(kind, tuple):
        number, extra = kind
        return NUMBERS.get(number, []) + list(extra)
    return SPECIAL.get(kind, [])


def _field_kind(name: str, default: object):
    kind = TRAIN_FIELDS[name]
    if isinstance(kind, str):
        return kind
    if isinstance(default, bool):
        return ("bool", ["maybe", *kind])
    if isinstance(default, int):
        return ("int", kind)
    if isinstance(default, float):
        return ("float", kind)
    return ("other", kind)


def _cases():
    cases = []
    sample = _parser_flags(sampling.build_parser())
    cases += [("sample", dest, sample[dest].option_strings[0], value)
              for dest, kind in SAMPLE_FLAGS.items() for value in _bad_values(kind)]
    cases += [("convert", dest, _option(dest), value) for dest, kind in CONVERT_FLAGS.items()
              for value in _bad_values(kind)]
    for command, parser in _evaluate_parsers().items():
        flags = _parser_flags(parser)
        cases += [(f"evaluate {command}", dest, _option(dest, flags[dest]), value)
                  for dest, kind in EVALUATE_FLAGS[command].items() for value in _bad_values(kind)]
    cases += [("train", dest, f"--{dest}", value) for dest, kind in TRAIN_FLAGS.items() for value in _bad_values(kind)]
    for name, (default, _) in _training_fields().items():
        cases += [("train", name, f"--config.{name}", value) for value in _bad_values(_field_kind(name, default))]
    return cases


def _option(dest: str, action: argparse.Action | None = None) -> str:
    """The flag a case sets: the action's first option string, a positional's name, or --dest-with-dashes."""
    if action is not None and action.option_strings:
        return action.option_strings[0]
    return dest if dest in ("source", "dest") else "--" + dest.replace("_", "-")


CASES = _cases()


def test_every_flag_is_classified():
    assert set(_parser_flags(sampling.build_parser())) == set(SAMPLE_FLAGS)
    parsers = _evaluate_parsers()
    assert set(parsers) == set(EVALUATE_FLAGS)
    for command, parser in parsers.items():
        assert set(_parser_flags(parser)) == set(EVALUATE_FLAGS[command]), command
    assert set(_training_fields()) == set(TRAIN_FIELDS)
    assert len(CASES) > 150


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Valid inputs every case starts from: a captioned PNG folder, a prepared tiny dataset, the embedded
    model's autoencoder as a first-stage directory, a plain file (under which nothing can be created)."""
    root = tmp_path_factory.mktemp("contract")
    images = root / "images"
    images.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "a red circle at the top left")
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(images / "00000.png", pnginfo=info)
    (images / "prompts.txt").write_text("a red circle at the top left\n")
    data_dir = root / "tfds"
    name = prepare_captioned_shapes(data_dir, resolution=32, num_train=8, num_validation=8, num_heldout=8)
    first_stage = root / "first_stage"
    model = store.load_model()
    store.save_first_stage(first_stage, model.config.first_stage, model.params["first_stage"])
    blocker = root / "a_file"
    blocker.write_text("not a directory\n")
    return dict(root=root, images=images, image=images / "00000.png", data_dir=data_dir, name=name,
                first_stage=first_stage, file=blocker)


def _value(value: str, world) -> str:
    return value.replace("<FILE>", str(world["file"]))


def _argv(command: str, dest: str, option: str, value: str, world, tmp_path) -> list[str]:
    """A valid command line for `command` with `option` set to the bad `value`."""
    out = str(tmp_path / "out")
    if command == "sample":
        args = {"--prompt": "a red circle", "--steps": "1", "--outdir": out}
        if dest == "mask":
            args["--init-image"] = str(world["image"])
        if dest == "controlnets":
            args["--control-image"] = str(world["image"])
        if dest == "control_images":
            args["--controlnet"] = str(world["file"])
        args[option] = value
        return [x for kv in args.items() for x in kv]
    if command == "convert":
        positional = {"source": "shapes", "dest": out}
        args = {"--to": "ldm"}
        if dest in positional:
            positional[dest] = value
        else:
            args[option] = value
        return [positional["source"], positional["dest"], *[x for kv in args.items() for x in kv]]
    if command.startswith("evaluate"):
        return [command.split()[1], *_evaluate_args(command.split()[1], option, value, world, out)]
    return _train_args(option, value, world, tmp_path)


def _evaluate_args(sub: str, option: str, value: str, world, out: str) -> list[str]:
    """A valid `evaluate SUB` command line with `option` set to `value`. What cannot be valid here (FID
    statistics, a CLIP model) is another missing path, which the error must not be about."""
    images = str(world["images"])
    args = {
        "split": {"--data_dir": str(world["data_dir"]), "--name": world["name"], "--outdir": out},
        "autoencode": {"--images": images, "--outdir": out},
        "adherence": {"--images": images},
        "reconstruction": {"--images": images, "--reconstructions": images},
        "fid": {"--stats": [OTHER_MISSING, OTHER_MISSING]},
        "clip-score": {"--images": images, "--clip": OTHER_MISSING},
        "sensitivity": {"--images": images, "--timesteps": "50"},
        "distribution": {"--images": images, "--reference": images},
    }[sub]
    if sub == "fid" and option in ("--stats", "--images"):  # two paths, one of the two flags
        args = {option: [value, value]}
    elif sub == "fid" and option == "--inception":
        args = {"--images": [images, images], option: value}
    else:
        args = {**args, option: value}
    return [x for flag, v in args.items() for x in [flag, *(v if isinstance(v, list) else [v])]]


def _train_args(option: str, value: str, world, tmp_path) -> list[str]:
    config = "shapes_ldm.py"
    if option.startswith("--config."):
        config = _training_fields().get(option.removeprefix("--config."), (None, "shapes_ldm.py"))[1]
    args = {"--config": f"configs/{config}", "--workdir": str(tmp_path / "workdir"),
            "--config.data.data_dir": str(world["data_dir"]), "--config.data.name": world["name"]}
    if config == "shapes_ldm.py":
        args["--config.train.first_stage"] = str(world["first_stage"])
    args[option] = value
    return [f"{k}={v}" for k, v in args.items()]


def _run(command: str, argv: list[str]) -> int:
    prog = f"ldm-jax {command}"
    try:
        if command == "sample":
            return sampling.main(argv, prog=prog)
        if command == "convert":
            return cli.convert_main(argv, prog=prog)
        if command.startswith("evaluate"):
            return evaluate.main(argv, prog="ldm-jax evaluate")
        return train_main.main(argv, prog=prog)
    except SystemExit as exit_:  # argparse exits
        return exit_.code


# ------------------------------------------------------------------------------------------------ test


@pytest.mark.parametrize("command, dest, option, value", CASES,
                         ids=[f"{c}:{o}={v}" for c, _, o, v in CASES])
def test_bad_value_is_one_line(command, dest, option, value, world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    # Nothing may start a cluster (bad coordinator values are refused before), train or sample: a stage that
    # gets built with the bad value fails the test.
    monkeypatch.setattr(train_main.parallel.jax.distributed, "initialize", _no_cluster)
    for module in (train_autoencoder, train_ldm):
        monkeypatch.setattr(module, "train_and_evaluate", _build_only(module))
    value = _value(value, world)
    code = _run(command, _argv(command, dest, option, value, world, tmp_path))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("ldm-jax "), err
    named = option.lstrip("-").removeprefix("config.")
    tokens = (option, named, named.replace("_", "-"), named.rsplit(".", 1)[-1], value)
    assert any(token.lower() in errors[0].lower() for token in tokens), errors[0]


def _no_cluster(*args, **kwargs):
    """jax.distributed.initialize as on a machine with no cluster; given arguments, a failure (the bad
    flags must be refused before)."""
    if args or kwargs:
        pytest.fail(f"jax.distributed.initialize{args} called")
    raise ValueError("coordinator_address should be defined")


def _build_only(module):
    """A stage's train_and_evaluate that builds the stage (where config values are refused) and never trains."""

    def build(config: ml_collections.ConfigDict, workdir):
        args = (config, workdir) if module is train_ldm else (config,)
        train_main.build_stage(module.build_stage, *args)
        pytest.fail("the stage was built: the bad value was not refused")

    return build
