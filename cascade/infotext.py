"""A1111/SD.Next-style "parameters" text: written into every PNG, readable by SD.Next's PNG Info.

Format (the one A1111 and SD.Next write and parse):
    <prompt>
    Negative prompt: <negative>
    Steps: 30, Sampler: DDPM, Schedule type: SGM Uniform, CFG scale: 7, Seed: 7, Size: 1024x1536, ...
Values containing ',' ':' or '"' are JSON-quoted. Stable Cascade's decoder settings use the names SD.Next maps to
its refiner fields for this model (steps -> prior, "Refiner steps" -> decoder), plus explicit Decoder keys; the
CLI and SD.Next share them (`generation_fields`). "Seed" is the image's seed (seed + i) with "cpu" noise and the
batch's seed with "comfyui" noise (as ComfyUI); "Batch index" says which image of the batch this is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

from .errors import CascadeError
from .request import GenerationRequest, StageSettings

from .names import SAMPLER_TITLES, SCHEDULER_TITLES  # noqa: E402  (one table of names, re-exported)

log = logging.getLogger(__name__)


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _num(value: float) -> str:
    return f"{value:g}"


MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


def model_title(name: str | None) -> str | None:
    """A checkpoint's infotext name: the file name without its extension (A1111's "Model" convention), so the
    CLI (which knows the path) and SD.Next (which knows the file name) write the same "Decoder" value."""
    if not name:
        return None
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in MODEL_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def generation_fields(prior: StageSettings, decoder: StageSettings, *, compression: float, stage_a_scale: float,
                      decoder_name: str | None = None) -> dict[str, Any]:
    """The sampling fields both the CLI and SD.Next write, under one set of names (issue 11):
    Steps / Sampler / Schedule type / CFG scale / Prior shift for Stage C (A1111's names, which SD.Next's paste
    maps to its own fields), Refiner steps / Image CFG scale (SD.Next's names for the decoder's steps and CFG) and
    Decoder sampler / Decoder schedule type / Decoder shift for Stage B."""
    fields: dict[str, Any] = {
        "Steps": prior.steps,
        "Sampler": SAMPLER_TITLES.get(prior.sampler, prior.sampler),
        "Schedule type": SCHEDULER_TITLES.get(prior.scheduler, prior.scheduler),
        "CFG scale": _num(prior.cfg),
        "Prior shift": _num(prior.shift),
        "Refiner steps": decoder.steps,
        "Image CFG scale": _num(decoder.cfg),
        "Decoder sampler": SAMPLER_TITLES.get(decoder.sampler, decoder.sampler),
        "Decoder schedule type": SCHEDULER_TITLES.get(decoder.scheduler, decoder.scheduler),
        "Decoder shift": _num(decoder.shift),
        "Compression": _num(compression),
        "Stage A scale": _num(stage_a_scale),
        "Decoder": model_title(decoder_name),
    }
    if prior.denoise != 1.0:
        fields["Denoising strength"] = _num(prior.denoise)
    if decoder.denoise != 1.0:
        fields["Decoder denoise"] = _num(decoder.denoise)
    return {k: v for k, v in fields.items() if v is not None}


def lora_fields(loras) -> dict[str, str]:
    """"LoRA networks" (file names without extension, SD.Next's field) and "LoRA weights" (UNet[:text-encoder]
    weight of each, in the same order), so `--from` can ask for the files and apply them as they were."""
    from .lora_apply import as_entry

    entries = [as_entry(item) for item in loras]
    weights = [f"{e.unet:g}" + (f":{e.text_encoder:g}" if e.text_encoder is not None else "") for e in entries]
    return {"LoRA networks": ", ".join(model_title(e.path) or "" for e in entries), "LoRA weights": ", ".join(weights)}


def build_infotext(
    request: GenerationRequest,
    seed: int,
    *,
    prior_name: str | None = None,
    prior_hash: str | None = None,
    decoder_name: str | None = None,
    decoder_hash: str | None = None,
    dtypes: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The parameters text for one image of `request` (image seed `seed`): everything `--from` needs to make the
    same image again (cascade.recall), with the names SD.Next writes too (`generation_fields`)."""
    stages = generation_fields(request.prior, request.decoder, compression=request.compression,
                               stage_a_scale=request.stage_a_scale, decoder_name=decoder_name)
    index = seed - request.seed  # image `index` of the batch
    per_image = request.noise != "comfyui"  # "cpu" noise: image i has seed + i; ComfyUI's: the batch has the seed
    fields: dict[str, Any] = {
        **{k: stages.pop(k) for k in ("Steps", "Sampler", "Schedule type", "CFG scale")},
        "Seed": seed if per_image else request.seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model_title(prior_name),
        "Model hash": prior_hash,
        **stages,
        "Decoder hash": decoder_hash,
        "Noise": request.noise,
        "Prompt syntax": request.prompt_syntax,
    }
    if request.decoder_seed is not None:
        fields["Decoder seed"] = request.decoder_seed + (index if per_image else 0)
    if request.cfg_rescale:
        fields["CFG rescale"] = _num(request.cfg_rescale)
    if request.batch_size > 1:
        fields["Batch size"] = request.batch_size
        fields["Batch index"] = index  # with the seeds above, the whole batch can be made again
    if request.upscale != 1:
        fields["Upscale"] = request.upscale
    if request.image_prompts:
        fields["Image prompts"] = len(request.image_prompts)
        fields["Image prompt strength"] = _num(request.image_prompt_strength)
    if request.loras:
        fields.update(lora_fields(request.loras))
    if request.controlnets:
        from .controlnet import infotext_value

        fields["ControlNet"] = infotext_value(request.controlnets)
    if dtypes:
        fields["Dtype"] = " ".join(f"{k}={v}" for k, v in dtypes.items())
    fields.update(extra or {})
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None and v != "")
    text = request.prompt
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    return f"{text}\n{line}"


_PAIR = re.compile(r'\s*([\w \-/+.()]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Parse A1111-style parameters back into a dict: 'Prompt', 'Negative prompt' and every key of the last line."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(_PAIR.findall(lines[-1])) >= 3 else ""  # A1111's rule: >= 3 pairs
    body = lines[:-1] if params_line else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(params_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        out[key.strip()] = value
    return out


HASH_CACHE_VERSION = 1
HASH_BLOCK = 16 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _file_key(path: Path) -> tuple[str, os.stat_result]:
    resolved = path.resolve()
    return str(resolved), resolved.stat()


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("mtime_ns"), int)
            and isinstance(entry.get("sha256"), str) and bool(_HEX64.fullmatch(entry["sha256"])))


def read_hash_cache(cache_file: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The cache's valid entries, {absolute path: {"size", "mtime_ns", "sha256"}}. A missing, corrupt, partial or
    foreign file reads as empty (it is a cache: the next write replaces it with a valid one)."""
    try:
        data = json.loads(Path(cache_file).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == HASH_CACHE_VERSION else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and _valid_entry(v)}


def _store_hash(cache_file: Path, key: str, entry: dict[str, Any]) -> None:
    """Merge one entry into the cache under a cross-process lock, written to a unique temporary file and renamed:
    concurrent processes never lose each other's entries and a reader never sees a half file."""
    from .atomic import atomic_write_text, file_lock

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_file.with_name(cache_file.name + ".lock")):
        files = read_hash_cache(cache_file)
        files[key] = entry
        atomic_write_text(cache_file, json.dumps({"version": HASH_CACHE_VERSION, "files": files}, indent=1,
                                                 sort_keys=True), what="hash cache", durable=False)


def file_sha256(path: str | os.PathLike, on_progress: Callable[[int, int], None] | None = None) -> str:
    """The full SHA-256 (hex) of a file, read in 16 MiB blocks; `on_progress(done_bytes, total_bytes)` is called
    once before the first block and after every block (the CLI draws its bar from it)."""
    path = Path(path)
    total = path.stat().st_size
    digest, done = hashlib.sha256(), 0
    if on_progress is not None:
        on_progress(0, total)
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            done += len(block)
            if on_progress is not None:
                on_progress(done, total)
    return digest.hexdigest()


def short_hash(path: str | os.PathLike, cache_file: str | os.PathLike | None = None, *,
               on_progress: Callable[[int, int], None] | None = None) -> str:
    """A1111/SD.Next's AutoV2 hash (sha256 of the whole file, first 10 hex), cached by (absolute path, size,
    mtime_ns) as SD.Next's `modules/hashes.py` caches by (title, mtime): a second run is instant, a changed file is
    hashed again. `on_progress` is called only when the file is actually read (not on a cache hit). A folder has no
    hash (""). A failed cache write is logged and does not fail the caller."""
    path = Path(path)
    if path.is_dir():
        return ""
    key, before = _file_key(path)
    cache = Path(cache_file) if cache_file is not None else None
    if cache is not None:
        entry = read_hash_cache(cache).get(key)
        if entry and entry["size"] == before.st_size and entry["mtime_ns"] == before.st_mtime_ns:
            return entry["sha256"][:10]
    value = file_sha256(path, on_progress)
    after = Path(key).stat()
    if cache is not None and (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
        try:
            _store_hash(cache, key, {"size": before.st_size, "mtime_ns": before.st_mtime_ns, "sha256": value})
        except (OSError, CascadeError) as err:  # a read-only cache folder costs a re-hash next time, nothing more
            log.warning("could not update the hash cache %s: %s", cache, err)
    return value[:10]


def check_output_target(path: str | os.PathLike) -> None:
    """Raise CascadeError unless `path` can be written as a PNG: called by the CLI before sampling, so an
    unusable `--out` (a directory, /dev/full, a fifo, an unwritable folder) fails before any compute."""
    from .atomic import check_output_target as check

    check(path, "output")


def save_png(image, path: str | os.PathLike, parameters: str) -> Path:
    """Write a PNG with the `parameters` text chunk atomically: a uniquely named temporary file in the target's
    folder, fsync'ed and renamed over the target. Concurrent writers of one path each publish a complete file (the
    last one wins); a kill (SIGKILL included) never leaves a 0-byte or partial file under `path`; an existing
    non-regular target (a directory, a device such as /dev/full, a fifo) is refused (CascadeError)."""
    from PIL.PngImagePlugin import PngInfo

    from .atomic import atomic_write

    info = PngInfo()
    info.add_text("parameters", parameters)
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info), what="output")
