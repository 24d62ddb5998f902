"""Benchmark (issue #13): time to merge and to restore a full-size-shaped LoRA, as a ratio to one Stage C step.

What is measured
    A Stage C of an official variant's shapes (default lite, 1.0 B parameters; `--variant big` needs ~25 GB of
    RAM) with random bf16 weights on the CPU, and a rank-32 LoRA over every one of its Linear layers, written as a
    diffusers/PEFT file. Timed in one process: `cascade.lora_apply.merge` (read the factors, fp32 deltas, merge at
    bf16, keep the originals), `restore` (copy them back), and one CFG step of Stage C at 1024 x 1024 (batch-2
    forward, 24 x 24 latent) — the unit the issue asks the merge to be compared with. Restore is checked bit-exact.

Why
    A merged LoRA costs nothing per step; what it costs is this one-off merge and restore per request.

Run from the repo root:  python benchmarks/lora.py [--variant lite] [--rank 32] [--threads 1]
Writes benchmarks/results/lora.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def build_prior(variant: str, dtype: torch.dtype) -> nn.Module:
    from cascade import configs
    from cascade.loader import instantiate

    with torch.device("meta"):
        model = instantiate("prior", configs.unet_config("prior", variant))
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(dtype))
        for b in model.buffers():
            b.zero_()
    return model.eval()


def write_lora(model: nn.Module, rank: int, path: Path) -> int:
    from cascade.tensorfile import write_safetensors

    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            out_dim, in_dim = module.weight.shape
            tensors[f"prior.{name}.lora_A.weight"] = (torch.randn(rank, in_dim, generator=gen) * 0.01).bfloat16()
            tensors[f"prior.{name}.lora_B.weight"] = (torch.randn(out_dim, rank, generator=gen) * 0.01).bfloat16()
    write_safetensors(path, tensors)
    return len(tensors) // 2


def one_step(model: nn.Module, dtype: torch.dtype) -> float:
    cfg = model.config
    x = torch.randn(2, 16, 24, 24, dtype=dtype)
    kw = {"clip_text": torch.randn(2, 77, cfg.clip_text_in_channels, dtype=dtype),
          "clip_text_pooled": torch.randn(2, 1, cfg.clip_text_pooled_in_channels, dtype=dtype),
          "clip_img": torch.zeros(2, 1, cfg.clip_image_in_channels, dtype=dtype)}
    r = torch.full((2,), 0.5)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x, r, **kw, return_dict=False)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="lite", choices=("lite", "big"))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="1: on a shared 2-vCPU machine 2 OpenMP threads stall (see benchmarks/sampling.py)")
    parser.add_argument("--steps", type=int, default=2, help="timed Stage C steps (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from cascade import lora_apply
    from cascade.pipeline import Resident

    dtype = torch.bfloat16
    model = build_prior(args.variant, dtype)
    params = sum(p.numel() for p in model.parameters())

    class Pipe:  # the three models lora_apply binds against; only Stage C is patched here
        prior = model
        decoder = nn.Module()
        text_encoder = nn.Module()
        placement = Resident("cpu")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "full.safetensors"
        layers = write_lora(model, args.rank, path)
        size = path.stat().st_size
        before = {k: v.clone() for k, v in model.state_dict().items()}
        t0 = time.perf_counter()
        prepared = lora_apply.prepare(Pipe, [(str(path), 1.0, None)])
        t_prepare = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = lora_apply.merge(Pipe, prepared)
        t_merge = time.perf_counter() - t0
        changed = sum(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
        t0 = time.perf_counter()
        lora_apply.restore(state)
        t_restore = time.perf_counter() - t0
    exact = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    max_error = max(float((v.float() - before[k].float()).abs().max()) for k, v in model.state_dict().items())
    one_step(model, dtype)  # warm-up
    steps = sorted(one_step(model, dtype) for _ in range(args.steps))
    step = steps[len(steps) // 2]
    result = {
        "variant": args.variant, "parameters": params, "rank": args.rank, "lora_layers": layers,
        "lora_file_bytes": size, "weights_changed": changed, "threads": args.threads,
        "prepare_s": round(t_prepare, 3), "merge_s": round(t_merge, 3), "restore_s": round(t_restore, 3),
        "stage_c_step_1024_cfg_s": round(step, 3),
        "merge_over_step": round(t_merge / step, 3), "restore_over_step": round(t_restore / step, 3),
        "restore_bit_exact": exact, "max_restore_error": max_error,
    }
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / "lora.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
