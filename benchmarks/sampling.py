"""Benchmark (issue #3): per-step cost of the full Stage C sampling loop against the bare UNet forwards it makes.

What is compared
    (loop) `CascadePipeline.run_prior` exactly as a generation runs it: the real `_denoiser` (input scaling,
           r from sigma, CFG 7 with cond and uncond batched into one batch-2 forward, eps -> x0 in fp32), the real
           `cascade.sampling.sample` (DDPM and DPM++ 2M, SGM Uniform, shift 2), a progress callback that receives
           every `StepEvent` and an interrupt check after every step;
    (bare) the same number of `unet(x, r, clip_text=..., clip_text_pooled=..., clip_img=...)` calls at batch 2 with
           the same shapes, dtypes and r values (recorded from an untimed run of the loop), nothing else.

    The model is a mid-size Stage C: the big prior's structure (ResBlock / TimestepBlock / AttnBlock, 2 levels,
    CLIP-G sized conditioning inputs) with c_hidden 512, 8 heads and 1 + 1 blocks per level (~19 M parameters),
    random weights, on the CPU, at 512 x 512 (12 x 12 latent; --size 1024 for 24 x 24). fp32 unless a quick
    matmul probe shows bf16 is at least as fast on this CPU (it is not on CPUs without AVX512-BF16/AMX).

Why
    The loop must not add measurable cost on top of the model: everything it does per step (sigma arithmetic,
    CFG, noise, callbacks, interrupt checks) should vanish next to one forward pass.

How it is measured
    One process, one model. After a warm-up of each, loop and bare runs are interleaved (the order flips every
    repetition) and medians are taken; overhead = median(loop) / median(bare) - 1, and the median of the
    per-pair ratios is reported too, and the same ratio in process CPU time. As a cross-check that does not depend
    on comparing two runs, extra loop runs time the UNet forwards with hooks and report the loop's time outside
    them (ms per step and as a fraction of the forwards).

    Threads: 1 by default. On a shared 2-vCPU machine two OpenMP threads stall whenever another process holds one
    core (measured here: 5 forwards took 5-7 s with 2 threads against 1.0-1.1 s with 1), which buries a 3 % effect
    in noise; one thread leaves the second core to the other load. The per-step overhead is single-threaded
    Python either way, so a faster (2-thread) forward makes it a larger fraction: `--threads 2` on a quiet
    machine is the stricter check.

Target (ratio, same run): loop overhead <= 3 % for each sampler.

Run from the repo root:  python benchmarks/sampling.py [--reps 4] [--steps 20] [--size 512] [--threads 1]
(about 2 minutes here).
Writes benchmarks/results/sampling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cascade import configs  # noqa: E402
from cascade.pipeline import CascadePipeline, Conditioning, StepEvent  # noqa: E402
from cascade.request import GenerationRequest, StageSettings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sampling.json"
TARGET_OVERHEAD = 0.03
SAMPLERS = ("ddpm", "dpmpp_2m")
CFG = 7.0

MID_PRIOR = {
    **configs.PRIOR,
    "conditioning_dim": 512,
    "block_out_channels": [512, 512],
    "num_attention_heads": [8, 8],
    "down_num_layers_per_block": [1, 1],
    "up_num_layers_per_block": [1, 1],
}


def build_unet(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The mid-size prior with seeded random weights; zero-initialised gains get small values (as cascade.tiny)."""
    from cascade.models import CascadeUNet

    torch.manual_seed(seed)
    unet = CascadeUNet.from_config(MID_PRIOR)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith(("gamma", "beta", "gammas")):
                p.normal_(0.0, 0.1)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


def pick_dtype() -> tuple[torch.dtype, dict]:
    """fp32 unless bf16 matmuls of the model's shapes are at least as fast here (a few ms to find out)."""
    a32, b32 = torch.randn(1152, 512), torch.randn(512, 2048)
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = a32.to(dt), b32.to(dt)
        a @ b
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        times[str(dt).removeprefix("torch.")] = (time.perf_counter() - t0) / 10
    bf16_ratio = times["bfloat16"] / times["float32"]
    chosen = torch.bfloat16 if bf16_ratio <= 1.0 else torch.float32
    return chosen, {"matmul_seconds": times, "bf16_over_fp32": bf16_ratio, "chosen": str(chosen).removeprefix("torch.")}


class Host:
    """What a host does around each step: progress bookkeeping and an interrupt flag, like SD.Next's shared.state."""

    def __init__(self):
        self.interrupted = False
        self.steps = 0
        self.last: StepEvent | None = None

    def callback(self, event: StepEvent) -> None:
        self.steps += 1
        self.last = event  # a host keeps the latest denoised latents for live previews

    def interrupt(self) -> bool:
        return self.interrupted


def make_request(sampler: str, steps: int, size: int) -> GenerationRequest:
    settings = StageSettings(steps=steps, cfg=CFG, sampler=sampler, scheduler="sgm_uniform", shift=2.0)
    return GenerationRequest(prompt="benchmark", width=size, height=size, seed=1, batch_size=1, prior=settings)


def conditioning(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, 77, 1280, generator=g), torch.randn(1, 1, 1280, generator=g))


def record_calls(pipe: CascadePipeline, request, cond, uncond) -> list[tuple[tuple, dict]]:
    """The exact (args, kwargs) of every UNet call the loop makes, from one untimed run."""
    calls: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        calls.append((tuple(a.clone() for a in args), {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}))

    handle = pipe.prior.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe.run_prior(request, cond, uncond)
    finally:
        handle.remove()
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=4, help="interleaved loop/bare pairs per sampler (median reported)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size // 42)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, see the docstring; 0 = torch's own choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    dtype, dtype_probe = pick_dtype()
    unet = build_unet(dtype)
    params = sum(p.numel() for p in unet.parameters())
    pipe = CascadePipeline(tokenizer=None, text_encoder=None, prior=unet, decoder=None, stage_a=None, device="cpu")
    cond, uncond = conditioning(1), conditioning(2)
    host = Host()
    print(f"mid-size prior: {params / 1e6:.1f} M parameters, {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads, {args.size}x{args.size} ({args.size // 42}x{args.size // 42} latent), "
          f"CFG {CFG}, {args.steps} steps", flush=True)

    plans = {}
    for sampler in SAMPLERS:
        request = make_request(sampler, args.steps, args.size)
        calls = record_calls(pipe, request, cond, uncond)
        # Bare calls: the recorded x and r of every call, and the conditioning (batch 2, model dtype) as one set of
        # tensors shared by all calls, as the loop's denoiser shares its batched cond/uncond (20 separate copies
        # would be colder in cache and make the bare side slower). No return_dict: the forward alone.
        shared = {k: v for k, v in calls[0][1].items() if k != "return_dict"}
        assert all(torch.equal(kw[k], shared[k]) for _, kw in calls for k in shared), "conditioning changed"
        bare = [(a, shared) for a, _ in calls]
        plans[sampler] = (request, bare)
        shapes = {k: tuple(v.shape) for k, v in bare[0][1].items() if torch.is_tensor(v)}
        print(f"{sampler}: {len(bare)} UNet calls, x {tuple(bare[0][0][0].shape)}, {shapes}", flush=True)

    def run_loop(sampler: str) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one full Stage C loop."""
        request, _ = plans[sampler]
        host.steps = 0
        t0, c0 = time.perf_counter(), time.process_time()
        pipe.run_prior(request, cond, uncond, host.callback, host.interrupt)
        elapsed = time.perf_counter() - t0, time.process_time() - c0
        assert host.steps == request.prior.steps
        return elapsed

    @torch.inference_mode()
    def run_bare(sampler: str) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of the same UNet calls, bare."""
        _, bare = plans[sampler]
        t0, c0 = time.perf_counter(), time.process_time()
        for call_args, call_kwargs in bare:
            unet(*call_args, **call_kwargs, return_dict=False)
        return time.perf_counter() - t0, time.process_time() - c0

    def run_loop_instrumented(sampler: str) -> tuple[float, float]:
        """(loop seconds, seconds inside the UNet forward) from hooks: a direct, noise-robust overhead estimate."""
        inside, started = [0.0], [0.0]

        def pre(_module, _args, _kwargs):
            started[0] = time.perf_counter()

        def post(_module, _args, _kwargs, _output):
            inside[0] += time.perf_counter() - started[0]

        handles = [unet.register_forward_pre_hook(pre, with_kwargs=True),
                   unet.register_forward_hook(post, with_kwargs=True)]
        try:
            total, _ = run_loop(sampler)
        finally:
            for h in handles:
                h.remove()
        return total, inside[0]

    for sampler in SAMPLERS:  # warm-up of the bare path (the recording run above warmed up the loop)
        run_bare(sampler)

    times = {s: {"loop": [], "bare": []} for s in SAMPLERS}
    for rep in range(args.reps):
        for sampler in SAMPLERS:
            order = ("loop", "bare") if rep % 2 == 0 else ("bare", "loop")
            for kind in order:
                times[sampler][kind].append(run_loop(sampler) if kind == "loop" else run_bare(sampler))
            (lw, lc), (bw, bc) = times[sampler]["loop"][-1], times[sampler]["bare"][-1]
            print(f"rep {rep} {sampler:<9} loop {lw:6.2f} s (cpu {lc:6.2f})  bare {bw:6.2f} s (cpu {bc:6.2f})  "
                  f"ratio {lw / bw:.3f} (cpu {lc / bc:.3f})", flush=True)

    # Secondary figure: the loop's time outside the UNet forwards, timed by hooks within each run, so noise from
    # other processes hits both sides of the split alike. Extra runs: the hooks never touch the timed pairs above.
    outside = {s: [] for s in SAMPLERS}
    for _ in range(max(1, args.reps // 2)):
        for sampler in SAMPLERS:
            total, inside = run_loop_instrumented(sampler)
            outside[sampler].append((total - inside, inside))

    summary = {}
    for sampler in SAMPLERS:
        loop, bare = [w for w, _ in times[sampler]["loop"]], [w for w, _ in times[sampler]["bare"]]
        loop_cpu, bare_cpu = [c for _, c in times[sampler]["loop"]], [c for _, c in times[sampler]["bare"]]
        n_calls = len(plans[sampler][1])
        overhead = statistics.median(loop) / statistics.median(bare) - 1
        pair = statistics.median(a / b for a, b in zip(loop, bare)) - 1
        summary[sampler] = {
            "steps": args.steps,
            "unet_calls": n_calls,
            "loop_seconds": loop,
            "bare_seconds": bare,
            "loop_ms_per_step": statistics.median(loop) / args.steps * 1000,
            "bare_ms_per_call": statistics.median(bare) / n_calls * 1000,
            "overhead": overhead,
            "overhead_pairwise_median": pair,
            "overhead_ms_per_step": (statistics.median(loop) - statistics.median(bare)) / args.steps * 1000,
            "overhead_min_based": min(loop) / min(bare) - 1,
            "loop_cpu_seconds": loop_cpu,
            "bare_cpu_seconds": bare_cpu,
            "overhead_cpu_time": statistics.median(loop_cpu) / statistics.median(bare_cpu) - 1,
            "bare_spread": max(bare) / min(bare),
            "outside_unet_ms_per_step": statistics.median(o for o, _ in outside[sampler]) / args.steps * 1000,
            "outside_over_inside": statistics.median(o / i for o, i in outside[sampler]),
            "target": TARGET_OVERHEAD,
            "met": overhead <= TARGET_OVERHEAD,
        }

    print()
    print(f"{'sampler':<10}{'calls':>6}{'loop ms/step':>14}{'bare ms/call':>14}{'overhead':>10}{'pairwise':>10}"
          f"{'cpu time':>10}{'outside UNet':>14}  target <= {TARGET_OVERHEAD:.0%}")
    for sampler, s in summary.items():
        print(f"{sampler:<10}{s['unet_calls']:>6}{s['loop_ms_per_step']:>14.1f}{s['bare_ms_per_call']:>14.1f}"
              f"{s['overhead']:>10.2%}{s['overhead_pairwise_median']:>10.2%}{s['overhead_cpu_time']:>10.2%}"
              f"{s['outside_over_inside']:>9.2%} ({s['outside_unet_ms_per_step']:.2f} ms/step)  "
              f"{'MET' if s['met'] else 'MISSED'}")
    print("overhead = median(loop) / median(bare) - 1, wall clock (the target); pairwise = median of per-pair ratios;\n"
          "cpu time = the same with process CPU time; outside UNet = loop time not spent in UNet forwards (hooks)")
    noisy = [s for s, v in summary.items() if v["bare_spread"] > 1.2]
    if noisy:
        print(f"warning: the bare runs of {', '.join(noisy)} varied by more than 20 % (other load on the machine); "
              "wall-clock ratios that close to 1 are not reliable, compare the cpu-time and outside-UNet columns")

    import diffusers

    result = {
        "benchmark": "sampling",
        "issue": 3,
        "model": {"config": MID_PRIOR, "parameters": params, "dtype": str(dtype).removeprefix("torch."),
                  "dtype_probe": dtype_probe},
        "run": {"size": args.size, "latent": [1, 16, args.size // 42, args.size // 42], "cfg": CFG,
                "scheduler": "sgm_uniform", "shift": 2.0, "reps": args.reps, "threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "cpu_count": os.cpu_count()},
        "summary": summary,
        "targets_met": all(s["met"] for s in summary.values()),
        "noisy": noisy,
        "total_seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
