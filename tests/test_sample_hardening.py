"""sample.py refuses what it cannot do in one line (exit 2), and says what it silently lost (issue 14).

What is checked, on the embedded model (32x32 images, 1 DDIM step, one compilation shared by every test):
non-finite --guidance / --eta / --strength are refused by the parser and by `validate`, before JAX starts;
sizes the model cannot sample (its learned 8x8 position embedding; sizes over 8192; other models' multiples)
are one line naming what it takes; --seed -1 draws a seed that is printed, recorded and reproduces the
images; NaN weights are refused at load naming the file and tensor; non-finite images are not written;
unknown prompt words and truncation are warned about once per prompt, by the prompt's 0-based index; the
embedded model's export to diffusers / CompVis is refused in one line and to our format works.
"""
import dataclasses
import json
import math
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from ldm_jax import cli, ldm, pipeline, presets, sampling, store
from ldm_jax.models.tokenizer import inspect_prompts, load_tokenizer, short_repr

ROOT = pathlib.Path(__file__).resolve().parents[1]
RED = "a red circle"
UNKNOWN = "a crimson circle at the upper left"  # 'crimson' and 'upper' are not in the embedded vocabulary


def _main(outdir: pathlib.Path, *args: str) -> int:
    """sample.py on the embedded model, 1 step (the compiled program is shared by every run of 1..8 images)."""
    return sampling.main(["--steps", "1", "--outdir", str(outdir), *args], prog="sample.py")


def _one_error_line(capsys) -> str:
    """The run's stderr holds exactly one error line 'sample.py: error: ...' and no traceback; returns it."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sample.py: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _only_line(capsys) -> str:
    """A user error reported before anything else: stderr is that one line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sample.py: error:"), err
    return err[0]


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def embedded():
    return store.load_model()


# ------------------------------------------------------------------------------------- 1. finite numbers


@pytest.mark.parametrize("flag, value", [("--guidance", "nan"), ("--scale", "inf"), ("--eta", "nan"),
                                         ("--strength=-inf", None)])
def test_non_finite_numbers_are_refused_by_the_parser(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        _main(tmp_path, "--prompt", RED, *([flag, value] if value else [flag]))
    assert exit_info.value.code == 2
    line = _only_line(capsys)
    assert "expected a finite number" in line and flag.split("=")[0] in line, line


@pytest.mark.parametrize("field, flag", [("guidance", "--guidance"), ("eta", "--eta"), ("strength", "--strength")])
def test_library_requests_with_non_finite_numbers_are_refused(tmp_path, field, flag):
    request = sampling.SampleRequest(prompts=(RED,), outdir=str(tmp_path), **{field: math.nan})
    with pytest.raises(sampling.UserError, match=f"^{flag} must be a finite number, got nan$"):
        sampling.run(request)


def test_bad_flags_are_refused_before_jax_starts(tmp_path):
    """run() validates before `import jax`: a bad flag costs no JAX start-up."""
    code = ("import sys; from ldm_jax import sampling; "
            f"code = sampling.main(['--prompt', 'x', '--steps', '0', '--outdir', {str(tmp_path)!r}]); "
            "assert code == 2 and 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "sample.py: error: --steps must be >= 1, got 0"


# ------------------------------------------------------------------------------------------------ 2. sizes


@pytest.mark.parametrize("args, message", [
    (["--height", "64"], "--height 64 --width 32, but this model samples only 32x32 images (its UNet's learned "
                         "position embedding is 8x8 latents, x4 the autoencoder's factor)"),
    (["--width", "16"], "samples only 32x32 images"),
    (["--height", "100000"], "--height 100000 is larger than 8192"),
])
def test_sizes_the_model_cannot_sample_are_one_line(tmp_path, capsys, args, message):
    assert _main(tmp_path, "--prompt", RED, *args) == 2
    assert message in _only_line(capsys)


def test_init_image_of_another_size_is_one_line(tmp_path, capsys):
    Image.new("RGB", (64, 48)).save(tmp_path / "init.png")
    assert _main(tmp_path / "out", "--prompt", RED, "--init-image", str(tmp_path / "init.png")) == 2
    line = _only_line(capsys)
    assert f"--init-image {tmp_path / 'init.png'} is 64x48 (width x height), but this model samples only 32x32" in line


def test_sizes_of_models_without_a_position_table_are_multiples():
    """SD v1 (factor 8): multiples of 8 as diffusers (the UNet handles inexact halvings), at most 8192."""
    config = ldm.ldm_config(presets.get_preset("sd_v1"))
    for height, width in ((512, 768), (8192, 64), (520, 8), (8, 8)):
        sampling.check_size(config, height, width, "x")
    for height, width in ((516, 512), (512, 4), (8200, 512)):
        with pytest.raises(sampling.UserError, match=r"^--height \d+, but this model takes heights and widths that "
                           r"are multiples of 8 \(the autoencoder's factor\), at most 8192$"):
            sampling.check_size(config, height, width, f"--height {height}")


# ---------------------------------------------------------------------------------------------- 3. seeds


def _seed_run(outdir: pathlib.Path, capsys, seed: str) -> tuple[str, str, bytes]:
    """(seed printed, seed recorded in 00001.png, that PNG's bytes) of a 2-image run."""
    assert _main(outdir, "--prompt", RED, "--n", "2", "--seed", seed) == 0
    err = capsys.readouterr().err
    printed = [line.split()[1] for line in err.splitlines() if line.startswith("seed: ")]
    with Image.open(outdir / "00001.png") as image:
        recorded = image.text["seed"]
    return (printed[0] if printed else None), recorded, (outdir / "00001.png").read_bytes()


def test_seed_minus_one_is_drawn_printed_recorded_and_reproducible(tmp_path, capsys):
    first = _seed_run(tmp_path / "a", capsys, "-1")
    second = _seed_run(tmp_path / "b", capsys, "-1")
    for printed, recorded, _ in (first, second):
        assert printed == recorded and 0 <= int(recorded) < 2**32
    assert first[1] != second[1]  # two draws from 2**32 seeds
    again = _seed_run(tmp_path / "c", capsys, first[1])
    assert again[0] is None and again[1] == first[1] and again[2] == first[2]  # bit-identical PNG


@pytest.mark.parametrize("seed", ["-2", str(2**32)])
def test_other_seeds_outside_the_range_are_one_line(tmp_path, capsys, seed):
    assert _main(tmp_path, "--prompt", RED, "--seed", seed) == 2
    assert _only_line(capsys) == f"sample.py: error: --seed must be in [0, 2**32) or -1 (random), got {seed}"


# -------------------------------------------------------------------------------------- 4. NaN weights


@pytest.fixture(scope="module")
def nan_model(embedded, tmp_path_factory) -> pathlib.Path:
    """The embedded model saved with 3 NaN in one UNet kernel."""
    flat = traverse_util.flatten_dict(embedded.params, sep="/")
    bad = flat["unet/conv_in/kernel"].copy()
    bad.reshape(-1)[:3] = np.nan
    flat["unet/conv_in/kernel"] = bad
    model = dataclasses.replace(embedded, params=traverse_util.unflatten_dict(flat, sep="/"))
    return store.save_model(model, tmp_path_factory.mktemp("nan") / "model")


def test_nan_weights_are_refused_at_load_naming_file_and_tensor(nan_model, tmp_path, capsys):
    with pytest.raises(store.StoreError) as error:
        store.load_model(nan_model)
    assert str(error.value) == (f"{nan_model / store.PARAMS_FILE}: weights are not finite: unet/conv_in/kernel "
                                f"holds 3 NaN / 0 inf values")
    assert _main(tmp_path, "--prompt", RED, "--checkpoint", str(nan_model)) == 2
    assert _only_line(capsys) == f"sample.py: error: --checkpoint {error.value}"


def test_nan_weights_in_a_first_stage_directory_are_refused(embedded, tmp_path):
    config = embedded.config.first_stage
    params = traverse_util.flatten_dict(embedded.params["first_stage"], sep="/")
    name = next(iter(params))
    params[name] = np.full_like(params[name], np.inf)
    directory = store.save_first_stage(tmp_path / "vae", config, traverse_util.unflatten_dict(params, sep="/"))
    with pytest.raises(store.StoreError, match=rf"weights are not finite: first_stage/{name} holds 0 NaN / "
                                               rf"{params[name].size} inf values"):
        store.load_first_stage(directory)


def test_check_finite_names_the_subfolder_of_a_split_source():
    params = {"unet": {"a": np.zeros(3, np.float32)}, "first_stage": {"b": np.array([0.0, np.nan, -np.inf])}}
    with pytest.raises(store.StoreError, match=r"^sd/vae: weights are not finite: first_stage/b holds 1 NaN / 1 inf"):
        store.check_finite(params, {"unet": "sd/unet", "first_stage": "sd/vae"})
    store.check_finite({"unet": {"a": np.zeros(3, np.float32), "n": np.arange(3)}}, "x")  # finite, ints pass


# ----------------------------------------------------------------------------------- 5. non-finite images


def test_non_finite_images_are_not_written(tmp_path, capsys, monkeypatch):
    """Image 1 (prompt 0's second copy) comes out NaN: images 0, 2 and 3 are written, 1 is named, exit 2."""
    real = pipeline.txt2img

    def second_image_nan(*args, **kwargs):
        out = np.array(real(*args, **kwargs))
        out[1, 5, 5, 0] = np.nan
        return out

    monkeypatch.setattr(pipeline, "txt2img", second_image_nan)
    assert _main(tmp_path, "--prompt", RED, "--prompt", "a blue square", "--n", "2") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "not finite" in line or "error" in line]
    assert lines == ["warning: image 1 (prompt 0 'a red circle') is not finite (NaN / inf); not written",
                     "sample.py: error: 1 of 4 image(s) came out NaN / inf and were not written (images 1); the "
                     "model's weights or the settings are at fault"], err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000.png", "00002.png", "00003.png", "grid.png"]


# ------------------------------------------------------------------------ 6, 7. unknown words, truncation


def test_unknown_words_are_warned_once_per_prompt_by_its_index(tmp_path, capsys):
    """Prompts are numbered from 0: the --prompt flags, then the --prompts-file lines."""
    (tmp_path / "prompts.txt").write_text(f"{RED}\nan upper circle\n")
    assert _main(tmp_path / "out", "--prompt", RED, "--prompt", UNKNOWN, "--prompts-file",
                 str(tmp_path / "prompts.txt"), "--n", "2", "--negative-prompt", "blurry") == 0
    assert _warnings(capsys) == [
        f"warning: prompt 1 {UNKNOWN!r}: not in the tokenizer's vocabulary, read as its unknown token: "
        "'crimson', 'upper'",
        "warning: prompt 3 'an upper circle': not in the tokenizer's vocabulary, read as its unknown token: "
        "'an', 'upper'",
        "warning: --negative-prompt 'blurry': not in the tokenizer's vocabulary, read as its unknown token: 'blurry'",
    ]


def test_truncation_is_warned_once_per_prompt_by_its_index(tmp_path, capsys, embedded):
    long = " ".join(["a red circle"] * 12)  # 36 words + 2 special tokens > max_length 32
    assert embedded.config.max_length == 32
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _main(tmp_path, "--prompt", RED, "--prompt", long, "--n", "3") == 0
    assert not [w for w in record if "tokens" in str(w.message)]  # the batch encoder no longer warns on its own
    assert _warnings(capsys) == [f"warning: prompt 1 {short_repr(long)} has 38 tokens, more than "
                                 f"max_length=32; truncated to 32 tokens"]


def test_encode_prompts_warns_library_callers_once_per_distinct_prompt(embedded):
    with pytest.warns(UserWarning) as record:
        pipeline.encode_prompts(embedded, [RED, UNKNOWN, UNKNOWN], ["blurry"] * 3)
    assert [str(w.message).split(":")[0] for w in record] == [f"prompt 1 {UNKNOWN!r}", "negative prompt 0 'blurry'"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pipeline.encode_prompts(embedded, [UNKNOWN], warn=False)
    assert not record
    (report,) = pipeline.inspect_prompts(embedded, [UNKNOWN])
    assert report.unknown_words == ("crimson", "upper") and report.n_tokens == 9 and not report.truncated


def test_tokenizers_without_an_unknown_token_report_no_unknown_words(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizer_fixtures import write_bert_tokenizer, write_clip_tokenizer

    clip = load_tokenizer(write_clip_tokenizer(tmp_path / "clip"), "clip")  # unk_token is <|endoftext|>
    assert inspect_prompts(clip, ["a crimson zebra \u2603"])[0].unknown_words == ()
    bert = load_tokenizer(write_bert_tokenizer(tmp_path / "bert"), "bert")  # WordPiece has [UNK]
    assert inspect_prompts(bert, ["a crimson zebra \u2603"])[0].unknown_words == ("\u2603",)


# -------------------------------------------------------------------------------------------- 8. export


@pytest.mark.parametrize("fmt, dest, unet", [("compvis", "x.safetensors", "the CompVis UNetModel"),
                                             ("diffusers", "x", "diffusers' UNet2DConditionModel")])
def test_export_of_the_position_table_is_refused_in_one_line(tmp_path, capsys, fmt, dest, unet):
    assert cli.main(["convert", "shapes", str(tmp_path / dest), "--to", fmt]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("ldm-jax convert: error: "), err
    assert f"the {fmt} format has no place for unet.position_embedding" in err[0]
    assert f"{unet} has no learned position embedding); save it with format 'ldm'" in err[0]
    assert not (tmp_path / dest).exists()


def test_export_to_our_format_works(tmp_path, capsys, embedded):
    assert cli.main(["convert", "shapes", str(tmp_path / "copy"), "--to", "ldm"]) == 0
    copy = store.load_model(tmp_path / "copy")
    assert copy.config == embedded.config
    assert json.loads((tmp_path / "copy" / store.CONFIG_FILE).read_text())["unet"]["position_embedding"] == [8, 8]
    for name, value in store.flatten_params(embedded.params).items():
        np.testing.assert_array_equal(store.flatten_params(copy.params)[name], value, name)
