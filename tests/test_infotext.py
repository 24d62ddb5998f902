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
