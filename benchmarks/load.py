"""Benchmark (issue #2): loading a full-size Stage C file to bf16 on the CPU, ours against plain safetensors.

What is compared
    A ComfyUI all-in-one Stage C ("main") file holding the full-size big prior UNet (3,589,103,632 parameters,
    `model.diffusion_model.*` in ComfyUI naming, random fp16 weights, ~7.2 GB) is generated once into --workdir
    and reused. It is loaded to bf16 on the CPU three ways, each in its own child process so that each peak RSS
    is clean:

    (a) ours      `cascade.checkpoints.scan(file)` + `cascade.loader.load_part(part, dtype=bf16, device="cpu")`
                  (header scan, model on the meta device, tensors read from the memory map at bf16, assign);
    (b) load_file `safetensors.torch.load_file(file)` then `.to(torch.bfloat16)` of every tensor — the plain
                  "read the file and cast it" a user would write;
    (c) safe_open `safe_open(file).get_tensor(k).to(torch.bfloat16)` tensor by tensor, a second baseline.

    (b) and (c) produce bare tensors, not a model, so they are the floor of what any loader has to pay.

Why
    The engine promises that loading a 7 GB model costs about the model's own size in RAM (no second copy) and
    about the time of a plain read, on 16-24 GB machines where a second copy does not fit.

How it is measured
    Every child imports the same modules (torch, safetensors, diffusers, cascade) before measuring, so the
    python + torch import floor is the same for all three; the floor is the RSS right before loading starts and is
    reported with raw and net (peak - floor) figures. Peak RSS is `ru_maxrss` of the child. The file is read once
    before every child (warm page cache for all), the order of the three is rotated between repetitions and the
    median of --reps repetitions is reported, in wall-clock and in CPU time (user + sys of the child, less
    sensitive to other load on the machine). The "ours" child also times the phases of `load_part` (meta
    instantiation, reading + conversion, page dropping, load_state_dict) by wrapping them, for diagnosis.
    Children run torch with 1 thread by default (--threads): on a shared 2-vCPU machine two OpenMP threads stall
    whenever another process holds a core, which makes timings swing by several x; all three methods do the same
    fp16 -> bf16 conversion, so the ratio is what matters.

Targets (ratios, same run)
    ours: net peak RSS <= 1.15 x the loaded bf16 weights; time <= 1.5 x the plain read and cast (b).

Run from the repo root:  python benchmarks/load.py [--workdir /tmp/sd-cascade-bench] [--reps 3] [--with-clip-g]
                                                  [--threads 1]
Writes benchmarks/results/load.json. Needs ~8 GB free disk in --workdir (9.6 GB with --with-clip-g) and ~16 GB of
free RAM (baseline (b) holds the mapped fp16 file and the bf16 copy at once).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "load.json"
UNET_PREFIX = "model.diffusion_model."
EXPECTED_PRIOR_PARAMS = 3_589_103_632
METHODS = ("ours", "load_file", "safe_open")
TARGET_RSS_RATIO = 1.15
TARGET_TIME_RATIO = 1.5
GB = 1e9


# ---------------------------------------------------------------------------------------------------------------
# The test file: written tensor by tensor, never more than one tensor in RAM
# ---------------------------------------------------------------------------------------------------------------
def file_layout(with_clip_g: bool) -> dict:
    """file key -> _fullsize.Spec of a ComfyUI Stage C main file in fp16 (big prior UNet, optionally CLIP-G)."""
    import torch

    from benchmarks._fullsize import text_encoder_layout, unet_layout
    from cascade import configs

    layout = unet_layout("prior", configs.unet_config("prior", "big"), torch.float16)
    if with_clip_g:
        layout |= text_encoder_layout(dict(configs.CLIP_G), torch.float16)
    return dict(sorted(layout.items()))  # safetensors' own writer orders same-dtype tensors by name


def ensure_file(workdir: Path, with_clip_g: bool) -> Path:
    """The test file, written once (tensor by tensor, by benchmarks/_fullsize.py) and reused while it matches."""
    from benchmarks._fullsize import write_random_safetensors

    name = "stage_c_big_comfyui_fp16" + ("_clip_g" if with_clip_g else "") + ".safetensors"
    path = workdir / name
    layout = file_layout(with_clip_g)
    unet_params = sum(spec.numel for k, spec in layout.items() if k.startswith(UNET_PREFIX))
    assert unet_params == EXPECTED_PRIOR_PARAMS, f"big prior has {unet_params} parameters, expected {EXPECTED_PRIOR_PARAMS}"
    if path.is_file():
        from cascade.tensorfile import read_header

        try:
            header = read_header(path)
            if {k: tuple(v.shape) for k, v in header.tensors.items()} == {k: spec.shape for k, spec in layout.items()}:
                print(f"reusing {path}", flush=True)
                return path
        except Exception as err:  # a damaged cache is rebuilt
            print(f"rebuilding {path}: {err}", flush=True)
    expected_size = sum(spec.nbytes for spec in layout.values())
    workdir.mkdir(parents=True, exist_ok=True)
    free = os.statvfs(workdir).f_bavail * os.statvfs(workdir).f_frsize
    if free < expected_size * 1.05:
        sys.exit(f"{workdir}: {free / GB:.1f} GB free, the test file needs {expected_size / GB:.1f} GB")
    print(f"generating {path} ({expected_size / GB:.2f} GB, once)", flush=True)
    write_random_safetensors(path, layout, {"cascade.bench": "random fp16 weights, benchmarks/load.py"},
                             log=lambda msg: print(msg, flush=True))
    return path


def warm_page_cache(path: Path) -> float:
    """Read the whole file once so every method starts from the page cache; returns seconds."""
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# Child process: one load, measured
# ---------------------------------------------------------------------------------------------------------------
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _instrument_loader(phases: dict[str, float]):
    """Wrap the phases of cascade.loader.load_part with timers (diagnosis only; load_part itself is unchanged)."""
    import torch

    from cascade import loader, tensorfile

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    loader.instantiate = timed("instantiate (meta model)", loader.instantiate)
    loader._read_state = timed("read + convert (_read_state)", loader._read_state)
    tensorfile.TensorReader._read_into = timed("  of which file reads (preadv)", tensorfile.TensorReader._read_into)
    torch.nn.Module.load_state_dict = timed("load_state_dict(assign)", torch.nn.Module.load_state_dict)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(method: str, path: str, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from safetensors import safe_open
    from safetensors.torch import load_file

    import cascade.models  # noqa: F401  (diffusers) imported by every child, so the floor is the same
    from cascade.checkpoints import PRIOR, scan
    from cascade.loader import load_part

    with safe_open(path, framework="pt") as f:
        all_keys = list(f.keys())
    unet_keys = [k for k in all_keys if k.startswith(UNET_PREFIX)]
    phases: dict[str, float] = {}
    if method == "ours":
        _instrument_loader(phases)
    gc.collect()
    floor, maxrss_before = _rss(), _maxrss()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    if method == "ours":
        model = load_part(scan(path).parts[PRIOR], dtype=torch.bfloat16, device="cpu")
        weights = list(model.state_dict().values())
    elif method == "load_file":
        if len(unet_keys) == len(all_keys):
            state = load_file(path)
        else:  # the file also holds CLIP-G: load_file's own code, restricted to the UNet tensors
            with safe_open(path, framework="pt") as f:
                state = {k: f.get_tensor(k) for k in unet_keys}
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
        weights = list(state.values())
    elif method == "safe_open":
        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k).to(torch.bfloat16) for k in unet_keys}
        weights = list(state.values())
    else:
        raise ValueError(method)
    seconds, cpu_seconds = time.perf_counter() - t0, _cpu_seconds() - c0
    peak, rss_after = _maxrss(), _rss()
    dtypes = sorted({str(w.dtype) for w in weights})
    return {
        "method": method,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "weights_bytes": sum(w.numel() * w.element_size() for w in weights),
        "params": sum(w.numel() for w in weights),
        "dtypes": dtypes,
        "floor_rss": floor,
        "maxrss_before": maxrss_before,
        "peak_rss": peak,
        "rss_after": rss_after,
        "phases": phases,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(method: str, path: Path, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--file", str(path), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Parent: generate, run, summarise
# ---------------------------------------------------------------------------------------------------------------
def _versions() -> dict:
    import diffusers
    import safetensors
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "diffusers": diffusers.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def summarise(runs: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        med = lambda key: statistics.median(r[key] for r in mine)  # noqa: E731
        weights = mine[0]["weights_bytes"]
        net = statistics.median(r["peak_rss"] - r["floor_rss"] for r in mine)
        out[method] = {
            "seconds_median": med("seconds"),
            "seconds_all": [round(r["seconds"], 3) for r in mine],
            "cpu_seconds_median": med("cpu_seconds"),
            "weights_bytes": weights,
            "peak_rss_raw_median": med("peak_rss"),
            "floor_rss_median": med("floor_rss"),
            "peak_rss_net_median": net,
            "rss_raw_over_weights": med("peak_rss") / weights,
            "rss_net_over_weights": net / weights,
        }
        if method == "ours":
            keys = sorted({k for r in mine for k in r["phases"]})
            out[method]["phases_median"] = {k: statistics.median(r["phases"].get(k, 0.0) for r in mine) for k in keys}
    base, base_cpu = out["load_file"]["seconds_median"], out["load_file"]["cpu_seconds_median"]
    for method in METHODS:
        out[method]["time_over_load_file"] = out[method]["seconds_median"] / base
        out[method]["cpu_time_over_load_file"] = out[method]["cpu_seconds_median"] / base_cpu
    return out


def print_table(summary: dict) -> None:
    print()
    print(f"{'method':<11}{'time s':>8}{'x plain':>9}{'cpu s':>7}{'x plain':>9}{'weights GB':>12}{'peak GB':>9}"
          f"{'floor GB':>10}{'net GB':>8}{'net/w':>7}{'raw/w':>7}")
    for method in METHODS:
        s = summary[method]
        print(f"{method:<11}{s['seconds_median']:>8.2f}{s['time_over_load_file']:>9.2f}{s['cpu_seconds_median']:>7.2f}"
              f"{s['cpu_time_over_load_file']:>9.2f}{s['weights_bytes'] / GB:>12.3f}"
              f"{s['peak_rss_raw_median'] / GB:>9.2f}{s['floor_rss_median'] / GB:>10.2f}"
              f"{s['peak_rss_net_median'] / GB:>8.2f}{s['rss_net_over_weights']:>7.3f}{s['rss_raw_over_weights']:>7.3f}")
    phases = summary["ours"].get("phases_median", {})
    if phases:
        print("\nours, phases (median s):")
        for k, v in phases.items():
            print(f"  {k:<32}{v:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sd-cascade-bench",
                        help="where the ~7 GB test file is generated once and reused (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each method (median reported)")
    parser.add_argument("--with-clip-g", action="store_true",
                        help="also embed the full CLIP-G text encoder, as real main files do (only the UNet is loaded)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the children (default 1, see the docstring; 0 = torch's own choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.file, args.threads)))
        return

    import psutil

    args.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    path = ensure_file(args.workdir, args.with_clip_g)
    size = path.stat().st_size
    avail = psutil.virtual_memory().available
    if avail < size * 2.2:
        print(f"warning: {avail / GB:.1f} GB RAM available; baseline (b) needs about {size * 2 / GB:.1f} GB "
              "plus the page cache — figures may be distorted by eviction", flush=True)
    runs: list[dict] = []
    for rep in range(args.reps):
        order = METHODS[rep % 3 :] + METHODS[: rep % 3]  # rotate so no method always runs first
        for method in order:
            warm = warm_page_cache(path)
            r = run_child(method, path, args.threads)
            r["rep"], r["warm_read_s"] = rep, warm
            runs.append(r)
            print(f"rep {rep} {method:<10} {r['seconds']:7.2f} s (cpu {r['cpu_seconds']:6.2f})  peak {r['peak_rss'] / GB:6.2f} GB "
                  f"(floor {r['floor_rss'] / GB:.2f})  [cache warm-up read {warm:.1f} s]", flush=True)
    summary = summarise(runs)
    print_table(summary)
    ours = summary["ours"]
    targets = {
        "rss_net_over_weights": {"value": ours["rss_net_over_weights"], "target": TARGET_RSS_RATIO,
                                 "met": ours["rss_net_over_weights"] <= TARGET_RSS_RATIO},
        "time_over_load_file": {"value": ours["time_over_load_file"], "target": TARGET_TIME_RATIO,
                                "met": ours["time_over_load_file"] <= TARGET_TIME_RATIO},
    }
    print()
    for name, t in targets.items():
        print(f"target {name}: {t['value']:.3f} <= {t['target']}  {'MET' if t['met'] else 'MISSED'}")
    result = {
        "benchmark": "load",
        "issue": 2,
        "file": {"name": path.name, "bytes": size, "with_clip_g": args.with_clip_g,
                 "unet_params": EXPECTED_PRIOR_PARAMS, "dtype": "F16", "layout": "comfyui"},
        "load_dtype": "bfloat16",
        "reps": args.reps,
        "threads": args.threads,
        "versions": _versions(),
        "summary": summary,
        "targets": targets,
        "runs": runs,
        "total_seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
