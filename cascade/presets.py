"""Model-card defaults and prompt presets for Stable Cascade and SoteDiffusion (Würstchen v3), as data.

Sources (checked 2026-11 through stored copies of the Hugging Face pages):
- Recipe: shared/reference/stable-cascade.md §4.7 (ComfyUI-equivalent SoteDiffusion Wuerstchen3 settings).
  The card itself (Disty0/sotediffusion-wuerstchen3 README, "UI Guide / SD.Next") says: Steps 30 or 40,
  Refiner Steps 10, CFG 7, Secondary CFG "2 or 1", resolutions 1024x1536 / 2048x1152, "Anything works as long
  as it's a multiply of 128".
- Prompt preset: the same card, verbatim: prompt ``newest, extremely aesthetic, best quality,`` and negative
  ``very displeasing, worst quality, monochrome, realistic, oldest, loli,``. The card's negative does contain
  ``loli``; we keep it (it is the card's recommendation and keeps the anime model away from minors).
- Tag vocabulary: the dataset card Disty0/sotediffusion-v1-text_only ("Used with SoteDiffusion V1 (Wuerstchen3)
  and SoteDiffusion V2") gives the tag order, date tags and aesthetic thresholds; the quality and rating tables
  come from the SoteDiffusion V2 card, whose counts are identical to that dataset card's (same tagged dataset).
  The Wuerstchen3 card as stored does not list the tags itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePath

from .request import StageSettings, default_decoder, default_prior


@dataclass(frozen=True)
class Recipe:
    prior: StageSettings  # Stage C
    decoder: StageSettings  # Stage B
    compression: int = 42  # Stage C latent = image size // compression
    size_multiple: int = 128  # width and height should be multiples of this
    example_sizes: tuple[tuple[int, int], ...] = ((1024, 1536), (2048, 1152))  # (width, height)


DEFAULT_RECIPE = Recipe(prior=default_prior(), decoder=default_decoder())


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    prompt_tags: tuple[str, ...]  # put in front of the user's prompt
    negative_tags: tuple[str, ...]  # put in front of the user's negative prompt
    recipe: Recipe


PRESETS: dict[str, Preset] = {
    "stable-cascade": Preset(
        name="stable-cascade",
        title="Stable Cascade (no prompt changes)",
        prompt_tags=(),
        negative_tags=(),
        recipe=DEFAULT_RECIPE,
    ),
    "sotediffusion": Preset(
        name="sotediffusion",
        title="SoteDiffusion Wuerstchen3 quality/aesthetic tags",
        prompt_tags=("newest", "extremely aesthetic", "best quality"),
        negative_tags=("very displeasing", "worst quality", "monochrome", "realistic", "oldest", "loli"),
        recipe=DEFAULT_RECIPE,
    ),
}


def apply_preset(name: str | None, prompt: str, negative: str) -> tuple[str, str]:
    """Put the preset's tags in front of the prompt and the negative prompt.

    Idempotent: a tag already present anywhere in the prompt (compared case-insensitively, ignoring A1111
    brackets and ``:weight``) is not added again, so applying a preset twice changes nothing.
    ``None`` or ``"none"`` returns the prompts unchanged; an unknown name raises ``KeyError``.
    """
    if name is None or name == "none":
        return prompt, negative
    preset = PRESETS[name]
    return _prepend_tags(preset.prompt_tags, prompt), _prepend_tags(preset.negative_tags, negative)


def _prepend_tags(tags: tuple[str, ...], text: str) -> str:
    present = {_tag_key(tag) for tag in text.split(",")}
    missing = [tag for tag in tags if _tag_key(tag) not in present]
    if not missing:
        return text
    head = ", ".join(missing)
    return f"{head}, {text.strip()}" if text.strip() else head


def _tag_key(tag: str) -> str:
    key = re.sub(r"^[\s(\[]+|[\s)\]]+$", "", tag)
    key = re.sub(r":\s*[+-]?[\d.]+$", "", key)
    return " ".join(key.lower().split())


_SOTE_METADATA = re.compile(r"sote[\s_-]?diffusion", re.IGNORECASE)
_TITLE_KEYS = ("modelspec.title", "ss_output_name", "modelspec.description", "ss_sd_model_name", "name", "title")


def preset_for_checkpoint(metadata: dict | None, filename: str) -> str | None:
    """Which preset suits a checkpoint: ``"sotediffusion"`` or ``None`` (no prompt preset).

    1. Safetensors metadata first: the title-like keys (``modelspec.title``, ``ss_output_name``, ...), then any
       other key or string value, mentioning "sotediffusion" (also "sote diffusion", "sote-diffusion",
       "sote_diffusion", any case).
    2. Otherwise the file name: "sote" anywhere in its base name, case-insensitive. This is SD.Next's own rule
       (it checks ``"sote" in sd_checkpoint_info.name``), so files SD.Next treats as SoteDiffusion match here too.
    """
    metadata = metadata or {}
    for key in _TITLE_KEYS:
        if _SOTE_METADATA.search(str(metadata.get(key, ""))):
            return "sotediffusion"
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if _SOTE_METADATA.search(str(key)) or _SOTE_METADATA.search(text):
            return "sotediffusion"
    if "sote" in PurePath(filename.replace("\\", "/")).name.lower():
        return "sotediffusion"
    return None


# --- SoteDiffusion tag vocabulary ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagGroup:
    name: str
    basis: str  # how the dataset assigned the tag
    tags: tuple[tuple[str, str], ...]  # (tag, meaning), best first
    source: str


_DATASET_CARD = "HF dataset card Disty0/sotediffusion-v1-text_only (used for SoteDiffusion V1 = Wuerstchen3)"
_V2_CARD = "HF model card Disty0/sotediffusion-v2 (same tagged dataset; not restated on the Wuerstchen3 card)"

TAG_ORDER = "aesthetic tags, quality tags, date tags, custom tags, rating tags, character, series, rest of the tags"

TAG_GROUPS: tuple[TagGroup, ...] = (
    TagGroup(
        name="Aesthetic",
        basis="shadowlilac/aesthetic-shadow-v2 score",
        tags=(
            ("extremely aesthetic", "score > 0.90"),
            ("very aesthetic", "score > 0.80"),
            ("aesthetic", "score > 0.70"),
            ("slightly aesthetic", "score > 0.50"),
            ("not displeasing", "score > 0.40"),
            ("not aesthetic", "score > 0.30"),
            ("slightly displeasing", "score > 0.20"),
            ("displeasing", "score > 0.10"),
            ("very displeasing", "score <= 0.10"),
        ),
        source=_DATASET_CARD,
    ),
    TagGroup(
        name="Quality",
        basis="waifu-diffusion v1.4 aes-B32-v0 score",
        tags=(
            ("best quality", "score > 0.980"),
            ("high quality", "score > 0.900"),
            ("great quality", "score > 0.750"),
            ("medium quality", "score > 0.500"),
            ("normal quality", "score > 0.250"),
            ("bad quality", "score > 0.125"),
            ("low quality", "score > 0.025"),
            ("worst quality", "score <= 0.025"),
        ),
        source=_V2_CARD,
    ),
    TagGroup(
        name="Date",
        basis="year the image was posted",
        tags=(
            ("newest", "2022 to 2024"),
            ("recent", "2019 to 2021"),
            ("mid", "2015 to 2018"),
            ("early", "2011 to 2014"),
            ("oldest", "2005 to 2010"),
        ),
        source=_DATASET_CARD,
    ),
    TagGroup(
        name="Rating",
        basis="content rating",
        tags=(
            ("general", "safe for work"),
            ("sensitive", "suggestive"),
            ("nsfw", "adult content"),
            ("explicit nsfw", "explicit adult content"),
        ),
        # The four tags are on the V2 card; the one-word meanings are ours (the card gives only counts).
        source=_V2_CARD,
    ),
    TagGroup(
        name="Custom (source dataset)",
        basis="which sub-dataset the image came from",
        tags=(
            ("pixiv", "images from pixiv"),
            ("visual novel cg", "visual novel CGs (the alpha3 card lists it in the negative prompt)"),
            ("anime wallpaper", "anime wallpapers"),
        ),
        # Unverified: the dataset card lists these as dataset names and the tag order has "custom tags"; the
        # V2 card's "Custom Tags" table (dataset name -> tag) was cut off in the stored copy.
        source=_DATASET_CARD + "; tag spelling unverified",
    ),
)


def format_tag_table() -> str:
    """The SoteDiffusion tag vocabulary as a plain-text table, for ``python -m cascade tags``."""
    width = max(len(tag) for group in TAG_GROUPS for tag, _ in group.tags)
    lines = [
        "SoteDiffusion (Wuerstchen3) tag vocabulary",
        f"Training tag order: {TAG_ORDER}",
        f"Recommended prompt:   {', '.join(PRESETS['sotediffusion'].prompt_tags)}",
        f"Recommended negative: {', '.join(PRESETS['sotediffusion'].negative_tags)}",
    ]
    for group in TAG_GROUPS:
        lines += ["", f"{group.name} tags ({group.basis})"]
        lines += [f"  {tag:<{width}}  {meaning}" for tag, meaning in group.tags]
        lines.append(f"  source: {group.source}")
    return "\n".join(lines) + "\n"
