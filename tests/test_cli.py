"""The command line as a user runs it: generate (tiny and real layouts), inspect, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cascade.cli import main
from cascade.infotext import parse_infotext

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cascade", *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=600)


@pytest.mark.slow
def test_readme_main_command_on_tiny_model(tmp_path):
    """`python -m cascade generate "..." --out out.png` works on a fresh cache and says it used random weights."""
    out = tmp_path / "out.png"
    proc = run_cli("generate", "1girl, solo, smile", "--out", str(out), "--width", "512", "--height", "512",
                   "--seed", "7", "--quiet", env={"CASCADE_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "TINY model with RANDOM weights" in proc.stderr
    image = Image.open(out)
    assert image.size == (512, 512)
    params = parse_infotext(image.text["parameters"])
    assert params["Seed"] == "7" and params["Size"] == "512x512" and params["Sampler"] == "DDPM"
    assert params["Model"] == "tiny_cascade_stage_c"


def test_generate_with_files_batch_and_options(tmp_path, tiny_pair, capsys):
    prior, decoder = tiny_pair
    out = tmp_path / "img.png"
    code = main(["generate", "a cat", "--prior", str(prior), "--decoder", str(decoder), "--out", str(out),
                 "--width", "256", "--height", "256", "--seed", "3", "--batch", "2", "--steps", "4",
                 "--decoder-steps", "2", "--prior-sampler", "DPM++ 2M", "--decoder-sampler", "Euler a",
                 "--device", "cpu", "--dtype", "fp32", "--quiet"])
    assert code == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == ["img-3.png", "img-4.png"]
    params = parse_infotext(Image.open(written[1]).text["parameters"])
    assert params["Seed"] == "4" and params["Sampler"] == "DPM++ 2M" and params["Steps"] == "4"
    assert params["Model"] == "tiny_sote_main" and params["Decoder"] == "tiny_sote_decoder"
    assert params["Preset"] == "sotediffusion"  # name contains "sote": the card's prompt preset is on
    assert params["Prompt"].startswith("newest, extremely aesthetic, best quality")


def test_preset_can_be_turned_off(tmp_path, tiny_pair, capsys):
    prior, decoder = tiny_pair
    out = tmp_path / "plain.png"
    assert main(["generate", "a cat", "--prior", str(prior), "--decoder", str(decoder), "--out", str(out),
                 "--width", "128", "--height", "128", "--steps", "2", "--decoder-steps", "1", "--preset", "none",
                 "--device", "cpu", "--quiet"]) == 0
    params = parse_infotext(Image.open(out).text["parameters"])
    assert params["Prompt"] == "a cat" and "Preset" not in params



def test_bare_files_with_explicit_text_encoder_and_stage_a(tmp_path, tiny_models, capsys):
    """Stability's bare Stage C / Stage B plus --text-encoder / --stage-a files that no naming rule finds: the memory
    plan must use the same sources as the load (it used to re-resolve without them and fail), and --dtype."""
    from cascade import tiny

    prior = tiny.write_stability_unet(tmp_path / "c.safetensors", tiny_models, "prior")
    decoder = tiny.write_stability_unet(tmp_path / "b.safetensors", tiny_models, "decoder")
    clip = tiny.write_text_encoder_side_file(tmp_path / "clip_g.safetensors", tiny_models)
    stage_a = tmp_path / "elsewhere" / "vqgan.safetensors"
    stage_a.parent.mkdir()
    tiny.write_stage_a(stage_a, tiny_models)
    out = tmp_path / "bare.png"
    code = main(["generate", "a cat", "--prior", str(prior), "--decoder", str(decoder), "--text-encoder", str(clip),
                 "--stage-a", str(stage_a), "--out", str(out), "--width", "128", "--height", "128", "--steps", "2",
                 "--decoder-steps", "1", "--device", "cpu", "--dtype", "fp32", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (128, 128)

def test_wrong_file_is_a_clear_error_and_writes_nothing(tmp_path, tiny_pair, capsys):
    prior, decoder = tiny_pair
    out = tmp_path / "never.png"
    code = main(["generate", "x", "--prior", str(decoder), "--decoder", str(prior), "--out", str(out), "--quiet"])
    assert code == 2
    assert "Stage B" in capsys.readouterr().err
    assert not out.exists()


def test_bad_size_is_a_clear_error(tmp_path, tiny_pair, capsys):
    code = main(["generate", "x", "--prior", str(tiny_pair[0]), "--decoder", str(tiny_pair[1]),
                 "--width", "1000", "--out", str(tmp_path / "x.png"), "--quiet"])
    assert code == 2 and "nearest valid: 896 or 1024" in capsys.readouterr().err


def test_inspect_text_and_json(tiny_pair, capsys):
    assert main(["inspect", str(tiny_pair[0]), str(tiny_pair[1])]) == 0
    text = capsys.readouterr().out
    assert "Stage C (prior, the 'main' file)" in text and "Stage B (decoder)" in text
    assert "CLIP-G text encoder" in text and "Stage A (VQGAN)" in text and "unknown tensors: 0" in text
    assert main(["inspect", "--json", str(tiny_pair[1]), str(tiny_pair[0])]) == 0
    prior_b, prior_c = json.loads(capsys.readouterr().out)  # one JSON document: a list, one entry per file
    assert prior_b["role"] == "stage_b" and set(prior_b["parts"]) == {"decoder", "text_encoder", "stage_a"}
    assert prior_c["role"] == "stage_c"


def test_inspect_reports_errors_per_file(tmp_path, tiny_pair, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert main(["inspect", str(tiny_pair[0]), str(bad)]) == 2
    out = capsys.readouterr().out
    assert "Stage C" in out and "bad.safetensors: ERROR" in out


def test_tags_lists_the_card_vocabulary(capsys):
    assert main(["tags"]) == 0
    out = capsys.readouterr().out
    assert "extremely aesthetic" in out and "best quality" in out and "newest" in out


def test_install_refuses_a_python_the_pins_do_not_support(monkeypatch):
    """requirements.txt pins releases that need Python 3.11 (numpy 2.4, diffusers 0.42, ...): install.py must say so
    up front instead of letting pip fail with "no matching distribution"."""
    import install

    calls = []
    monkeypatch.setattr(install, "pip", lambda *args: calls.append(args))
    monkeypatch.setattr(install.sys, "version_info", (3, 10, 14, "final", 0))
    with pytest.raises(SystemExit, match="3.11 or newer"):
        install.install_standalone(dev=False)
    assert calls == []
