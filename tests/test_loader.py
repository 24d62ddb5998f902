"""Every layout loads to identical tensors; loading is lazy (meta init) and strict about what is missing."""

from __future__ import annotations

import pytest
import torch

from cascade import tiny
from cascade.checkpoints import DECODER, PRIOR, STAGE_A, TEXT_ENCODER, scan
from cascade.errors import CheckpointError
from cascade.loader import load_part, parameters_on_meta, resolve_sources
from cascade.tensorfile import write_safetensors


@pytest.fixture(scope="module")
def fp32_layouts(tmp_path_factory, tiny_models):
    """All layouts written in fp32 so a correct loader must reproduce the canonical tensors bit for bit."""
    d = tmp_path_factory.mktemp("fp32-layouts")
    f32 = torch.float32
    out = {
        "comfyui": (tiny.write_comfyui_stage_c(d / "c.safetensors", tiny_models, dtype=f32),
                    tiny.write_comfyui_stage_b(d / "b.safetensors", tiny_models, dtype=f32)),
        "comfyui_linear_projection": (tiny.write_comfyui_stage_c(d / "c2.safetensors", tiny_models, dtype=f32, projection="linear"),
                                      d / "b.safetensors"),
        "stability": (tiny.write_stability_unet(d / "s" / "stage_c.safetensors", tiny_models, PRIOR, dtype=f32),
                      tiny.write_stability_unet(d / "s" / "stage_b.safetensors", tiny_models, DECODER, dtype=f32)),
    }
    tiny.write_text_encoder_side_file(d / "s" / "stage_c_text_model.safetensors", tiny_models, dtype=f32)
    tiny.write_stage_a(d / "s" / "stage_a.safetensors", tiny_models, dtype=f32)
    out["diffusers"] = tiny.write_diffusers_folders(d / "df", tiny_models, dtype=f32)
    return out


@pytest.mark.parametrize("layout", ["comfyui", "comfyui_linear_projection", "stability", "diffusers"])
def test_every_layout_loads_identical_tensors(fp32_layouts, tiny_models, layout):
    sources = resolve_sources(*fp32_layouts[layout])
    canonical = tiny_models.state_dicts()
    for kind, part in sources.parts().items():
        model = load_part(part, dtype=torch.float32)
        got = model.state_dict()
        assert set(got) == set(canonical[kind]), kind
        for key, ref in canonical[kind].items():
            assert torch.equal(got[key], ref), f"{layout}/{kind}/{key}"


def test_fp16_file_converts_exactly(tiny_pair, tiny_models):
    """An fp16 file loaded to bf16 equals casting the fp16 values (one rounding, no detour through other dtypes)."""
    sources = resolve_sources(*tiny_pair)
    model = load_part(sources.prior, dtype=torch.bfloat16)
    for key, ref in tiny_models.prior.state_dict().items():
        assert torch.equal(model.state_dict()[key], ref.half().to(torch.bfloat16)), key
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_parameters_created_on_meta_buffers_real():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with parameters_on_meta():
        model = CLIPTextModelWithProjection(CLIPTextConfig(**tiny.TINY_TEXT_ENCODER))
    assert all(p.device.type == "meta" for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert buffers["text_model.embeddings.position_ids"].device.type == "cpu"
    assert torch.equal(buffers["text_model.embeddings.position_ids"][0], torch.arange(77))
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the patch does not leak out of the block


def test_parameters_on_meta_leaves_other_threads_alone():
    import threading

    built = {}
    with parameters_on_meta():
        worker = threading.Thread(target=lambda: built.setdefault("linear", torch.nn.Linear(2, 2)))
        worker.start()
        worker.join()
        mine = torch.nn.Linear(2, 2)
    assert mine.weight.device.type == "meta"
    assert built["linear"].weight.device.type == "cpu"


def test_loaded_text_encoder_runs(tiny_pair):
    sources = resolve_sources(*tiny_pair)
    te = load_part(sources.text_encoder, dtype=torch.float32)
    out = te(torch.tensor([[49406, 320, 49407]]), output_hidden_states=True)
    assert out.text_embeds.shape == (1, 32)
    assert not te.training and not any(p.requires_grad for p in te.parameters())


def test_missing_tensors_are_an_error(tmp_path, tiny_models):
    sd = tiny_models.state_dicts()[STAGE_A]
    partial = {k: v for k, v in sd.items() if not k.startswith("up_blocks.1.")}
    path = tmp_path / "stage_a_partial.safetensors"
    write_safetensors(path, partial, tiny._metadata(STAGE_A))
    with pytest.raises(CheckpointError, match="tensors missing, e.g. up_blocks.1"):
        load_part(scan(path).parts[STAGE_A], dtype=torch.float32)


def test_shape_mismatch_is_an_error(tmp_path, tiny_models):
    sd = dict(tiny_models.state_dicts()[STAGE_A])
    sd["out_block.0.weight"] = torch.zeros(5, 32, 1, 1)
    path = tmp_path / "stage_a_bad.safetensors"
    write_safetensors(path, sd, tiny._metadata(STAGE_A))
    with pytest.raises(CheckpointError, match="out_block.0.weight has shape"):
        load_part(scan(path).parts[STAGE_A], dtype=torch.float32)


def _diffusers_paella():
    """diffusers' PaellaVQModel: pipelines.wuerstchen up to 0.37, pipelines.deprecated.wuerstchen from 0.38."""
    import importlib

    for module in ("diffusers.pipelines.deprecated.wuerstchen", "diffusers.pipelines.wuerstchen"):
        try:
            return importlib.import_module(module).PaellaVQModel
        except (ImportError, AttributeError):
            continue
    pytest.skip("this diffusers version has no PaellaVQModel")


def test_stage_a_matches_diffusers_paella(tiny_models):
    """Our Stage A reimplementation computes what diffusers' (deprecated) PaellaVQModel computes."""
    ref = _diffusers_paella()(**tiny.TINY_STAGE_A).eval()
    ref.load_state_dict(tiny_models.stage_a.state_dict())
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(tiny_models.stage_a.decode(latents).sample, ref.decode(latents).sample, atol=1e-6)
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        # return_dict=False: some diffusers versions (0.37.1, 0.39.0; not 0.42) build the encode output through a
        # deprecated alias (diffusers.models.vq_model.VQEncoderOutput) whose deprecate("0.31") call raises.
        (ref_latents,) = ref.encode(image, return_dict=False)
        assert torch.allclose(tiny_models.stage_a.encode(image), ref_latents, atol=1e-6)


def test_meta_state_dict_keys_match_diffusers_unet():
    """Our UNet subclass keeps diffusers' state-dict layout (SD.Next and diffusers tools rely on it)."""
    from diffusers import StableCascadeUNet

    from cascade.models import CascadeUNet

    with torch.device("meta"):
        ours, theirs = CascadeUNet.from_config(tiny.TINY_DECODER), StableCascadeUNet.from_config(tiny.TINY_DECODER)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_r_embedding_in_fp32(tiny_models):
    """bf16 weights, but the sinusoidal embedding of r is computed from fp32 r (reference §3.1)."""
    from cascade.models import CascadeUNet

    unet = CascadeUNet.from_config(tiny.TINY_PRIOR).to(torch.bfloat16)
    r = torch.tensor([0.9803])
    emb = unet.get_timestep_ratio_embedding(r)
    assert emb.dtype == torch.bfloat16
    half_dim = 32
    freqs = torch.exp(-torch.arange(half_dim).float() * (torch.log(torch.tensor(10000.0)) / (half_dim - 1)))
    def embed(r_times_10000: float) -> torch.Tensor:
        return torch.cat([torch.sin(r_times_10000 * freqs), torch.cos(r_times_10000 * freqs)])

    assert torch.allclose(emb[0].float(), embed(9803.0), atol=1e-2)
    quantised = torch.tensor(0.9803, dtype=torch.bfloat16).float().item() * 10000  # what diffusers' pipeline embeds
    assert not torch.allclose(emb[0].float(), embed(quantised), atol=1e-1)


def test_loader_reads_only_headers_before_load(tiny_pair):
    """resolve_sources decides everything from headers (fast, no tensor data)."""
    sources = resolve_sources(*tiny_pair)
    assert set(sources.parts()) == {PRIOR, DECODER, TEXT_ENCODER, STAGE_A}
    assert sources.prior.variant == "custom" and sources.text_encoder.config["hidden_size"] == 32
