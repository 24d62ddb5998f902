"""Engine results -> SD.Next's response: base64 PNGs carrying their infotext, and the `info` JSON string.

The PNG has the A1111/SD.Next `parameters` text chunk (cascade.infotext.build_infotext, the same text the CLI writes),
so SD.Next's PNG Info reads it back. `info` has the keys SD.Next's `Processed.js()` writes (modules/processing.py), plus
ours: id_task, model, interrupted, warnings, ignored_fields, worker.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from .worker import Output


def png_bytes(image, parameters: str) -> bytes:
    """A PNG with the `parameters` text chunk, in memory."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def infotexts_for(result, names: dict[str, str]) -> list[str]:
    """One infotext per image of an engine result (image i has seed seeds[i])."""
    from cascade.infotext import build_infotext

    return [build_infotext(result.request, seed, dtypes=result.dtypes, **names) for seed in result.seeds]


def render_output(results: list, names: dict[str, str], model: str, *, interrupted: bool = False,
                  send_images: bool = True, seconds: float = 0.0) -> Output:
    """Encode every image of `results` (one engine result per batch) as a base64 PNG with its infotext."""
    from cascade.pipeline import to_pil

    images, infotexts, seeds, warnings = [], [], [], []
    for result in results:
        texts = infotexts_for(result, names)
        for image, text in zip(to_pil(result.images), texts):
            if send_images:
                images.append(base64.b64encode(png_bytes(image, text)).decode("ascii"))
        infotexts += texts
        seeds += list(result.seeds)
        warnings += list(result.warnings)
    return Output(images, infotexts, seeds, [r.request for r in results], model, interrupted, warnings, seconds)


def sdnext_info(output: Output, task_id: str, *, ignored: tuple[str, ...] = (), worker: str = "") -> str:
    """SD.Next's `info` string for a finished request (modules/processing.py Processed.js)."""
    from cascade.names import sampler_title

    first = output.requests[0]
    all_prompts = [r.prompt for r in output.requests for _ in range(r.batch_size)]
    all_negatives = [r.negative_prompt for r in output.requests for _ in range(r.batch_size)]
    info: dict[str, Any] = {
        "prompt": first.prompt,
        "all_prompts": all_prompts,
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": all_negatives,
        "seed": output.seeds[0] if output.seeds else first.seed,
        "all_seeds": output.seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(output.seeds),
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": sampler_title(first.prior.sampler),
        "cfg_scale": first.prior.cfg,
        "steps": first.prior.steps,
        "batch_size": first.batch_size,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.prior.denoise if first.image is not None else None,
        "extra_generation_params": {"Refiner steps": first.decoder.steps, "Image CFG scale": first.decoder.cfg,
                                    "Decoder sampler": sampler_title(first.decoder.sampler),
                                    "Compression": first.compression},
        "index_of_first_image": 0,
        "infotexts": output.infotexts,
        "styles": [],
        "job_timestamp": None,
        "clip_skip": 1,
        "id_task": task_id,
        "model": output.model,
        "interrupted": output.interrupted,
        "warnings": output.warnings,
        "ignored_fields": list(ignored),
        "worker": worker,
        "seconds": round(output.seconds, 3),
    }
    return json.dumps(info)
