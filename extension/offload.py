"""Who moves the weights inside SD.Next: SD.Next's offload when its mode is set, our planner when it is `none`.

- Offload mode balanced/model/sequential/group: SD.Next attaches its hooks to the registered modules after the
  load, so everything is loaded to the CPU and SD.Next moves it on use. Between stages we call SD.Next's balanced
  offload (a no-op in the other modes), as its own Stable Cascade decoder does, so the prior leaves the card before
  Stage B runs. Stage A runs through `decode()`, which no forward hook sees, so it is put on the device here.
- Offload mode none: cascade.memory plans resident/stage/stream/sequential for the card's free memory, and
  cascade.offload executes the plan; the pipeline then ignores SD.Next's whole-pipeline moves (see pipeline.to).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

class SdnextOffload:
    """cascade.pipeline.Placement for SD.Next's own offload modes."""

    def __init__(self, mode: str, device: torch.device, between_stages: Callable[[], None]):
        self.name = f"sdnext-{mode}"
        self.device = torch.device(device)
        self.between_stages = between_stages

    def initial_device(self, component: str) -> torch.device:
        return torch.device("cpu")

    def pins_host_memory(self, component: str) -> bool:
        return False

    def enter(self, phase: str, components: dict[str, nn.Module]) -> None:
        self.between_stages()
        if phase == "vqgan":
            vqgan = components["vqgan"]
            if next(vqgan.parameters()).device != self.device:
                vqgan.to(self.device)

    def degrade(self, components: dict[str, nn.Module]) -> str | None:
        return None  # SD.Next's offload settings are the user's to change

    def recast(self, component: str, module: nn.Module, dtype: torch.dtype) -> None:
        """NaN guard's retry in a safer dtype: convert the weights where they are; SD.Next's hooks keep moving them."""
        module.to(dtype)


def is_managed(placement) -> bool:
    """True when our executor owns device residency (SD.Next must not move the whole pipeline)."""
    return placement is not None and not isinstance(placement, SdnextOffload) and getattr(placement, "name", "") != "resident"
