"""`python -m cascade ...` (or `stable-cascade ...`): generate, inspect, backends, plan, tags, serve, batch.

What a person meets: every mistake is one line on stderr and exit code 2 (an unknown name lists the valid ones),
never a traceback (`-v` shows one for a bug); `--help` shows defaults; a broken pipe is quiet; Ctrl-C or SIGTERM
writes nothing half-done (exit 130 / 143). Flags mirror the model card's parameters; their names are the request's
flat field names (`cascade.request.build_request`), so the CLI, SD.Next and the server accept the same values.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import NoReturn

from .errors import CascadeError

PROG = "python -m cascade"
OFFLOAD_CHOICES = ("auto", "resident", "stage", "stream", "sequential")  # cascade.memory.MODES + auto
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
DEVICE_HELP = "auto, cpu, cuda[:N], rocm, xpu, mps, openvino[:DEVICE]"


class UsageError(CascadeError):
    """A bad command line (argparse's complaint), shown as one line."""


class Terminated(BaseException):
    """SIGTERM: stop like Ctrl-C (nothing half-written), exit 143."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + exiting, so every bad argument is one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):
        """Also record, as `given`, the dests a command's options were set from the command line (not defaults):
        `generate --from PNG` lets those override the PNG. A second parse with every default suppressed says."""
        parsed, extras = super().parse_known_args(args, namespace)
        if self._subparsers is None and args is not None:
            saved = [(action, action.default) for action in self._actions]
            try:
                for action, _ in saved:
                    action.default = argparse.SUPPRESS
                probe, _ = super().parse_known_args(list(args), None)
            finally:
                for action, default in saved:
                    action.default = default
            parsed.given = frozenset(vars(probe))
        return parsed, extras


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as file managers and model pages show sizes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def path_arg(text: str) -> str:
    """A file path flag: refused at parse time when no file can have that name (a NUL byte)."""
    if "\x00" in text:
        raise argparse.ArgumentTypeError(f"{text!r} contains a NUL byte, which no file name can hold")
    return text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where they say something (not for unset options and switches), every option listed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], "", argparse.SUPPRESS) or "%(default)" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _HelpFormatter(prog, max_help_position=34, width=118)


def _sub(sub, name: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_formatter, **kw)


def _names(table: dict) -> str:
    return ", ".join(title for title, _ in table.values())


def _add_model_files(g: argparse.ArgumentParser) -> None:
    g.add_argument("--prior", type=path_arg, help="Stage C file or diffusers folder (the 'main' file); none = the tiny test model")
    g.add_argument("--decoder", type=path_arg, help="Stage B file or diffusers folder (the 'decoder' file)")
    g.add_argument("--text-encoder", type=path_arg, help="CLIP-G file when the prior file has none")
    g.add_argument("--stage-a", type=path_arg, help="Stage A file when the decoder file has none")


def _lora_arg(text: str):
    from .lora import lora_arg  # lazily: torch is not imported to parse flags

    return lora_arg(text)


def _add_generate(sub) -> None:
    from .names import SAMPLERS, SCHEDULERS
    from .presets import PRESETS
    from .request import MAX_SEED, default_decoder, default_prior

    p, d = default_prior(), default_decoder()
    g = _sub(sub, "generate", help="text (or image) to image", description="Generate images with Stable Cascade.")
    g.add_argument("prompt", nargs="?", default=None,
                   help="the prompt (A1111 weights: (word:1.2), BREAK; see --prompt-syntax); optional with --from")
    g.add_argument("--from", dest="from_png", type=path_arg, metavar="PNG",
                   help="make this image again: the settings in its ComfyUI workflow or A1111/SD.Next parameters "
                        "(flags given here override them)")
    g.add_argument("--dry-run", action="store_true", help="with --from: print the settings read, as flags, and exit")
    g.add_argument("--models", type=path_arg, metavar="DIR",
                   help="with --from: find the checkpoints, text encoder, VAE and LoRAs the PNG names in this folder")
    g.add_argument("--negative", "--negative-prompt", dest="negative_prompt", default="", help="negative prompt")
    g.add_argument("--out", type=path_arg, default="out.png", help="output PNG (batch: <stem>-<seed>.png)")
    _add_model_files(g)
    g.add_argument("--width", type=int, default=1024, help="a multiple of 128")
    g.add_argument("--height", type=int, default=1024, help="a multiple of 128")
    g.add_argument("--seed", type=int, default=-1, help=f"-1 = random; 0..{MAX_SEED}; image i of a batch uses seed + i")
    g.add_argument("--batch", dest="batch_size", type=int, default=1, help="images per prompt")
    stage = g.add_argument_group("sampling", f"samplers: {_names(SAMPLERS)}, Default; schedulers: "
                                             f"{_names(SCHEDULERS)}, Default (any spelling SD.Next or ComfyUI uses)")
    stage.add_argument("--steps", "--prior-steps", dest="prior_steps", type=int, default=p.steps, help="Stage C steps")
    stage.add_argument("--cfg", "--prior-cfg", dest="prior_cfg", type=float, default=p.cfg, help="Stage C CFG")
    stage.add_argument("--prior-sampler", default=p.sampler, help="Stage C sampler")
    stage.add_argument("--prior-scheduler", default=p.scheduler, help="Stage C schedule")
    stage.add_argument("--prior-shift", type=float, default=p.shift, help="Stage C schedule shift")
    stage.add_argument("--decoder-steps", type=int, default=d.steps, help="Stage B steps")
    stage.add_argument("--decoder-cfg", type=float, default=d.cfg, help="Stage B CFG (card: 1-1.2)")
    stage.add_argument("--decoder-sampler", default=d.sampler, help="Stage B sampler")
    stage.add_argument("--decoder-scheduler", default=d.scheduler, help="Stage B schedule")
    stage.add_argument("--decoder-shift", type=float, default=d.shift, help="Stage B schedule shift")
    stage.add_argument("--decoder-seed", type=int, default=None, help="Stage B seed (ComfyUI's second KSampler); "
                                                                       "default: the seed")
    stage.add_argument("--compression", type=float, default=42.0, help="Stage C compression (model card: 42, 32-64)")
    stage.add_argument("--stage-a-scale", type=float, default=0.43, help="0.43 (original, ComfyUI) or 0.3764 (diffusers)")
    stage.add_argument("--cfg-rescale", type=float, default=0.0, help="original code's CFG rescale (0.7 there); 0 = off")
    stage.add_argument("--noise", choices=("cpu", "comfyui"), default="cpu",
                       help="cpu: seed + i per image, the same on every device; comfyui: ComfyUI's KSampler noise")
    stage.add_argument("--prompt-syntax", choices=("a1111", "comfyui"), default="a1111",
                       help="prompt weights: a1111 ((x), [x], (x:1.2), BREAK; SD.Next's) or comfyui (ComfyUI's)")
    stage.add_argument("--preset", default="auto", choices=("auto", "none", *PRESETS),
                       help="prompt preset: auto (by checkpoint name/metadata), none, or a preset")
    images = g.add_argument_group("image inputs")
    images.add_argument("--image", type=path_arg, help="init image: Stage C starts from its encoding (img2img)")
    images.add_argument("--denoise", dest="prior_denoise", type=float, default=1.0,
                        help="img2img strength for --image (1 = ignore the image)")
    images.add_argument("--decoder-image", type=path_arg, help="Stage B starts from this image's Stage A encoding")
    images.add_argument("--decoder-denoise", type=float, default=1.0, help="strength for --decoder-image")
    images.add_argument("--image-prompt", dest="image_prompts", type=path_arg, action="append", default=[],
                        help="image prompt (image variations through CLIP vision); repeatable")
    images.add_argument("--image-prompt-strength", type=float, default=1.0, help="weight of the image prompts")
    images.add_argument("--upscale", type=int, default=1, help="Stage B renders at this multiple of the size (1-4)")
    images.add_argument("--stage-c-encoder", type=path_arg, help="EfficientNet encoder file for --image when the main file has none")
    images.add_argument("--clip-vision", type=path_arg, help="CLIP-L vision file for --image-prompt when the main file has none")
    images.add_argument("--previewer", type=path_arg, help="Stage C previewer file for --preview when the main file has none")
    images.add_argument("--preview", type=path_arg, help="keep writing a live preview PNG of the first image here")
    images.add_argument("--preview-dir", type=path_arg,
                        help="write every preview of the first image here as <stage>-<step>.png")
    images.add_argument("--preview-every", type=int, default=4,
                        help="steps between previews (with --preview / --preview-dir; the last step always)")
    _add_device_args(g)
    g.add_argument("--lora", dest="loras", action="append", default=[], type=_lora_arg,
                   metavar="FILE[:WEIGHT[:TE_WEIGHT]]",
                   help="a LoRA (repeatable); WEIGHT default 1, TE_WEIGHT default WEIGHT (README: LoRA)")
    g.add_argument("--controlnet", dest="controlnets", action="append", default=[], type=path_arg,
                   metavar="FILE:IMAGE[:STRENGTH[:START:END]]",
                   help="a Stage C ControlNet (repeatable); IMAGE = PATH, PATH,MASK (inpainting, white = repaint), "
                        "canny=PHOTO or canny@LOW,HIGH=PHOTO (README: ControlNets)")
    g.add_argument("--quiet", action="store_true", help="no progress lines or bars")


def _add_device_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--device", default=None, help=DEVICE_HELP + " (default: the best this machine has)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="UNet dtype (auto: the backend's; Stage C never fp16 unless asked)")
    g.add_argument("--offload", default="auto", choices=OFFLOAD_CHOICES, help="memory plan")
    g.add_argument("--vram", default=None, help="memory budget for the plan, e.g. 16GiB (default: free device memory)")


def _generate_options() -> dict[str, str]:
    """dest -> the option string that spells it best (`--prior-steps` over `--steps`), for `--dry-run`."""
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    return {a.dest: next((o for o in a.option_strings if o == "--" + a.dest.replace("_", "-")), a.option_strings[0])
            for a in sub._actions if a.option_strings}


def cmd_generate(args: argparse.Namespace) -> int:
    from .run import generate_to_files

    if args.from_png:
        from .errors import InvalidRequestError
        from .recall import as_flags, merge_args, recall_png

        recalled = recall_png(args.from_png)
        args, problems = merge_args(args, recalled, set(getattr(args, "given", ())))
        if args.dry_run:
            print(as_flags(args, recalled, _generate_options(), set(getattr(args, "given", ()))))
            for problem in problems:
                print(f"note: {problem}", file=sys.stderr)
            return 0
        if problems:
            raise InvalidRequestError(f"--from {args.from_png}: " + "; ".join(problems))
    elif args.dry_run:
        raise UsageError(f"{PROG} generate: --dry-run needs --from PNG (see --help)")
    if args.prompt is None:
        raise UsageError(f"{PROG} generate: a PROMPT is needed, or --from PNG (see --help)")
    for path, seed in generate_to_files(args):
        print(path)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoints import PART_TITLES, describe, printable, scan

    status, documents = 0, []
    for path in args.files:
        try:
            info = describe(scan(path))
        except (CascadeError, OSError) as err:
            documents.append({"path": str(path), "error": str(err)})
            if not args.json and len(args.files) > 1:  # one file: the error line below says it all
                print(f"{printable(str(path))}: ERROR: {err}")
            status = 2
            continue
        documents.append(info)
        if args.json:
            continue
        print(f"{printable(str(path))}: {info['title']}")
        for kind, part in info["parts"].items():
            variant = part["variant"] or "-"
            print(f"  {PART_TITLES[kind]:<30} {part['layout']:<10} {variant:<8} {part['dtype']:<5} "
                  f"{part['tensors']:>5} tensors {part['parameters'] / 1e6:>9.1f} M params {human_bytes(part['bytes']):>10}")
        unknown = info["unknown_tensors"]
        print(f"  unknown tensors: {len(unknown)}"
              + (f" (e.g. {', '.join(printable(k) for k in unknown[:5])})" if unknown else ""))
    if args.json:
        print(json.dumps(documents, indent=2))
    failed = [d for d in documents if "error" in d]
    if len(documents) == 1 and failed:
        _error(f"{printable(failed[0]['path'])}: {failed[0]['error']}")
    elif failed:
        _error(f"{len(failed)} of {len(documents)} files could not be used (reasons above)")
    return status


def cmd_backends(args: argparse.Namespace) -> int:
    from cascade_backends import doctor, select_backend

    from .precision import advice

    selected, problem = None, None
    try:
        selected = select_backend(args.device)
    except Exception as err:  # noqa: BLE001 - the doctor still shows what exists and why the request failed
        problem = str(err)
    report = doctor.report(selected, requested=args.device, advisor=advice)
    print(json.dumps(report, indent=2, default=str) if args.json else doctor.format_report(report))
    if problem:
        print(f"error: requested backend unavailable: {problem}", file=sys.stderr)
    return 0 if selected is not None else 2


def cmd_plan(args: argparse.Namespace) -> int:
    from .memory import format_plan
    from .run import plan_for_args

    plan, dtype_note = plan_for_args(args)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
        print(dtype_note)
    if not plan.fits:
        from .memory import PlanDoesNotFit

        _error(str(PlanDoesNotFit(plan)))
    return 0 if plan.fits else 2


def cmd_tags(args: argparse.Namespace) -> int:
    from .presets import format_tag_table

    print(format_tag_table())
    return 0


def _add_serving(sub) -> dict:
    """`serve` and `batch` live in serving/ (imported only for their flags; the server packages load when run)."""
    try:
        from serving.cli import add_batch_parser, add_serve_parser, run_batch, run_serve
    except ImportError:  # an install without serving/: the engine commands still work
        return {}
    for add in (add_serve_parser, add_batch_parser):
        add(sub).formatter_class = _formatter
    return {"serve": run_serve, "batch": run_batch}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog=PROG, description="Stable Cascade engine (offline).", formatter_class=_formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and a traceback for internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_generate(sub)
    i = _sub(sub, "inspect", help="say what checkpoint files are (headers only)")
    i.add_argument("files", nargs="+", type=path_arg, help="checkpoint files or diffusers folders")
    i.add_argument("--json", action="store_true", help="one JSON list, one entry per file")
    b = _sub(sub, "backends", help="what this machine offers and what would be chosen")
    b.add_argument("--device", default=None, help=DEVICE_HELP)
    b.add_argument("--json", action="store_true", help="the report as JSON")
    pl = _sub(sub, "plan", help="the memory plan for a size and budget (headers only, no loading)")
    _add_model_files(pl)
    pl.add_argument("--width", type=int, default=1024, help="image width")
    pl.add_argument("--height", type=int, default=1024, help="image height")
    pl.add_argument("--batch", dest="batch_size", type=int, default=1, help="images per run")
    pl.add_argument("--compression", type=float, default=42.0, help="Stage C compression")
    pl.add_argument("--cfg", dest="prior_cfg", type=float, default=7.0, help="Stage C CFG (1 = one pass)")
    pl.add_argument("--decoder-cfg", type=float, default=1.0, help="Stage B CFG")
    pl.add_argument("--variant", choices=("big", "lite"), default="big",
                    help="without --prior/--decoder: plan for the official big or lite models")
    _add_device_args(pl)
    pl.add_argument("--json", action="store_true", help="the plan as JSON")
    _sub(sub, "tags", help="the SoteDiffusion tag vocabulary")
    commands = {"generate": cmd_generate, "inspect": cmd_inspect, "backends": cmd_backends, "plan": cmd_plan,
                "tags": cmd_tags, **_add_serving(sub)}
    return parser, commands


def _on_sigterm(signum, frame) -> NoReturn:
    raise Terminated()


def _quiet_broken_pipe() -> int:
    """Stdout's reader went away (`| head`): stop without a traceback, and keep Python's exit flush quiet too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a process killed by the broken pipe


def main(argv: list[str] | None = None) -> int:
    verbose = "-v" in (argv if argv is not None else sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (a host calling main): leave signals to it
        pass
    try:
        parser, commands = build_parser()
        args = parser.parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return commands[args.command](args)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (CascadeError, OSError) as err:  # OSError: a file that is missing, unreadable or fails to read
        _error(str(err) if isinstance(err, CascadeError) or not err.strerror else f"{err.strerror}: {err.filename}")
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; nothing half-written was left", file=sys.stderr)
        return 143
    except Exception as err:  # noqa: BLE001 - a bug or an unexpected runtime failure: one line, traceback with -v
        from .errors import describe_unexpected

        if verbose:
            import traceback

            traceback.print_exc()
        _error(describe_unexpected(err) + ("" if verbose else " (run with -v for the traceback)"))
        return 1


def _error(message: str) -> None:
    """One line: newlines in a message (a path, a file's text) would make it several."""
    try:
        print("error: " + " ".join(message.split()), file=sys.stderr)
    except BrokenPipeError:
        pass
