"""Classification of every file kind, by tensors only, and every error case with a message that names the fix."""

from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest
import torch

from tests._headers import header_from_shapes
from cascade import configs, tiny
from cascade.checkpoints import (
    DECODER,
    PRIOR,
    STAGE_A,
    TEXT_ENCODER,
    checkpoint_from_header,
    describe,
    scan,
)
from cascade.errors import (
    CorruptFileError,
    IncompatibleStagesError,
    MissingComponentError,
    NotStableCascadeError,
    PickleRefusedError,
    WrongStageError,
)
from cascade.tiny import unet_keys_for_layout
from cascade.loader import instantiate, resolve_sources
from cascade.tensorfile import SafetensorsHeader, read_header, write_safetensors


# --- full-size headers, built from meta models so no gigabytes are written --------------------------------------

def _header(name: str, shapes: dict[str, tuple[int, ...]], dtype: str = "F16") -> SafetensorsHeader:
    return header_from_shapes(name, shapes, dtype)


def _meta_shapes(kind: str, config: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in instantiate(kind, config).state_dict().items()}


def _unet_file_shapes(stage: str, variant: str, layout: str, prefix: str) -> dict[str, tuple[int, ...]]:
    shapes = _meta_shapes(stage, configs.unet_config(stage, variant))
    out = {}
    for file_key, members in unet_keys_for_layout(shapes, layout, stage).items():
        first = shapes[members[0][0]]
        out[prefix + file_key] = (first[0] * len(members), *first[1:])
    return out


@pytest.mark.parametrize("stage,variant", [(PRIOR, "big"), (PRIOR, "lite"), (DECODER, "big"), (DECODER, "lite")])
@pytest.mark.parametrize("layout", ["comfyui", "stability", "diffusers"])
def test_full_size_unets_classified_by_shape(stage, variant, layout):
    prefix = "model.diffusion_model." if layout == "comfyui" else ""
    ckpt = checkpoint_from_header(_header(f"whatever_{layout}.safetensors", _unet_file_shapes(stage, variant, layout, prefix)))
    assert ckpt.role == {"prior": "stage_c", "decoder": "stage_b"}[stage]
    part = ckpt.parts[stage]
    assert (part.layout, part.variant) == (layout, variant)
    assert part.config == configs.unet_config(stage, variant)
    expected_params = {("prior", "big"): 3_589_103_632, ("prior", "lite"): 1_030_785_040,
                       ("decoder", "big"): 1_562_941_136, ("decoder", "lite"): 699_471_248}[(stage, variant)]
    assert part.numel == expected_params
    assert ckpt.unknown_keys == []


def test_full_size_comfyui_main_file_with_all_parts():
    """Stability's comfyui_checkpoints/stable_cascade_stage_c: UNet + CLIP-G + CLIP-L vision + coder (reference §1.2)."""
    shapes = _unet_file_shapes(PRIOR, "big", "comfyui", "model.diffusion_model.")
    clip = _meta_shapes(TEXT_ENCODER, configs.CLIP_G)
    shapes |= {f"text_encoder.clip_g.transformer.{k}": s for k, s in clip.items() if k != "text_projection.weight"}
    shapes["text_encoder.clip_g.text_projection"] = (1280, 1280)
    shapes["text_encoder.clip_g.logit_scale"] = ()
    shapes["clip_l_vision.vision_model.embeddings.class_embedding"] = (1024,)
    shapes["clip_l_vision.visual_projection.weight"] = (768, 1024)
    shapes["vae.encoder.backbone.0.0.weight"] = (24, 3, 3, 3)
    shapes["vae.previewer.blocks.0.weight"] = (512, 16, 1, 1)
    ckpt = checkpoint_from_header(_header("stable_cascade_stage_c.safetensors", shapes))
    assert ckpt.role == "stage_c"
    assert set(ckpt.parts) == {PRIOR, TEXT_ENCODER, "clip_vision", "effnet", "previewer"}
    assert ckpt.parts[TEXT_ENCODER].variant == "clip-g"
    assert ckpt.parts[TEXT_ENCODER].numel == 694_659_840 + 1  # + logit_scale, ignored at load
    assert ckpt.parts[PRIOR].nbytes == 3_589_103_632 * 2


# --- tiny files in every layout -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_models):
    d = tmp_path_factory.mktemp("layouts")
    files = {
        "comfy_c": tiny.write_comfyui_stage_c(d / "comfy_c.safetensors", tiny_models),
        "comfy_c_linear": tiny.write_comfyui_stage_c(d / "comfy_c_linear.safetensors", tiny_models, projection="linear", extras=False),
        "comfy_b": tiny.write_comfyui_stage_b(d / "comfy_b.safetensors", tiny_models),
        "stab_c": tiny.write_stability_unet(d / "bare" / "stage_c_bf16.safetensors", tiny_models, PRIOR),
        "stab_b": tiny.write_stability_unet(d / "bare" / "stage_b_bf16.safetensors", tiny_models, DECODER),
        "stage_a": tiny.write_stage_a(d / "stage_a.safetensors", tiny_models),
        "kohya_te": tiny.write_text_encoder_side_file(d / "side" / "model_text_model.safetensors", tiny_models),
    }
    files["diffusers_prior"], files["diffusers_decoder"] = tiny.write_diffusers_folders(d / "diffusers", tiny_models)
    return files


@pytest.mark.parametrize(
    "name,role,parts,layout",
    [
        ("comfy_c", "stage_c", {PRIOR, TEXT_ENCODER, "clip_vision", "effnet", "previewer"}, "comfyui"),
        ("comfy_c_linear", "stage_c", {PRIOR, TEXT_ENCODER}, "comfyui"),
        ("comfy_b", "stage_b", {DECODER, TEXT_ENCODER, STAGE_A}, "comfyui"),
        ("stab_c", "stage_c", {PRIOR}, "stability"),
        ("stab_b", "stage_b", {DECODER}, "stability"),
        ("stage_a", "stage_a", {STAGE_A}, "stability"),
        ("kohya_te", "text_encoder", {TEXT_ENCODER}, "hf"),
        ("diffusers_prior", "stage_c", {PRIOR, TEXT_ENCODER}, "diffusers"),
        ("diffusers_decoder", "stage_b", {DECODER, TEXT_ENCODER, STAGE_A}, "diffusers"),
    ],
)
def test_tiny_layouts_classified(layouts, name, role, parts, layout):
    ckpt = scan(layouts[name])
    assert ckpt.role == role
    assert set(ckpt.parts) == parts
    unet = ckpt.unet() or ckpt.parts.get(STAGE_A) or ckpt.parts.get(TEXT_ENCODER)
    assert unet.layout == layout
    assert ckpt.unknown_keys == []


def test_describe_is_json_and_lists_parts(layouts):
    info = describe(scan(layouts["comfy_c"]))
    json.dumps(info)
    assert info["role"] == "stage_c"
    assert info["parts"][PRIOR]["dtype"] == "F16"
    assert info["parts"][TEXT_ENCODER]["tensors"] > 0


def test_unknown_tensors_listed_not_fatal(tmp_path, tiny_models, tiny_pair):
    extra = {"my_custom_thing.weight": torch.zeros(3), "model.diffusion_model.extra_head.weight": torch.zeros(2)}
    path = tiny.write_comfyui_stage_c(tmp_path / "with_extras.safetensors", tiny_models, extra_tensors=extra)
    ckpt = scan(path)
    assert ckpt.unknown_keys == ["my_custom_thing.weight"]
    sources = resolve_sources(path, tiny_pair[1])  # still usable
    assert sources.prior.headers[0].path == path


# --- errors ----------------------------------------------------------------------------------------------------

def test_stage_b_given_as_prior_says_swap(tiny_pair):
    prior, decoder = tiny_pair
    with pytest.raises(WrongStageError, match=r"Stage B.*--prior needs a Stage C.*--decoder"):
        resolve_sources(decoder, prior)


def test_stage_c_given_as_decoder_says_swap(tiny_pair):
    prior, _ = tiny_pair
    with pytest.raises(WrongStageError, match=r"--decoder needs a Stage B.*Pass it as --prior"):
        resolve_sources(prior, prior)


def test_incompatible_stages(tmp_path, tiny_models, tiny_pair, monkeypatch):
    """A decoder whose pooled-text input differs from the text encoder's projection cannot work with it."""
    from cascade.models import CascadeUNet

    other = {**tiny.TINY_DECODER, "clip_text_pooled_in_channels": 48}
    models = tiny.TinyModels(tiny_models.prior, CascadeUNet.from_config(other), tiny_models.text_encoder, tiny_models.stage_a)
    monkeypatch.setitem(tiny.TINY_CONFIGS, DECODER, other)
    path = tiny.write_comfyui_stage_b(tmp_path / "odd_decoder.safetensors", models)
    with pytest.raises(IncompatibleStagesError, match="cannot work together.*pooled"):
        resolve_sources(tiny_pair[0], path)


@pytest.mark.parametrize(
    "keys,expected",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (4,), "cond_stage_model.transformer.text_model.x": (1,)}, "Stable Diffusion 1.x"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (4,), "model.diffusion_model.label_emb.0.0.weight": (1,),
          "conditioner.embedders.0.transformer.x": (1,)}, "SDXL"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (4,), "cond_stage_model.model.x": (1,)}, "Stable Diffusion 2"),
        ({"lora_unet_down_blocks_0.lora_up.weight": (4,)}, "LoRA"),
        ({"double_blocks.0.img_attn.qkv.weight": (4,)}, "FLUX"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4,),
          "text_encoders.clip_g.transformer.text_model.embeddings.token_embedding.weight": (4,)}, "Stable Diffusion 3"),
        ({"first_stage_model.encoder.conv_in.weight": (4,)}, "VAE"),
        ({"random.tensor": (4,)}, "not a recognised model"),
    ],
)
def test_not_stable_cascade_says_what_it_looks_like(tmp_path, keys, expected):
    path = tmp_path / "other_model.safetensors"
    write_safetensors(path, {k: torch.zeros(s) for k, s in keys.items()})
    with pytest.raises(NotStableCascadeError, match=expected):
        scan(path)


def test_truncated_file(tmp_path, tiny_pair):
    path = tmp_path / "cut.safetensors"
    data = tiny_pair[0].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated.*download it again"):
        scan(path)


@pytest.mark.parametrize("payload,message", [(b"", "only 0 bytes"), (b"\xff" * 64, "header length"),
                                              (struct.pack("<Q", 10) + b"{not json}", "damaged")])
def test_corrupt_files(tmp_path, payload, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(payload)
    with pytest.raises(CorruptFileError, match=message):
        read_header(path)


def test_pickles_refused_by_suffix_and_by_content(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(PickleRefusedError, match="arbitrary code"):
        scan(ckpt)
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(pickle.dumps({"a": 1}, protocol=2) + b"\0" * 64)
    with pytest.raises(PickleRefusedError, match="pickled"):
        scan(disguised)


def test_missing_text_encoder_names_side_files(layouts):
    with pytest.raises(MissingComponentError, match=r"stage_c_bf16_text_model.safetensors.*--text-encoder"):
        resolve_sources(layouts["stab_c"], layouts["stab_b"], stage_a=layouts["stage_a"])


@pytest.mark.parametrize("suffix", ["_text_model", "_text_encoder"])
def test_side_text_encoder_files_found(tmp_path, layouts, suffix):
    folder = tmp_path / "kohya"
    folder.mkdir()
    prior = shutil.copy(layouts["stab_c"], folder / "sote_c.safetensors")
    shutil.copy(layouts["kohya_te"], folder / f"sote_c{suffix}.safetensors")
    sources = resolve_sources(prior, layouts["comfy_b"])
    assert sources.text_encoder.headers[0].path.name == f"sote_c{suffix}.safetensors"
    assert any("side file" in n for n in sources.notes)


def test_text_encoder_from_decoder_file_is_announced(layouts):
    sources = resolve_sources(layouts["stab_c"], layouts["comfy_b"])
    assert sources.text_encoder.headers[0].path == layouts["comfy_b"]
    assert any("decoder file" in n for n in sources.notes)


def test_missing_stage_a_names_the_file(tmp_path, layouts):
    folder = tmp_path / "no_stage_a"
    folder.mkdir()
    decoder = shutil.copy(layouts["stab_b"], folder / "stage_b.safetensors")
    prior = shutil.copy(layouts["comfy_c"], folder / "main.safetensors")
    with pytest.raises(MissingComponentError, match=r"stage_a.safetensors.*--stage-a"):
        resolve_sources(prior, decoder)
    shutil.copy(layouts["stage_a"], folder / "stage_a.safetensors")
    sources = resolve_sources(prior, decoder)
    assert sources.stage_a.headers[0].path.name == "stage_a.safetensors"
