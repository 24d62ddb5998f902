"""The executor of a memory plan: moves whole components at phase boundaries, streams blocks when planned.

Every offloadable component is loaded once into (pinned, where the device supports it) host memory and keeps that
copy for its whole life. Putting it on the device uploads from the host copy; taking it off just drops the device
copy — nothing is copied back, so no weight is copied twice. A streamed UNet keeps its non-block weights and its
first `resident_blocks` blocks on the device for the phase; each other block is uploaded by a forward pre-hook (the
next one prefetched on a side stream where the device has streams) and dropped by a forward hook.

The ledger records the weight bytes on the device after each phase change and the peak while streaming; tests check
it against the plan's prediction. `guard`, when given, is called with the bytes the device would hold before every
upload: it is the allocation boundary where a test stands in for a device that runs out of memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import torch
from torch import nn

from .memory import COMPONENTS, MODES, STREAMABLE, Option, Plan, fallback_option, make_plan

log = logging.getLogger(__name__)


class _Slot(NamedTuple):
    """One parameter or buffer: where it lives in the module tree and its host copy."""

    owner: nn.Module
    name: str
    host: torch.Tensor
    is_param: bool
    counted: bool  # False for non-persistent buffers (CLIP's position ids): they move, but are not weights

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    @property
    def key(self) -> tuple[int, str]:
        """Identity of the slot (the owning module and attribute name); tensor objects are not stable identities."""
        return id(self.owner), self.name

    def point_to(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor

    def current(self) -> torch.Tensor:
        return self.owner._parameters[self.name].data if self.is_param else self.owner._buffers[self.name]


def _slots(module: nn.Module) -> list[_Slot]:
    out = []
    for sub in module.modules():
        out += [_Slot(sub, n, p.data, True, True) for n, p in sub._parameters.items() if p is not None]
        out += [_Slot(sub, n, b, False, n not in sub._non_persistent_buffers_set) for n, b in sub._buffers.items() if b is not None]
    return out


def _block_modules(unet: nn.Module) -> list[nn.Module]:
    """The UNet's down then up blocks, in the order the memory plan counts them."""
    return [block for level in unet.down_blocks for block in level] + [block for level in unet.up_blocks for block in level]


class _Weights:
    """A component's (or one block's) slots, and how many of its weight bytes are on the device now."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.slots = _slots(module)
        self.nbytes = sum(s.nbytes for s in self.slots if s.counted)
        self.device_bytes = 0
        self.ready = None  # copy-finished event when uploaded on a side stream

    @property
    def on_device(self) -> bool:
        return self.device_bytes > 0

    def upload(self, device: torch.device, non_blocking: bool, skip: frozenset = frozenset()) -> int:
        """Copy every slot not in `skip` (slot keys) to the device; returns the weight bytes moved.

        All or nothing: when a copy fails (out of memory halfway through), the slots already copied are pointed back
        at their host copies before the error propagates, so no device memory stays held by a part that the ledger
        (and `Executor._drop`) believes is off the device.
        """
        moved = 0
        try:
            for slot in self.slots:
                if slot.key in skip:
                    continue
                slot.point_to(slot.host.to(device, non_blocking=non_blocking))
                moved += slot.nbytes if slot.counted else 0
        except BaseException:
            for slot in self.slots:
                if slot.key not in skip:
                    slot.point_to(slot.host)
            self.device_bytes = 0
            raise
        self.device_bytes = moved
        return moved

    def drop(self) -> int:
        """Point every slot back at its host copy (the device copy is freed); returns the weight bytes released."""
        for slot in self.slots:
            slot.point_to(slot.host)
        released, self.device_bytes = self.device_bytes, 0
        return released

    def bring_home(self, to_host: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Make host copies of weights whose only copy is on the device (leaving a resident plan)."""
        self.slots = [s._replace(host=to_host(s.host)) for s in self.slots]


@dataclass
class Ledger:
    """Weight bytes on the device: after each phase change, and the peak (streaming adds blocks in flight)."""

    after_enter: dict[str, int] = field(default_factory=dict)
    current: int = 0
    peak: int = 0

    def add(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)


class Executor:
    """Runs a `memory.Plan` (see module doc); implements cascade.pipeline.Placement."""

    def __init__(self, plan: Plan, backend, guard: Callable[[int], None] | None = None):
        if plan.chosen is None:
            raise ValueError("the plan does not fit; refuse before loading instead of executing it")
        self.plan = plan
        self.option: Option = plan.chosen
        self.backend = backend
        self.device = backend.device
        self.host_device = torch.device("cpu")
        self.guard = guard
        self.ledger = Ledger()
        self._pin = backend.pinned_host_memory
        self._parts: dict[str, _Weights] = {}
        self._blocks: dict[str, list[_Weights]] = {}
        self._hooks: dict[str, list] = {}

    @property
    def name(self) -> str:
        return self.option.mode

    # --- Placement protocol ----------------------------------------------------------------------------------
    def initial_device(self, component: str) -> torch.device:
        return self.device if self.option.mode == "resident" else self.host_device

    def pins_host_memory(self, component: str) -> bool:
        return self._pin and self.option.mode != "resident"

    def enter(self, phase: str, components: dict[str, nn.Module]) -> None:
        self._adopt(components)
        needed = set(self.option.needs(phase))
        for name in COMPONENTS:
            if name not in needed:
                self._drop(name)
            elif not self._parts[name].on_device:
                self._upload(name)
        self._check(0)  # the phase's working set itself must fit (resident plans upload nothing)
        self.ledger.after_enter[phase] = self.ledger.current

    def degrade(self, components: dict[str, nn.Module]) -> str | None:
        """After an out-of-memory error: free everything and continue with a smaller plan (memory.fallback_option)."""
        option = fallback_option(self.plan, self.option)
        if option is None:
            return None
        self._adopt(components)
        self._release_all()
        self.option = option
        log.warning("out of memory: continuing with the %r memory plan", option.mode)
        return option.mode

    def recast(self, component: str, module: nn.Module, dtype: torch.dtype) -> None:
        """Convert a component to `dtype` (NaN fallback) and re-plan: the weights changed size, so the plan that fit
        before may not. The next phase entry uploads what the new plan wants on the device."""
        self._release_all()
        part = self._parts[component]
        part.bring_home(lambda t: self._to_host(t.to(dtype)) if t.is_floating_point() else t)
        part.drop()  # point the module at the converted host copies
        part.nbytes = sum(s.nbytes for s in part.slots if s.counted)
        if component in STREAMABLE:
            self._blocks[component] = [_Weights(b) for b in _block_modules(module)]
        sizes = self.plan.sizes
        sizes = replace(
            sizes,
            weights={**sizes.weights, component: part.nbytes},
            itemsize={**sizes.itemsize, component: torch.empty((), dtype=dtype).element_size()},
            blocks={**sizes.blocks, **({component: tuple(b.nbytes for b in self._blocks[component])} if component in STREAMABLE else {})},
        )
        plan = make_plan(sizes, self.plan.shape, self.plan.budget, steps=self.plan.steps, search_largest=False)
        lower = [o for o in plan.options if MODES.index(o.mode) >= MODES.index(self.option.mode)]
        self.plan, self.option = plan, next((o for o in lower if o.fits), plan.option("sequential"))
        log.warning("%s now runs in %s: continuing with the %r memory plan", component, dtype, self.option.mode)

    def host_copies(self) -> dict[tuple[int, str], torch.Tensor]:
        """(id(module), attribute) -> the host copy every upload of that weight reads (none before the first phase).
        Code that edits weights in place (cascade.lora_apply) edits these too, or the next upload would undo it."""
        return {slot.key: slot.host for part in self._parts.values() for slot in part.slots}

    def _release_all(self) -> None:
        """Take every component off the device; weights whose only copy is there (resident plan) go home first."""
        for name in COMPONENTS:
            part = self._parts[name]
            if any(s.host.device != self.host_device for s in part.slots):
                part.bring_home(self._to_host)
            self._drop(name)
        for name in STREAMABLE:  # block views must refer to the host copies the modules now point at
            self._blocks[name] = [_Weights(b) for b in _block_modules(self._parts[name].module)]
        self.backend.empty_cache()

    # --- internals -------------------------------------------------------------------------------------------
    def _adopt(self, components: dict[str, nn.Module]) -> None:
        """First sight of the components: take note of their weights (resident: already on the device)."""
        if self._parts:
            return
        for name in COMPONENTS:
            part = _Weights(components[name])
            if self.option.mode == "resident":  # loaded straight onto the device; no host copy until a fallback
                part.device_bytes = part.nbytes
                self.ledger.add(part.nbytes)
            self._parts[name] = part
        for name in STREAMABLE:
            self._blocks[name] = [_Weights(b) for b in _block_modules(components[name])]

    def _streamed_blocks(self, name: str) -> list[_Weights]:
        if self.option.mode not in ("stream", "sequential") or name not in STREAMABLE:
            return []
        kept = self.option.resident_blocks.get(name, len(self._blocks[name]))
        return self._blocks[name][kept:]

    def _upload(self, name: str) -> None:
        """Upload a component; for a streamed UNet everything except its streamed blocks (hooks bring those)."""
        part, streamed = self._parts[name], self._streamed_blocks(name)
        skip = frozenset(slot.key for block in streamed for slot in block.slots)
        self._check(part.nbytes - sum(b.nbytes for b in streamed))
        self.ledger.add(part.upload(self.device, self._pin, skip))
        if streamed:
            self._install_stream_hooks(name, streamed)

    def _drop(self, name: str) -> None:
        part = self._parts[name]
        if not part.on_device:
            return
        for handle in self._hooks.pop(name, []):
            handle.remove()
        for block in self._blocks.get(name, []):
            self.ledger.current -= block.device_bytes  # a block still in flight; the component drop frees it
            block.device_bytes = 0
        self.ledger.current -= part.drop()

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.to(self.host_device)
        return host.pin_memory() if self._pin else host

    def _check(self, extra: int) -> None:
        if self.guard is not None:
            self.guard(self.ledger.current + extra)

    # --- streaming -------------------------------------------------------------------------------------------
    def _install_stream_hooks(self, name: str, streamed: list[_Weights]) -> None:
        prefetch = self.option.mode == "stream"
        side = self.backend.copy_stream() if prefetch else None

        def bring(block: _Weights) -> None:
            self._check(block.nbytes)
            self.ledger.add(_upload_on(side, self.device, block, self._pin))

        prefetched: list[int] = []  # the block uploaded ahead for the next call, until that call comes

        def pre_hook(index: int):
            def hook(module, args):
                block = streamed[index]
                if prefetched and prefetched[0] != index:
                    # The block fetched ahead is not the one running: a level repeats (Stage B runs its up levels
                    # 2-3 times) and the forward went back to the level's first block. Drop it, so that never more
                    # than two blocks are in flight, as the plan's buffers assume; the level's last pass fetches
                    # it again.
                    stale = streamed[prefetched[0]]
                    self.ledger.current -= stale.drop()
                    stale.ready = None
                prefetched.clear()
                if not block.on_device:
                    bring(block)
                # Also after an upload made just now: it ran on the side stream, and the compute stream must not
                # read the weights before that copy has finished.
                _wait_for(self.device, block)
                if prefetch and index + 1 < len(streamed) and not streamed[index + 1].on_device:
                    bring(streamed[index + 1])
                    prefetched.append(index + 1)

            return hook

        def post_hook(index: int):
            def hook(module, args, output):
                self.ledger.current -= streamed[index].drop()

            return hook

        handles = []
        for i, block in enumerate(streamed):
            handles.append(block.module.register_forward_pre_hook(pre_hook(i)))
            handles.append(block.module.register_forward_hook(post_hook(i)))
        self._hooks[name] = handles


def _upload_on(stream, device: torch.device, block: _Weights, non_blocking: bool) -> int:
    """Upload a block, on the side stream when there is one; the compute stream waits for it before use."""
    if stream is None:
        return block.upload(device, non_blocking)
    module = torch.get_device_module(device.type)
    with module.stream(stream):
        moved = block.upload(device, non_blocking)
        block.ready = module.Event()
        block.ready.record(stream)
    current = module.current_stream(device)
    for slot in block.slots:
        slot.current().record_stream(current)  # used (and freed) on the compute stream, not the copy stream
    return moved


def _wait_for(device: torch.device, block: _Weights) -> None:
    if block.ready is not None:
        torch.get_device_module(device.type).current_stream(device).wait_event(block.ready)
        block.ready = None
