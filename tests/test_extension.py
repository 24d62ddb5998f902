"""The SD.Next extension without SD.Next: the pipeline contract, pairing, descriptors, settings, host glue.

SD.Next's `modules.*` are replaced by small stand-ins injected as a `modules` package for one test at a time
(there is no real `modules` package in this environment, so nothing real is patched).
"""

from __future__ import annotations

import inspect
import json
import re
import runpy
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cascade import tiny
from cascade.errors import GenerationInterrupted
from extension import descriptors, library, params
from extension.errors import CascadeHostError
from extension.pipeline import PipelineHost, StableCascadeSingleFilePipeline

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(width=128, height=128, prior_num_inference_steps=3, num_inference_steps=2)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return StableCascadeSingleFilePipeline.from_engine(tiny_pipeline)


# --- the pipeline contract SD.Next relies on ---------------------------------------------------------------------


def test_contract_class_and_components(pipe, tiny_pipeline):
    from diffusers import StableCascadeCombinedPipeline

    assert "StableCascade" in type(pipe).__name__  # SD.Next's Stable Cascade branches test the class name
    assert isinstance(pipe, StableCascadeCombinedPipeline)
    assert pipe.prior_pipe.prior is tiny_pipeline.prior
    assert pipe.prior_pipe.text_encoder is tiny_pipeline.text_encoder
    assert pipe.decoder_pipe.decoder is tiny_pipeline.decoder
    assert pipe.vqgan is tiny_pipeline.stage_a
    assert not hasattr(pipe, "vae")  # SD.Next then asks for output_type='np' and passes the images through
    registered = set(pipe.config.keys())
    assert {"prior_prior", "prior_text_encoder", "decoder", "vqgan", "prior_tokenizer", "prior_scheduler"} <= registered
    assert set(pipe.components) >= {"prior_prior", "decoder", "vqgan"}  # diffusers' consistency check passes
    assert pipe.device == torch.device("cpu")


def test_contract_call_signature(pipe):
    names = set(inspect.signature(type(pipe).__call__, follow_wrapped=True).parameters)
    needed = {
        "prompt", "negative_prompt", "height", "width", "prior_num_inference_steps", "prior_guidance_scale",
        "num_inference_steps", "decoder_guidance_scale", "prompt_embeds", "prompt_embeds_pooled",
        "negative_prompt_embeds", "negative_prompt_embeds_pooled", "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds", "num_images_per_prompt", "generator", "latents", "output_type",
        "return_dict", "prior_callback_on_step_end", "prior_callback_on_step_end_tensor_inputs",
        "callback_on_step_end", "callback_on_step_end_tensor_inputs", "compression", "decoder_sampler",
        "decoder_scheduler",
    }
    assert needed <= names
    assert "seed" not in names and "guidance_scale" not in names  # SD.Next would fill them with other meanings


def test_np_output_and_batch_seeds(pipe):
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    out = pipe(prompt=["a cat", "a dog"], negative_prompt=["", ""], generator=gens, output_type="np", **SMALL)
    assert out.images.shape == (2, 128, 128, 3) and out.images.dtype == np.float32
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    assert out.seeds == [5, 6] and not out.interrupted
    single = pipe(prompt="a dog", seeds=[6], output_type="np", **SMALL)
    assert np.abs(single.images[0] - out.images[1]).max() < 1e-4  # image i of a batch == a run with its seed


def test_non_consecutive_seeds_run_separately(pipe):
    out = pipe(prompt=["x", "x"], seeds=[10, 3], output_type="np", **SMALL)
    one = pipe(prompt="x", seeds=[3], output_type="np", **SMALL)
    assert out.seeds == [10, 3]
    assert np.abs(out.images[1] - one.images[0]).max() < 1e-4


def test_both_pooled_argument_names_and_sdnext_layout(pipe, tiny_pipeline):
    cond, uncond = tiny_pipeline.encode(["a red fox", "a red fox"]), tiny_pipeline.encode(["", ""])
    text = pipe(prompt=["a red fox"] * 2, seeds=[1, 2], output_type="np", **SMALL).images
    diffusers_names = pipe(prompt_embeds=cond.hidden, prompt_embeds_pooled=cond.pooled,
                           negative_prompt_embeds=uncond.hidden, negative_prompt_embeds_pooled=uncond.pooled,
                           seeds=[1, 2], output_type="np", **SMALL).images
    sdnext_names = pipe(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled[:, 0],
                        negative_prompt_embeds=uncond.hidden, negative_pooled_prompt_embeds=uncond.pooled[:, 0],
                        seeds=[1, 2], output_type="np", **SMALL).images
    sdnext_unsqueezed = pipe(prompt_embeds=cond.hidden, prompt_embeds_pooled=cond.pooled[:, 0].unsqueeze(0),
                             negative_prompt_embeds=uncond.hidden,
                             negative_prompt_embeds_pooled=uncond.pooled[:, 0].unsqueeze(0),
                             seeds=[1, 2], output_type="np", **SMALL).images
    for other in (diffusers_names, sdnext_names, sdnext_unsqueezed):
        assert np.abs(other - text).max() < 1e-4


def test_embeds_without_pooled_is_a_clear_error(pipe, tiny_pipeline):
    cond = tiny_pipeline.encode(["a fox"])
    with pytest.raises(CascadeHostError, match="pooled") as err:
        pipe(prompt_embeds=cond.hidden, output_type="np", **SMALL)
    assert err.value.status_code == 400


def test_errors_escape_sdnext_catch_clauses(pipe):
    with pytest.raises(CascadeHostError) as err:
        pipe(prompt="x", width=250, height=256, prior_num_inference_steps=2, num_inference_steps=1)
    # SD.Next swallows these three into "HTTP 200, no images"; ours must not be one of them.
    assert not isinstance(err.value, (ValueError, RuntimeError, AssertionError))
    assert err.value.status_code == 400 and "multiple of 128" in str(err.value)


def test_runtime_failure_becomes_host_error(tiny_pipeline):
    engine = SimpleNamespace(**vars(tiny_pipeline))
    engine.encode = tiny_pipeline.encode

    def boom(*_a, **_k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    engine.generate = boom
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline)
    pipe._engine = engine
    with pytest.raises(CascadeHostError, match="out of memory") as err:
        pipe(prompt="x", output_type="np", **SMALL)
    assert err.value.status_code == 507


class RecordingHost(PipelineHost):
    def __init__(self, stop_after: int | None = None):
        self.total, self.events, self.stop_after, self.was_stopped = None, [], stop_after, False

    def begin(self, total_steps):
        self.total = total_steps

    def step(self, event):
        self.events.append((event.stage, event.step, event.total))

    def should_stop(self):
        return self.stop_after is not None and len(self.events) >= self.stop_after

    def stopped(self):
        self.was_stopped = True


def test_progress_covers_both_stages(tiny_pipeline):
    host = RecordingHost()
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=host)
    pipe(prompt="x", seeds=[1], output_type="np", **SMALL)
    assert host.total == len(host.events) == 5
    assert [e[0] for e in host.events] == ["prior"] * 3 + ["decoder"] * 2


def test_stop_returns_what_finished(tiny_pipeline):
    host = RecordingHost(stop_after=2)
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=host)
    out = pipe(prompt="x", seeds=[1], output_type="np", **SMALL)
    assert out.interrupted and host.was_stopped and out.images.shape == (0, 128, 128, 3)
    host = RecordingHost(stop_after=6)  # the second of two separately run images is interrupted
    pipe.host = host
    out = pipe(prompt=["x", "y"], seeds=[1, 9], output_type="np", **SMALL)
    assert out.interrupted and out.images.shape[0] == 1 and out.seeds == [1]


def test_diffusers_style_callbacks_get_both_stages(pipe):
    seen = []
    pipe(prompt="x", seeds=[1], output_type="np",
         prior_callback_on_step_end=lambda p, i, t, kw: seen.append(("prior", i, tuple(kw["latents"].shape))),
         callback_on_step_end=lambda p, i, t, kw: seen.append(("decoder", i, tuple(kw["latents"].shape))), **SMALL)
    assert [s[:2] for s in seen] == [("prior", 0), ("prior", 1), ("prior", 2), ("decoder", 0), ("decoder", 1)]


def test_unavailable_model_raises_its_load_error():
    error = CascadeHostError("Stable Cascade loading 'x' failed: it is a Stage B file", 422)
    pipe = StableCascadeSingleFilePipeline.unavailable(error)
    assert "StableCascade" in type(pipe).__name__
    with pytest.raises(CascadeHostError, match="Stage B"):
        pipe.preprocess(SimpleNamespace(), {})
    with pytest.raises(CascadeHostError, match="Stage B"):
        pipe(prompt="x")


def test_placement_owned_devices_ignore_whole_pipeline_moves(tiny_pipeline, monkeypatch):
    class StagedPlan:  # what the executor looks like after a fallback from `resident` to `stage`
        name = "stage"

    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline)
    assert not pipe.placement_owns_devices  # a resident plan: SD.Next's whole-pipeline moves are honoured
    monkeypatch.setattr(tiny_pipeline, "placement", StagedPlan())
    assert pipe.placement_owns_devices  # read live: the fallback takes over at once
    assert pipe.to("meta") is pipe and pipe.device == tiny_pipeline.device
    assert next(tiny_pipeline.prior.parameters()).device.type == "cpu"



def test_nan_retry_works_under_sdnext_offload(tiny_pair, nan_when_bf16):
    """With SD.Next's own offload modes the placement is SdnextOffload: the NaN guard's retry in a safer dtype must
    convert the weights through it (it lacked `recast`, so the retry died with an AttributeError)."""
    from cascade_backends import select_backend
    from cascade.engine import load_pipeline
    from cascade.request import GenerationRequest, StageSettings
    from extension.offload import SdnextOffload

    engine, _ = load_pipeline(*tiny_pair, backend=select_backend("cpu"), dtype=torch.bfloat16,
                              placement=SdnextOffload("balanced", torch.device("cpu"), lambda: None))

    handle = engine.prior.register_forward_hook(nan_when_bf16)
    try:
        result = engine.generate(GenerationRequest(
            "a cat", width=128, height=128, seed=1, prior=StageSettings(2, 4.0, "euler", "karras", 2.0),
            decoder=StageSettings(1, 1.0, "euler", "karras", 1.0)))
    finally:
        handle.remove()
    assert torch.isfinite(result.images).all() and result.dtypes["prior"] == "float32"

# --- folder scanning, pairing, descriptors -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models):
    """Tiny Stage C / Stage B files under several names, written once and copied per test."""
    folder = tmp_path_factory.mktemp("tiny-files")
    return (tiny.write_comfyui_stage_c(folder / "c.safetensors", tiny_models),
            tiny.write_comfyui_stage_b(folder / "b.safetensors", tiny_models))


def _place(folder: Path, files, **names: str) -> None:
    """names: new name -> 'c' or 'b' (symlinks: the library classifies by header, not by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, kind in names.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(files[0] if kind == "c" else files[1])


def test_pairing_by_name_convention(tmp_path, files):
    _place(tmp_path, files, **{"sote_main.safetensors": "c", "sote_decoder.safetensors": "b",
                               "other-stage-c.safetensors": "c", "other-stage-b.safetensors": "b"})
    lib = library.scan_library(tmp_path)
    pairs = {p.name: (p.decoder.name, p.rule) for p in lib.pairs}
    assert pairs == {"sote_main": ("sote_decoder.safetensors", "name"),
                     "other-stage-c": ("other-stage-b.safetensors", "name")}
    assert lib.problems == []


def test_pairing_sidecar_setting_only_and_problems(tmp_path, files):
    _place(tmp_path, files, **{"alpha.safetensors": "c", "beta.safetensors": "c", "gamma.safetensors": "c",
                               "dec1.safetensors": "b", "dec2.safetensors": "b"})
    (tmp_path / "alpha.cascade.json").write_text(json.dumps({"decoder": "dec2.safetensors"}))
    (tmp_path / "beta.cascade.json").write_text(json.dumps({"decoder": "../outside.safetensors"}))
    (tmp_path / "notes.safetensors").write_bytes(b"not a safetensors file")
    lib = library.scan_library(tmp_path)
    assert {p.name: (p.decoder.name, p.rule) for p in lib.pairs} == {"alpha": ("dec2.safetensors", "sidecar")}
    text = " ".join(lib.problems)
    assert "outside the model folder" in text  # sidecars never reach outside the folder
    assert "gamma.safetensors: no Stage B pairs" in text
    assert "dec1.safetensors: a Stage B (decoder) file with no Stage C" in text  # a lone Stage B is not a model
    assert "notes.safetensors" in text
    lib = library.scan_library(tmp_path, default_decoder="dec1.safetensors")
    assert {p.name: p.rule for p in lib.pairs} == {"alpha": "sidecar", "beta": "setting", "gamma": "setting"}
    assert library.decoder_choices(lib) == ["Automatic", "dec1.safetensors", "dec2.safetensors"]


def test_single_stage_b_pairs_everything(tmp_path, files):
    _place(tmp_path, files, **{"one.safetensors": "c", "sub/two.safetensors": "c", "dec.safetensors": "b"})
    lib = library.scan_library(tmp_path)
    assert sorted((p.name, p.rule) for p in lib.pairs) == [("one", "only"), ("two", "only")]


def test_missing_folder_is_a_problem_not_a_crash(tmp_path):
    lib = library.scan_library(tmp_path / "nope")
    assert lib.pairs == [] and "does not exist" in lib.problems[0]


@pytest.mark.parametrize("stem, name", [("sote-prior", "sote_prior"), ("org--model", "org-model"),
                                        ("models--x", "sc-models-x"), ("plain", "plain")])
def test_descriptor_names_survive_sdnext_listing(stem, name):
    assert library._descriptor_name(stem) == name


def test_descriptor_sync_is_atomic_idempotent_and_cleans_only_its_own(tmp_path, files):
    lib_dir, diffusers_dir = tmp_path / "sc", tmp_path / "Diffusers"
    _place(lib_dir, files, **{"m_main.safetensors": "c", "m_decoder.safetensors": "b"})
    (diffusers_dir / "someone-else").mkdir(parents=True)
    (diffusers_dir / "someone-else" / "model_index.json").write_text("{}")
    lib = library.scan_library(lib_dir)
    report = descriptors.sync(lib.pairs, lib.root, diffusers_dir)
    assert report.written == ["m_main"] and report.changed
    index = json.loads((diffusers_dir / "m_main" / "model_index.json").read_text())
    assert index["_class_name"] == "StableCascadeCombinedPipeline"
    desc = descriptors.read_descriptor(diffusers_dir / "m_main")
    assert desc.prior.name == "m_main.safetensors" and desc.decoder.name == "m_decoder.safetensors"
    mtime = (diffusers_dir / "m_main" / "model_index.json").stat().st_mtime_ns
    again = descriptors.sync(lib.pairs, lib.root, diffusers_dir)
    assert again.unchanged == ["m_main"] and not again.changed
    assert (diffusers_dir / "m_main" / "model_index.json").stat().st_mtime_ns == mtime
    assert not list(diffusers_dir.rglob("*.tmp"))
    (lib_dir / "m_main.safetensors").unlink()
    gone = descriptors.sync(library.scan_library(lib_dir).pairs, lib.root, diffusers_dir)
    assert gone.removed == ["m_main"] and not (diffusers_dir / "m_main").exists()
    assert (diffusers_dir / "someone-else" / "model_index.json").exists()  # never touched


def test_descriptor_never_overwrites_a_foreign_folder(tmp_path, files):
    lib_dir, diffusers_dir = tmp_path / "sc", tmp_path / "Diffusers"
    _place(lib_dir, files, **{"taken_main.safetensors": "c", "taken_decoder.safetensors": "b"})
    (diffusers_dir / "taken_main").mkdir(parents=True)
    (diffusers_dir / "taken_main" / "model_index.json").write_text('{"_class_name": "X"}')
    lib = library.scan_library(lib_dir)
    report = descriptors.sync(lib.pairs, lib.root, diffusers_dir)
    assert report.written == [] and "was not made by this extension" in report.problems[0]
    assert json.loads((diffusers_dir / "taken_main" / "model_index.json").read_text()) == {"_class_name": "X"}


# --- SD.Next fields and settings -> engine settings ----------------------------------------------------------------


@pytest.mark.parametrize("sdnext, ours", [("Default", "ddpm"), (None, "ddpm"), ("Euler a", "euler_ancestral"),
                                          ("DPM++ 2M", "dpmpp_2m"), ("UniPC", "uni_pc"), ("KDPM2", "dpm_2"),
                                          ("DDPM", "ddpm")])
def test_sdnext_sampler_names(sdnext, ours):
    assert params.resolve_sdnext_sampler(sdnext) == ours


def test_unknown_sampler_lists_the_usable_ones():
    with pytest.raises(Exception, match="not available for Stable Cascade.*Euler a"):
        params.resolve_sdnext_sampler("DEIS")


def test_settings_per_request_then_options():
    values = {"cascade_compression": "32", "cascade_decoder_sampler": "DPM++ 2M"}
    s = params.resolve_settings(values.get)
    assert s.compression == 32.0 and s.decoder_sampler == "DPM++ 2M" and s.prior_scheduler == "sgm_uniform"
    decoder = params.decoder_stage(10, 1.0, s)
    assert decoder.sampler == "dpmpp_2m" and decoder.scheduler == "karras"
    with pytest.raises(Exception, match="Refiner steps"):
        params.decoder_stage(0, 1.0, s)


def test_infotext_keys_parse_back_in_sdnext():
    s = params.CascadeSettings()
    fields = params.infotext_fields(params.prior_stage(30, 7, "Default", s), params.decoder_stage(10, 1.5, s), s,
                                    "model_decoder.safetensors")
    assert all(re.fullmatch(r"[\w ]+", k) for k in fields)  # SD.Next's infotext key pattern
    assert fields["Refiner steps"] == 10 and fields["Image CFG scale"] == "1.5"  # restored by send-to-txt2img
    assert fields["Decoder sampler"] == "Euler a" and fields["Compression"] == "42"


# --- SD.Next glue with stand-ins -----------------------------------------------------------------------------------


class FakeState:
    def __init__(self):
        self.sampling_step = self.sampling_steps = 0
        self.interrupted = self.skipped = self.paused = False
        self.textinfo = None

    def step(self, n=1):
        self.sampling_step += n


@pytest.fixture
def fake_modules(monkeypatch):
    """A stand-in `modules` package with the few SD.Next objects the host touches."""
    shared = SimpleNamespace(state=FakeState(), opts=SimpleNamespace(data={}, diffusers_offload_mode="none"))
    pkg = types.ModuleType("modules")
    pkg.shared = shared
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    return shared


def _fake_p(**kw):
    base = dict(steps=3, cfg_scale=4.0, sampler_name="Default", refiner_steps=2, prompts=["a fox"],
                negative_prompts=[""], seeds=[11], extra_generation_params={})
    base.update(kw)
    return SimpleNamespace(**base)


def test_host_preprocess_maps_fields_and_writes_infotext(fake_modules, tiny_pipeline):
    from extension.host import SdnextHost

    fake_modules.opts.data["cascade_decoder_scheduler"] = "exponential"
    p = _fake_p(cascade_compression=36)  # an `extra` value: an attribute of p
    args = {"prompt_embeds": torch.zeros(1), "prior_num_inference_steps": 3, "num_inference_steps": 2,
            "prior_guidance_scale": 4.0, "prior_callback_on_step_end": print, "output_type": "np"}
    host = SdnextHost("d.safetensors")
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=host)
    pipe.preprocess(p, args)
    assert args["prompt"] == ["a fox"] and args["negative_prompt"] == [""] and args["seeds"] == [11]
    assert "prior_callback_on_step_end" not in args  # our progress replaces SD.Next's prior-only callback
    assert args["compression"] == 36.0 and args["decoder_scheduler"] == "exponential"
    assert p.extra_generation_params["Decoder schedule type"] == "Exponential"  # the CLI's field names (infotext)
    assert p.extra_generation_params["Decoder"] == "d"
    out = pipe(**{**args, "prompt_embeds": None, "width": 128, "height": 128})
    assert out.images.shape == (1, 128, 128, 3)
    assert fake_modules.state.sampling_steps == 5 and fake_modules.state.sampling_step == 5
    assert "Stage B" in fake_modules.state.textinfo


def test_host_preprocess_errors_are_host_errors(fake_modules):
    from extension.host import SdnextHost

    with pytest.raises(CascadeHostError, match="not available") as err:
        SdnextHost("d").preprocess(None, _fake_p(sampler_name="DEIS"), {})
    assert err.value.status_code == 400


def test_host_refuses_an_offload_switch_without_reload(fake_modules):
    from extension.host import SdnextHost

    fake_modules.opts.diffusers_offload_mode = "balanced"
    with pytest.raises(CascadeHostError, match="reload-checkpoint") as err:
        SdnextHost("d", offload_mode="none").preprocess(None, _fake_p(), {})
    assert err.value.status_code == 409
    SdnextHost("d", offload_mode="model").preprocess(None, _fake_p(), {})  # SD.Next's modes switch among themselves


def test_host_skip_is_consumed_interrupt_is_not(fake_modules):
    from extension.host import SdnextHost

    host, state = SdnextHost("d"), fake_modules.state
    state.skipped = True
    assert host.should_stop()
    host.stopped()
    assert not state.skipped  # SD.Next goes on with the next batch
    state.interrupted = True
    assert host.should_stop()
    host.stopped()
    assert state.interrupted  # SD.Next ends the job


@pytest.fixture
def fake_loader_module(monkeypatch):
    calls = []

    def original(checkpoint_info, diffusers_load_config=None):
        calls.append(checkpoint_info)
        return "original-result"

    mod = types.ModuleType("pipelines.model_stablecascade")
    mod.load_cascade_combined = original
    pkg = types.ModuleType("pipelines")
    pkg.model_stablecascade = mod
    monkeypatch.setitem(sys.modules, "pipelines", pkg)
    monkeypatch.setitem(sys.modules, "pipelines.model_stablecascade", mod)
    return mod, original, calls


def test_hook_wraps_once_and_restores(fake_loader_module, tmp_path):
    from extension import hook

    mod, original, calls = fake_loader_module
    hook.install(lambda: None)
    hook.install(lambda: None)
    assert hook.installed() and mod.load_cascade_combined.__sd_cascade_original__ is original
    folder = tmp_path / "hub-folder"
    folder.mkdir()
    assert mod.load_cascade_combined(SimpleNamespace(path=str(folder), name="x")) == "original-result"
    assert len(calls) == 1  # not ours: SD.Next's own loader
    hook.uninstall()
    assert mod.load_cascade_combined is original and not hook.installed()


def test_loader_gives_an_unavailable_model_for_a_lone_stage_b(fake_loader_module, tmp_path, files):
    from extension import hook

    mod, _, calls = fake_loader_module
    _place(tmp_path, files, **{"stablecascade-decoder.safetensors": "b"})
    hook.install(lambda: None)
    try:
        pipe = mod.load_cascade_combined(SimpleNamespace(path=str(tmp_path / "stablecascade-decoder.safetensors"),
                                                         name="stablecascade-decoder"))
    finally:
        hook.uninstall()
    assert calls == [] and isinstance(pipe, StableCascadeSingleFilePipeline)
    with pytest.raises(CascadeHostError, match="is a Stage B .decoder. file, not a model on its own") as err:
        pipe(prompt="x")
    assert err.value.status_code == 422


def test_loader_reports_a_vanished_decoder(fake_loader_module, tmp_path, files):
    from extension import hook

    mod, _, _ = fake_loader_module
    lib_dir, diffusers_dir = tmp_path / "sc", tmp_path / "Diffusers"
    _place(lib_dir, files, **{"v_main.safetensors": "c", "v_decoder.safetensors": "b"})
    lib = library.scan_library(lib_dir)
    descriptors.sync(lib.pairs, lib.root, diffusers_dir)
    (lib_dir / "v_decoder.safetensors").unlink()
    hook.install(lambda: None)
    try:
        pipe = mod.load_cascade_combined(SimpleNamespace(path=str(diffusers_dir / "v_main"), name="Diffusers/v_main"))
    finally:
        hook.uninstall()
    with pytest.raises(CascadeHostError, match="Stage B file .* is gone"):
        pipe(prompt="x")


def test_entry_script_refuses_a_shadowing_package(monkeypatch, tmp_path):
    fake = types.ModuleType("cascade")  # generic names are avoided (tests/test_packaging.py); `cascade` is checked
    fake.__file__ = str(tmp_path / "other-extension" / "cascade" / "__init__.py")
    monkeypatch.setitem(sys.modules, "cascade", fake)
    with pytest.raises(ImportError, match="other-extension"):
        runpy.run_path(str(ROOT / "scripts" / "stable_cascade.py"))


def test_generation_interrupted_is_not_a_host_error():
    assert not issubclass(GenerationInterrupted, (ValueError, RuntimeError, AssertionError))


def test_batch_of_prompts_of_different_lengths_equals_single_runs(pipe):
    """A batch mixing a one-chunk and a two-chunk prompt (wildcards, API prompt lists): each image equals the single
    run with its prompt and seed. Encoding them together tiled the short one to the long one's length, which changes
    Stage C's attention (image and text tokens share one softmax), and the image."""
    long = ", ".join(["masterpiece", "1girl", "solo", "smile"] * 30)
    batch = pipe(prompt=["a cat", long], seeds=[1, 2], output_type="np", **SMALL)
    assert batch.seeds == [1, 2] and batch.images.shape[0] == 2
    for i, (text, seed) in enumerate((("a cat", 1), (long, 2))):
        single = pipe(prompt=text, seeds=[seed], output_type="np", **SMALL).images[0]
        assert np.abs(batch.images[i] - single).max() < 1e-4, text


def test_embeddings_with_several_images_per_prompt(pipe, tiny_pipeline):
    cond, uncond = tiny_pipeline.encode(["a red fox"]), tiny_pipeline.encode([""])
    out = pipe(prompt_embeds=cond.hidden, prompt_embeds_pooled=cond.pooled, negative_prompt_embeds=uncond.hidden,
               negative_prompt_embeds_pooled=uncond.pooled, num_images_per_prompt=2, seeds=[4, 9], output_type="np",
               **SMALL)
    text = pipe(prompt="a red fox", seeds=[9], output_type="np", **SMALL).images[0]
    assert out.images.shape[0] == 2 and np.abs(out.images[1] - text).max() < 1e-4


# --- img2img and live previews --------------------------------------------------------------------------------------


def _picture(seed: int, size=(160, 144)):
    from PIL import Image

    gen = np.random.RandomState(seed)
    return Image.fromarray((gen.rand(5, 4, 3) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)


@pytest.fixture
def engine_calls(tiny_pipeline, monkeypatch):
    """The requests the wrapped engine is asked to run (it still runs them)."""
    calls = []
    real = tiny_pipeline.generate

    def spy(request, **kw):
        calls.append(request)
        return real(request, **kw)

    monkeypatch.setattr(tiny_pipeline, "generate", spy)
    return calls


def test_image_and_strength_become_stage_c_img2img(pipe, engine_calls):
    """diffusers' img2img arguments map onto the request fields `image` / `prior_denoise` (through build_request)."""
    picture = _picture(1)
    out = pipe(prompt="a fox", seeds=[3], image=[picture], strength=0.6, output_type="np", **SMALL).images
    (request,) = engine_calls
    assert request.image is picture and request.prior.denoise == 0.6
    txt2img = pipe(prompt="a fox", seeds=[3], output_type="np", **SMALL).images
    stronger = pipe(prompt="a fox", seeds=[3], image=picture, strength=0.9, output_type="np", **SMALL).images
    other = pipe(prompt="a fox", seeds=[3], image=_picture(2), strength=0.6, output_type="np", **SMALL).images
    again = pipe(prompt="a fox", seeds=[3], image=picture, strength=0.6, output_type="np", **SMALL).images
    assert np.array_equal(out, again)
    for different in (txt2img, stronger, other):
        assert np.abs(out - different).mean() > 1e-3
    assert engine_calls[1].image is None and engine_calls[1].prior.denoise == 1.0
    pipe(prompt="a fox", seeds=[3], image=picture, output_type="np", **SMALL)
    assert engine_calls[-1].prior.denoise == 0.8  # an image alone: diffusers' default strength


def test_one_init_image_per_image_or_one_for_the_batch(pipe, engine_calls):
    a, b = _picture(1), _picture(2)
    both = pipe(prompt=["x", "x"], seeds=[1, 2], image=[a, b], strength=0.6, output_type="np", **SMALL).images
    assert [r.batch_size for r in engine_calls] == [1, 1]  # different init images run apart
    single = pipe(prompt="x", seeds=[2], image=b, strength=0.6, output_type="np", **SMALL).images
    assert np.abs(both[1] - single[0]).max() < 1e-4
    engine_calls.clear()
    pipe(prompt=["x", "x"], seeds=[1, 2], image=[a, a.copy()], strength=0.6, output_type="np", **SMALL)
    assert [r.batch_size for r in engine_calls] == [2]  # equal pixels: one batch


def test_array_and_tensor_images_equal_the_pil_image(pipe):
    picture = _picture(4, (128, 128))
    hwc = np.asarray(picture, dtype=np.float32) / 255.0
    runs = [pipe(prompt="x", seeds=[5], image=img, strength=0.5, output_type="np", **SMALL).images
            for img in (picture, hwc, torch.from_numpy(hwc).permute(2, 0, 1), hwc[None])]
    for other in runs[1:]:
        assert np.abs(other - runs[0]).max() < 1e-4


@pytest.mark.parametrize("kw, message", [
    (dict(strength=0.5), "strength 0.5 was given without an image"),
    (dict(image="in.png", strength=0.5), "must be a PIL image, an array or a tensor"),
    (dict(image=np.zeros((2, 2)), strength=0.5), "is not one HWC or CHW image"),
    (dict(image=[None, None, None], strength=0.5), None),
    (dict(image=[_picture(1), _picture(2), _picture(3)], strength=0.5), "3 init images for 1 images"),
    (dict(image=_picture(1, (1, 1)), strength=0.5), "is 1x1"),
    (dict(image=_picture(1), strength=1.5), "prior denoise 1.5 must be in"),
])
def test_bad_img2img_arguments_are_400s(pipe, kw, message):
    if message is None:  # an empty image list is text-to-image... with a strength that then has no image
        message = "without an image"
    with pytest.raises(CascadeHostError, match=message) as err:
        pipe(prompt="x", seeds=[1], output_type="np", **SMALL, **kw)
    assert err.value.status_code == 400


def test_host_hands_over_sdnexts_init_images_and_strength(fake_modules, tiny_pipeline, engine_calls):
    """SD.Next's img2img leaves `image`/`strength` out for our (text-to-image task) class: preprocess fills them."""
    from extension.host import SdnextHost

    picture = _picture(3)
    p = _fake_p(init_images=[picture], denoising_strength=0.45)
    args = {"prior_num_inference_steps": 3, "num_inference_steps": 2, "output_type": "np"}
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=SdnextHost("d.safetensors"))
    pipe.preprocess(p, args)
    assert args["image"] == [picture] and args["strength"] == 0.45
    out = pipe(**args, width=128, height=128)
    assert out.images.shape == (1, 128, 128, 3)
    assert engine_calls[-1].image is picture and engine_calls[-1].prior.denoise == 0.45
    hires = {"image": [_picture(5)], "strength": 0.3}  # a hires pass passes its own images: kept
    pipe.preprocess(_fake_p(init_images=[picture], denoising_strength=0.45), hires)
    assert hires["strength"] == 0.3 and hires["image"][0] is not picture
    txt2img = {}
    pipe.preprocess(_fake_p(init_images=None), txt2img)
    assert "image" not in txt2img and "strength" not in txt2img


class PreviewState(FakeState):
    """Records the live previews SD.Next would show (what `current_image` is set to)."""

    def __init__(self):
        super().__init__()
        self.previews, self.current_latent, self.preview_job = [], "stale", 7

    def __setattr__(self, name, value):
        if name == "current_image":
            self.previews.append(value)
        super().__setattr__(name, value)


def _preview_run(fake_modules, tiny_pipeline, clock=None, **opts):
    from extension.host import SdnextHost

    fake_modules.state = PreviewState()
    for key, value in opts.items():
        setattr(fake_modules.opts, key, value)
    host = SdnextHost("d") if clock is None else SdnextHost("d", clock=clock)
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=host)
    pipe(prompt="x", seeds=[1], output_type="np", width=256, height=384, prior_num_inference_steps=3,
         num_inference_steps=2)
    return fake_modules.state


def test_live_previews_reach_sdnexts_preview_pane(fake_modules, tiny_pipeline):
    state = _preview_run(fake_modules, tiny_pipeline, show_progress_type="Approximate", live_preview_refresh_period=0)
    sizes = [image.size for image in state.previews]
    # Stage C through the main file's previewer (8x its latent), Stage B by the factors (its latent's size)
    assert sizes == [(8 * (256 // 42), 8 * (384 // 42))] * 3 + [(256 // 4, 384 // 4)] * 2
    assert all(image.mode == "RGB" for image in state.previews)
    assert state.current_latent is None and state.preview_job == -1  # SD.Next then shows current_image
    simple = _preview_run(fake_modules, tiny_pipeline, show_progress_type="Simple", live_preview_refresh_period=0)
    assert simple.previews[0].size == (256 // 42, 384 // 42)  # the latent-to-RGB factors at the latent's size
    assert _preview_run(fake_modules, tiny_pipeline, show_progress_type="None").previews == []


def test_live_previews_follow_the_refresh_period(fake_modules, tiny_pipeline):
    ticks = iter(range(1000))
    clock = lambda: next(ticks) * 0.2  # noqa: E731 - 200 ms between steps
    state = _preview_run(fake_modules, tiny_pipeline, clock, show_progress_type="Simple",
                         live_preview_refresh_period=500)
    assert len(state.previews) == 2  # steps 1 and 4 of 5 (0, 0.6 s)
    state = _preview_run(fake_modules, tiny_pipeline, show_progress_type="TAESD", live_preview_refresh_period=10**9)
    assert len(state.previews) == 1  # the first step only


def test_noise_setting_reaches_the_request_and_the_infotext(tiny_pipeline, fake_modules):
    """Settings > Stable Cascade "Noise" (cascade_noise; per request as an `extra` / override value): comfyui gives
    ComfyUI's noise stream, the same image as the engine's own comfyui mode, and the infotext says which."""
    from cascade.request import build_request
    from extension.host import SdnextHost

    results = {}
    for mode in ("cpu", "comfyui"):
        p = _fake_p(cascade_noise=mode)
        args = {"prior_num_inference_steps": 3, "num_inference_steps": 2, "output_type": "pt"}
        pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=SdnextHost("d.safetensors"))
        pipe.preprocess(p, args)
        assert p.extra_generation_params["Noise"] == mode
        results[mode] = pipe(**{**args, "width": 128, "height": 128}).images
    engine = tiny_pipeline.generate(build_request(prompt="a fox", width=128, height=128, seed=11, prior_steps=3,
                                                  decoder_steps=2, prior_cfg=4.0, noise="comfyui")).images
    torch.testing.assert_close(results["comfyui"], engine)
    assert not torch.allclose(results["cpu"], results["comfyui"])


def test_hires_fix_is_the_stage_b_upscale(tiny_pipeline, fake_modules):
    """SD.Next's hires fix at scale 2 renders Stage B at twice the size from the same Stage C latent (the engine's
    upscale 2, identical pixels), turns SD.Next's own second pass off and says so in the infotext; a scale that is
    not a whole factor is refused with the fix."""
    from cascade.request import build_request
    from extension.host import SdnextHost

    p = _fake_p(enable_hr=True, hr_scale=2.0, hr_resize_x=0, hr_resize_y=0, width=128, height=128)
    args = {"prior_num_inference_steps": 3, "num_inference_steps": 2, "output_type": "pt", "width": 128, "height": 128}
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=SdnextHost("d.safetensors"))
    pipe.preprocess(p, args)
    assert p.enable_hr is False and p.extra_generation_params["Upscale"] == 2
    images = pipe(**args).images
    engine = tiny_pipeline.generate(build_request(prompt="a fox", width=128, height=128, seed=11, prior_steps=3,
                                                  decoder_steps=2, prior_cfg=4.0, upscale=2)).images
    assert images.shape[-2:] == (256, 256)
    torch.testing.assert_close(images, engine)
    bad = _fake_p(enable_hr=True, hr_scale=1.5, hr_resize_x=0, hr_resize_y=0, width=128, height=128)
    with pytest.raises(CascadeHostError, match="whole multiple.*Hires scale to 2") as err:
        pipe.preprocess(bad, dict(args))
    assert err.value.status_code == 400


def test_image_prompts_arrive_as_extra_base64(tiny_pipeline, fake_modules):
    """`extra: {"cascade_image_prompts": [base64], "cascade_image_prompt_strength": "0.5"}` conditions Stage C
    through CLIP vision like the CLI's --image-prompt (same pixels); bad base64 is a 400 naming the field."""
    import base64
    import io

    from PIL import Image

    from cascade.request import build_request
    from extension.host import SdnextHost

    picture = Image.new("RGB", (64, 48), (200, 40, 40))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    encoded = base64.b64encode(buf.getvalue()).decode()
    p = _fake_p(cascade_image_prompts=[encoded], cascade_image_prompt_strength="0.5")
    args = {"prior_num_inference_steps": 3, "num_inference_steps": 2, "output_type": "pt", "width": 128, "height": 128}
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=SdnextHost("d.safetensors"))
    pipe.preprocess(p, args)
    assert p.extra_generation_params["Image prompts"] == 1
    images = pipe(**args).images
    engine = tiny_pipeline.generate(build_request(prompt="a fox", width=128, height=128, seed=11, prior_steps=3,
                                                  decoder_steps=2, prior_cfg=4.0, image_prompts=(picture,),
                                                  image_prompt_strength=0.5)).images
    torch.testing.assert_close(images, engine)
    with pytest.raises(CascadeHostError, match="image prompt 1 is not valid base64") as err:
        pipe.preprocess(_fake_p(cascade_image_prompts=["%%%"]), dict(args))
    assert err.value.status_code == 400


def _b64_png(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _controlnet_folder(monkeypatch, root: Path) -> Path:
    """The default rule: `<SD.Next models>/StableCascade/ControlNet` (SD.Next's modules.paths.models_path)."""
    monkeypatch.setattr(sys.modules["modules"], "paths", SimpleNamespace(models_path=str(root)), raising=False)
    folder = root / "StableCascade" / "ControlNet"
    folder.mkdir(parents=True)
    return folder


def test_controlnets_arrive_as_extra_by_name(tiny_pipeline, fake_modules, tmp_path, monkeypatch):
    """`extra: {"cascade_controlnets": [{"model": name, "image": base64, "canny": [lo, hi], ...}]}` (issue 13): the
    ControlNet is picked by name from `<model folder>/ControlNet`, the canny edges are computed from the photo, and
    the image equals the engine's own request with that ControlNet (same pixels); strength 0 equals none; the
    infotext gets the engine's ControlNet field."""
    from cascade.controlnet import canny_edges
    from cascade.request import build_request
    from extension.host import SdnextHost

    folder = _controlnet_folder(monkeypatch, tmp_path)
    canny_file = tiny.write_tiny_controlnet(folder / "tiny_canny.safetensors", "canny")
    tiny.write_tiny_controlnet(folder / "tiny_inpaint.safetensors", "inpainting")
    photo = _picture(3, (128, 128))
    args = {"prior_num_inference_steps": 3, "num_inference_steps": 2, "output_type": "pt", "width": 128, "height": 128}
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=SdnextHost("d.safetensors"))

    def run(items):
        p = _fake_p(cascade_controlnets=items)
        call = dict(args)
        pipe.preprocess(p, call)
        return p, pipe(**call).images

    item = {"model": "tiny_canny", "image": _b64_png(photo), "canny": [0.2, 0.6], "strength": 0.8, "end": 0.9}
    p, controlled = run([item])
    assert p.extra_generation_params["ControlNet"] == "tiny_canny 0.8 0-0.9"
    engine = tiny_pipeline.generate(build_request(
        prompt="a fox", width=128, height=128, seed=11, prior_steps=3, decoder_steps=2, prior_cfg=4.0,
        controlnets=[(str(canny_file), canny_edges(photo, 0.2, 0.6), 0.8, 0.0, 0.9)])).images
    torch.testing.assert_close(controlled, engine)
    p, plain = run(None)
    assert "ControlNet" not in p.extra_generation_params
    assert not torch.equal(plain, controlled)
    assert torch.equal(run([{**item, "strength": 0}])[1], plain)
    lib = library.scan_library(folder.parent)  # the model folder's pairing leaves its ControlNet files alone
    assert not lib.pairs and not lib.problems and {f.role for f in lib.files} == {"controlnet"}


@pytest.mark.parametrize("item, message", [
    ({"model": "nope"}, "no ControlNet named 'nope'.*known: tiny_canny, tiny_inpaint"),
    ({"model": "CONTROLNET_PATH"}, "looks like a path; ControlNets are chosen by name only"),
    ({"model": "../ControlNet/tiny_canny"}, "looks like a path"),
    ({"model": "tiny_canny", "mask": "IMAGE"}, "only the inpainting one takes a mask"),
    ({"model": "tiny_inpaint"}, "needs a \"mask\""),
    ({"model": "tiny_canny", "strength": "lots"}, "strength 'lots' must be a number"),
    ({"model": "tiny_canny", "canny": [0.9, 0.1]}, "canny thresholds 0.9, 0.1"),
    ({"model": "tiny_canny", "image": "%%%"}, r"cascade_controlnets\[0\] image is not valid base64"),
    ({"model": "tiny_canny", "file": "/etc/passwd"}, "unknown field"),
])
def test_bad_controlnet_items_are_400s(tiny_pipeline, fake_modules, tmp_path, monkeypatch, item, message):
    """Unknown names list the known ones; a path instead of a name is refused, never opened; wrong types/values
    name the item and field."""
    from extension.host import SdnextHost

    folder = _controlnet_folder(monkeypatch, tmp_path)
    canny_file = tiny.write_tiny_controlnet(folder / "tiny_canny.safetensors", "canny")
    tiny.write_tiny_controlnet(folder / "tiny_inpaint.safetensors", "inpainting")
    image = _b64_png(_picture(1, (64, 64)))
    item = {"image": image, **item}
    item = {k: (str(canny_file) if v == "CONTROLNET_PATH" else image if v == "IMAGE" else v) for k, v in item.items()}
    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline, host=SdnextHost("d.safetensors"))
    with pytest.raises(CascadeHostError, match=message) as err:
        pipe.preprocess(_fake_p(cascade_controlnets=[item]), dict(SMALL))
    assert err.value.status_code == 400
