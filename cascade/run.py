"""The command-line jobs: `generate` (request from flags, pipeline from `cascade.session`, progress, PNGs with
infotext) and `plan` (the memory plan from headers or the shipped full-size table, no loading)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli import human_bytes
from .request import GenerationRequest, build_request, request_field_names, with_fields
from .session import LoadEvent, PipelineSpec

TINY_NOTICE = (
    "No --prior/--decoder given: using the embedded TINY model with RANDOM weights (for testing the pipeline; "
    "the image is noise-like). Pass --prior MAIN.safetensors --decoder DECODER.safetensors for real images."
)
COMPONENT_TITLES = {"text_encoder": "CLIP-G text encoder", "prior": "Stage C (prior)", "decoder": "Stage B (decoder)",
                    "vqgan": "Stage A (VQGAN)"}
IMAGE_FLAGS = {"image": "init image", "decoder_image": "decoder image"}


def _say(args: argparse.Namespace, text: str, end: str = "\n") -> None:
    if not args.quiet:
        print(text, file=sys.stderr, end=end, flush=True)


def spec_from_args(args: argparse.Namespace) -> PipelineSpec:
    from .errors import CascadeError

    from .memory import parse_size

    if args.vram is not None:
        parse_size(args.vram)  # a bad budget is refused even where the plan would not need it (CPU residency)
    if bool(args.prior) != bool(args.decoder):
        raise CascadeError("Give both --prior (Stage C 'main' file) and --decoder (Stage B file), or neither for the "
                           "tiny model.")
    return PipelineSpec(prior=args.prior, decoder=args.decoder, text_encoder=args.text_encoder, stage_a=args.stage_a,
                        device=args.device, dtype=args.dtype, offload=args.offload, vram=args.vram,
                        stage_c_encoder=getattr(args, "stage_c_encoder", None),
                        clip_vision=getattr(args, "clip_vision", None), previewer=getattr(args, "previewer", None))


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The request the flags describe (argparse dests are the request's flat field names), images opened and
    checked, seeds made concrete so the output names are known before anything loads."""
    from .controlnet import SR_COMPRESSION, entry_from_spec, super_resolution_size
    from .images import load_image
    from .lora import read_lora

    fields = {name: getattr(args, name) for name in request_field_names() if hasattr(args, name)}
    for name, what in IMAGE_FLAGS.items():
        if fields.get(name) is not None:
            fields[name] = load_image(fields[name], f"{what} {Path(fields[name]).name}")
    fields["image_prompts"] = tuple(load_image(p, f"image prompt {i + 1} {Path(p).name}")
                                    for i, p in enumerate(fields.get("image_prompts") or ()))
    if getattr(args, "preview", None) or getattr(args, "preview_dir", None):
        fields["preview_every"] = args.preview_every
    fields["loras"] = tuple(fields.get("loras") or ())
    for path, _, _ in fields["loras"]:
        read_lora(path)  # a missing file, not a LoRA, another family's or an unsupported type: before any load
    fields["controlnets"] = tuple(entry_from_spec(s) for s in fields.get("controlnets") or ())
    doubled = super_resolution_size(fields["controlnets"])
    if doubled is not None:  # a super-resolution ControlNet: twice its image, unless the size was typed
        given = getattr(args, "given", frozenset())
        sr = {"width": doubled[0], "height": doubled[1], "compression": SR_COMPRESSION}
        fields.update({k: v for k, v in sr.items() if k not in given})
    return build_request(fields).with_seed()


def output_paths(out: Path, seeds: list[int]) -> list[Path]:
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{seed}{out.suffix or '.png'}") for seed in seeds]


class _Progress:
    """Step bars per stage on stderr, the Stage A line after the last decoder step, and the live preview file."""

    def __init__(self, enabled: bool, preview: Path | None = None, preview_dir: Path | None = None):
        self.enabled = enabled
        self.preview = preview
        self.preview_dir = preview_dir
        self.bar = None
        self.stage = None
        self.decode_started: float | None = None

    def __call__(self, event) -> None:
        if event.preview is not None and self.preview is not None:
            from .atomic import atomic_write

            atomic_write(self.preview, lambda f: event.preview.save(f, format="PNG"), what="preview", durable=False)
        if event.preview is not None and self.preview_dir is not None:
            from .atomic import atomic_write

            target = self.preview_dir / f"{event.stage}-{event.step:04d}.png"
            atomic_write(target, lambda f: event.preview.save(f, format="PNG"), what="preview", durable=False)
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=COMPONENT_TITLES.get(event.stage, event.stage), unit="step",
                            file=sys.stderr, leave=True)
        self.bar.update(1)
        if event.stage == "decoder" and event.step == event.total:
            self.close()
            print("Stage A (VQGAN): decoding to pixels...", file=sys.stderr, flush=True)
            self.decode_started = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _load_reporter(args: argparse.Namespace):
    def report(event: LoadEvent) -> None:
        title = COMPONENT_TITLES.get(event.component, event.component)
        dtype = str(event.dtype).removeprefix("torch.")
        if event.seconds is None:
            _say(args, f"loading {event.index}/{event.total} {title} ({human_bytes(event.nbytes)} {dtype})...", end="")
        else:
            _say(args, f" {event.seconds:.1f} s")

    return report


def _hash_bar(args: argparse.Namespace, name: str):
    """A progress bar for the first hashing of a checkpoint (later runs read the cache and show nothing)."""
    state = {}

    def on_progress(done: int, total: int) -> None:
        if args.quiet:
            return
        from tqdm import tqdm

        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=f"hashing {name} (once, cached)", unit="B", unit_scale=True,
                                file=sys.stderr, leave=False)
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return on_progress


def _preset(args: argparse.Namespace, session) -> str | None:
    from . import presets

    if args.preset == "auto":
        checkpoint = session.sources.prior_checkpoint
        return presets.preset_for_checkpoint(checkpoint.metadata, session.prior_path.name)
    return None if args.preset == "none" else args.preset


def generate_to_files(args: argparse.Namespace) -> list[tuple[Path, int]]:
    """Run `generate`: everything the user could have got wrong is checked before the first weight loads."""
    from . import presets
    from .infotext import build_infotext, check_output_target, save_png
    from .lora import infotext_fields
    from .pipeline import to_pil
    from .session import open_pipeline, select_backend
    from .side_parts import check_side_files

    t_start = time.perf_counter()
    spec = spec_from_args(args)
    request = request_from_args(args)
    targets = output_paths(Path(args.out), request.seeds)
    preview_dir = Path(args.preview_dir) if getattr(args, "preview_dir", None) else None
    for target in targets + ([Path(args.preview)] if getattr(args, "preview", None) else []) + (
            [preview_dir / "prior-0001.png"] if preview_dir is not None else []):
        check_output_target(target)
    if preview_dir is not None:
        preview_dir.mkdir(parents=True, exist_ok=True)
    check_side_files(spec.side_files())  # --stage-c-encoder / --clip-vision / --previewer: headers, before loading
    backend = select_backend(spec.device)
    if spec.is_tiny:
        print(TINY_NOTICE, file=sys.stderr)
    session = open_pipeline(spec, backend=backend, request=request, on_load=_load_reporter(args))
    for note in session.notes:
        print(f"note: {note}", file=sys.stderr)
    preset = _preset(args, session)
    prompt, negative = presets.apply_preset(preset, request.prompt, request.negative_prompt)
    request = with_fields(request, prompt=prompt, negative_prompt=negative)

    progress = _Progress(enabled=not args.quiet, preview=Path(args.preview) if getattr(args, "preview", None) else None,
                         preview_dir=preview_dir)
    try:
        result = session.pipeline.generate(request, callback=progress)
    finally:
        progress.close()
    if progress.decode_started is not None:
        _say(args, f"Stage A (VQGAN): {result.timings.get('vqgan', 0.0):.1f} s")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    names = session.model_names(on_progress=lambda name: _hash_bar(args, name))
    extra = {"Preset": preset} if preset else {}
    extra["Offload"] = session.placement_name
    extra.update(infotext_fields(entry[0] for entry in result.request.loras))
    written = []
    for image, seed, path in zip(to_pil(result.images), result.seeds, targets):
        text = build_infotext(result.request, seed, dtypes=result.dtypes, extra=extra, **names)
        written.append((save_png(image, path, text), seed))
        _say(args, f"saved {path} (seed {seed}, {image.width}x{image.height})")
    _say(args, f"done in {time.perf_counter() - t_start:.1f} s")
    return written


def plan_for_args(args: argparse.Namespace):
    """The plan `generate` would make for these flags: header sizes of the given files, or the official models'
    from the shipped table; the dtypes `generate` would use on this device unless --dtype says otherwise."""
    from .precision import choose_dtypes
    from .session import open_sources, plan_for_sizes, select_backend
    from .sizing import full_size, sizes_from_sources

    request = build_request(prompt="", width=args.width, height=args.height, batch_size=args.batch_size,
                            compression=args.compression, prior_cfg=args.prior_cfg, decoder_cfg=args.decoder_cfg)
    backend = select_backend(args.device)
    dtypes = choose_dtypes(backend, args.dtype)
    if args.prior or args.decoder:
        _, _, sources = open_sources(spec_from_args(args))
        sizes = sizes_from_sources(sources, dtypes)
    else:
        sizes = full_size(dtypes, args.variant, args.variant)
    plan = plan_for_sizes(sizes, backend, request, args.offload, args.vram)
    unets = f"Stage C {_dtype(dtypes['prior'])}, Stage B {_dtype(dtypes['decoder'])}"
    why = "as given by --dtype" if args.dtype != "auto" else f"what generate uses on {backend.name}; --dtype to change"
    return plan, f"weights: {unets}, text encoder {_dtype(dtypes['text_encoder'])} ({why})"


def _dtype(dtype) -> str:
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}.get(str(dtype), str(dtype))
