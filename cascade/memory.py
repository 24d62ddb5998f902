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

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .activations import Shape, default_model, stage_a_working_height
from .errors import CascadeError, InvalidRequestError
from .names import COMPONENTS

GiB = 1024**3
MODES = ("resident", "stage", "stream", "sequential")
PHASES = COMPONENTS  # one phase per component, in execution order
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


class PlanInputError(InvalidRequestError):
    """A budget that cannot be read (`--vram lots`) or is not known."""


class PlanDoesNotFit(CascadeError):
    """No plan fits the budget; `plan` holds every option's numbers and the largest size that would fit."""

    def __init__(self, plan: "Plan"):
        self.plan = plan
        s = plan.shape
        hint = (f"; the largest size that fits is {plan.largest_fitting[0]}x{plan.largest_fitting[1]}"
                if plan.largest_fitting else "")
        super().__init__(f"{s.width}x{s.height} (batch {s.batch}) does not fit in {plan.budget / GiB:.2f} GiB with "
                         f"any memory plan{hint}. Lower the size or batch, or use a lite model.")


def parse_size(text: str) -> int:
    """'16GiB', '12GB', '8000MiB', '15.5G' (G = GiB) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise PlanInputError(f"cannot read memory size {text!r}; write a positive size such as 16GiB, 12GB or 8000MiB")
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
    # Per phase: bytes of the parts only some requests use (cascade.side_parts: Stage C encoder and CLIP vision
    # after text encoding, the previewer during Stage C, Stage A's encoder in the decoder phase), weights and
    # activations together; they are on the device only while used, so they count like activations.
    extras: dict[str, int] = field(default_factory=dict)

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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _block_order(name: str) -> tuple[int, int, int]:
    direction, level, index = name.split(".")[0], *map(int, name.split(".")[1:])
    return (0 if direction == "down_blocks" else 1, level, index)


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
            work = Shape(shape.width, stage_a_working_height(shape.width, shape.height))
        else:
            work = shape
        act[phase] = model.predict(phase, work, sizes.itemsize[phase]) + sizes.extras.get(phase, 0)
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
        raise PlanInputError(f"unknown offload mode {mode!r}; use auto, {', '.join(MODES)}")
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


def budget_for(backend, vram: str | None) -> int:
    """`vram` when given, else the device's free memory (on the CPU: available RAM)."""
    if vram:
        return parse_size(vram)
    info = backend.memory()
    if info.free is None:
        raise PlanInputError(f"{backend.name} does not report free memory; pass --vram (e.g. --vram 16GiB)")
    return int(info.free)


def require_fit(plan: Plan) -> Option:
    """The chosen option, or PlanDoesNotFit carrying the plan (callers read `.largest_fitting`, not the text)."""
    if plan.chosen is None:
        raise PlanDoesNotFit(plan)
    return plan.chosen
