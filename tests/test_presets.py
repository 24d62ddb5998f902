"""Model-card recipe, SoteDiffusion prompt preset, checkpoint detection and the tag table."""

import pytest

from cascade.presets import (
    DEFAULT_RECIPE,
    PRESETS,
    TAG_GROUPS,
    apply_preset,
    format_tag_table,
    preset_for_checkpoint,
)

SOTE_PROMPT = "newest, extremely aesthetic, best quality"
SOTE_NEGATIVE = "very displeasing, worst quality, monochrome, realistic, oldest, loli"


def test_recipe_matches_the_model_card():
    prior, decoder = DEFAULT_RECIPE.prior, DEFAULT_RECIPE.decoder
    def settings(stage):
        return (stage.sampler, stage.scheduler, stage.steps, stage.cfg, stage.shift)

    assert settings(prior) == ("ddpm", "sgm_uniform", 30, 7.0, 2.0)
    assert settings(decoder) == ("euler_ancestral", "karras", 10, 1.0, 1.0)
    assert DEFAULT_RECIPE.compression == 42 and DEFAULT_RECIPE.size_multiple == 128
    assert all(w % 128 == 0 and h % 128 == 0 for w, h in DEFAULT_RECIPE.example_sizes)
    assert all(preset.recipe is DEFAULT_RECIPE for preset in PRESETS.values())


def test_sote_preset_prepends_card_tags():
    prompt, negative = apply_preset("sotediffusion", "1girl, solo", "bad hands")
    assert prompt == f"{SOTE_PROMPT}, 1girl, solo"
    assert negative == f"{SOTE_NEGATIVE}, bad hands"


def test_sote_preset_on_empty_prompts():
    assert apply_preset("sotediffusion", "", "  ") == (SOTE_PROMPT, SOTE_NEGATIVE)


@pytest.mark.parametrize(
    "prompt, negative",
    [("1girl, solo", "bad hands"), ("", ""), ("cat BREAK dog", "(worst quality:1.4)"), ("a (b:1.2)", "x")],
)
def test_apply_preset_is_idempotent(prompt, negative):
    once = apply_preset("sotediffusion", prompt, negative)
    assert apply_preset("sotediffusion", *once) == once


def test_present_tags_are_not_repeated():
    prompt, negative = apply_preset("sotediffusion", "1girl, (Best Quality:1.2), newest", "[worst quality], oldest")
    assert prompt == "extremely aesthetic, 1girl, (Best Quality:1.2), newest"
    assert negative == "very displeasing, monochrome, realistic, loli, [worst quality], oldest"
    # a tag inside a longer tag is a different tag
    prompt, _ = apply_preset("sotediffusion", "newest style", "")
    assert prompt == f"{SOTE_PROMPT}, newest style"


def test_no_preset_and_plain_cascade_leave_prompts_alone():
    assert apply_preset(None, "a", "b") == ("a", "b")
    assert apply_preset("none", "a", "b") == ("a", "b")
    assert apply_preset("stable-cascade", "a", "b") == ("a", "b")
    with pytest.raises(KeyError):
        apply_preset("unknown", "a", "b")


@pytest.mark.parametrize(
    "metadata, filename, expected",
    [
        ({"modelspec.title": "SoteDiffusion Wuerstchen3"}, "stage_c.safetensors", "sotediffusion"),
        ({"ss_output_name": "sotediffusion-wr3_3b"}, "model.safetensors", "sotediffusion"),
        ({"ss_sd_model_name": "Disty0/sote-diffusion-cascade-alpha3"}, "x.safetensors", "sotediffusion"),
        ({"notes": '{"base": "SOTE_DIFFUSION v1"}'}, "x.safetensors", "sotediffusion"),
        ({"sotediffusion_version": "1"}, "x.safetensors", "sotediffusion"),
        ({}, "/models/Stable-diffusion/SoteDiffusion-StageC.safetensors", "sotediffusion"),
        (None, r"C:\models\sote_stage_c.safetensors", "sotediffusion"),
        ({"modelspec.title": "Stable Cascade Stage C"}, "stage_c_bf16.safetensors", None),
        ({}, "/models/sote/stage_c.safetensors", None),  # only the file's own name counts
        ({}, "stable_cascade_stage_c.safetensors", None),
    ],
)
def test_preset_for_checkpoint(metadata, filename, expected):
    assert preset_for_checkpoint(metadata, filename) == expected


def test_tag_table_lists_every_tag():
    table = format_tag_table()
    assert table.startswith("SoteDiffusion (Wuerstchen3) tag vocabulary")
    for group in TAG_GROUPS:
        assert f"{group.name} tags" in table
        for tag, meaning in group.tags:
            assert tag in table and meaning in table
    assert "extremely aesthetic" in table and "2022 to 2024" in table and "explicit nsfw" in table
    # the preset's tags are part of the vocabulary
    vocabulary = {tag for group in TAG_GROUPS for tag, _ in group.tags}
    recommended = set(PRESETS["sotediffusion"].prompt_tags) | set(PRESETS["sotediffusion"].negative_tags)
    assert recommended - {"monochrome", "realistic", "loli"} <= vocabulary
