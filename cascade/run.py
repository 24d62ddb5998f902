"""The command-line generation job: request from flags, pipeline from files, progress bars, PNGs with infotext."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .request import GenerationRequest, StageSettings, validate


def request_from_args(args: argparse.Namespace, prompt: str, negative: str) -> GenerationRequest:
    from .sampling import resolve_sampler, resolve_scheduler

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        width=args.width,
        height=args.height,
        seed=args.seed,
        batch_size=args.batch,
        prior=StageSettings(
            steps=args.prior_steps,
            cfg=args.prior_cfg,
            sampler=resolve_sampler(args.prior_sampler),
            scheduler=resolve_scheduler(args.prior_scheduler),
            shift=args.prior_shift,
            denoise=args.denoise,
        ),
        decoder=StageSettings(
            steps=args.decoder_steps,
            cfg=args.decoder_cfg,
            sampler=resolve_sampler(args.decoder_sampler),
            scheduler=resolve_scheduler(args.decoder_scheduler),
            shift=args.decoder_shift,
        ),
        compression=args.compression,
        stage_a_scale=args.stage_a_scale,
        cfg_rescale=args.cfg_rescale,
    )


class _Progress:
    """One tqdm bar per stage, on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            title = {"prior": "Stage C (prior)", "decoder": "Stage B (decoder)"}.get(event.stage, event.stage)
            self.bar = tqdm(total=event.total, desc=title, unit="step", file=sys.stderr, leave=True)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def output_paths(out: Path, seeds: list[int]) -> list[Path]:
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{seed}{out.suffix or '.png'}") for seed in seeds]


def generate_to_files(args: argparse.Namespace) -> list[Path]:
    from backends import select_backend

    from . import presets, tiny
    from .checkpoints import scan
    from .engine import choose_dtypes, load_pipeline, parse_dtype
    from .infotext import build_infotext, save_png, short_hash
    from .loader import resolve_sources
    from .memory import placement_for
    from .pipeline import to_pil
    from .tensorfile import read_header

    prior_path, decoder_path = (Path(args.prior), Path(args.decoder)) if args.prior else tiny.ensure_tiny_checkpoints()
    preset = args.preset
    if preset == "auto":
        metadata = read_header(prior_path).metadata if prior_path.is_file() else {}
        preset = presets.preset_for_checkpoint(metadata, prior_path.name)
    prompt, negative = presets.apply_preset(None if preset in (None, "none") else preset, args.prompt, args.negative)

    backend = select_backend(args.device)
    request = request_from_args(args, prompt, negative).with_seed()
    validate(request)
    # Plan for exactly what will be loaded: the explicit text encoder / Stage A files and the --dtype.
    sources = resolve_sources(prior_path, decoder_path, text_encoder=args.text_encoder, stage_a=args.stage_a)
    dtype = parse_dtype(args.dtype)
    placement = placement_for(args.offload, backend, prior_path, decoder_path, request, vram=args.vram,
                              dtypes=choose_dtypes(backend, dtype), sources=sources)
    pipe, report = load_pipeline(prior_path, decoder_path, backend=backend, dtype=dtype, placement=placement,
                                 sources=sources)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    progress = _Progress(enabled=not args.quiet)
    try:
        result = pipe.generate(request, callback=progress)
    finally:
        progress.close()

    hash_cache = tiny.cache_dir() / "hashes.json"
    names = {"prior_name": scan(prior_path).name, "decoder_name": scan(decoder_path).name,
             "prior_hash": short_hash(prior_path, hash_cache), "decoder_hash": short_hash(decoder_path, hash_cache)}
    extra = {"Preset": preset} if preset not in (None, "none") else {}
    extra["Offload"] = getattr(placement, "name", None)
    written = []
    for image, seed, path in zip(to_pil(result.images), result.seeds, output_paths(Path(args.out), result.seeds)):
        text = build_infotext(result.request, seed, dtypes=result.dtypes, extra=extra, **names)
        written.append(save_png(image, path, text))
    return written
