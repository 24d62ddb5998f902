"""Property-based fuzz of safetensors headers (issue 10), plus the regression corpus of hostile headers.

Property: for any bytes put in a .safetensors file, `scan` (and, when it classifies the file, `load_part` of every
part) either succeeds or raises the engine's CheckpointError; never another exception, never more memory than the
bound, never a hang. The fuzz runs in a child process under an address-space limit (tests/_bounded.py,
MEMORY_BOUND = 4 GiB) with a wall-clock timeout, derandomized so the default suite is reproducible; set
CASCADE_FUZZ_SCALE=10 (more examples) and CASCADE_FUZZ_SEED=<n> (other inputs) to search further. An input that
breaks the property is written to $CASCADE_FUZZ_CRASH_DIR (default: the child's temp dir) and named in the
failure; copy it into tests/corpus/headers/ with a MANIFEST.json entry so `test_corpus_replays` keeps it fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest

from tests._bounded import MEMORY_BOUND, ROOT, run_bounded

CORPUS = Path(__file__).with_name("corpus") / "headers"
# examples per strategy; ~950 in ~15 s on 2 shared cores. "unet_config" only checks the part (meta build against
# the header), since loading a UNet per example would cost ~0.2 s; "mutated" (Stage A) loads what passes.
EXAMPLES = {"raw": 250, "structured": 350, "mutated": 250, "unet_config": 100}


# --- the child: hypothesis strategies and the property --------------------------------------------------------------


def _strategies(bases: dict[str, tuple[dict, bytes, str]]):
    from hypothesis import strategies as st

    control = st.characters(codec="utf-8", categories=("Cc", "Cf", "Zl", "L", "N", "P"))
    names = st.text(control, max_size=12)
    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=8))
    hostile = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
                           max_leaves=8)
    dims = st.integers(-70, 70) | st.integers(-(2**64), 2**64) | st.sampled_from([0, 1, 2, 4, 1 << 28, 1 << 48])
    offsets = st.integers(-16, 600) | st.integers(-(2**64), 2**64)
    entry = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "F128", "", "f32"]) | hostile,
            "shape": st.lists(dims, max_size=4) | hostile,
            "data_offsets": st.lists(offsets, min_size=2, max_size=2) | hostile,
            "extra": hostile,
        },
    )
    metadata = st.dictionaries(names | st.sampled_from(["cascade.config.stage_a", "cascade.config.prior"]),
                               st.text(max_size=20) | hostile.map(lambda v: json.dumps(v)) | hostile, max_size=3)
    structured = st.fixed_dictionaries(
        {"tensors": st.dictionaries(names, entry | hostile, max_size=4)},
        optional={"__metadata__": metadata | hostile},
    )

    def as_file(obj: dict, length_shift: int, data: int, sparse: int) -> bytes:
        table = dict(obj["tensors"])
        if "__metadata__" in obj:
            table["__metadata__"] = obj["__metadata__"]
        body = json.dumps(table, allow_nan=True).encode("utf-8", "surrogatepass")
        return struct.pack("<Q", max(0, len(body) + length_shift)) + body + b"\0" * data, sparse

    structured_files = st.builds(as_file, structured, st.sampled_from([0, 0, 0, 1, -1, 7]), st.integers(0, 600),
                                 st.sampled_from([0, 0, 1 << 30]))
    raw_files = st.binary(max_size=400).map(lambda b: (b, 0)) | st.builds(
        lambda body, data: (struct.pack("<Q", len(body)) + body + data, 0), st.binary(max_size=300), st.binary(max_size=64))

    config_values = hostile | st.integers(-1, 70000) | st.sampled_from([16384, 1 << 20, 0, 3, 4]) | st.lists(dims, max_size=4)

    def mutations(base: tuple[dict, bytes, str], fields: list[str]):
        header0, data0, kind = base
        keys = sorted(header0)
        config_key = "cascade.config." + kind
        config_keys = sorted(json.loads(header0["__metadata__"][config_key]))

        def mutate(choice: int, what: str, value, index: int) -> tuple[bytes, int]:
            header = json.loads(json.dumps(header0))
            name = keys[choice % len(keys)]
            if what == "config":
                config = json.loads(header["__metadata__"][config_key])
                key = config_keys[index % len(config_keys)]
                if isinstance(config[key], list) and config[key] and choice % 2:
                    config[key][index % len(config[key])] = value  # one level's width, depth, block types...
                else:
                    config[key] = value
                header["__metadata__"][config_key] = json.dumps(config, allow_nan=True)
            elif what == "rename":
                if name != "__metadata__":
                    header[str(value)[:40]] = header.pop(name)
            elif name == "__metadata__" or what == "entry":
                header[name] = value
            else:
                header[name][what] = value
            body = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
            return struct.pack("<Q", len(body)) + body + data0, 0

        return st.builds(mutate, st.integers(0, 10_000), st.sampled_from(fields), config_values, st.integers(0, 100))

    return {
        "raw": raw_files,
        "structured": structured_files,
        "mutated": mutations(bases["stage_a"], ["dtype", "shape", "data_offsets", "entry", "rename", "config", "config"]),
        "unet_config": mutations(bases["prior"], ["config"]),
    }


def _case_runner(record):
    """A one-argument test function for @given (which refuses functions with default arguments)."""

    def run_case(case):
        record(case)

    return run_case


def fuzz_main() -> None:
    """Entry point of the child process; prints one JSON line of statistics, exits 1 on a broken property."""
    import torch
    from hypothesis import HealthCheck, given, settings

    from cascade import tiny
    from cascade.checkpoints import DECODER, PRIOR, STAGE_A, TEXT_ENCODER, scan
    from cascade.errors import CheckpointError
    from cascade.loader import check_part, load_part

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="cascade-fuzz-"))
    crash_dir = Path(os.environ.get("CASCADE_FUZZ_CRASH_DIR") or work)
    models = tiny.build_tiny_models()
    bases = {}
    for kind, write in (("stage_a", lambda p: tiny.write_stage_a(p, models)),
                        ("prior", lambda p: tiny.write_stability_unet(p, models, PRIOR))):
        raw = write(work / f"base_{kind}.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        bases[kind] = (json.loads(raw[8 : 8 + n]), raw[8 + n :], kind)
    strategies = _strategies(bases)
    scale = float(os.environ.get("CASCADE_FUZZ_SCALE", "1"))
    seed = os.environ.get("CASCADE_FUZZ_SEED")
    stats = {"examples": {}, "outcomes": {}, "slowest_s": 0.0}
    state = {"last": b""}
    path = work / "case.safetensors"

    def probe(data: bytes, sparse: int, load: bool) -> str:
        state["last"] = data
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            if sparse:
                f.truncate(len(data) + sparse)
        start = time.perf_counter()
        try:
            ckpt = scan(path)
            for kind in (PRIOR, DECODER, TEXT_ENCODER, STAGE_A):
                if kind in ckpt.parts:
                    check_part(ckpt.parts[kind])
                    if load:
                        load_part(ckpt.parts[kind], dtype=torch.float32)
            outcome = "ok:" + ckpt.role
        except CheckpointError as err:
            outcome = type(err).__name__
        elapsed = time.perf_counter() - start
        stats["slowest_s"] = max(stats["slowest_s"], elapsed)
        if elapsed > 10:
            raise AssertionError(f"one input took {elapsed:.1f} s (a hang in the making)")
        return outcome

    for name, strategy in strategies.items():
        count = max(1, int(EXAMPLES[name] * scale))
        options = dict(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                       derandomize=seed is None)

        def record(case, name=name):
            outcome = probe(*case, load=name != "unet_config")
            stats["examples"][name] = stats["examples"].get(name, 0) + 1
            stats["outcomes"][outcome] = stats["outcomes"].get(outcome, 0) + 1

        run = settings(**options)(given(strategy)(_case_runner(record)))
        if seed is not None:
            from hypothesis import seed as seed_decorator

            run = seed_decorator(int(seed))(run)
        try:
            run()
        except Exception:
            crash = crash_dir / f"crash-{hashlib.sha256(state['last']).hexdigest()[:12]}.safetensors"
            crash.write_bytes(state["last"])
            print("CRASH", name, crash, file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
    stats["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(stats))


def test_fuzz_headers_under_a_memory_bound():
    started = time.perf_counter()
    result = run_bounded("from tests.test_fuzz_headers import fuzz_main; fuzz_main()", timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    total = sum(stats["examples"].values())
    assert total >= sum(EXAMPLES.values()) * 0.9, stats  # hypothesis may dedupe a few
    assert stats["maxrss"] < MEMORY_BOUND // 2, stats
    assert stats["slowest_s"] < 10, stats
    # The property is only worth something if the fuzz reaches deep: classified files and many error kinds.
    assert any(k.startswith("ok:") for k in stats["outcomes"]) and len(stats["outcomes"]) >= 4, stats
    print(f"fuzz: {total} examples {stats['examples']} in {time.perf_counter() - started:.1f} s, "
          f"outcomes {stats['outcomes']}, peak RSS {stats['maxrss'] >> 20} MiB, bound {MEMORY_BOUND >> 30} GiB")


# --- the regression corpus ----------------------------------------------------------------------------------------


def _manifest() -> dict:
    return json.loads((CORPUS / "MANIFEST.json").read_text())


def test_corpus_is_complete():
    files = {p.name for p in CORPUS.glob("*.safetensors")}
    assert files and files == set(_manifest()), "every corpus file needs a MANIFEST.json entry, and the reverse"


@pytest.mark.parametrize("name", sorted(_manifest()))
def test_corpus_replays(name):
    from cascade import errors
    from cascade.checkpoints import scan

    expected = _manifest()[name]
    with pytest.raises(errors.CheckpointError) as info:
        scan(CORPUS / name)
    assert isinstance(info.value, getattr(errors, expected["error"])), repr(info.value)
    assert expected["words"] in str(info.value)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_inspect_cli_on_corpus_files_exits_2_with_one_line():
    names = ["dtype_list.safetensors", "nested_deep.safetensors", "escape_in_name.safetensors", "metadata_config_list.safetensors"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {n: subprocess.Popen([sys.executable, "-m", "cascade", "inspect", str(CORPUS / n)], cwd=Path(tempfile.gettempdir()),
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in names}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [line for line in (out + err).splitlines() if line.strip()]
        assert proc.returncode == 2, (name, out, err)
        assert len(lines) == 1 and "Traceback" not in out + err, (name, out, err)
        assert name in lines[0] and "\x1b" not in lines[0]
