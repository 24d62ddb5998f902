"""Benchmark (issue #5): full-size Stable Cascade on a capped CUDA device: predicted vs measured peak memory, the
cost of offloading, and our speed against diffusers' own pipeline with model CPU offload.

What is compared
    Full-size Stage C (big prior, 3.6 B parameters) + Stage B (big decoder, 1.56 B) + CLIP-G (0.69 B) + Stage A, with
    random weights, written once as ComfyUI all-in-one files in bf16 (`benchmarks/_fullsize.py`: header first, then
    tensor by tensor; ~11.7 GB in --workdir, reused), loaded with `cascade.engine.load_pipeline(..., dtype=bf16,
    placement=Executor(plan, backend))` where `plan = cascade.memory.make_plan(sizes_from_sources(...),
    Shape(w, h), cap, mode=...)`, and run with `generate()` (prior 30 steps CFG 7, decoder 10 steps CFG 1) at
    1024x1536 and 2048x1152. The process is capped with `torch.cuda.set_per_process_memory_fraction(cap / total)`:
      16 GiB, mode `resident`   everything on the device;
      16 GiB, mode `stage`      one stage's weights on the device at a time (uploads from pinned host memory);
      8 GiB,  mode `stream`     what does not fit is streamed block by block.
    With the engine's dtypes on CUDA (UNets and CLIP-G bf16, Stage A fp32, decoded in strips) the planner predicts
    `resident` fits 16 GiB at both sizes (about 12.3 / 12.5 GiB), `stage` about 6.8 / 6.9 GiB, and on 8 GiB `stage`
    already fits, so the forced `stream` case keeps every block and moves like `stage`; `--check-layout` prints the
    full plans without a GPU.
    Per phase (text encoder, Stage C, Stage B, Stage A) the peak of `torch.cuda.max_memory_allocated()` is taken
    between phase entries (the statistics are reset when a phase starts, by a wrapper around the executor's
    `enter`), and compared with the plan's prediction for that phase (`plan.chosen.phases[p].peak`: weights on the
    device + streaming buffers + the fitted activation peak). The weight moves at each phase boundary are measured
    separately ("transition" peaks).
    In the same run, diffusers' `StableCascadeCombinedPipeline` is built from the same weights (the same files,
    loaded by our loader to the CPU in bf16 into the model classes diffusers uses; the decoder pipeline gets its own
    CLIP-G copy as from_pretrained would give it; Stage A cast to bf16 because diffusers decodes in the decoder's
    dtype; `DDPMWuerstchenScheduler()` for both stages; no downloads), with
    `enable_model_cpu_offload()`, under the 16 GiB cap, same prompt, sizes and step counts. It samples differently
    (no shift, its own timestep schedule): a speed and memory comparison only, not an image comparison.

Why
    The memory planner promises that what it predicts is what the card sees, so `auto` can pick the fastest plan
    that fits; offloading whole stages should cost almost nothing next to 40 sampling steps; and we should not be
    slower than the stock diffusers route SD.Next users have today.

Targets (same run)
    every case the planner accepts completes without an out-of-memory retry or NaN fallback;  measured peak <=
    predicted peak x 1.05 in every phase;  time(stage) <= 1.05 x time(resident) where both fit (both sizes at 16 GiB);
    the 8 GiB cap completes with `stream` at both sizes.  Reported, no target: our time and peak as ratios to diffusers + enable_model_cpu_offload.

How it is measured
    One process. Per case: load (timed), one warm-up generation (its peaks count), then --reps timed generations
    (median). Between cases every module is released and the CUDA cache emptied. Times are wall clock of
    `generate()`, which returns images on the CPU (so the device is synchronised).

Run
    python benchmarks/gpu_memory.py [--workdir DIR] [--reps 2] [--cases 16GiB:resident,16GiB:stage,8GiB:stream]
                                    [--sizes 1024x1536,2048x1152] [--no-diffusers]
        needs a CUDA (or ROCm) device with >= 16 GiB, ~12 GB of disk in --workdir (default $CASCADE_BENCH_DIR or
        /tmp/sd-cascade-bench) and ~30 GB of host RAM (pinned weights of the offloaded plans + diffusers' copy).
        Writes benchmarks/results/gpu_memory.json. Without a CUDA device it refuses (exit 2) and says so.
    python benchmarks/gpu_memory.py --dry-run
        the same code paths on the CPU with the tiny model (cascade.tiny's configs, written by the same writer):
        no CUDA statistics and no set_per_process_memory_fraction; the caps become the smallest budgets at which
        each case's mode fits (so `stream` really streams), and the executor's ledger (weight bytes on the device)
        is checked against the plan instead of allocator peaks. Timings are not meaningful. Writes
        benchmarks/results/gpu_memory_dryrun.json; exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cascade.names import COMPONENTS as PHASES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu_memory.json"
RESULTS_DRY = ROOT / "benchmarks" / "results" / "gpu_memory_dryrun.json"
GiB = 1024**3
PROMPT = "a lighthouse on a cliff above a stormy sea at sunset, dramatic clouds, detailed photograph"
NEGATIVE = ""
SEED = 42
PEAK_SLACK = 0.05
STAGE_OVERHEAD = 0.05
DEFAULT_CASES = "16GiB:resident,16GiB:stage,8GiB:stream"
DEFAULT_SIZES = "1024x1536,2048x1152"


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Meters: per-phase peaks, from the CUDA allocator (real) or the executor's ledger (dry run)
# ---------------------------------------------------------------------------------------------------------------
class CudaMeter:
    """Peak of torch.cuda.max_memory_allocated per phase (from the end of its `enter` to the next phase's start)
    and per transition (the `enter` itself: weights dropped and uploaded)."""

    kind = "cuda max_memory_allocated (bytes of live tensors; the CUDA context is outside, in the plan's margin)"

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.phase: str | None = None
        self.peaks: dict[str, int] = {}
        self.transitions: dict[str, int] = {}

    def _sync_peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def _restart(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self._restart()
        self.phase = None

    def before_enter(self, phase: str, executor) -> None:
        self._close()
        self._restart()

    def after_enter(self, phase: str, executor) -> None:
        peak = self._sync_peak()
        self.transitions[phase] = max(self.transitions.get(phase, 0), peak)
        self._restart()
        self.phase = phase

    def finish(self, executor) -> None:
        self._close()
        self.phase = None

    def _close(self) -> None:
        if self.phase is not None:
            peak = self._sync_peak()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)


class LedgerMeter:
    """The executor's ledger: weight bytes on the device, peak per phase (streaming adds blocks in flight)."""

    kind = "executor ledger (weight bytes on the device; activations are not counted)"

    def __init__(self, device: torch.device):
        self.reset()

    def reset(self) -> None:
        self.phase: str | None = None
        self.peaks: dict[str, int] = {}
        self.transitions: dict[str, int] = {}
        self.after_enter_bytes: dict[str, int] = {}

    def start(self) -> None:
        self.phase = None

    def before_enter(self, phase: str, executor) -> None:
        self._close(executor)
        executor.ledger.peak = executor.ledger.current

    def after_enter(self, phase: str, executor) -> None:
        self.transitions[phase] = max(self.transitions.get(phase, 0), executor.ledger.peak)
        self.after_enter_bytes[phase] = executor.ledger.current
        executor.ledger.peak = executor.ledger.current
        self.phase = phase

    def finish(self, executor) -> None:
        self._close(executor)
        self.phase = None

    def _close(self, executor) -> None:
        if self.phase is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), executor.ledger.peak)


class MeteredPlacement:
    """The executor, with the meter told about every phase entry. Everything else is the executor's."""

    def __init__(self, executor, meter):
        self.executor = executor
        self.meter = meter

    def __getattr__(self, name: str):
        return getattr(self.executor, name)

    @property
    def name(self) -> str:
        return self.executor.name

    def enter(self, phase: str, components) -> None:
        self.meter.before_enter(phase, self.executor)
        self.executor.enter(phase, components)
        self.meter.after_enter(phase, self.executor)


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        w, h = item.lower().split("x")
        out.append((int(w), int(h)))
    return out


def parse_cases(text: str) -> list[tuple[str, str]]:
    from cascade.memory import MODES

    out = []
    for item in text.split(","):
        cap, mode = item.split(":")
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r} in --cases; use {', '.join(MODES)}")
        out.append((cap.strip(), mode.strip()))
    return out


def model_configs(dry_run: bool) -> dict[str, dict]:
    from cascade import configs

    if dry_run:
        from cascade.tiny import TINY_DECODER, TINY_PRIOR, TINY_STAGE_A, TINY_TEXT_ENCODER

        return {"prior": TINY_PRIOR, "decoder": TINY_DECODER, "text_encoder": TINY_TEXT_ENCODER, "stage_a": TINY_STAGE_A}
    return {"prior": configs.unet_config("prior", "big"), "decoder": configs.unet_config("decoder", "big"),
            "text_encoder": dict(configs.CLIP_G), "stage_a": dict(configs.STAGE_A)}


def request_for(width: int, height: int, steps: dict[str, int]):
    from cascade.request import GenerationRequest, default_decoder, default_prior

    return GenerationRequest(PROMPT, NEGATIVE, width=width, height=height, seed=SEED,
                             prior=replace(default_prior(), steps=steps["prior"]),
                             decoder=replace(default_decoder(), steps=steps["decoder"]))


def shape_for(request):
    from cascade.activations import Shape

    return Shape(request.width, request.height, request.batch_size, request.compression, request.prior.cfg,
                 request.decoder.cfg)


def smallest_fitting_budget(sizes, shapes, mode: str, steps: dict[str, int]) -> int:
    """Dry run: the smallest budget (bytes) at which `mode` fits every shape."""
    from cascade.memory import make_plan

    def fits(budget: int) -> bool:
        return all(make_plan(sizes, s, budget, steps=steps, mode=mode, search_largest=False).fits for s in shapes)

    lo, hi = 0, 1 << 50
    while hi - lo > 1 << 16:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def release(*objects) -> None:
    for obj in objects:
        del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def apply_cap(cap: int, total: int, dry_run: bool) -> dict:
    if dry_run:
        return {"cap_bytes": cap, "applied": False, "why": "dry run: no CUDA allocator to cap"}
    fraction = cap / total
    note = None
    if fraction > 1.0:
        fraction, note = 1.0, f"the device has only {total / GiB:.1f} GiB: cap clamped to the whole device"
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"cap_bytes": cap, "applied": True, "fraction": fraction, "device_total_bytes": total, "note": note}


# ---------------------------------------------------------------------------------------------------------------
# Our pipeline, one case
# ---------------------------------------------------------------------------------------------------------------
def run_case(files, sources, sizes, backend, cap_label: str, cap: int, mode: str, size: tuple[int, int],
             args, meter_cls) -> dict:
    from cascade.engine import load_pipeline
    from cascade.memory import make_plan
    from cascade.offload import Executor

    w, h = size
    steps = {"prior": args.prior_steps, "decoder": args.decoder_steps}
    request = request_for(w, h, steps)
    plan = make_plan(sizes, shape_for(request), cap, steps=steps, mode=mode)
    case = {"cap": cap_label, "cap_bytes": cap, "mode": mode, "width": w, "height": h, "fits": plan.fits,
            "plan": plan.to_dict()}
    if not plan.fits:  # refused before loading, as the CLI would; not a failure, but nothing to measure
        case["refused"] = True
        case["completed"] = False
        case["error"] = (f"the planner refuses: {mode} needs {plan.option(mode).peak / GiB:.2f} GiB at {w}x{h}, "
                         f"{plan.usable / GiB:.2f} GiB usable of {cap / GiB:.2f} GiB")
        return case
    chosen = plan.chosen
    case["streamed_blocks"] = {u: len(sizes.blocks[u]) - k for u, k in chosen.resident_blocks.items()}
    executor = Executor(plan, backend)
    meter = meter_cls(backend.device)
    placement = MeteredPlacement(executor, meter)
    runs, warnings, pipe = [], [], None
    try:
        t0 = time.perf_counter()
        pipe, report = load_pipeline(*files, backend=backend, dtype=torch.bfloat16, placement=placement)
        case["load_s"] = round(time.perf_counter() - t0, 2)
        case["dtypes"] = {k: str(v).removeprefix("torch.") for k, v in report.dtypes.items()}
        for i in range(1 + args.reps):  # the first is the warm-up: its peaks count, its time does not
            meter.start()
            t0 = time.perf_counter()
            result = pipe.generate(request)
            elapsed = time.perf_counter() - t0
            meter.finish(executor)
            warnings += result.warnings
            runs.append({"seconds": round(elapsed, 3), "timings": {k: round(v, 3) for k, v in result.timings.items()},
                         "warm_up": i == 0})
            assert tuple(result.images.shape) == (1, 3, h, w), result.images.shape
            case["image_finite"] = bool(torch.isfinite(result.images).all())
        case["completed"] = True
    except Exception as err:  # noqa: BLE001 - a failed case is a result, reported with the others
        case["completed"] = False
        case["error"] = f"{type(err).__name__}: {err}"
    case["runs"] = runs
    timed = [r["seconds"] for r in runs if not r["warm_up"]]
    case["median_s"] = round(statistics.median(timed), 3) if timed else None
    case["warnings"] = warnings  # generate() warns only for an out-of-memory retry or a NaN dtype fallback
    case["final_mode"] = executor.name
    case["fell_back"] = executor.name != mode or bool(warnings)
    case["meter"] = meter.kind
    case["phases"] = compare_phases(plan, meter, args.dry_run)
    case["peak_ok"] = all(p["ok"] for p in case["phases"].values()) if case["phases"] else False
    case["ledger"] = {"after_enter": dict(executor.ledger.after_enter), "peak": executor.ledger.peak}
    del pipe, placement, executor
    release()
    return case


def compare_phases(plan, meter, dry_run: bool) -> dict:
    out = {}
    chosen = plan.chosen
    worst_predicted = max(p.peak for p in chosen.phases.values())
    for phase in PHASES:
        predicted = chosen.phases[phase]
        measured = meter.peaks.get(phase)
        transition = meter.transitions.get(phase)
        if measured is None:
            continue
        if dry_run:  # the ledger counts weights: exactly what the plan keeps resident (+ streaming buffers)
            limit = predicted.resident + predicted.buffers
            row = {"predicted_weights": limit, "measured_weights_peak": measured,
                   "after_enter": getattr(meter, "after_enter_bytes", {}).get(phase),
                   "predicted_resident": predicted.resident, "transition_weights_peak": transition}
            row["ok"] = measured <= limit and row["after_enter"] == predicted.resident
        else:
            limit = int(predicted.peak * (1 + PEAK_SLACK))
            row = {"predicted_peak": predicted.peak, "predicted_weights": predicted.resident + predicted.buffers,
                   "predicted_activations": predicted.activations, "measured_peak": measured,
                   "measured_over_predicted": round(measured / predicted.peak, 4),
                   "transition_peak": transition,
                   "transition_ok": transition is None or transition <= worst_predicted * (1 + PEAK_SLACK)}
            row["ok"] = measured <= limit and row["transition_ok"]
        out[phase] = row
    return out


# ---------------------------------------------------------------------------------------------------------------
# diffusers' StableCascadeCombinedPipeline on the same weights
# ---------------------------------------------------------------------------------------------------------------
def build_diffusers(sources, dry_run: bool):
    import warnings

    from diffusers import StableCascadeCombinedPipeline
    from diffusers.schedulers import DDPMWuerstchenScheduler

    from cascade.loader import load_part
    from cascade.text import load_tokenizer

    dtype = torch.bfloat16
    parts = sources.parts()
    modules = {kind: load_part(part, dtype=dtype, device="cpu") for kind, part in parts.items()}
    # The decoder pipeline gets its own CLIP-G copy, as from_pretrained would give it: one module object shared by
    # two pipelines would have its offload hook replaced by the second enable_model_cpu_offload().
    decoder_text_encoder = load_part(parts["text_encoder"], dtype=dtype, device="cpu")
    tokenizer = load_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Stable Cascade pipelines are deprecated in diffusers
        pipe = StableCascadeCombinedPipeline(
            tokenizer=tokenizer, text_encoder=decoder_text_encoder, decoder=modules["decoder"],
            scheduler=DDPMWuerstchenScheduler(), vqgan=modules["stage_a"], prior_prior=modules["prior"],
            prior_text_encoder=modules["text_encoder"], prior_tokenizer=tokenizer,
            prior_scheduler=DDPMWuerstchenScheduler())
    pipe.set_progress_bar_config(disable=True)
    offload = None
    if dry_run:
        offload = "not enabled: dry run on the CPU (enable_model_cpu_offload needs an accelerator)"
    else:
        pipe.enable_model_cpu_offload()
        offload = "enable_model_cpu_offload()"
    return pipe, offload


def run_diffusers(pipe, size: tuple[int, int], args) -> dict:
    w, h = size
    runs, peaks = [], []
    out = {"width": w, "height": h}
    try:
        for i in range(1 + args.reps):
            if not args.dry_run:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            images = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=h, width=w,
                          prior_num_inference_steps=args.prior_steps, prior_guidance_scale=7.0,
                          num_inference_steps=args.decoder_steps, decoder_guidance_scale=0.0,
                          generator=torch.Generator().manual_seed(SEED), output_type="pt").images
            if not args.dry_run:
                torch.cuda.synchronize()
                peaks.append(int(torch.cuda.max_memory_allocated()))
            runs.append({"seconds": round(time.perf_counter() - t0, 3), "warm_up": i == 0})
            out["image_shape"] = list(images.shape)
        out["completed"] = True
    except Exception as err:  # noqa: BLE001
        out["completed"] = False
        out["error"] = f"{type(err).__name__}: {err}"
    out["runs"] = runs
    timed = [r["seconds"] for r in runs if not r["warm_up"]]
    out["median_s"] = round(statistics.median(timed), 3) if timed else None
    out["peak_bytes"] = max(peaks) if peaks else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def clean(case: dict) -> bool:
    """Completed with the plan it was given: no out-of-memory retry, no NaN dtype fallback, finite images."""
    return bool(case.get("completed") and not case.get("fell_back") and case.get("image_finite"))


def summarise(result: dict) -> dict:
    cases = result["cases"]
    checks = {}
    measured = [c for c in cases if not c.get("refused")]
    checks["refused_by_planner"] = [f"{c['cap']} {c['mode']} {c['width']}x{c['height']}" for c in cases if c.get("refused")]
    checks["all_complete"] = bool(measured) and all(clean(c) for c in measured)
    checks["peaks_within_prediction"] = bool(measured) and all(c.get("peak_ok") for c in measured)
    stage_ratio = {}
    for c in cases:
        if c["mode"] == "stage" and c.get("median_s"):
            twin = next((r for r in cases if r["mode"] == "resident" and r["cap"] == c["cap"] and r["width"] == c["width"]
                         and r["height"] == c["height"] and r.get("median_s")), None)
            if twin:
                stage_ratio[f"{c['width']}x{c['height']}"] = round(c["median_s"] / twin["median_s"], 4)
    checks["stage_over_resident_time"] = stage_ratio
    checks["stage_within_5pct"] = bool(stage_ratio) and all(v <= 1 + STAGE_OVERHEAD for v in stage_ratio.values())
    stream = [c for c in cases if c["mode"] == "stream"]  # refused counts as not completing here
    checks["stream_completes"] = bool(stream) and all(clean(c) for c in stream)
    vs = {}
    for d in result.get("diffusers", {}).get("runs", []):
        key = f"{d['width']}x{d['height']}"
        for mode in ("resident", "stage"):
            ours = next((c for c in cases if c["mode"] == mode and c["width"] == d["width"] and c["height"] == d["height"]
                         and c.get("median_s")), None)
            if ours and d.get("median_s"):
                entry = {"ours_s": ours["median_s"], "diffusers_s": d["median_s"],
                         "speed_ratio_diffusers_over_ours": round(d["median_s"] / ours["median_s"], 3)}
                measured = [p.get("measured_peak") for p in ours["phases"].values() if p.get("measured_peak")]
                if measured and d.get("peak_bytes"):
                    entry["peak_ratio_ours_over_diffusers"] = round(max(measured) / d["peak_bytes"], 3)
                vs.setdefault(key, {})[mode] = entry
    checks["vs_diffusers"] = vs
    return checks


def print_report(result: dict) -> None:
    dry = result["dry_run"]
    unit = "weights on device (ledger)" if dry else "peak allocated"
    log(f"\n{'DRY RUN (tiny model, CPU) — ' if dry else ''}Stable Cascade memory plans, meter: {result['meter']}")
    head = f"{'cap':<8} {'mode':<10} {'size':<10} {'done':<5} {'median s':>9}  " + "  ".join(
        f"{p[:7]:>15}" for p in PHASES) + "  ok"
    log(head)
    log("-" * len(head))
    for c in result["cases"]:
        cells = []
        for p in PHASES:
            row = c.get("phases", {}).get(p)
            if not row:
                cells.append(f"{'-':>15}")
            elif dry:
                cells.append(f"{row['measured_weights_peak'] / 2**20:6.1f}/{row['predicted_weights'] / 2**20:6.1f}M")
            else:
                cells.append(f"{row['measured_peak'] / GiB:5.2f}/{row['predicted_peak'] / GiB:5.2f}G ")
        med = f"{c['median_s']:.2f}" if c.get("median_s") else "-"
        done = "yes" if clean(c) else ("plan" if c.get("refused") else "NO")
        log(f"{c['cap']:<8} {c['mode']:<10} {c['width']}x{c['height']:<5} {done:<5} {med:>9}  " + "  ".join(cells)
            + f"  {'yes' if c.get('peak_ok') else ('-' if c.get('refused') else 'NO')}")
    log(f"(cells: measured / predicted {unit} per phase{'' if dry else '; ok = every phase <= predicted x 1.05'}; "
        "done 'plan' = the planner refused the forced mode at this cap before loading)")
    d = result.get("diffusers")
    if d:
        for r in d["runs"]:
            peak = f", peak {r['peak_bytes'] / GiB:.2f} GiB" if r.get("peak_bytes") else ""
            log(f"diffusers StableCascadeCombinedPipeline ({d['offload']}) {r['width']}x{r['height']}: "
                f"{'done' if r.get('completed') else 'FAILED ' + r.get('error', '')} median {r.get('median_s')} s{peak}")
    s = result["summary"]
    if s["refused_by_planner"]:
        log(f"\nrefused by the planner (does not fit; not measured): {', '.join(s['refused_by_planner'])}")
    log(f"\nall measured cases complete without fallback: {s['all_complete']}")
    log(f"peaks within prediction{' (ledger == plan)' if dry else ' + 5%'}: {s['peaks_within_prediction']}")
    log(f"stage / resident time: {s['stage_over_resident_time']} (target <= {1 + STAGE_OVERHEAD:.2f})"
        + (" — not meaningful in a dry run" if dry else ""))
    log(f"8 GiB cap completes with stream: {s['stream_completes']}")
    for size, modes in s["vs_diffusers"].items():
        for mode, e in modes.items():
            log(f"vs diffusers {size} ({mode}): ours {e['ours_s']:.2f} s, diffusers {e['diffusers_s']:.2f} s -> "
                f"speed ratio {e['speed_ratio_diffusers_over_ours']:.2f}x"
                + (f", peak ratio {e['peak_ratio_ours_over_diffusers']:.2f}" if "peak_ratio_ours_over_diffusers" in e else "")
                + (" (dry run: not meaningful)" if dry else ""))


# ---------------------------------------------------------------------------------------------------------------
# --check-layout: what can be checked at full size without a GPU
# ---------------------------------------------------------------------------------------------------------------
def cuda_like_backend():
    """A stand-in CUDA backend with native bf16 (plain data: nothing is probed), for the dtype policy only."""
    from cascade_backends import Backend, Capabilities

    return Backend("cuda", torch.device("cuda", 0), "stand-in CUDA device with native bf16 (no GPU used)",
                   Capabilities(bf16=True, fp16=True, fp64=True))


def check_layout(args) -> int:
    """Full-size files written header-only (sparse zeros): detection, sizes and plans exactly as the real run sees
    them, and (with --load) every part loaded on the CPU through the real loader."""
    from cascade.precision import choose_dtypes
    from cascade.loader import load_part, resolve_sources
    from cascade.memory import format_plan, make_plan, parse_size
    from cascade.sizing import full_size, sizes_from_sources

    from benchmarks._fullsize import ensure_comfyui_pair

    steps = {"prior": args.prior_steps, "decoder": args.decoder_steps}
    files = ensure_comfyui_pair(args.workdir / "sparse", **model_configs(False), name="fullsize", sparse=True, log=log)
    sources = resolve_sources(*files)
    dtypes = choose_dtypes(cuda_like_backend(), torch.bfloat16)
    sizes = sizes_from_sources(sources, dtypes)
    reference = full_size(dtypes)
    out = {"files": [str(f) for f in files], "variants": {k: v.variant for k, v in sources.parts().items()},
           "dtypes": {k: str(v).removeprefix("torch.") for k, v in dtypes.items()},
           "weights_bytes": sizes.weights, "checks": {}, "plans": []}
    checks = out["checks"]
    checks["variants"] = out["variants"] == {"prior": "big", "decoder": "big", "text_encoder": "clip-g", "stage_a": "paella"}
    checks["sizes_equal_full_size"] = sizes.weights == reference.weights and sizes.blocks == reference.blocks
    for label, mode in parse_cases(args.cases):
        for w, h in parse_sizes(args.sizes):
            plan = make_plan(sizes, shape_for(request_for(w, h, steps)), parse_size(label), steps=steps, mode=mode)
            log(f"\n[{label} {mode}] {w}x{h}\n" + format_plan(plan))
            entry = {"cap": label, "mode": mode, "width": w, "height": h, "fits": plan.fits,
                     "peak": plan.chosen.peak if plan.fits else None,
                     "phases": {p: v.peak for p, v in plan.chosen.phases.items()} if plan.fits else None,
                     "streamed_blocks": ({u: len(sizes.blocks[u]) - k for u, k in plan.chosen.resident_blocks.items()}
                                         if plan.fits else None)}
            out["plans"].append(entry)
    out["refused"] = [f"{e['cap']} {e['mode']} {e['width']}x{e['height']}" for e in out["plans"] if not e["fits"]]
    if args.load:
        loaded = {}
        for kind, part in sources.parts().items():
            t0 = time.perf_counter()
            module = load_part(part, dtype=torch.bfloat16, device="cpu")
            loaded[kind] = {"parameters": sum(p.numel() for p in module.parameters()),
                            "seconds": round(time.perf_counter() - t0, 1)}
            log(f"loaded {kind}: {loaded[kind]['parameters']:,} parameters in {loaded[kind]['seconds']} s")
            del module
            gc.collect()
        out["loaded_on_cpu"] = loaded
        checks["loads"] = True
    out["passed"] = all(checks.values())
    path = args.out or (ROOT / "benchmarks" / "results" / "gpu_memory_layout.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    for e in out["plans"]:
        log(f"{e['cap']:<6} {e['mode']:<9} {e['width']}x{e['height']}: "
            + (f"fits, peak {e['peak'] / GiB:.2f} GiB, streamed blocks {e['streamed_blocks']}" if e["fits"] else "does not fit"))
    log(f"\nchecks: {checks}\n{'PASS' if out['passed'] else 'FAIL'}; wrote {path}")
    return 0 if out["passed"] else 1


# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, ledger instead of CUDA stats")
    p.add_argument("--workdir", type=Path,
                   default=Path(os.environ.get("CASCADE_BENCH_DIR", "/tmp/sd-cascade-bench")))
    p.add_argument("--cases", default=DEFAULT_CASES, help="CAP:MODE,... (caps like 16GiB; modes resident/stage/stream/sequential)")
    p.add_argument("--sizes", default=DEFAULT_SIZES)
    p.add_argument("--reps", type=int, help="timed generations per case after one warm-up (default 2; 1 in a dry run)")
    p.add_argument("--prior-steps", type=int, default=30)
    p.add_argument("--decoder-steps", type=int, default=10)
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    p.add_argument("--check-layout", action="store_true",
                   help="no GPU: full-size header-only files -> detection, sizes and plans; --load also loads them")
    p.add_argument("--load", action="store_true", help="with --check-layout: load every part on the CPU")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.dry_run else 2
    if args.check_layout:
        return check_layout(args)

    if not args.dry_run and not torch.cuda.is_available():
        log("gpu_memory.py measures CUDA memory and no CUDA device is visible "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}, ROCm build {getattr(torch.version, 'hip', None)}). "
            "Run it on a machine with an NVIDIA or AMD GPU of at least 16 GiB, or run it with --dry-run to exercise "
            "the same code on the CPU with the tiny model.")
        return 2

    from cascade_backends import select_backend
    from cascade.precision import choose_dtypes
    from cascade.loader import resolve_sources
    from cascade.memory import parse_size
    from cascade.sizing import sizes_from_sources

    from benchmarks._fullsize import ensure_comfyui_pair

    out_path = args.out or (RESULTS_DRY if args.dry_run else RESULTS)
    if args.dry_run:
        # The tiny model's thousands of tiny ops are the worst case for OpenMP's spin-waiting on a shared CPU (one
        # call can take 20x another); one thread keeps the dry run quick and steady.
        torch.set_num_threads(1)
    backend = select_backend("cpu" if args.dry_run else None)
    if not args.dry_run and backend.device.type != "cuda":
        log(f"selected backend is {backend.name} ({backend.device}), not a CUDA/ROCm device; refusing")
        return 2
    configs = model_configs(args.dry_run)
    workdir = args.workdir / ("tiny" if args.dry_run else "fullsize")
    log(f"checkpoints in {workdir} ...")
    files = ensure_comfyui_pair(workdir, **configs, name="tiny" if args.dry_run else "fullsize",
                                device="cuda" if (not args.dry_run and torch.cuda.is_available()) else "cpu", log=log)
    sources = resolve_sources(*files)
    dtypes = choose_dtypes(backend, torch.bfloat16)
    sizes = sizes_from_sources(sources, dtypes)
    steps = {"prior": args.prior_steps, "decoder": args.decoder_steps}
    size_list = parse_sizes(args.sizes)
    cases = parse_cases(args.cases)
    shapes = [shape_for(request_for(w, h, steps)) for w, h in size_list]

    total = torch.cuda.get_device_properties(backend.device).total_memory if not args.dry_run else None
    caps: dict[str, int] = {}
    for label, mode in cases:
        if args.dry_run:
            caps[f"{label}:{mode}"] = smallest_fitting_budget(sizes, shapes, mode, steps)
        else:
            caps[f"{label}:{mode}"] = parse_size(label)

    result = {
        "benchmark": "gpu_memory", "issue": 5, "dry_run": args.dry_run,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "device": str(backend.device), "backend": backend.name, "description": backend.description,
                        "device_total_bytes": total},
        "files": [str(f) for f in files], "sources": {k: f"{v.variant}" for k, v in sources.parts().items()},
        "dtypes": {k: str(v).removeprefix("torch.") for k, v in dtypes.items()},
        "weights_bytes": sizes.weights, "steps": steps, "prompt": PROMPT, "seed": SEED,
        "meter": (LedgerMeter if args.dry_run else CudaMeter).kind,
        "caps": {k: v for k, v in caps.items()}, "cases": [],
        "targets": {"peak_slack": PEAK_SLACK, "stage_overhead": STAGE_OVERHEAD},
    }
    if args.dry_run:
        result["dry_run_note"] = ("tiny model on the CPU, 1 torch thread; each case's cap is the smallest budget at which its mode "
                                  "fits both sizes (with the full-size activation model), so stream really streams; "
                                  "checks compare the executor's ledger with the plan; times are not meaningful")
    meter_cls = LedgerMeter if args.dry_run else CudaMeter
    t_start = time.perf_counter()
    for label, mode in cases:
        cap = caps[f"{label}:{mode}"]
        cap_info = apply_cap(cap, total, args.dry_run)
        for size in size_list:
            log(f"[{label} {mode}] {size[0]}x{size[1]} (cap {cap / GiB:.3f} GiB) ...")
            case = run_case(files, sources, sizes, backend, label, cap, mode, size, args, meter_cls)
            case["cap_applied"] = cap_info
            result["cases"].append(case)
            log(f"  {'completed' if case.get('completed') else 'FAILED: ' + case.get('error', '')} "
                f"median {case.get('median_s')} s, peaks ok: {case.get('peak_ok')}")
    if args.diffusers:
        cap = parse_size("16GiB") if not args.dry_run else max(caps.values())
        cap_info = apply_cap(cap, total, args.dry_run)
        log("[diffusers] StableCascadeCombinedPipeline on the same weights ...")
        pipe, offload = build_diffusers(sources, args.dry_run)
        result["diffusers"] = {"offload": offload, "cap": cap_info, "runs": [],
                               "note": "samples differently (no shift, its own schedule); speed/memory only"}
        for size in size_list:
            log(f"[diffusers] {size[0]}x{size[1]} ...")
            result["diffusers"]["runs"].append(run_diffusers(pipe, size, args))
        del pipe
        release()
    result["summary"] = summarise(result)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    s = result["summary"]
    passed = s["all_complete"] and s["peaks_within_prediction"] and s["stream_completes"]
    if not args.dry_run:
        passed = passed and s["stage_within_5pct"]
    if args.diffusers:
        passed = passed and all(r.get("completed") for r in result["diffusers"]["runs"])
    result["passed"] = passed
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str))
    print_report(result)
    log(f"\n{'PASS' if passed else 'FAIL'}; wrote {out_path} ({result['seconds']:.0f} s)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
