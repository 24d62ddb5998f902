"""Memory planner: which components sit on the device in each phase, so a generation fits the card.

Inputs are real numbers, not guesses by file size: weight bytes per component from the checkpoint headers (element
counts x the chosen compute dtype), streamable block sizes from the same headers, and activation peaks from the
fitted activation model (cascade.activations, measured on the full-size models). The budget is the device's free
memory (or `--vram`) minus a safety margin for the driver context, allocator rounding and kernel workspaces.

Plans, cheapest first; the first that fits is chosen:
- resident:   everything stays on the device; nothing moves between images.
- stage:      text encoder, then Stage C, then Stage B + A: only the running stage's weights are on the device;
              each is uploaded from pinned host memory when its phase starts.
- stream:     like stage, but a stage too big for the budget keeps as many of its blocks resident as fit and
              streams the others in per forward pass (next block prefetched while the current one computes).
- sequential: every block of the big stages streams through one buffer; the last resort.
A plan that cannot fit says so before anything is loaded, with the largest size that would.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .activations import Shape, default_model

GiB = 1024**3
MODES = ("resident", "stage", "stream", "sequential")
PHASES = ("text_encoder", "prior", "decoder", "vqgan")
COMPONENTS = ("text_encoder", "prior", "decoder", "vqgan")
STREAMABLE = ("prior", "decoder")
# Which components a phase needs on the device under the stage-style plans.
STAGE_NEEDS = {
    "text_encoder": ("text_encoder",),
    "prior": ("prior",),
    "decoder": ("decoder", "vqgan"),
    "vqgan": ("decoder", "vqgan"),
}
MARGIN_FIXED = GiB // 2  # driver context, allocator segments
MARGIN_FRACTION = 0.05  # fragmentation and kernel workspaces, proportional to the card
_BLOCK = re.compile(r"^((?:down|up)_blocks\.\d+\.\d+)\.")


def parse_size(text: str) -> int:
    """'16GiB', '12GB', '8000MiB', '15.5G' (G = GiB) -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 16GiB, 12GB or 8000MiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = " KMGT".index(unit or " ")
    base = 1000 if (unit and not binary and text.strip().upper().endswith("B")) else 1024
    return int(value * base**power)


def usable_bytes(budget: int) -> int:
    return max(0, int(budget - MARGIN_FIXED - MARGIN_FRACTION * budget))


# --- sizes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentSizes:
    """Weight bytes per component at its compute dtype, element sizes, and per-block bytes of the UNets."""

    weights: dict[str, int]
    itemsize: dict[str, int]
    blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)  # execution order

    def rest(self, component: str) -> int:
        """Bytes of a UNet outside its down/up blocks (embeddings, mappers, output): always resident."""
        return self.weights[component] - sum(self.blocks.get(component, ()))

    @classmethod
    def from_bytes(cls, named: dict[str, dict[str, int]], itemsize: dict[str, int]) -> "ComponentSizes":
        """From {component: {state-dict key: bytes on the device}} and each component's compute element size."""
        weights, blocks = {}, {}
        for component, sizes in named.items():
            weights[component] = sum(sizes.values())
            if component in STREAMABLE:
                grouped: dict[str, int] = {}
                for key, n in sizes.items():
                    if m := _BLOCK.match(key):
                        grouped[m.group(1)] = grouped.get(m.group(1), 0) + n
                blocks[component] = tuple(grouped[k] for k in sorted(grouped, key=_block_order))
        return cls(weights, dict(itemsize), blocks)

    @classmethod
    def from_sources(cls, sources, dtypes: dict[str, torch.dtype]) -> "ComponentSizes":
        """Sizes read from checkpoint headers: every tensor the model will hold, at its device dtype."""
        from .loader import keymap_for
        from .pipeline import COMPONENT_OF_PART

        named = {}
        for kind, part in sources.parts().items():
            component = COMPONENT_OF_PART[kind]
            sizes = {}
            for model_key, src in keymap_for(part).items():
                info = part.info(src.key)
                n = info.numel // 3 if src.chunk is not None else info.numel
                floating = info.torch_dtype.is_floating_point
                sizes[model_key] = n * (_itemsize(dtypes[component]) if floating else _itemsize(info.torch_dtype))
            named[component] = sizes
        return cls.from_bytes(named, {c: _itemsize(d) for c, d in dtypes.items()})

    @classmethod
    def full_size(cls, dtypes: dict[str, torch.dtype], prior: str = "big", decoder: str = "big") -> "ComponentSizes":
        """The official models' sizes, counted from their configs (no files needed)."""
        named = {}
        for component, tensors in _full_size_state(prior, decoder).items():
            named[component] = {k: n * (_itemsize(dtypes[component]) if fp else _itemsize(dt)) for k, (n, fp, dt) in tensors.items()}
        return cls.from_bytes(named, {c: _itemsize(d) for c, d in dtypes.items()})


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _block_order(name: str) -> tuple[int, int, int]:
    direction, level, index = name.split(".")[0], *map(int, name.split(".")[1:])
    return (0 if direction == "down_blocks" else 1, level, index)


@functools.lru_cache(maxsize=4)
def _full_size_state(prior: str, decoder: str) -> dict[str, dict[str, tuple[int, bool, torch.dtype]]]:
    """{component: {state-dict key: (numel, is floating, dtype)}} of the official models, built on meta."""
    from . import configs
    from .loader import instantiate

    models = {
        "text_encoder": ("text_encoder", configs.CLIP_G),
        "prior": ("prior", configs.unet_config("prior", prior)),
        "decoder": ("decoder", configs.unet_config("decoder", decoder)),
        "vqgan": ("stage_a", configs.STAGE_A),
    }
    state = {}
    for component, (kind, config) in models.items():
        with torch.device("meta"):
            model = instantiate(kind, dict(config))
        state[component] = {k: (t.numel(), t.is_floating_point(), t.dtype) for k, t in model.state_dict().items()}
    return state


def default_dtypes(weights: str = "bf16") -> dict[str, torch.dtype]:
    """Device dtypes as the backend policy sets them: `weights` for the text encoder and both UNets, Stage A fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[weights]
    return {"text_encoder": dtype, "prior": dtype, "decoder": dtype, "vqgan": torch.float32}


# --- plans ------------------------------------------------------------------------------------------------------


@dataclass
class PhasePlan:
    """Bytes on the device while a phase runs."""

    phase: str
    resident: int  # weights kept on the device for the phase
    streamed: int  # weights of the phase's UNet streamed through per forward pass
    buffers: int  # room for the block(s) in flight while streaming
    activations: int

    @property
    def peak(self) -> int:
        return self.resident + self.buffers + self.activations


@dataclass
class Option:
    """One mode's evaluation."""

    mode: str
    phases: dict[str, PhasePlan]
    bytes_moved: int  # host->device bytes per generation (steady state); streaming assumes one UNet call per step
    fits: bool
    resident_blocks: dict[str, int] = field(default_factory=dict)  # streamed UNets: how many leading blocks stay

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases.values())

    def needs(self, phase: str) -> tuple[str, ...]:
        return COMPONENTS if self.mode == "resident" else STAGE_NEEDS[phase]


@dataclass
class Plan:
    budget: int
    usable: int
    shape: Shape
    steps: dict[str, int]
    options: list[Option]
    chosen: Option | None
    sizes: ComponentSizes | None = None
    largest_fitting: tuple[int, int] | None = None

    @property
    def fits(self) -> bool:
        return self.chosen is not None

    @property
    def mode(self) -> str | None:
        return self.chosen.mode if self.chosen else None

    def option(self, mode: str) -> Option:
        return next(o for o in self.options if o.mode == mode)

    def to_dict(self) -> dict[str, Any]:
        def option_dict(o: Option) -> dict[str, Any]:
            return {"mode": o.mode, "fits": o.fits, "peak_bytes": o.peak, "bytes_moved_per_generation": o.bytes_moved,
                    "phases": {k: {**asdict(v), "peak": v.peak} for k, v in o.phases.items()},
                    "resident_blocks": o.resident_blocks}

        return {
            "budget_bytes": self.budget,
            "usable_bytes": self.usable,
            "margin_bytes": self.budget - self.usable,
            "width": self.shape.width,
            "height": self.shape.height,
            "batch": self.shape.batch,
            "compression": self.shape.compression,
            "fits": self.fits,
            "mode": self.mode,
            "options": [option_dict(o) for o in self.options],
            "largest_fitting": list(self.largest_fitting) if self.largest_fitting else None,
        }


def _activations(sizes: ComponentSizes, shape: Shape) -> dict[str, int]:
    model = default_model()
    act = {}
    for phase in PHASES:
        if phase == "vqgan":  # Stage A decodes one image at a time, in strips (pipeline.decode_in_strips)
            from .pipeline import stage_a_working_height

            work = Shape(shape.width, stage_a_working_height(shape.width, shape.height))
        else:
            work = shape
        act[phase] = model.predict(phase, work, sizes.itemsize[phase])
    return act


def _stage_option(sizes: ComponentSizes, act: dict[str, int], usable: int, mode: str) -> Option:
    w = sizes.weights
    if mode == "resident":
        total = sum(w.values())
        phases = {p: PhasePlan(p, total, 0, 0, act[p]) for p in PHASES}
        return Option(mode, phases, 0, max(p.peak for p in phases.values()) <= usable)
    phases = {p: PhasePlan(p, sum(w[c] for c in STAGE_NEEDS[p]), 0, 0, act[p]) for p in PHASES}
    moved = w["text_encoder"] + w["prior"] + w["decoder"] + w["vqgan"]
    return Option(mode, phases, moved, max(p.peak for p in phases.values()) <= usable)


def _streamed_option(sizes: ComponentSizes, act: dict[str, int], usable: int, calls: dict[str, int], mode: str) -> Option:
    """stream: stream only what does not fit, with a prefetch buffer; sequential: stream every block, one buffer."""
    base = _stage_option(sizes, act, usable, "stage")
    phases = dict(base.phases)
    resident_blocks: dict[str, int] = {}
    moved = sizes.weights["text_encoder"]
    for unet in STREAMABLE:
        partner = sizes.weights["vqgan"] if unet == "decoder" else 0
        blocks = sizes.blocks[unet]
        phase_peak = max(base.phases[p].peak for p in PHASES if unet in STAGE_NEEDS[p])
        if mode == "stream" and phase_peak <= usable:
            resident_blocks[unet] = len(blocks)
            moved += sizes.weights[unet] + partner
            continue
        largest = max(blocks)
        buffers = (2 if mode == "stream" else 1) * largest
        fixed = sizes.rest(unet) + partner + buffers
        room = usable - fixed - max(act[p] for p in PHASES if unet in STAGE_NEEDS[p]) if mode == "stream" else 0
        kept, kept_bytes = 0, 0
        for b in blocks:
            if kept_bytes + b > room:
                break
            kept, kept_bytes = kept + 1, kept_bytes + b
        streamed = sum(blocks[kept:])
        resident_blocks[unet] = kept
        for p in PHASES:
            if unet in STAGE_NEEDS[p]:
                phases[p] = PhasePlan(p, sizes.rest(unet) + kept_bytes + partner, streamed, buffers, act[p])
        moved += sizes.rest(unet) + kept_bytes + partner + streamed * calls[unet]
    fits = max(p.peak for p in phases.values()) <= usable
    return Option(mode, phases, moved, fits, resident_blocks)


def make_plan(
    sizes: ComponentSizes,
    shape: Shape,
    budget: int,
    *,
    steps: dict[str, int] | None = None,
    mode: str = "auto",
    search_largest: bool = True,
) -> Plan:
    """Evaluate every mode; choose the requested one, or the cheapest that fits for mode='auto'."""
    if mode not in ("auto", *MODES):
        raise ValueError(f"unknown offload mode {mode!r}; use auto, {', '.join(MODES)}")
    steps = steps or {"prior": 30, "decoder": 10}
    calls = dict(steps)  # cond and uncond run as one batch: one UNet call per step
    usable = usable_bytes(budget)
    act = _activations(sizes, shape)
    options = [
        _stage_option(sizes, act, usable, "resident"),
        _stage_option(sizes, act, usable, "stage"),
        _streamed_option(sizes, act, usable, calls, "stream"),
        _streamed_option(sizes, act, usable, calls, "sequential"),
    ]
    if mode == "auto":
        chosen = next((o for o in options if o.fits), None)
    else:
        chosen = next(o for o in options if o.mode == mode)
        chosen = chosen if chosen.fits else None
    plan = Plan(budget, usable, shape, steps, options, chosen, sizes)
    if chosen is None and search_largest:
        plan.largest_fitting = _largest_fitting(sizes, shape, budget, steps, mode)
    return plan


def _largest_fitting(sizes: ComponentSizes, shape: Shape, budget: int, steps: dict[str, int], mode: str) -> tuple[int, int] | None:
    """The largest multiple-of-128 size with the same aspect ratio that would fit."""
    aspect = shape.width / shape.height
    long_side = max(shape.width, shape.height)
    for side in range(long_side - 128, 127, -128):
        w, h = (side, round(side / aspect / 128) * 128) if aspect >= 1 else (round(side * aspect / 128) * 128, side)
        if min(w, h) < 128:
            continue
        candidate = Shape(w, h, shape.batch, shape.compression, shape.prior_cfg, shape.decoder_cfg, shape.chunks)
        if make_plan(sizes, candidate, budget, steps=steps, mode=mode, search_largest=False).fits:
            return (w, h)
    return None


def fallback_option(plan: Plan, current: Option) -> Option | None:
    """After an out-of-memory error under `current`: a lower mode with a strictly smaller peak.

    The error means the real budget was smaller than planned, so the plan is redone at shrinking budgets (the
    streamed modes then keep fewer blocks resident); the first lower mode that fits and needs less memory than
    `current` wins, and the sequential plan is the last resort.
    """
    lower = MODES[MODES.index(current.mode) + 1 :]
    if not lower:
        return None
    for factor in (1.0, 0.75, 0.5, 0.25):
        smaller = make_plan(plan.sizes, plan.shape, int(plan.budget * factor), steps=plan.steps, search_largest=False)
        for mode in lower:
            option = smaller.option(mode)
            if option.fits and option.peak < current.peak:
                return option
    return make_plan(plan.sizes, plan.shape, 0, steps=plan.steps, search_largest=False).option("sequential")


def format_plan(plan: Plan) -> str:
    """The human table of `python -m cascade plan`."""
    gib = lambda n: f"{n / GiB:6.2f} GiB"  # noqa: E731
    s = plan.shape
    lines = [
        f"Memory plan for {s.width}x{s.height}, batch {s.batch}, compression {s.compression:g}, "
        f"prior CFG {s.prior_cfg:g}, decoder CFG {s.decoder_cfg:g}",
        f"budget {gib(plan.budget)}  - margin {gib(plan.budget - plan.usable)}  = usable {gib(plan.usable)}",
        "",
        f"{'mode':<11} {'fits':<5} {'peak':>10}  {'text':>10} {'prior':>10} {'decoder':>10} {'vqgan':>10}  {'moved/gen':>10}",
    ]
    for o in plan.options:
        mark = "<-" if plan.chosen is o else ""
        lines.append(
            f"{o.mode:<11} {'yes' if o.fits else 'no':<5} {gib(o.peak)}  "
            + " ".join(gib(o.phases[p].peak) for p in PHASES)
            + f"  {gib(o.bytes_moved)} {mark}"
        )
    lines.append("")
    if plan.fits:
        lines.append(f"chosen: {plan.mode}")
        if plan.chosen.resident_blocks:
            lines.append("streaming: " + ", ".join(f"{k} keeps {v} blocks resident" for k, v in plan.chosen.resident_blocks.items()))
    else:
        hint = f"; the largest size that fits is {plan.largest_fitting[0]}x{plan.largest_fitting[1]}" if plan.largest_fitting else ""
        lines.append(f"does not fit in {gib(plan.budget).strip()} with any plan{hint}. Lower the size or batch, or use a lite model.")
    return "\n".join(lines)


# --- glue for the CLI -------------------------------------------------------------------------------------------


def budget_for(backend, vram: str | None) -> int:
    """`--vram` when given, else the device's free memory (on the CPU: available RAM)."""
    if vram:
        return parse_size(vram)
    info = backend.memory()
    if info.free is None:
        raise ValueError(f"{backend.name} does not report free memory; pass --vram (e.g. --vram 16GiB)")
    return int(info.free)


def validate_shape(shape: Shape) -> None:
    """Refuse sizes a generation would refuse (InvalidRequestError naming the fix) before planning for them: a zero
    width would divide by zero, and a huge one would make the largest-fitting-size search run for hours."""
    from .request import GenerationRequest, validate

    validate(GenerationRequest(prompt="", width=shape.width, height=shape.height, batch_size=shape.batch,
                               compression=shape.compression))


def plan_from_args(args) -> Plan:
    """`python -m cascade plan`: full-size figures, or the sizes read from --prior/--decoder headers."""
    dtypes = default_dtypes(args.dtype)
    shape = Shape(args.width, args.height, args.batch, args.compression, args.cfg, args.decoder_cfg)
    validate_shape(shape)
    if args.prior and args.decoder:
        from .loader import resolve_sources

        sizes = ComponentSizes.from_sources(resolve_sources(args.prior, args.decoder), dtypes)
    else:
        sizes = ComponentSizes.full_size(dtypes)
    if args.vram:
        budget = parse_size(args.vram)
    else:
        from backends import select_backend

        budget = budget_for(select_backend(args.device), None)
    return make_plan(sizes, shape, budget)


def placement_for(mode: str, backend, prior_path, decoder_path, request, vram: str | None = None, dtypes=None,
                  sources=None):
    """The executor for a CLI generation: plan from the headers and the budget, refuse before loading if nothing fits.

    `sources`/`dtypes`: what will actually be loaded (explicit --text-encoder/--stage-a files, --dtype); by default
    the pair's own sources at the backend policy's dtypes.
    """
    from .errors import CascadeError
    from .loader import resolve_sources
    from .offload import Executor

    if backend.device.type == "cpu" and mode == "auto":
        mode = "resident"  # host memory is the device: moving weights around would only copy them
    from .engine import choose_dtypes

    dtypes = dtypes or choose_dtypes(backend, None)
    sizes = ComponentSizes.from_sources(sources or resolve_sources(prior_path, decoder_path), dtypes)
    shape = Shape(request.width, request.height, request.batch_size, request.compression, request.prior.cfg,
                  request.decoder.cfg)
    budget = budget_for(backend, vram)
    plan = make_plan(sizes, shape, budget, steps={"prior": request.prior.steps, "decoder": request.decoder.steps}, mode=mode)
    if not plan.fits:
        raise CascadeError(format_plan(plan).splitlines()[-1].replace("does not fit", f"{request.width}x{request.height} does not fit"))
    return Executor(plan, backend)
