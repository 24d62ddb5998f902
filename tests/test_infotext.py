"""Infotext written into PNGs round-trips through the A1111-style parser."""

from __future__ import annotations

from PIL import Image

from cascade.infotext import build_infotext, parse_infotext, save_png, short_hash
from cascade.request import GenerationRequest


def test_round_trip_all_fields():
    req = GenerationRequest(prompt='1girl, "quoted", (smile:1.2)\nsecond line', negative_prompt="worst quality, lowres",
                            width=1024, height=1536, seed=7, cfg_rescale=0.7)
    text = build_infotext(req, 7, prior_name="sote_main", prior_hash="abcdef1234", decoder_name="sote: decoder",
                          decoder_hash="0123456789", dtypes={"prior": "bfloat16"}, extra={"Preset": "sotediffusion"})
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == req.prompt
    assert parsed["Negative prompt"] == req.negative_prompt
    expected = {
        "Steps": "30", "Sampler": "DDPM", "Schedule type": "SGM Uniform", "CFG scale": "7", "Seed": "7",
        "Size": "1024x1536", "Model": "sote_main", "Model hash": "abcdef1234", "Refiner steps": "10",
        "Image CFG scale": "1", "Decoder": "sote: decoder", "Decoder sampler": "Euler a",
        "Decoder schedule type": "Karras", "Compression": "42", "Stage A scale": "0.43", "CFG rescale": "0.7",
        "Prior shift": "2", "Decoder shift": "1", "Dtype": "prior=bfloat16", "Preset": "sotediffusion",
    }
    for key, value in expected.items():
        assert parsed[key] == value, key


def test_no_negative_prompt():
    text = build_infotext(GenerationRequest(prompt="a cat", seed=1), 1)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a cat" and parsed["Negative prompt"] == ""
    assert parsed["Seed"] == "1"


def test_png_carries_parameters_and_write_is_atomic(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", "a cat\nSteps: 1, Sampler: DDPM, Seed: 3")
    assert Image.open(path).text["parameters"].endswith("Seed: 3")
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_short_hash_is_autov2_and_cached(tmp_path):
    import hashlib

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"abc" * 1000)
    cache = tmp_path / "hashes.json"
    assert short_hash(f, cache) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    assert cache.is_file() and short_hash(f, cache) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]


def test_cli_and_sdnext_write_the_same_names_and_values():
    """Issue 11: SD.Next's extension fields are the CLI's, name for name and value for value."""
    from dataclasses import replace

    from extension import params

    settings = replace(params.CascadeSettings(), decoder_scheduler="exponential", compression=36.0,
                       stage_a_scale=0.3764)
    prior = params.prior_stage(20, 5.0, "Euler a", settings)
    decoder = params.decoder_stage(8, 1.5, settings)
    sdnext = params.infotext_fields(prior, decoder, settings, "models/Stable-cascade/my_decoder.safetensors")
    req = GenerationRequest(prompt="a", seed=3, prior=prior, decoder=decoder, compression=36.0, stage_a_scale=0.3764)
    cli = parse_infotext(build_infotext(req, 3, prior_name="main", decoder_name="my_decoder"))
    assert {k: str(v) for k, v in sdnext.items()} == {k: cli[k] for k in sdnext}
    assert sdnext["Decoder"] == "my_decoder" and sdnext["Decoder schedule type"] == "Exponential"
    assert sdnext["Sampler"] == "Euler a" and sdnext["Schedule type"] == "SGM Uniform"
    assert not {"Prior sampler", "Prior schedule", "Decoder schedule"} & set(sdnext)


def test_model_title_drops_the_extension_only():
    from cascade.infotext import model_title

    assert model_title("a/b/sote_decoder.safetensors") == "sote_decoder"
    assert model_title("C:\\models\\x.CKPT") == "x"
    assert model_title("folder.v2") == "folder.v2" and model_title(None) is None


def test_reproduction_fields_are_written():
    from cascade.request import build_request

    req = build_request(prompt="a", seed=10, decoder_seed=20, batch_size=3, noise="cpu", prompt_syntax="comfyui")
    parsed = parse_infotext(build_infotext(req, 12))
    assert (parsed["Seed"], parsed["Decoder seed"], parsed["Batch index"], parsed["Batch size"]) == ("12", "22", "2", "3")
    assert parsed["Noise"] == "cpu" and parsed["Prompt syntax"] == "comfyui"
    comfy = parse_infotext(build_infotext(build_request(prompt="a", seed=10, decoder_seed=20, batch_size=3,
                                                        noise="comfyui"), 12))
    assert (comfy["Seed"], comfy["Decoder seed"], comfy["Batch index"]) == ("10", "20", "2")  # the batch's seeds
