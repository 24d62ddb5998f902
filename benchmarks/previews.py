"""Benchmark (issue #12): live-preview overhead per sampling step, and the extra peak memory of each new part.

1. Preview overhead (ratio to a step without previews, same run)
    The real sampling loop (`CascadePipeline.run_prior` / `run_decoder`: CFG denoiser, DDPM / Euler a, StepEvent
    callback) on full-size UNet architectures with random weights (`--variant lite` by default: on a CPU the big
    models take minutes per step; a lite step is ~3x cheaper, so the ratio it gives is an upper bound for big),
    at `--size` (1024 x 1024), CFG 7 for Stage C (batch-2 forwards) and 1.0 for Stage B. Each stage runs with
    `preview_every=1` and without previews, interleaved `--reps` times; per-step medians give
        overhead = median(step with preview) / median(step without) - 1.
    (in wall time and in process CPU time). Because a full-size step lasts seconds here and the machine is shared,
    that difference is within run-to-run noise (several % either way between identical runs), so the previews are
    also timed directly, in the same process on the same latents (`preview_ms`: the full-size previewer, 16 ch ->
    RGB at 8x, and the latent-to-RGB factors, each including the uint8/PIL conversion) and reported as a fraction
    of the measured step: `preview_ms / step_ms`. Target: <= 5 % per step.

2. Extra peak memory per new part (planner, full-size sizes, no files needed)
    `cascade.memory.make_plan` on the official sizes (`cascade.sizing.full_size`, bf16 UNets and text encoder,
    fp32 Stage A) for a 16 GiB card at 1024x1024 and 1024x1536, with and without each part a request can add:
    the EfficientNet encoder (img2img), CLIP-L vision (image prompts), the previewer (previews), Stage A's encoder
    (Stage B img2img; its weights are part of the loaded VQGAN, only activations add), and all of them. Part
    weights are counted from the official architectures at their dtypes (as their headers would give), activations
    are traced on the meta device (cascade.memtrace). Reported per phase where the part runs and for the chosen
    plan's overall peak.

Run from the repo root:  python benchmarks/previews.py [--size 1024] [--variant lite] [--reps 2] [--steps 3]
(about 15 minutes on the 2-core CPU here; --device cuda on a GPU). Writes benchmarks/results/previews.json.
"""

from __future__ import annotations

import argparse
import json
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
from torch import nn  # noqa: E402

from cascade import configs, previews, side_parts  # noqa: E402
from cascade.pipeline import CascadePipeline, Conditioning, StepEvent  # noqa: E402
from cascade.request import GenerationRequest, StageSettings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "previews.json"
TARGET = 0.05
GiB = 1024**3


def random_model(kind: str, config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A full-size model with small uniform random weights, built on meta and materialised on `device`."""
    from cascade.loader import instantiate

    with torch.device("meta"):
        model = instantiate(kind, dict(config))
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            bound = 1.0 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.05
            p.uniform_(-bound, bound, generator=gen)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.fill_(1.0 if name.endswith("running_var") else 0.0)
            else:
                b.zero_()
    return model.to(dtype).eval().requires_grad_(False)


def stage_timings(pipe: CascadePipeline, stage: str, req: GenerationRequest, prior_latents=None) -> list[tuple]:
    """(wall, process CPU) seconds per step of one stage run, from StepEvent arrival times (the first step
    includes the warm-up)."""
    cond = Conditioning(torch.randn(1, 77, 1280), torch.randn(1, 1, 1280))
    times: list[tuple[float, float]] = []
    last = [(time.perf_counter(), time.process_time())]

    def on_step(event: StepEvent) -> None:
        now = (time.perf_counter(), time.process_time())
        times.append((now[0] - last[0][0], now[1] - last[0][1]))
        last[0] = now

    if stage == "prior":
        pipe.run_prior(req, cond, cond, on_step)
    else:
        pipe.run_decoder(req, prior_latents, cond, cond, on_step)
    return times


def measure_overhead(args, device: torch.device, dtype: torch.dtype) -> dict:
    from cascade.models.stage_c_coder import Previewer

    prior = random_model("prior", configs.unet_config("prior", args.variant), device, dtype, 1)
    decoder = random_model("decoder", configs.unet_config("decoder", args.variant), device, dtype, 2)
    stage_a = random_model("stage_a", configs.STAGE_A, device, torch.float32, 3)
    previewer = random_model("previewer", side_parts.full_size_configs()["previewer"], device, dtype, 4)
    assert isinstance(previewer, Previewer)
    pipe = CascadePipeline(tokenizer=None, text_encoder=nn.Linear(1, 1), prior=prior, decoder=decoder,
                           stage_a=stage_a, device=device)
    pipe.side.provide("previewer", previewer)
    size = args.size
    base = GenerationRequest(prompt="", width=size, height=size, seed=0,
                             prior=StageSettings(args.steps, 7.0, "ddpm", "sgm_uniform", 2.0),
                             decoder=StageSettings(args.steps, 1.0, "euler_ancestral", "karras", 1.0))
    prior_latents = torch.randn(base.prior_latent_shape())
    out: dict = {}
    for stage in ("prior", "decoder"):
        runs = {"with": [], "without": []}
        for rep in range(args.reps):
            order = ("with", "without") if rep % 2 == 0 else ("without", "with")
            for mode in order:
                req = replace(base, preview_every=1 if mode == "with" else 0)
                steps = stage_timings(pipe, stage, req, prior_latents)
                runs[mode] += steps[1:] if len(steps) > 1 else steps  # drop each run's warm-up step
        step_with, step_without = (statistics.median(t[0] for t in runs[m]) for m in ("with", "without"))
        cpu_with, cpu_without = (statistics.median(t[1] for t in runs[m]) for m in ("with", "without"))
        latents = prior_latents if stage == "prior" else torch.randn(base.decoder_latent_shape())
        direct = {}
        methods = ("previewer", "rgb") if stage == "prior" else ("rgb",)
        for method in methods:
            net = previewer if method == "previewer" else None
            previews.preview_image(latents.to(device), stage, net, method)  # warm-up
            samples = []
            for _ in range(5):
                t0 = time.perf_counter()
                previews.preview_image(latents.to(device), stage, net, method)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            ms = 1000 * statistics.median(samples)
            direct[method] = {"preview_ms": ms, "fraction_of_step": ms / (1000 * step_without)}
        out[stage] = {
            "step_ms_without_previews": 1000 * step_without,
            "step_ms_with_previews": 1000 * step_with,
            "overhead_ratio_wall": step_with / step_without - 1,
            "overhead_ratio_cpu": cpu_with / cpu_without - 1,
            "steps_timed": {k: len(v) for k, v in runs.items()},
            "direct": direct,
            "within_target": all(d["fraction_of_step"] <= TARGET for d in direct.values()),
        }
        print(f"{stage}: step {1000 * step_without:.0f} ms without, {1000 * step_with:.0f} ms with previews "
              f"({100 * (step_with / step_without - 1):+.2f} % wall, {100 * (cpu_with / cpu_without - 1):+.2f} % CPU); "
              "direct: "
              + ", ".join(f"{m} {d['preview_ms']:.1f} ms = {100 * d['fraction_of_step']:.2f} %"
                          for m, d in direct.items()), flush=True)
    return out


def measure_memory(budgets: list[int]) -> dict:
    return {f"{b / GiB:g}GiB": measure_memory_at(b) for b in budgets}


def measure_memory_at(budget: int) -> dict:
    """Planner peaks with and without each new part at full size (see the module doc)."""
    from PIL import Image

    from cascade.activations import Shape
    from cascade.memory import default_dtypes, make_plan
    from cascade.sizing import full_size

    dtypes = default_dtypes("bf16")
    sizes = full_size(dtypes)
    kinds = {"effnet": torch.float32, "previewer": torch.float32, "clip_vision": torch.bfloat16}
    weights = {k: side_parts.full_size_bytes(k, d) for k, d in kinds.items()}
    part_dtypes = {**kinds, side_parts.STAGE_A_ENCODE: dtypes["vqgan"]}
    image = Image.new("RGB", (64, 64))
    cases = {
        "effnet (img2img)": dict(image=image),
        "clip_vision (image prompt)": dict(image_prompts=(image,)),
        "previewer (previews)": dict(preview_every=1),
        "stage_a_encoder (Stage B img2img)": dict(decoder_image=image),
        "all": dict(image=image, image_prompts=(image,), preview_every=1, decoder_image=image),
    }
    out = {"budget_bytes": budget, "part_weight_bytes": weights,
           "part_dtypes": {k: str(v).removeprefix("torch.") for k, v in kinds.items()}, "sizes": {}}
    for width, height in ((1024, 1024), (1024, 1536)):
        shape = Shape(width, height)
        plain = make_plan(sizes, shape, budget, search_largest=False)
        rows = {}
        for name, fields in cases.items():
            req = GenerationRequest(prompt="", width=width, height=height, **fields)
            extras = side_parts.planner_extras(req, weights, side_parts.full_size_configs(), part_dtypes)
            plan = make_plan(replace(sizes, extras=extras), shape, budget, search_largest=False)
            option, base = plan.chosen or plan.option("sequential"), plain.chosen or plain.option("sequential")
            rows[name] = {
                "extra_by_phase_bytes": extras,
                "phase_peak_increase_bytes": {p: option.phases[p].peak - base.phases[p].peak for p in extras},
                "mode": plan.mode, "mode_without": plain.mode,
                "overall_peak_bytes": option.peak, "overall_peak_without_bytes": base.peak,
                "overall_peak_increase_bytes": option.peak - base.peak,
            }
            print(f"{budget / GiB:g} GiB {width}x{height} {name}: +{sum(extras.values()) / 2**20:.0f} MiB in "
                  f"{', '.join(extras)}; overall peak {base.peak / GiB:.2f} -> {option.peak / GiB:.2f} GiB "
                  f"({plain.mode} -> {plan.mode})", flush=True)
        out["sizes"][f"{width}x{height}"] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--variant", choices=("lite", "big"), default="lite")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="1: steadier on a shared 2-core machine")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vram", nargs="+", default=["16GiB", "8GiB"], help="card sizes for the planner figures")
    parser.add_argument("--skip-overhead", action="store_true", help="only the planner figures (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    from cascade.memory import parse_size

    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": args.threads,
              "size": args.size, "variant": args.variant, "steps": args.steps, "reps": args.reps,
              "target_fraction": TARGET}
    result["memory"] = measure_memory([parse_size(v) for v in args.vram])
    if not args.skip_overhead:
        result["overhead"] = measure_overhead(args, device, dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
