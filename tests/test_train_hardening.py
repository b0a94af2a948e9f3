"""The train command's failure modes (issue 14): what the user got wrong is one line with exit status 2, bad
images are counted and reported, and a corrupt newest checkpoint falls back to the one before it.

- A TFDS data_dir that does not hold the dataset: one line naming data_dir, dataset, split and the command that
  prepares it, before any params exist (both stages).
- A workdir that cannot be written (an existing file, a path under a file, no permission): one line.
- Other user errors (config values, missing files, unreadable data): one line each.
- An image folder with a zero-byte, a truncated and a non-image .png trains; the skips are in metrics.jsonl
  (`data/skipped_images`), on the console when the count changes, and in a summary at the end.
- A corrupt newest checkpoint (a truncated OCDBT data file, an empty manifest.ocdbt, an empty data/metadata):
  one log line names the step and why, it is moved to checkpoints/corrupt/, training resumes from the step
  before and ends bit-identical to an uninterrupted run. When no checkpoint restores, nothing is moved and
  the command says so in one line (exit 2).
"""
import io
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

import multihost_worker as toy
from ldm_jax.data.captioned_shapes import prepare_captioned_shapes
from ldm_jax.training import loop, main, train_autoencoder, train_ldm
from ldm_jax.training.checkpoint import CheckpointRestoreError

ROOT = pathlib.Path(__file__).resolve().parent.parent
AE = "configs/shapes_autoencoder.py"
LDM = "configs/shapes_ldm.py"
# The tiny autoencoder run of tests/test_train.py (one device, GAN on from step 1, 2 steps).
AE_TINY = {"first_stage.num_res_blocks": 1, "data.global_batch_size": 8, "train.num_steps": 2,
           "train.log_every": 1, "train.image_every": 2, "train.num_images": 8, "train.progress_bar": False,
           "checkpoint.every_steps": 100, "mesh.data": 1, "loss.disc_factor": 1.0, "loss.disc_start": 1,
           "loss.disc_ndf": 8, "loss.disc_num_layers": 1}


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """main() in-process: jax.distributed cannot start once this session's backend runs; nothing to start."""
    monkeypatch.setattr(main.parallel, "initialize_distributed", lambda *args: False)


def _argv(config, workdir, overrides=None, *extra):
    return [f"--config={ROOT / config}", "--workdir", str(workdir),
            *(f"--config.{k}={v}" for k, v in (overrides or {}).items()), *extra]


def _user_error(argv, capsys) -> str:
    """Runs the command; asserts exit status 2 and exactly one line on stderr, `train.py: error: ...`."""
    assert main.main(argv, prog="train.py") == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """{data.data_dir, data.name} of a tiny prepared captioned-shapes set."""
    data_dir = tmp_path_factory.mktemp("tfds")
    name = prepare_captioned_shapes(data_dir, resolution=32, num_train=32, num_validation=8, num_heldout=8)
    return {"data.data_dir": str(data_dir), "data.name": name}


# ------------------------------------------------------------------------------------ 1. a missing dataset


@pytest.mark.parametrize("config", [AE, LDM])
@pytest.mark.parametrize("where", ["missing folder", "empty folder"])
def test_missing_tfds_data_dir_is_one_line_before_any_params(config, where, tmp_path, capsys, monkeypatch):
    def too_late(*args, **kwargs):
        raise AssertionError("params were built before the data was checked")

    monkeypatch.setattr(train_autoencoder, "init_state", too_late)
    for name in ("init_state", "frozen_params", "load_pretrained"):
        monkeypatch.setattr(train_ldm, name, too_late)
    data_dir = tmp_path / "tfds"
    if where == "empty folder":
        data_dir.mkdir()
    line = _user_error(_argv(config, tmp_path / "w", {"data.data_dir": data_dir}), capsys)
    assert (f"TFDS dataset 'captioned_shapes/res32' (split 'train') is not prepared in data_dir {data_dir}" in line
            and f"prepare it with: python -m ldm_jax.data.captioned_shapes --data_dir {data_dir} --resolution 32"
            in line), line
    assert ("(no such folder)" in line) == (where == "missing folder")


# ------------------------------------------------------------------------------------ 2. the workdir


@pytest.mark.parametrize("kind", ["existing file", "under a file", "not writable"])
def test_unwritable_workdir_is_one_line(kind, dataset, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    workdir = {"existing file": blocker, "under a file": blocker / "run", "not writable": tmp_path / "ro"}[kind]
    expected = {"existing file": f"workdir {blocker} is an existing file, not a folder",
                "under a file": f"workdir {workdir} cannot be created or written: {blocker} is a file",
                "not writable": f"workdir {workdir} cannot be created or written: Permission denied"}[kind]
    if kind == "not writable":  # root ignores permission bits: the write is refused as a read-only folder would
        def refuse(self, data):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(pathlib.Path, "write_bytes", refuse)
    line = _user_error(_argv(AE, workdir, {**dataset, **AE_TINY}), capsys)
    assert expected in line, line


# ------------------------------------------------------------------------------------ 5. other user errors


def _only_unreadable(folder):
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"not an image")
    return folder


USER_ERRORS = [
    (AE, {"checkpoint.keep": 1}, "checkpoint.keep=1; expected >= 2"),
    (AE, {"checkpoint.every_steps": 0}, "checkpoint.every_steps=0"),
    (AE, {"train.log_every": 0}, "train.log_every=0"),
    (AE, {"data.crop": "middle"}, "data.crop='middle'"),
    (AE, {"data.source": "s3"}, "data.source='s3'"),
    (AE, {"optimizer.learning_rate": -1}, "learning_rate=-1.0"),
    (AE, {"data.global_batch_size": 12, "mesh.data": -1}, "data.global_batch_size=12 is not divisible"),
    (AE, {"data.split": "test"}, "data: TFDS dataset 'captioned_shapes/res32_train32_val8_heldout8_seed0' has no split"),
    (AE, {"train.eval_split": "test"}, "train.eval_split='test': TFDS dataset"),
    (AE, {"data.source": "folder", "data.path": "{tmp}/nowhere"}, "data: data.path {tmp}/nowhere does not exist"),
    (AE, {"data.path": "{tmp}/nowhere"}, "data.path {tmp}/nowhere does not exist (data.source='tfds' does not read"),
    (AE, {"data.source": "tar", "data.path": "{tmp}/*.tar"}, "data.path '{tmp}/*.tar' matches no .tar shards"),
    (AE, {"data.source": "folder", "data.path": "{tmp}/bad", "data.caption_key": ""},
     "no readable example in a whole epoch of {tmp}/bad; skipped 3 unreadable images: first few 0.png (not an image"),
    (AE, {"loss.lpips_vgg_path": "{tmp}/vgg16.pth"}, "loss.lpips_vgg_path {tmp}/vgg16.pth is not a file"),
    (AE, {"loss.disc_start": -1}, "loss.disc_start=-1; expected >= 0"),
    (AE, {"train.seed": -1}, "train.seed=-1"),
    (LDM, {"train.first_stage": "{tmp}/no_autoencoder"}, "train.first_stage='{tmp}/no_autoencoder': "),
    (LDM, {"train.first_stage": ""}, "train.first_stage is required"),
    (LDM, {"train.init_from": "{tmp}/no_model"}, "train.init_from='{tmp}/no_model': "),
    (LDM, {"train.tokenizer": "{tmp}/no_tokenizer"}, "tokenizer directory {tmp}/no_tokenizer does not exist"),
    (LDM, {"train.sampler": "bogus"}, "train.sampler='bogus'"),
    (LDM, {"train.first_stage": "{tmp}/bad"}, "train.first_stage='{tmp}/bad': {tmp}/bad: a directory, but neither"),
]


@pytest.mark.parametrize("config, overrides, expected", USER_ERRORS,
                         ids=[f"{c.split('_')[-1][:-3]}:" + ",".join(f"{k}={v}" for k, v in o.items())
                              for c, o, _ in USER_ERRORS])
def test_user_errors_are_one_line(config, overrides, expected, dataset, tmp_path, capsys):
    _only_unreadable(tmp_path / "bad")
    overrides = {k: str(v).format(tmp=tmp_path) for k, v in {**dataset, **AE_TINY, **overrides}.items()
                 if not (config == LDM and k.startswith(("loss.", "first_stage.")))}
    line = _user_error(_argv(config, tmp_path / "w", overrides), capsys)
    assert expected.format(tmp=tmp_path) in line, line


# ------------------------------------------------------------------------------ 3. unreadable images


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _png_bytes(rng) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """The tiny autoencoder run (through the command) on 8 good images, a zero-byte, a truncated and a text
    file named .png; (workdir, log lines, image folder)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        (folder / f"img_{i}.png").write_bytes(_png_bytes(rng))
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(_png_bytes(rng)[:400])
    (folder / "text.png").write_text("a caption file, renamed\n")
    workdir = tmp_path_factory.mktemp("folder_run") / "w"
    handler = _Lines()
    logging.getLogger("ldm_jax").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(main.parallel, "initialize_distributed", lambda *args: False)
            argv = _argv(AE, workdir, {**AE_TINY, "data.source": "folder", "data.path": folder,
                                       "data.caption_key": ""})
            assert main.main(argv, prog="train.py") == 0
    finally:
        logging.getLogger("ldm_jax").removeHandler(handler)
    return workdir, handler.lines, folder


def test_unreadable_images_are_counted_and_reported(folder_run):
    workdir, lines, _ = folder_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["data/skipped_images"] == 3
    assert 1 <= rows[0]["data/skipped_images"] <= 3
    counts = [line for line in lines if line.startswith("step ") and "unreadable images" in line]
    assert 1 <= len(counts) <= 2 and counts[-1].startswith(("step 1: skipped 3", "step 2: skipped 3")), counts
    summary = [line for line in lines if line.startswith("skipped 3 unreadable images: first few ")]
    assert len(summary) == 1, lines
    for name in ("empty.png (zero bytes)", "text.png (not an image PIL can read)", "truncated.png ("):
        assert name in summary[0], summary[0]


def test_no_checkpoint_that_restores_is_one_line(folder_run, tmp_path, capsys):
    # Every checkpoint of the run above made unreadable: nothing is moved, the command stops (no fresh start
    # over existing checkpoints).
    workdir = tmp_path / "w"
    shutil.copytree(folder_run[0], workdir)
    steps = _steps(workdir / "checkpoints")
    for step in steps:
        (workdir / "checkpoints" / str(step) / "state" / "manifest.ocdbt").write_bytes(b"")
    argv = _argv(AE, workdir, {**AE_TINY, "train.num_steps": 3, "data.source": "folder",
                               "data.path": folder_run[2], "data.caption_key": ""})
    line = _user_error(argv, capsys)
    assert f"no checkpoint in {workdir / 'checkpoints'} restores (steps {steps})" in line, line
    assert "manifest.ocdbt" in line and _steps(workdir / "checkpoints") == steps
    assert not (workdir / "checkpoints" / "corrupt").exists()


# ------------------------------------------------------------------------------ 4. corrupt checkpoints


def _steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _truncate_data_files(step_dir):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        os.truncate(f, f.stat().st_size // 2)


CORRUPTIONS = {  # how -> (corrupt(step_dir), what the log line names)
    "truncated OCDBT data files": (_truncate_data_files, "/state/d/"),
    "empty manifest.ocdbt": (lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b""), "manifest.ocdbt"),
    "empty data/metadata": (lambda d: (d / "data" / "metadata").write_bytes(b""), "empty files: data/metadata"),
}


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """(workdir of a 4-step toy run with checkpoints 2 and 4, the params of an uninterrupted 6-step run)."""
    root = tmp_path_factory.mktemp("toy")
    reference = toy.gathered_params(toy.run(str(root / "reference"), steps=6, checkpoint_every=2))
    toy.run(str(root / "base"), steps=4, checkpoint_every=2)
    assert _steps(root / "base" / "checkpoints") == [2, 4]
    return root / "base", reference


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_newest_checkpoint_falls_back_bit_identically(corruption, toy_runs, tmp_path, caplog):
    base, reference = toy_runs
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    checkpoints = workdir / "checkpoints"
    corrupt, named = CORRUPTIONS[corruption]
    corrupt(checkpoints / "4")
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        resumed = toy.gathered_params(toy.run(str(workdir), steps=6, checkpoint_every=2))
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    lines = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint step 4 in {checkpoints} cannot be restored (")
    assert named in lines[0] and "resuming from step 2" in lines[0], lines[0]
    assert (checkpoints / "corrupt" / "4" / "state").is_dir()  # set aside, not deleted
    assert _steps(checkpoints) == [4, 6]  # step 4 saved again beside it
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 7))


def test_when_no_checkpoint_restores_nothing_is_moved(toy_runs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(toy_runs[0], workdir)
    for step in (2, 4):
        (workdir / "checkpoints" / str(step) / "data" / "metadata").write_bytes(b"")
    with pytest.raises(CheckpointRestoreError, match=r"no checkpoint in .* restores \(steps \[2, 4\]\); the newest, "
                                                     r"step 4: JSONDecodeError: .*\(empty files: data/metadata\)"):
        toy.run(str(workdir), steps=6, checkpoint_every=2)
    assert _steps(workdir / "checkpoints") == [2, 4] and not (workdir / "checkpoints" / "corrupt").exists()


def test_divergence_is_one_line_with_status_1(tmp_path, capsys, monkeypatch):
    def diverge(config, workdir):
        raise loop.NonFiniteError("non-finite metrics at step 5: {'loss': nan}; the last good checkpoint is step 4")

    monkeypatch.setattr(main, "train_and_evaluate", diverge)
    monkeypatch.setattr(main.parallel, "initialize_distributed", lambda *args: False)
    argv = ["--config=configs/shapes_autoencoder.py", "--workdir", str(tmp_path / "w")]
    assert main.main(argv, prog="train.py") == 1
    err = capsys.readouterr().err
    assert err == "train.py: error: non-finite metrics at step 5: {'loss': nan}; the last good checkpoint is step 4\n"
