"""`python -m cascade ...`: generate, inspect, backends, plan, tags.

Flags mirror the model card's parameters. Errors the user can fix are printed as one clear message with exit
code 2; nothing is written unless the whole image is ready (PNG writes are atomic).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import CascadeError

_TINY_NOTICE = (
    "No --prior/--decoder given: using the embedded TINY model with RANDOM weights (for testing the pipeline; "
    "the image is noise-like). Pass --prior MAIN.safetensors --decoder DECODER.safetensors for real images."
)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.1f} GB"


def _add_generate(sub) -> None:
    from .request import default_decoder, default_prior

    p, d = default_prior(), default_decoder()
    g = sub.add_parser("generate", help="text to image", description="Generate images with Stable Cascade.")
    g.add_argument("prompt")
    g.add_argument("--negative", "--negative-prompt", dest="negative", default="")
    g.add_argument("--out", default="out.png", help="output PNG (batch: <stem>-<seed>.png)")
    g.add_argument("--prior", help="Stage C file or diffusers folder (the 'main' file)")
    g.add_argument("--decoder", help="Stage B file or diffusers folder (the 'decoder' file)")
    g.add_argument("--text-encoder", help="CLIP-G file when the prior file has none")
    g.add_argument("--stage-a", help="Stage A file when the decoder file has none")
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--seed", type=int, default=-1, help="-1 = random; image i of a batch uses seed + i")
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--steps", "--prior-steps", dest="prior_steps", type=int, default=p.steps)
    g.add_argument("--cfg", "--prior-cfg", dest="prior_cfg", type=float, default=p.cfg)
    g.add_argument("--prior-sampler", default=p.sampler)
    g.add_argument("--prior-scheduler", default=p.scheduler)
    g.add_argument("--prior-shift", type=float, default=p.shift)
    g.add_argument("--decoder-steps", type=int, default=d.steps)
    g.add_argument("--decoder-cfg", type=float, default=d.cfg)
    g.add_argument("--decoder-sampler", default=d.sampler)
    g.add_argument("--decoder-scheduler", default=d.scheduler)
    g.add_argument("--decoder-shift", type=float, default=d.shift)
    g.add_argument("--denoise", type=float, default=1.0, help="prior denoise strength (<1 for image-to-image)")
    g.add_argument("--compression", type=float, default=42.0, help="Stage C compression (model card: 42, 32-64)")
    g.add_argument("--stage-a-scale", type=float, default=0.43, help="0.43 (original, ComfyUI) or 0.3764 (diffusers)")
    g.add_argument("--cfg-rescale", type=float, default=0.0, help="original code's CFG rescale (0.7 there); 0 = off")
    g.add_argument("--preset", default="auto", help="prompt preset: auto (by checkpoint), none, or a preset name")
    g.add_argument("--device", default=None, help="auto, cpu, cuda[:N], rocm, xpu, mps, openvino[:DEVICE]")
    g.add_argument("--dtype", default="auto", help="UNet dtype: auto, bf16, fp16, fp32 (Stage C never fp16 unless asked)")
    g.add_argument("--offload", default="auto", help="memory plan: auto, resident, stage, stream, sequential")
    g.add_argument("--vram", default=None, help="memory budget for the plan, e.g. 16GiB (default: free device memory)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_generate(args: argparse.Namespace) -> int:
    from .run import generate_to_files

    if bool(args.prior) != bool(args.decoder):
        raise CascadeError("Give both --prior (Stage C 'main' file) and --decoder (Stage B file), or neither for the tiny model.")
    if not args.prior:
        print(_TINY_NOTICE, file=sys.stderr)
    paths = generate_to_files(args)
    for path in paths:
        print(path)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoints import PART_TITLES, describe, scan

    status = 0
    for path in args.files:
        try:
            info = describe(scan(path))
        except CascadeError as err:
            if args.json:
                print(json.dumps({"path": str(path), "error": str(err)}))
            else:
                print(f"{path}: ERROR: {err}")
            status = 2
            continue
        if args.json:
            print(json.dumps(info, indent=2))
            continue
        print(f"{path}: {info['title']}")
        for kind, part in info["parts"].items():
            variant = part["variant"] or "-"
            print(
                f"  {PART_TITLES[kind]:<30} {part['layout']:<10} {variant:<8} {part['dtype']:<5} "
                f"{part['tensors']:>5} tensors {part['parameters'] / 1e6:>9.1f} M params {_human_bytes(part['bytes']):>10}"
            )
        unknown = info["unknown_tensors"]
        print(f"  unknown tensors: {len(unknown)}" + (f" (e.g. {', '.join(unknown[:5])})" if unknown else ""))
    return status


def cmd_backends(args: argparse.Namespace) -> int:
    from backends import doctor, select_backend

    selected = None
    try:
        selected = select_backend(args.device)
    except Exception as err:  # the doctor still shows what exists and why the request failed
        print(f"requested backend unavailable: {err}", file=sys.stderr)
    report = doctor.report(selected, requested=args.device)
    print(json.dumps(report, indent=2, default=str) if args.json else doctor.format_report(report))
    return 0 if selected is not None else 2


def cmd_plan(args: argparse.Namespace) -> int:
    from .memory import format_plan, plan_from_args

    plan = plan_from_args(args)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 2


def cmd_tags(args: argparse.Namespace) -> int:
    from .presets import format_tag_table

    print(format_tag_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cascade", description="Stable Cascade engine (offline).")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    i = sub.add_parser("inspect", help="say what a checkpoint file is")
    i.add_argument("files", nargs="+")
    i.add_argument("--json", action="store_true")
    b = sub.add_parser("backends", help="what this machine offers and what would be chosen")
    b.add_argument("--device", default=None)
    b.add_argument("--json", action="store_true")
    pl = sub.add_parser("plan", help="print the memory plan for a size and budget")
    pl.add_argument("--vram", default=None, help="budget, e.g. 16GiB, 12GB, 8000MiB (default: this device's free memory)")
    pl.add_argument("--width", type=int, default=1024)
    pl.add_argument("--height", type=int, default=1024)
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--compression", type=float, default=42.0)
    pl.add_argument("--cfg", type=float, default=7.0)
    pl.add_argument("--decoder-cfg", type=float, default=1.0)
    pl.add_argument("--prior", help="Stage C file (sizes read from its header); default: full-size bf16 figures")
    pl.add_argument("--decoder", help="Stage B file")
    pl.add_argument("--dtype", default="bf16", help="weights dtype on the device: bf16, fp16, fp32")
    pl.add_argument("--device", default=None)
    pl.add_argument("--json", action="store_true")
    sub.add_parser("tags", help="the SoteDiffusion tag vocabulary")
    return parser


COMMANDS = {"generate": cmd_generate, "inspect": cmd_inspect, "backends": cmd_backends, "plan": cmd_plan, "tags": cmd_tags}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except CascadeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
