"""Measure activation peaks of the full-size stages and fit the planner's activation model.

Traces every phase (CLIP-G, Stage C denoiser with CFG, Stage B denoiser, Stage A decode) with the real big
configs on the meta device (cascade.memtrace: exact live-tensor bytes, no GPU needed) over a grid of sizes,
batches and CFG settings, fits `peak = c0 + c1*n + c2*n*t` per phase (cascade.activations) and writes
cascade/data/activation_model.json plus benchmarks/results/activations.json (every sample with its fit error).

Activations scale with the compute dtype's element size (checked: fp32 traces are 2.00x the bf16 ones), so the fit
is done at 2 bytes and the planner scales it. Run: python benchmarks/measure_activations.py   (about 4 minutes)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cascade.activations import MODEL_FILE, Shape, fit, measure  # noqa: E402

SIZES = [(512, 512), (1024, 1024), (1024, 1536), (1536, 1536), (2048, 2048)]
GRID = {
    "text_encoder": [Shape(1024, 1024, chunks=c) for c in (1, 2, 3, 4)],
    "prior": [Shape(w, h, batch=b, prior_cfg=cfg) for w, h in SIZES for b in (1, 2) for cfg in (1.0, 7.0)]
    + [Shape(1024, 1024, compression=32), Shape(1024, 1024, compression=64)],
    "decoder": [Shape(w, h, batch=b, decoder_cfg=cfg) for w, h in SIZES for b in (1, 2) for cfg in (1.0, 1.2)],
    "vqgan": [Shape(w, h, batch=b) for w, h in SIZES for b in (1, 2)],
}


def main() -> None:
    samples, rows = [], []
    t0 = time.perf_counter()
    for phase, shapes in GRID.items():
        for shape in shapes:
            peak = measure(phase, shape, torch.bfloat16)
            samples.append((phase, 2, shape, peak))
            print(f"{phase:<13} {shape.width}x{shape.height} b{shape.batch} cfg{shape.prior_cfg if phase == 'prior' else shape.decoder_cfg} "
                  f"c{shape.compression:g} chunks{shape.chunks}: {peak / 2**30:.3f} GiB", flush=True)
    model = fit(samples)
    for phase, itemsize, shape, peak in samples:
        pred = model.predict(phase, shape, itemsize)
        rows.append({"phase": phase, "width": shape.width, "height": shape.height, "batch": shape.batch,
                     "prior_cfg": shape.prior_cfg, "decoder_cfg": shape.decoder_cfg, "compression": shape.compression,
                     "chunks": shape.chunks, "traced_bytes": peak, "fitted_bytes": pred,
                     "error": (pred - peak) / peak})
    worst = max(abs(r["error"]) for r in rows)
    MODEL_FILE.write_text(model.to_json())
    out = ROOT / "benchmarks" / "results" / "activations.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"samples": rows, "worst_relative_error": worst,
                               "seconds": time.perf_counter() - t0}, indent=1))
    print(f"fit written to {MODEL_FILE}; worst relative error {worst:.2%}; {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
