"""Property-based fuzz of the command line (issue 10).

Property: for any argument list built from the real flags with hostile values (huge and negative numbers, nan/inf,
text where numbers go, control characters, NUL bytes, devices, folders, missing and real files), `python -m cascade`
either gets past every check to the point where it would load the pipeline (the load is replaced by a sentinel: the
request was valid), prints help and exits 0, or exits 2 with exactly one stderr line starting "error: " — never a
traceback or an internal error (exit 1), never more memory than the bound, never a hang. Runs in a child process
under RLIMIT_AS (tests/_bounded.py, MEMORY_BOUND = 4 GiB) with a timeout; derandomized so the suite is reproducible.
CASCADE_FUZZ_SCALE=10 runs ten times as many examples; CASCADE_FUZZ_SEED=<n> explores other inputs.
"""

from __future__ import annotations

import json
import os

from tests._bounded import MEMORY_BOUND, run_bounded

EXAMPLES = 400  # ~15 s on 2 shared cores


def _child(examples: int, seed: int, files: list[str]) -> None:  # runs in the bounded child process
    import contextlib
    import io

    from hypothesis import HealthCheck, given, seed as hseed, settings, strategies as st

    import cascade.session

    class Reached(BaseException):
        pass

    def reached(*args, **kwargs):
        raise Reached()

    cascade.session.open_pipeline = reached
    from cascade.cli import main

    hostile_text = st.text(st.characters(codec="utf-8"), max_size=12)
    ints = st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 128, 256, 1024, 2**64 - 1, 2**64, 10**9])
    floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, 7.0, 42.0, 1e30, -1.0])
    number = st.one_of(ints.map(str), floats.map(repr), hostile_text)
    paths = st.sampled_from([*files, "/nonexistent/x.safetensors", "/dev/full", "/dev/zero", "/tmp", "/", "",
                             "bad\x00name", "/proc/self/mem"]) | hostile_text
    names = st.sampled_from(["DDPM", "Euler a", "dpmpp_2m", "Default", "karras", "sgm_uniform", "bogus", ""]) | hostile_text
    flag_values = {
        "--width": number, "--height": number, "--seed": number, "--batch": number, "--steps": number,
        "--cfg": number, "--decoder-steps": number, "--decoder-cfg": number, "--prior-shift": number,
        "--decoder-shift": number, "--compression": number, "--stage-a-scale": number, "--cfg-rescale": number,
        "--denoise": number, "--decoder-denoise": number, "--upscale": number, "--decoder-seed": number,
        "--image-prompt-strength": number, "--preview-every": number, "--vram": number | st.sampled_from(["16GiB", "8GB"]),
        "--prior-sampler": names, "--decoder-sampler": names, "--prior-scheduler": names, "--decoder-scheduler": names,
        "--dtype": names | st.sampled_from(["bf16", "fp32"]), "--offload": names | st.sampled_from(["stream"]),
        "--device": names | st.sampled_from(["cpu", "cuda", "openvino:NPU.3", "cuda:99"]),
        "--noise": names | st.sampled_from(["comfyui"]), "--preset": names | st.sampled_from(["none", "auto"]),
        "--out": paths, "--prior": paths, "--decoder": paths, "--text-encoder": paths, "--stage-a": paths,
        "--image": paths, "--decoder-image": paths, "--image-prompt": paths, "--preview": paths,
    }
    option = st.sampled_from(sorted(flag_values)).flatmap(lambda f: st.tuples(st.just(f), flag_values[f]))
    generate = st.tuples(hostile_text, st.lists(option, max_size=6)).map(
        lambda t: ["generate", t[0], *[x for pair in t[1] for x in pair]])
    plan_flags = ["--width", "--height", "--compression", "--vram", "--device", "--dtype", "--offload", "--prior",
                  "--decoder", "--cfg", "--decoder-cfg"]
    plan_option = st.sampled_from(plan_flags).flatmap(lambda f: st.tuples(st.just(f), flag_values[f]))
    plan = st.lists(plan_option, max_size=4).map(lambda opts: ["plan", *[x for pair in opts for x in pair]])
    inspect = st.lists(paths, min_size=1, max_size=3).map(lambda ps: ["inspect", *ps])
    junk = st.lists(hostile_text | st.sampled_from(["--", "-v", "--json", "-x", "generate", "--steps"]), max_size=5)
    argv_strategy = st.one_of(generate, generate, generate, plan, inspect, junk)

    @hseed(seed)
    @settings(max_examples=examples, derandomize=seed == 0, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(argv=argv_strategy)
    def prop(argv: list[str]) -> None:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except Reached:
                return
            except SystemExit as exit_:  # --help / -h: argparse prints and exits 0
                code = exit_.code
        text = err.getvalue()
        if code == 0:
            return
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("No --prior/--decoder")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, code, text[-2000:])

    prop()
    print("FUZZ-OK", examples)


def test_cli_arguments_fuzz(tiny_pair, tmp_path):
    from PIL import Image

    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture)
    files = [str(tiny_pair[0]), str(tiny_pair[1]), str(picture), str(tmp_path / "new.png")]
    examples = EXAMPLES * int(os.environ.get("CASCADE_FUZZ_SCALE", "1"))
    seed = int(os.environ.get("CASCADE_FUZZ_SEED", "0"))
    code = f"from tests.test_fuzz_cli import _child; _child({examples}, {seed}, {json.dumps(files)})"
    proc = run_bounded(code, timeout=120 * int(os.environ.get("CASCADE_FUZZ_SCALE", "1")),
                       env={"CASCADE_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0 and "FUZZ-OK" in proc.stdout, (
        f"under RLIMIT_AS {MEMORY_BOUND >> 30} GiB:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    assert not (tmp_path / "new.png").exists()  # nothing reached the point of writing
