"""What a careless user meets on the command line: every bad argument is one line on stderr and exit code 2, checked
before any weight loads; --help shows defaults and choices; a broken pipe and SIGTERM are quiet and leave nothing
half-written; the seed used is printed with the output path (issues 9 and 10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cascade.cli import main
from cascade.infotext import parse_infotext

ROOT = Path(__file__).resolve().parents[1]


class LoadReached(BaseException):
    """Raised instead of loading: the request passed every check (BaseException: the CLI's handlers let it by)."""


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a bad argument is only noticed after the pipeline started loading."""
    import cascade.session

    def refuse(*args, **kwargs):
        raise LoadReached()

    monkeypatch.setattr(cascade.session, "open_pipeline", refuse)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("No --prior/--decoder given")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


BAD_GENERATE = [
    (["--prior-sampler", "bogus"], "DPM++ 2M"),
    (["--decoder-scheduler", "nope"], "Karras"),
    (["--offload", "lots"], "invalid choice"),
    (["--dtype", "fp7"], "choose from"),
    (["--device", "cuda"], "CUDA"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--vram", "lots"], "16GiB"),
    (["--vram", "1.2.3"], "16GiB"),
    (["--vram", "0"], "positive"),
    (["--seed", str(2**64)], "2^64-1"),
    (["--seed", str(2**64 - 1), "--batch", "2"], "passes"),
    (["--seed", "-5"], "-1 (random)"),
    (["--preset", "nonsense"], "invalid choice"),
    (["--cfg", "nan"], "finite"),
    (["--decoder-cfg", "nan"], "finite"),
    (["--prior-shift", "inf"], "finite"),
    (["--stage-a-scale", "nan"], "finite"),
    (["--cfg", "1e30"], "between 0 and 100"),
    (["--steps", "1000000"], "between 1 and 1000"),
    (["--decoder-steps", "0"], "between 1 and 1000"),
    (["--batch", "0"], "between 1 and 64"),
    (["--width", "1000"], "nearest valid: 896 or 1024"),
    (["--width", "abc"], "invalid int value"),
    (["--compression", "7"], "16-128"),
    (["--denoise", "0.5"], "needs an init image"),
    (["--upscale", "9"], "1 to 4"),
    (["--image", "/nonexistent/in.png"], "in.png"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--out", "/dev/full"], "never overwritten"),
    (["--out", "bad\x00name.png"], "NUL"),
]


@pytest.mark.parametrize("extra,expected", BAD_GENERATE, ids=[" ".join(a)[:40] for a, _ in BAD_GENERATE])
def test_bad_generate_argument_is_one_line_exit_2_before_loading(extra, expected, no_loading, capsys, tmp_path):
    code = main(["generate", "a cat", "--out", str(tmp_path / "o.png"), *extra])
    line = one_error_line(capsys)
    assert code == 2 and expected in line, line
    assert not any(tmp_path.iterdir())  # nothing written


def test_out_naming_a_directory_is_refused_before_loading(no_loading, capsys, tmp_path):
    assert main(["generate", "a cat", "--out", str(tmp_path)]) == 2
    assert "is a directory" in one_error_line(capsys)


def test_only_one_of_prior_and_decoder(no_loading, capsys, tiny_pair, tmp_path):
    assert main(["generate", "x", "--prior", str(tiny_pair[0]), "--out", str(tmp_path / "o.png")]) == 2
    assert "Give both --prior" in one_error_line(capsys)


def test_missing_and_unreadable_checkpoint(capsys, tmp_path):
    assert main(["generate", "x", "--prior", str(tmp_path / "c.safetensors"), "--decoder", str(tmp_path / "b.safetensors"),
                 "--out", str(tmp_path / "o.png"), "--device", "cpu"]) == 2
    assert "c.safetensors" in one_error_line(capsys)
    if os.geteuid() == 0:
        return  # root reads any file: the permission case cannot happen here
    locked = tmp_path / "locked.safetensors"
    locked.write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")
    locked.chmod(0)
    assert main(["generate", "x", "--prior", str(locked), "--decoder", str(locked), "--out", str(tmp_path / "o.png")]) == 2
    assert "ermission" in one_error_line(capsys)


def test_corrupt_or_tiny_init_image(no_loading, capsys, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    assert main(["generate", "x", "--image", str(junk), "--denoise", "0.5", "--out", str(tmp_path / "o.png")]) == 2
    assert "junk.png" in one_error_line(capsys)
    small = tmp_path / "small.png"
    Image.new("RGB", (4, 4)).save(small)
    assert main(["generate", "x", "--image", str(small), "--denoise", "0.5", "--out", str(tmp_path / "o.png")]) == 2
    line = one_error_line(capsys)
    assert "small.png" in line and "4x4" in line, line


def test_plan_and_inspect_errors(capsys, tmp_path):
    assert main(["plan", "--vram", "lots"]) == 2
    assert "16GiB" in one_error_line(capsys)
    assert main(["plan", "--width", "1000"]) == 2
    assert "896 or 1024" in one_error_line(capsys)
    assert main(["plan", "--device", "cuda"]) == 2
    assert "CUDA" in one_error_line(capsys)


@pytest.mark.parametrize("argv,expected", [
    (["inspect", "/proc/self/mem"], "Input/output error"),  # found by the CLI fuzz: an EIO traceback before
    (["plan", "--vram", "1"], "does not fit"),  # found by the CLI fuzz: exit 2 with no error line before
    (["inspect", "/dev/zero"], "not a regular file"),
])
def test_fuzz_findings_stay_fixed(argv, expected, capsys):
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert expected in line, line


def test_help_shows_defaults_choices_and_verbose():
    from cascade.cli import build_parser

    parser, _ = build_parser()
    top = parser.format_help()
    assert "-v, --verbose" in top and "traceback for internal errors" in top
    generate = parser._subparsers._group_actions[0].choices["generate"].format_help()
    assert "(default: 30)" in generate and "(default: 10)" in generate  # the card's prior and decoder steps
    assert "DPM++ 2M" in generate and "SGM Uniform" in generate and "{auto,bf16,fp16,fp32}" in generate


def test_random_seed_is_printed_with_the_output_path(capsys, tmp_path):
    out = tmp_path / "r.png"
    assert main(["generate", "a cat", "--out", str(out), "--width", "128", "--height", "128", "--steps", "2",
                 "--decoder-steps", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    seed = parse_infotext(Image.open(out).text["parameters"])["Seed"]
    assert f"saved {out} (seed {seed}, 128x128)" in err
    assert "loading 1/4" in err and "Stage A (VQGAN): decoding" in err


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cascade", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_broken_pipe_is_quiet():
    proc = subprocess.run(f"{sys.executable} -m cascade tags | head -c 10", shell=True, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.stderr == "" and len(proc.stdout) == 10


def test_sigterm_stops_cleanly_and_writes_nothing(tmp_path):
    out = tmp_path / "t.png"
    proc = _cli("generate", "a cat", "--out", str(out), "--width", "512", "--height", "512", "--steps", "1000",
                "--device", "cpu")
    deadline = time.monotonic() + 120
    seen = ""
    while "Stage C (prior)" not in seen and time.monotonic() < deadline:  # sampling has started
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated; nothing half-written was left" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
