"""The one table of names: pipeline components, samplers and schedulers with their display titles and aliases.

The CLI, the SD.Next extension, the server and the infotext all resolve names here, so a spelling accepted in one
place is accepted everywhere ("DPM++ 2M", "dpmpp_2m", "k_dpmpp_2m" and SD.Next's "Default" alike) and written the
same way in every PNG. Pure data and string functions: importing this module costs nothing.
"""

from __future__ import annotations

import re

# Pipeline components, in execution order (diffusers and SD.Next call Stage A "vqgan").
COMPONENTS: tuple[str, ...] = ("text_encoder", "prior", "decoder", "vqgan")
# Checkpoint part kinds (cascade.checkpoints) -> pipeline component names.
COMPONENT_OF_PART: dict[str, str] = {"text_encoder": "text_encoder", "prior": "prior", "decoder": "decoder",
                                     "stage_a": "vqgan"}
STAGES: tuple[str, ...] = ("prior", "decoder")  # the two sampled stages
# Noise streams (cascade.sampling.StageNoise): "cpu" = image i from seed + i on any device; "comfyui" = ComfyUI's.
NOISE_MODES: tuple[str, ...] = ("cpu", "comfyui")

# canonical ComfyUI name -> (display title as SD.Next/A1111 write it, other accepted spellings)
SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ddpm": ("DDPM", ()),
    "euler": ("Euler", ("k euler",)),
    "euler_ancestral": ("Euler a", ("euler ancestral", "k euler a", "k euler ancestral")),
    "heun": ("Heun", ("k heun",)),
    "dpm_2": ("DPM2", ("dpm 2", "k dpm 2", "kdpm2", "k dpm2")),
    "dpmpp_2m": ("DPM++ 2M", ("dpmpp 2m", "k dpmpp 2m")),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", ("dpmpp 2m sde", "k dpmpp 2m sde")),
    "dpmpp_sde": ("DPM++ SDE", ("dpmpp sde", "k dpmpp sde", "dpm sde")),
    "lcm": ("LCM", ("k lcm",)),
    "uni_pc": ("UniPC", ("uni pc", "unipc")),
}
SCHEDULERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "normal": ("Normal", ()),
    "karras": ("Karras", ()),
    "exponential": ("Exponential", ()),
    "sgm_uniform": ("SGM Uniform", ()),
    "simple": ("Simple", ()),
    "beta": ("Beta", ()),
}
# SD.Next's "Default" sampler/scheduler means the model card's choice for that stage.
DEFAULT_NAME = "default"
CARD_SAMPLER = {"prior": "ddpm", "decoder": "euler_ancestral"}
CARD_SCHEDULER = {"prior": "sgm_uniform", "decoder": "karras"}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def _lookup(table: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for canonical, (title, aliases) in table.items():
        for spelling in (canonical, title, *aliases):
            out[_key(spelling)] = canonical
    return out


_SAMPLER_LOOKUP = _lookup(SAMPLERS)
_SCHEDULER_LOOKUP = _lookup(SCHEDULERS)


class UnknownNameError(ValueError):
    """A sampler or scheduler name that is in no table; the message lists the valid ones."""


def _resolve(name: str, lookup: dict[str, str], table: dict, kind: str, stage: str | None, card: dict) -> str:
    key = _key(name)
    if key == DEFAULT_NAME and stage in card:
        return card[stage]
    if key in lookup:
        return lookup[key]
    titles = ", ".join(title for title, _ in table.values())
    default = " or Default (the model card's)" if stage else ""
    raise UnknownNameError(f"unknown {kind} {name!r}; use one of: {titles}{default} (ComfyUI names such as "
                           f"{next(iter(table))} work too, case-insensitive)")


def resolve_sampler(name: str, stage: str | None = None) -> str:
    """Canonical sampler for any accepted spelling ("DPM++ 2M" -> "dpmpp_2m"); "Default" needs the stage."""
    return _resolve(name, _SAMPLER_LOOKUP, SAMPLERS, "sampler", stage, CARD_SAMPLER)


def resolve_scheduler(name: str, stage: str | None = None) -> str:
    """Canonical scheduler for any accepted spelling ("SGM Uniform" -> "sgm_uniform")."""
    return _resolve(name, _SCHEDULER_LOOKUP, SCHEDULERS, "scheduler", stage, CARD_SCHEDULER)


def sampler_title(name: str) -> str:
    """Display title of a canonical sampler ("dpmpp_2m" -> "DPM++ 2M"), the spelling infotexts use."""
    return SAMPLERS[name][0] if name in SAMPLERS else name


def scheduler_title(name: str) -> str:
    return SCHEDULERS[name][0] if name in SCHEDULERS else name


SAMPLER_TITLES: dict[str, str] = {k: v[0] for k, v in SAMPLERS.items()}
SCHEDULER_TITLES: dict[str, str] = {k: v[0] for k, v in SCHEDULERS.items()}
