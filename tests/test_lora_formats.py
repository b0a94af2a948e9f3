"""LoRA files against diffusers 0.42 + peft (PyTorch, CPU, float32) on tiny random SD and SDXL pipelines.

- A LoRA made with peft on the UNet (attention, a 1x1-conv proj_in, 3x3 ResNet convs: LoCon) and the text encoder,
  rank 4, alpha != rank, saved by diffusers' `save_lora_weights` as its training scripts do: loaded here, merged at
  scales 0.5 and 1.0, our UNet and text-encoder outputs equal diffusers' `load_lora_weights` +
  `cross_attention_kwargs={"scale": s}` (UNet) / `encode_prompt(lora_scale=s)` (the text encoder, what the pipeline
  does with that scale), and one txt2img (DDIM + CFG, same initial latents) at scale 0.5.
- The same LoRA in the kohya layout, written by our writer and built independently here from peft's state dict,
  loads to the same factors.
- A LoRA made here (`init_lora`, random up factors) saved in the PEFT format and in the kohya format loads in
  diffusers' `load_lora_weights` (every tensor) and reproduces our outputs.
- SDXL: UNet (CompVis-named kohya keys), text_encoder and text_encoder_2 (te1 / te2) against
  `StableDiffusionXLPipeline.load_lora_weights`.
- Bad files: one-line LoraErrors.

transformers 5.24's own `add_adapter` asks for peft >= 0.22 (not released; 0.21.2 is installed), so the peft LoRAs
of text encoders are made with peft's `inject_adapter_in_model`, which is what it calls.

Run: .venv/bin/python -m pytest -q tests/test_lora_formats.py
"""
import copy
import json

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import sdxl_fixtures as parts
from conftest import TINY_SD_SIZE
from ldm_jax import ldm, pipeline, store
from ldm_jax.adapters import lora as lora_lib
from ldm_jax.adapters.lora import LoraError
from ldm_jax.convert import lora_files, lora_peft
from ldm_jax.convert.diffusers_pipeline import read_scheduler_config, sampler_options
from ldm_jax.parallel import make_mesh

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

RANK = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # conv1: 3x3 ResNet convs; proj_in: 1x1 conv
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
PROMPTS = ["a red circle on the left", "a blue square"]
SIZE, STEPS, GUIDANCE = TINY_SD_SIZE, 5, 7.5  # test_diffusers_pipeline's txt2img settings (its compiled program)
# Model outputs: both sides float32, differing by op order (~1e-6 relative). Issue 16 asks for 1e-5 relative.
RTOL = 1e-5
IMAGE_ATOL = 2e-5  # images in [-1, 1] after 5 DDIM steps with CFG 7.5 (test_diffusers_pipeline measured 3.5e-6)

apply_unet = jax.jit(ldm.apply_unet, static_argnums=0)
encode = jax.jit(ldm.encode_conditioning, static_argnums=0)
merge = jax.jit(lora_lib.apply_loras)
init_lora = jax.jit(lora_lib.init_lora, static_argnames=("modules", "rank", "alpha"))  # one compile, not one per shape


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _add_peft_lora(module, targets, alpha, seed, *, inject=False):
    """A peft LoRA (rank 4, `alpha`) on `module`'s `targets` with random non-zero lora_B; returns its LoraConfig."""
    config = peft.LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    if inject:
        peft.inject_adapter_in_model(config, module)
    else:
        module.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return config


def _peft_state(module):
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(module).items()}


def _diffusers_layers(module):
    """What diffusers' training scripts pass to save_lora_weights (diffusers' key spellings)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def _count_loaded(*modules) -> int:
    """How many LoRA tensors the modules hold (diffusers loads one adapter, "default_0")."""
    from peft.utils import get_peft_model_state_dict

    return sum(len(get_peft_model_state_dict(m, adapter_name="default_0")) for m in modules)


def _lora_tensors(path) -> int:
    with safetensors.safe_open(str(path), "np") as f:
        return sum(1 for k in f.keys() if not k.endswith(".alpha"))


def _same_lora(a, b):
    assert a.alpha_of() == pytest.approx(b.alpha_of())
    jax.tree.map(np.testing.assert_array_equal, a.factors, b.factors)


# ------------------------------------------------------------------------------------------------------ SD


@pytest.fixture(scope="module")
def sd_lora(sd, tmp_path_factory):
    """(model, peft file, the peft state dicts {"unet", "text_encoder"}, training-script file): a peft LoRA on a copy
    of the tiny SD pipeline's UNet and text encoder, saved with StableDiffusionPipeline.save_lora_weights and its
    metadata: once with peft's keys, once as diffusers' training scripts pass them (`convert_state_dict_to_diffusers`:
    `.lora.down.weight` for the UNet's attention projections; diffusers 0.42 itself then loads only the UNet modules
    that kept `lora_A` names when the first key has one, so the parity runs on the first file)."""
    pipe, folder = sd
    unet, text = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    configs = {"unet": _add_peft_lora(unet, UNET_TARGETS, alpha=6, seed=0),
               "text_encoder": _add_peft_lora(text, TEXT_TARGETS, alpha=2, seed=1, inject=True)}
    metadata = {f"{name}_lora_adapter_metadata": c.to_dict() for name, c in configs.items()}
    out = tmp_path_factory.mktemp("sd_lora")
    states = {"unet": _peft_state(unet), "text_encoder": _peft_state(text)}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out, **{f"{name}_lora_layers": {k: torch.from_numpy(v) for k, v in sd.items()} for name, sd in states.items()},
        **metadata)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=_diffusers_layers(unet), text_encoder_lora_layers=_diffusers_layers(text),
        weight_name="training_script.safetensors", **metadata)
    return (store.load_model(folder), out / "pytorch_lora_weights.safetensors", states,
            out / "training_script.safetensors")


def _reference(pipe, lora_file):
    """A copy of `pipe` with the LoRA file loaded by diffusers' load_lora_weights, every tensor of it."""
    ref = diffusers.StableDiffusionPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet),
                                               "text_encoder": copy.deepcopy(pipe.text_encoder)})
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    assert _count_loaded(ref.unet, ref.text_encoder) == _lora_tensors(lora_file)
    return ref


def _sd_inputs(pipe):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    ids = np.asarray(pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
    return x, np.array([10, 700]), context, ids


def _sd_errors(model, ref, lora, scale, inputs):
    """(UNet, text encoder) relative errors of ours with `lora` merged at `scale` vs the diffusers reference."""
    x, t, context, ids = inputs
    params = merge(model.params, [(lora, scale)])
    ours_unet = apply_unet(model.config, params, x, t, {"context": context})
    ours_text = encode(model.config, params, ids)["context"]
    with torch.no_grad():
        theirs_unet = ref.unet(_nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context),
                               cross_attention_kwargs={"scale": scale}).sample.numpy().transpose(0, 2, 3, 1)
        theirs_text = ref.encode_prompt(PROMPTS, "cpu", 1, False, lora_scale=scale)[0].numpy()
        base_unet = ref.unet(_nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context),
                             cross_attention_kwargs={"scale": 0.0}).sample.numpy().transpose(0, 2, 3, 1)
    assert _rel(base_unet, theirs_unet) > 0.01  # the LoRA changes the output
    return _rel(ours_unet, theirs_unet), _rel(ours_text, theirs_text)


def test_detect_formats(sd_lora, tmp_path):
    model, lora_file, *_ = sd_lora
    assert lora_files.detect_lora_format(lora_file) == "peft"
    kohya = lora_files.save_lora_file(lora_files.load_lora_file(lora_file, model.config), tmp_path / "k.safetensors",
                                      model.config, format="kohya")
    assert lora_files.detect_lora_format(kohya) == "kohya"


def test_peft_file_matches_diffusers_at_two_scales(sd, sd_lora):
    model, lora_file, *_ = sd_lora
    lora = lora_files.load_lora_file(lora_file, model.config)
    modules = lora.modules()
    assert any(np.ndim(p["down"]) == 4 and np.shape(p["down"])[0] == 3 for p in modules.values())  # LoCon 3x3
    assert {lora.alpha_of()[p] for p in modules} == {6.0, 2.0}  # the metadata's alphas (rank 4)
    _same_lora(lora_files.load_lora_file(sd_lora[3], model.config), lora)  # diffusers' key spellings
    ref = _reference(sd[0], lora_file)
    inputs = _sd_inputs(sd[0])
    for scale in (0.5, 1.0):
        unet_err, text_err = _sd_errors(model, ref, lora, scale, inputs)
        print(f"SD peft file, scale {scale}: UNet {unet_err:.2e}, text encoder {text_err:.2e}")
        assert unet_err <= RTOL and text_err <= RTOL, (scale, unet_err, text_err)


def test_txt2img_with_lora_matches_diffusers(sd, sd_lora):
    model, lora_file, *_ = sd_lora
    lora = lora_files.load_lora_file(lora_file, model.config)
    ref = _reference(sd[0], lora_file)
    noise = np.random.default_rng(1).standard_normal((len(PROMPTS), SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    cond, uncond = pipeline.encode_prompts(model, PROMPTS)
    sampler = pipeline.make_model_sampler(model.config, "ddim", STEPS,
                                          **sampler_options(read_scheduler_config(model.model_id), "ddim"))
    ours = np.asarray(pipeline.txt2img(model.config, merge(model.params, [(lora, 0.5)]), sampler, cond, uncond,
                                       guidance_scale=GUIDANCE, noise=noise, height=SIZE, width=SIZE,
                                       mesh=make_mesh(devices=jax.devices()[:2])))
    with torch.no_grad():
        theirs = ref(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                     latents=_nchw(noise), output_type="np", cross_attention_kwargs={"scale": 0.5}).images * 2 - 1
    err = float(np.abs(ours - theirs).max())
    print(f"SD txt2img with the LoRA at 0.5: max |diff| {err:.2e}")
    assert np.abs(theirs).max() > 0.05 and err <= IMAGE_ATOL, err


def test_kohya_layouts_load_to_the_same_factors(sd_lora, tmp_path):
    model, lora_file, peft_states, _ = sd_lora
    lora = lora_files.load_lora_file(lora_file, model.config)
    ours = lora_files.save_lora_file(lora, tmp_path / "ours_kohya.safetensors", model.config, format="kohya")
    with safetensors.safe_open(str(ours), "np") as f:
        keys = list(f.keys())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha" in keys
    _same_lora(lora_files.load_lora_file(ours, model.config), lora)
    # Independently: kohya keys from peft's state dicts (module names with "_", lora_A -> lora_down, alphas).
    kohya = {}
    for component, prefix, alpha in (("unet", "lora_unet_", 6.0), ("text_encoder", "lora_te_text_model_", 2.0)):
        for key, value in peft_states[component].items():
            module, factor = key.rsplit(".lora_", 1)
            name = prefix + module.replace(".", "_")
            kohya[f"{name}.lora_{'down' if factor == 'A.weight' else 'up'}.weight"] = value
            kohya[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    independent = tmp_path / "independent_kohya.safetensors"
    safetensors.numpy.save_file(kohya, str(independent))
    _same_lora(lora_files.load_lora_file(independent, model.config), lora)


def _made_here(model, key, *, varied_alpha):
    """A LoRA made here: init_lora on attention and conv modules of the UNet and the text tower, random up factors;
    alphas 6 (UNet) and 2 (text); with `varied_alpha` one UNet module has alpha 3 and one rank differs."""
    params = model.params
    unet = lora_lib.target_modules(params, (*lora_lib.ATTENTION_TARGETS, *lora_lib.CONV_TARGETS))
    text = lora_lib.target_modules(params, lora_lib.ATTENTION_TARGETS + (r".*/mlp/fc1",), sections=("cond_stage",))
    lora = init_lora(params, tuple(unet + text), rank=RANK, alpha=None, key=key)
    rng = np.random.default_rng(2)
    modules = {p: {"down": np.asarray(f["down"]), "up": 0.05 * rng.standard_normal(f["up"].shape).astype(np.float32)}
               for p, f in lora.modules().items()}
    alphas = {p: 6.0 if p[0] == "unet" else 2.0 for p in modules}
    if varied_alpha:
        alphas[unet[0]] = 3.0
        modules[unet[1]] = {"down": modules[unet[1]]["down"][..., :2], "up": modules[unet[1]]["up"][:2]}
    return lora_lib.make_lora(modules, alphas)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_made_here_loads_in_diffusers(sd, sd_lora, tmp_path, fmt):
    model = sd_lora[0]
    # diffusers reads a kohya file's per-module alphas of attention modules under names it cannot match, so the
    # kohya file gets one alpha per component (it loads those); the PEFT metadata carries alpha_pattern/rank_pattern.
    lora = _made_here(model, jax.random.key(3), varied_alpha=fmt == "peft")
    path = lora_files.save_lora_file(lora, tmp_path / f"ours_{fmt}.safetensors", model.config, format=fmt)
    _same_lora(lora_files.load_lora_file(path, model.config), lora)
    ref = _reference(sd[0], path)
    unet_err, text_err = _sd_errors(model, ref, lora, 1.0, _sd_inputs(sd[0]))
    print(f"LoRA made here, {fmt} file in diffusers: UNet {unet_err:.2e}, text encoder {text_err:.2e}")
    assert unet_err <= RTOL and text_err <= RTOL, (unet_err, text_err)


# ---------------------------------------------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory):
    """(pipeline, model, peft file): a tiny random SDXL base pipeline (tests/sdxl_fixtures.py parts) saved by
    diffusers, and a peft LoRA on copies of its UNet and both text towers saved by its save_lora_weights."""
    torch.manual_seed(0)
    tok, tok_2 = parts.tokenizers(tmp_path_factory.mktemp("sdxl_lora_tok"))
    clip_l, big_g = parts.text_encoders(tok)
    unet, vae = parts.unet(size=SIZE), parts.vae(SIZE)
    parts.randomise(clip_l, big_g, unet, vae)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tok,
                                               tokenizer_2=tok_2, unet=unet, scheduler=parts.scheduler())
    root = tmp_path_factory.mktemp("sdxl_lora")
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    trained = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(clip_l),
               "text_encoder_2": copy.deepcopy(big_g)}
    configs = {"unet": _add_peft_lora(trained["unet"], UNET_TARGETS, alpha=8, seed=4),
               "text_encoder": _add_peft_lora(trained["text_encoder"], TEXT_TARGETS, alpha=2, seed=5, inject=True),
               "text_encoder_2": _add_peft_lora(trained["text_encoder_2"], TEXT_TARGETS, alpha=3, seed=6, inject=True)}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        root, **{f"{name}_lora_layers": {k: torch.from_numpy(v) for k, v in _peft_state(m).items()}
                 for name, m in trained.items()},
        **{f"{name}_lora_adapter_metadata": c.to_dict() for name, c in configs.items()})
    return pipe, store.load_model(root / "pipe"), root / "pytorch_lora_weights.safetensors"


def _sdxl_errors(pipe, model, lora, lora_file):
    """(UNet, context, pooled) relative errors at scale 1 of ours vs StableDiffusionXLPipeline.load_lora_weights."""
    ref = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet),
                                                 "text_encoder": copy.deepcopy(pipe.text_encoder),
                                                 "text_encoder_2": copy.deepcopy(pipe.text_encoder_2)})
    ref.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    assert _count_loaded(ref.unet, ref.text_encoder, ref.text_encoder_2) == _lora_tensors(lora_file)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10, 700])
    time_ids = np.tile(np.array([[16, 16, 0, 0, 16, 16]], np.float32), (2, 1))
    ids = {name: np.asarray(getattr(ref, tok)(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
           for name, tok in (("tokens", "tokenizer"), ("tokens_2", "tokenizer_2"))}
    params = merge(model.params, [(lora, 1.0)])
    cond = encode(model.config, params, {**ids, "time_ids": time_ids})
    ours_unet = apply_unet(model.config, params, x, t, cond)
    with torch.no_grad():
        context, _, pooled, _ = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False,
                                                  lora_scale=1.0)
        theirs_unet = ref.unet(_nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.tensor(
            np.asarray(cond["context"])), added_cond_kwargs={"text_embeds": torch.tensor(np.asarray(cond["y"])),
                                                             "time_ids": torch.from_numpy(time_ids)},
            cross_attention_kwargs={"scale": 1.0}).sample.numpy().transpose(0, 2, 3, 1)
    return _rel(ours_unet, theirs_unet), _rel(cond["context"], context.numpy()), _rel(cond["y"], pooled.numpy())


def test_sdxl_peft_file_matches_diffusers(sdxl_lora):
    pipe, model, lora_file = sdxl_lora
    lora = lora_files.load_lora_file(lora_file, model.config)
    assert {p[0] for p in lora.modules()} == {"unet", "cond_stage", "cond_stage_2"}
    errors = _sdxl_errors(pipe, model, lora, lora_file)
    print("SDXL peft file: UNet {:.2e}, context {:.2e}, pooled {:.2e}".format(*errors))
    assert max(errors) <= RTOL, errors


def test_sdxl_kohya_file_uses_compvis_names_and_loads_in_diffusers(sdxl_lora, tmp_path):
    pipe, model, lora_file = sdxl_lora
    lora = lora_files.load_lora_file(lora_file, model.config)
    # One alpha per component (diffusers reads a kohya file's per-module alphas only that way, see above).
    lora = lora_lib.make_lora(lora.modules(), {p: {"unet": 8.0, "cond_stage": 2.0, "cond_stage_2": 3.0}[p[0]]
                                                for p in lora.modules()})
    path = lora_files.save_lora_file(lora, tmp_path / "sdxl_kohya.safetensors", model.config, format="kohya")
    with safetensors.safe_open(str(path), "np") as f:
        stems = {k.partition(".")[0] for k in f.keys()}
    for stem in ("lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k", "lora_unet_input_blocks_3_0_in_layers_2",
                 "lora_unet_middle_block_1_proj_in", "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_q",
                 "lora_te1_text_model_encoder_layers_2_mlp_fc1", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"):
        assert stem in stems, stem
    assert not any("down_blocks" in s for s in stems)
    _same_lora(lora_files.load_lora_file(path, model.config), lora)
    errors = _sdxl_errors(pipe, model, lora, path)
    print("SDXL kohya file (ours) in diffusers: UNet {:.2e}, context {:.2e}, pooled {:.2e}".format(*errors))
    assert max(errors) <= RTOL, errors


# ----------------------------------------------------------------------------------------------- bad input


def _write(path, tensors, metadata=None):
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata)
    return path


def _one_line_error(path, config, match):
    with pytest.raises(LoraError, match=match) as info:
        lora_files.load_lora_file(path, config)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    return str(info.value)


def test_lora_for_another_model_is_refused(sd_lora, sdxl_lora, tmp_path):
    sd_model, sdxl_model = sd_lora[0], sdxl_lora[1]
    _one_line_error(sdxl_lora[2], sd_model.config, r"key text_encoder.*matches no module of an SD 1\.x/2\.x-style")
    sdxl_lora_obj = lora_files.load_lora_file(sdxl_lora[2], sdxl_model.config)
    kohya = lora_files.save_lora_file(sdxl_lora_obj, tmp_path / "sdxl_kohya.safetensors", sdxl_model.config,
                                      format="kohya")
    _one_line_error(kohya, sd_model.config, r"key lora_te1_text_model_\S+ matches no module of an SD 1\.x/2\.x-style "
                                            r"model .*kohya prefixes: lora_unet_, lora_te_")
    _one_line_error(sd_lora[1], sdxl_model.config, r"matches no module of an SDXL base-style model")


def test_bad_lora_files_are_one_line_errors(sd_lora, tmp_path):
    model, lora_file, *_ = sd_lora
    state, metadata = lora_files.read_lora_file(lora_file)
    a_key = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"
    b_key = a_key.replace("lora_A", "lora_B")
    cases = {
        "rank": ({**state, b_key: state[b_key][:, :3]}, metadata,
                 r"proj_in.lora_A.weight: rank mismatch, down \(4, 32, 1, 1\), up \(32, 3, 1, 1\)"),
        "partner": ({k: v for k, v in state.items() if k != b_key}, metadata,
                    r"proj_in.lora_A.weight has no partner unet\.down_blocks\.0\.attentions\.0\.proj_in\.lora_B"),
        "family": ({**state, "unet.down_blocks.0.attentions.0.proj_in.hada_w1_a": state[a_key]}, metadata,
                   r"key unet\.\S+\.hada_w1_a is of no known LoRA key family"),
        "mixed": ({**state, "lora_unet_conv_in.alpha": np.float32(1.0)}, metadata,
                  r"key \S+ is a peft key in a file of kohya keys"),
        "shape": ({**state, "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight":
                   np.zeros((4, 48), np.float32),
                   "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight":
                   np.zeros((64, 4), np.float32)}, metadata,
                  r"attn2\.to_k\.lora_A\.weight: factors give a delta of shape \(48, 64\) .* is \(32, 64\)"),
        "metadata_rank": (state, {**metadata, "lora_adapter_metadata": json.dumps(
            {**json.loads(metadata["lora_adapter_metadata"]), "unet.r": 8})},
                          r"rank mismatch, the file's factors have rank 4, its metadata says 8"),
        "dora": (state, {**metadata, "lora_adapter_metadata": json.dumps(
            {**json.loads(metadata["lora_adapter_metadata"]), "unet.use_dora": True})}, r"use_dora=True is not supported"),
    }
    for name, (tensors, meta, match) in cases.items():
        _one_line_error(_write(tmp_path / f"{name}.safetensors", tensors, meta), model.config, match)
    kohya = {"lora_unet_conv_in.alpha": np.float32(1.0)}
    _one_line_error(_write(tmp_path / "alpha_alone.safetensors", kohya), model.config,
                    r"key lora_unet_conv_in\.alpha has no partner lora_unet_conv_in\.lora_down\.weight")
    with pytest.raises(FileNotFoundError):
        lora_files.load_lora_file(tmp_path / "nowhere.safetensors", model.config)
    lora = lora_files.load_lora_file(lora_file, model.config)
    with pytest.raises(ValueError, match="LoRA format 'ckpt'"):
        lora_files.save_lora_file(lora, tmp_path / "x.safetensors", model.config, format="ckpt")
    with pytest.raises(ValueError, match="leave lora_adapter_metadata to the writer"):
        lora_files.save_lora_file(lora, tmp_path / "x.safetensors", model.config,
                                  metadata={lora_peft.METADATA_KEY: "{}"})
    stray = lora_lib.make_lora({("unet", "nowhere"): {"down": np.zeros((4, 2)), "up": np.zeros((2, 4))}})
    with pytest.raises(LoraError, match="unet/nowhere matches no kernel"):
        lora_files.save_lora_file(stray, tmp_path / "x.safetensors", model.config)


def test_alpha_from_metadata_patterns_rslora_or_rank(sd_lora, tmp_path):
    """alpha = rank without metadata; alpha_pattern (peft's regex rule) over lora_alpha; rsLoRA's alpha / sqrt(r)
    as the alpha of the same coefficient; text keys with and without transformers' text_model level."""
    model, lora_file, *_ = sd_lora
    state, metadata = lora_files.read_lora_file(lora_file)
    q = ("unet", "down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
    bare = lora_files.load_lora_file(_write(tmp_path / "bare.safetensors", state), model.config)
    assert set(bare.alpha_of().values()) == {float(RANK)}
    meta = json.loads(metadata["lora_adapter_metadata"])
    patterned = {**meta, "unet.alpha_pattern": {r"down_blocks\.0\..*attn1\.to_q": 1.5}, "unet.use_rslora": True}
    path = _write(tmp_path / "patterned.safetensors", state, {"lora_adapter_metadata": json.dumps(patterned)})
    alphas = lora_files.load_lora_file(path, model.config).alpha_of()
    assert alphas[q] == pytest.approx(1.5 * RANK**0.5)
    assert alphas[q[:-2] + ("attn2", "to_q")] == pytest.approx(6.0 * RANK**0.5)
    renamed = {k.replace("text_encoder.", "text_encoder.text_model."): v for k, v in state.items()}
    _same_lora(lora_files.load_lora_file(_write(tmp_path / "t4.safetensors", renamed, metadata), model.config),
               lora_files.load_lora_file(lora_file, model.config))
