"""`generate --from picture.png` (cascade.recall): ComfyUI workflow PNGs and A1111/SD.Next infotexts -> requests.

The workflow PNGs are written here in ComfyUI's API format, as ComfyUI's SaveImage stores it (nodes.py SaveImage:
a "prompt" tEXt chunk holding ``json.dumps(prompt)``, prompt = {node id: {"class_type", "inputs"}} with links as
[node id, output index]); node input names as in ComfyUI's nodes.py and comfy_extras/nodes_stable_cascade.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cascade.cli import main
from cascade.errors import InvalidRequestError
from cascade.recall import from_comfyui_graph, from_infotext, recall_png


def txt2img_graph(seed_c=101, seed_b=202, batch=1) -> dict:
    """ComfyUI's Stable Cascade text-to-image example graph, two KSamplers with their own seeds."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed_c, "steps": 20, "cfg": 4.0, "sampler_name": "euler_ancestral", "scheduler": "simple",
            "denoise": 1.0, "model": ["30", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["34", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "(1girl:1.3), [smile], red scarf",
                                                          "clip": ["41", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "lowres, bad anatomy", "clip": ["41", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["33", 0], "vae": ["42", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
        "30": {"class_type": "ModelSamplingStableCascade", "inputs": {"shift": 3.0, "model": ["41", 0]}},
        "33": {"class_type": "KSampler", "inputs": {
            "seed": seed_b, "steps": 10, "cfg": 1.1, "sampler_name": "euler_ancestral", "scheduler": "simple",
            "denoise": 1.0, "model": ["42", 0], "positive": ["36", 0], "negative": ["7", 0],
            "latent_image": ["34", 1]}},
        "34": {"class_type": "StableCascade_EmptyLatentImage", "inputs": {
            "width": 1024, "height": 1536, "compression": 32, "batch_size": batch}},
        "36": {"class_type": "StableCascade_StageB_Conditioning", "inputs": {
            "conditioning": ["6", 0], "stage_c": ["3", 0]}},
        "41": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "cascade/stable_cascade_stage_c.safetensors"}},
        "42": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "cascade/stable_cascade_stage_b.safetensors"}},
    }


def img2img_graph() -> dict:
    graph = txt2img_graph()
    graph["34"] = {"class_type": "StableCascade_StageC_VAEEncode", "inputs": {
        "image": ["48", 0], "vae": ["41", 2], "compression": 42}}
    graph["48"] = {"class_type": "LoadImage", "inputs": {"image": "sunset03.png", "upload": "image"}}
    graph["3"]["inputs"]["denoise"] = 0.6
    return graph


def write_png(path: Path, **chunks: str) -> Path:
    info = PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    return path


# --- ComfyUI graphs ---------------------------------------------------------------------------------------------
def test_txt2img_workflow(tmp_path):
    png = write_png(tmp_path / "c.png", prompt=json.dumps(txt2img_graph()), workflow="{}")
    r = recall_png(png)
    f = r.fields
    assert (f["prompt"], f["negative_prompt"]) == ("(1girl:1.3), [smile], red scarf", "lowres, bad anatomy")
    assert (f["seed"], f["decoder_seed"]) == (101, 202)  # the two KSamplers' own seeds
    assert (f["prior_steps"], f["prior_cfg"], f["prior_sampler"], f["prior_scheduler"], f["prior_shift"]) == \
        (20, 4.0, "euler_ancestral", "simple", 3.0)
    assert (f["decoder_steps"], f["decoder_cfg"], f["decoder_shift"]) == (10, 1.1, 1.0)  # ComfyUI's default B shift
    assert (f["width"], f["height"], f["compression"], f["batch_size"]) == (1024, 1536, 32.0, 1)
    assert (f["noise"], f["prompt_syntax"]) == ("comfyui", "comfyui")
    assert r.models["prior"][0] == "cascade/stable_cascade_stage_c.safetensors" and "node 41" in r.models["prior"][1]
    assert r.models["decoder"][0] == "cascade/stable_cascade_stage_b.safetensors"


def test_img2img_workflow_needs_its_image(tmp_path):
    r = from_comfyui_graph(img2img_graph())
    assert r.fields["prior_denoise"] == 0.6 and r.size_from_image
    assert r.inputs["image"][0][0] == "sunset03.png" and "node 48" in r.inputs["image"][0][1]
    png = write_png(tmp_path / "i.png", prompt=json.dumps(img2img_graph()))
    models = tmp_path / "models" / "cascade"
    models.mkdir(parents=True)
    for name in ("stable_cascade_stage_c.safetensors", "stable_cascade_stage_b.safetensors"):
        (models / name).write_bytes(b"")
    code = main(["generate", "--from", str(png), "--models", str(tmp_path / "models"), "--out", str(tmp_path / "o.png")])
    assert code == 2  # nothing ran: the message names the file and the flag
    init = tmp_path / "sunset.png"
    Image.new("RGB", (896, 640)).save(init)
    code = main(["generate", "--from", str(png), "--models", str(tmp_path / "models"), "--image", str(init),
                 "--dry-run"])
    assert code == 0


def test_img2img_error_text(tmp_path, capsys):
    png = write_png(tmp_path / "i.png", prompt=json.dumps(img2img_graph()))
    assert main(["generate", "--from", str(png), "--models", str(tmp_path), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "'sunset03.png' (node 48 (LoadImage))" in err and "--image FILE" in err
    assert "'cascade/stable_cascade_stage_c.safetensors'" in err and "--prior FILE" in err
    assert len(err.strip().splitlines()) == 1


def test_dry_run_prints_flags_and_explicit_flags_win(tmp_path, capsys):
    init = tmp_path / "sunset.png"
    Image.new("RGB", (896, 640)).save(init)
    png = write_png(tmp_path / "i.png", prompt=json.dumps(img2img_graph()))
    # --steps 30 equals the parser default: it still overrides the workflow's 20 because it was given
    assert main(["generate", "--from", str(png), "--image", str(init), "--steps", "30", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "--prior-steps 30" in out and "--seed 101" in out and "--decoder-seed 202" in out
    assert "--width 896 --height 640" in out and "--denoise 0.6" in out and "--noise comfyui" in out
    assert "note:" in err and "--prior FILE" in err  # the models it could not find, said, exit 0 anyway


def test_batch_and_two_seeds(tmp_path):
    r = from_comfyui_graph(txt2img_graph(seed_c=5, seed_b=5, batch=3))
    assert (r.fields["seed"], r.fields["decoder_seed"], r.fields["batch_size"]) == (5, 5, 3)


def test_image_prompt_and_lora(tmp_path):
    graph = txt2img_graph()
    graph["3"]["inputs"]["positive"] = ["51", 0]
    graph["51"] = {"class_type": "unCLIPConditioning", "inputs": {
        "strength": 0.8, "noise_augmentation": 0, "conditioning": ["6", 0], "clip_vision_output": ["50", 0]}}
    graph["50"] = {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["41", 3], "image": ["48", 0],
                                                                 "crop": "center"}}
    graph["48"] = {"class_type": "LoadImage", "inputs": {"image": "ref.png"}}
    graph["41"]["class_type"] = "unCLIPCheckpointLoader"
    graph["30"]["inputs"]["model"] = ["60", 0]
    graph["60"] = {"class_type": "LoraLoader", "inputs": {"model": ["41", 0], "clip": ["41", 1],
                                                           "lora_name": "style.safetensors", "strength_model": 0.7,
                                                           "strength_clip": 0.5}}
    r = from_comfyui_graph(graph)
    assert r.fields["image_prompt_strength"] == 0.8 and r.inputs["image_prompts"][0][0] == "ref.png"
    assert r.loras[0][:3] == ("style.safetensors", 0.7, 0.5)


@pytest.mark.parametrize("change,message", [
    (lambda g: g["3"]["inputs"].update(latent_image=["70", 0]) or g.update(
        {"70": {"class_type": "LatentUpscale", "inputs": {"samples": ["34", 0]}}}), "node 70 (LatentUpscale)"),
    (lambda g: g["8"].update(class_type="VAEDecodeTiled"), "node 8 (VAEDecodeTiled)"),
    (lambda g: g["36"]["inputs"].update(conditioning=["40", 0]) or g.update(
        {"40": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}}), "ConditioningZeroOut"),
    (lambda g: g["3"]["inputs"].update(positive=["80", 0]) or g.update(
        {"80": {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["6", 0], "negative": ["7", 0],
                                                                    "control_net": ["81", 0]}},
         "81": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}}}),
     "'canny.safetensors'"),
    (lambda g: g["3"]["inputs"].update(sampler_name="dpmpp_3m_sde"), "node 3 (KSampler)"),
    (lambda g: g["3"]["inputs"].update(seed=["90", 0]) or g.update(
        {"90": {"class_type": "Seed (rgthree)", "inputs": {}}}), "node 90 (Seed (rgthree))"),
    (lambda g: g.pop("9"), "exactly one SaveImage"),
    (lambda g: g["33"]["inputs"].update(negative=["95", 0]) or g.update(
        {"95": {"class_type": "CLIPTextEncode", "inputs": {"text": "other", "clip": ["41", 1]}}}),
     "negative prompt 'other'"),
])
def test_what_cannot_be_reproduced_is_named(change, message):
    graph = txt2img_graph()
    change(graph)
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_comfyui_graph(graph)


def test_png_without_parameters(tmp_path):
    with pytest.raises(InvalidRequestError, match="no generation parameters"):
        recall_png(write_png(tmp_path / "n.png", workflow="{}"))


# --- A1111 / SD.Next infotexts ----------------------------------------------------------------------------------
A1111 = ("1girl, (smile:1.2)\nNegative prompt: lowres\nSteps: 25, Sampler: Euler a, Schedule type: Karras, "
         "CFG scale: 6.5, Seed: 1234, Size: 768x1152, Model hash: abc, Model: sote_main, Version: v1.9.0")
SDNEXT_OLD = ("a fox\nSteps: 30, Seed: 8, Sampler: Default, CFG scale: 7, Size: 512x512, Prior sampler: DDPM, "
              "Prior schedule: SGM Uniform, Prior shift: 2, Refiner steps: 2, Image CFG scale: 1.5, Decoder sampler: "
              "DPM++ 2M, Decoder schedule: Karras, Decoder shift: 1, Compression: 36, Decoder: tiny_sc_decoder.safetensors, "
              "Hires upscale: 2")


def test_a1111_infotext():
    r = from_infotext(A1111)
    f = r.fields
    assert (f["prompt"], f["negative_prompt"], f["seed"], f["width"], f["height"]) == \
        ("1girl, (smile:1.2)", "lowres", 1234, 768, 1152)
    assert (f["prior_steps"], f["prior_sampler"], f["prior_scheduler"], f["prior_cfg"]) == (25, "Euler a", "Karras", 6.5)
    assert r.models == {"prior": ("sote_main", "infotext 'Model'")} and "noise" not in f


def test_sdnext_older_names_and_unknown_keys():
    r = from_infotext(SDNEXT_OLD)
    f = r.fields
    assert (f["prior_sampler"], f["prior_scheduler"], f["decoder_scheduler"], f["decoder_steps"]) == \
        ("DDPM", "SGM Uniform", "Karras", 2)
    assert r.models["decoder"][0] == "tiny_sc_decoder.safetensors" and r.ignored == ["Hires upscale"]


def test_batch_index_recovers_the_batch_seeds():
    text = "x\nSteps: 4, Seed: 12, Decoder seed: 22, Batch size: 3, Batch index: 2, Noise: cpu, Size: 256x256"
    f = from_infotext(text).fields
    assert (f["seed"], f["decoder_seed"], f["batch_size"]) == (10, 20, 3)
    f = from_infotext(text.replace("Noise: cpu", "Noise: comfyui")).fields
    assert (f["seed"], f["decoder_seed"]) == (12, 22)  # ComfyUI noise writes the batch's seed


def test_infotext_img2img_names_the_flag(tmp_path, capsys):
    png = write_png(tmp_path / "a.png", parameters="x\nSteps: 4, Seed: 1, Size: 256x256, Denoising strength: 0.5")
    assert main(["generate", "--from", str(png), "--out", str(tmp_path / "o.png")]) == 2
    assert "--image FILE" in capsys.readouterr().err


# --- generate -> --from -> the same pixels ----------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    ["--noise", "comfyui", "--prompt-syntax", "comfyui", "--decoder-seed", "4", "--prior-sampler", "dpmpp_2m_sde"],
    ["--batch", "2", "--decoder-sampler", "dpmpp_sde", "--cfg-rescale", "0.5"],
])
def test_round_trip_identical_pixels(tmp_path, capsys, extra):
    first = tmp_path / "a.png"
    args = ["generate", "a (red:1.2) fox, [x]", "--negative", "blurry", "--width", "256", "--height", "256",
            "--seed", "11", "--steps", "3", "--decoder-steps", "2", "--device", "cpu", "--quiet"]
    assert main(args + extra + ["--out", str(first)]) == 0
    written = [Path(p) for p in capsys.readouterr().out.split()]
    source = written[-1]  # the last image of a batch: its Batch index brings back the batch's seeds
    again = tmp_path / "b.png"
    assert main(["generate", "--from", str(source), "--out", str(again), "--device", "cpu", "--quiet"]) == 0
    remade = [Path(p) for p in capsys.readouterr().out.split()]
    assert len(remade) == len(written)
    for a, b in zip(written, remade):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert Image.open(a).text["parameters"] == Image.open(b).text["parameters"]


def test_models_and_loras_found_by_name(tmp_path, capsys):
    graph = txt2img_graph()
    graph["30"]["inputs"]["model"] = ["60", 0]
    graph["60"] = {"class_type": "LoraLoader", "inputs": {"model": ["41", 0], "clip": ["41", 1],
                                                           "lora_name": "styles/ink.safetensors",
                                                           "strength_model": 0.7, "strength_clip": 0.5}}
    png = write_png(tmp_path / "l.png", prompt=json.dumps(graph))
    models = tmp_path / "models"
    for rel in ("checkpoints/cascade/stable_cascade_stage_c.safetensors", "unet/stable_cascade_stage_b.safetensors",
                "loras/styles/ink.safetensors"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        (models / rel).write_bytes(b"")
    assert main(["generate", "--from", str(png), "--models", str(models), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert f"--prior {models / 'checkpoints/cascade/stable_cascade_stage_c.safetensors'}" in out
    assert f"--decoder {models / 'unet/stable_cascade_stage_b.safetensors'}" in out  # found by its file name
    assert f"--lora {models / 'loras/styles/ink.safetensors'}:0.7:0.5" in out and not err


def test_infotext_lora_without_weight_asks_for_it(tmp_path, capsys):
    png = write_png(tmp_path / "a.png", parameters="x\nSteps: 4, Seed: 1, Size: 256x256, LoRA networks: ink, "
                                                   "LoRA hashes: 0123abcd")
    assert main(["generate", "--from", str(png), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "'ink'" in err and "--lora FILE:WEIGHT" in err


def test_our_lora_fields_come_back(tmp_path):
    from cascade.infotext import build_infotext
    from cascade.request import build_request

    req = build_request(prompt="x", seed=1, loras=[("/m/loras/ink.safetensors", 0.7, 0.5), ("/m/b.safetensors", 0.8, None)])
    r = from_infotext(build_infotext(req, 1))
    assert [lora[:3] for lora in r.loras] == [("ink", 0.7, 0.5), ("b", 0.8, None)]
    (tmp_path / "loras").mkdir()
    for name in ("ink.safetensors", "b.safetensors"):
        (tmp_path / "loras" / name).write_bytes(b"")
    png = write_png(tmp_path / "p.png", parameters=build_infotext(req, 1))
    from cascade.cli import build_parser

    args = build_parser()[0].parse_args(["generate", "--from", str(png), "--models", str(tmp_path)])
    from cascade.recall import merge_args

    merged, problems = merge_args(args, recall_png(png), set(args.given))
    assert not problems
    assert merged.loras == [(str(tmp_path / "loras/ink.safetensors"), 0.7, 0.5),
                            (str(tmp_path / "loras/b.safetensors"), 0.8, None)]
