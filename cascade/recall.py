"""Make an image again from its PNG (`generate --from picture.png`): the parameters embedded in it -> flat request
fields (cascade.request.request_field_names), plus the files the generation used, named so the user can supply them.

Two sources, tried in this order:
* ComfyUI's ``prompt`` text chunk: the API-format graph ComfyUI embeds in every PNG it saves, a JSON object
  ``{node_id: {"class_type": ..., "inputs": {name: literal | [source_node_id, output_index]}}}``. The graph is
  followed from the SaveImage node back through VAEDecode, the Stage B KSampler, StableCascade_StageB_Conditioning,
  the Stage C KSampler, StableCascade_EmptyLatentImage or StableCascade_StageC_VAEEncode (+ LoadImage),
  CLIPTextEncode, unCLIPConditioning (+ CLIPVisionEncode, LoadImage), ModelSamplingStableCascade, LoraLoader and the
  loaders (CheckpointLoaderSimple, unCLIPCheckpointLoader, UNETLoader, CLIPLoader, VAELoader, CLIPVisionLoader).
  Node input names and defaults are ComfyUI's (nodes.py, comfy_extras/nodes_stable_cascade.py,
  comfy_extras/nodes_model_advanced.py; default shifts from comfy/supported_models.py: 2.0 Stage C, 1.0 Stage B).
  A ComfyUI graph runs with ComfyUI's noise and prompt syntax, so those two fields are set to "comfyui".
* A1111 / SD.Next ``parameters`` text (cascade.infotext.parse_infotext), ours included: the names
  cascade.infotext.generation_fields writes, plus the older SD.Next names ("Prior sampler", "Decoder schedule").

Anything that changes the image and cannot be reproduced raises InvalidRequestError naming the node (or field) and,
where one exists, the flag that would supply it. Nodes the SaveImage node does not depend on are ignored.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError

TINY_MODELS = ("tiny_cascade_stage_c", "tiny_cascade_stage_b")  # cascade.tiny.ensure_tiny_checkpoints' file stems
COMFY_SHIFT = {"prior": 2.0, "decoder": 1.0}  # comfy/supported_models.py Stable_Cascade_C / _B sampling shift
SAVE_NODES = ("SaveImage", "PreviewImage")
MODEL_ROLES = {"prior": "--prior", "decoder": "--decoder", "text_encoder": "--text-encoder", "stage_a": "--stage-a",
               "clip_vision": "--clip-vision"}
ROLE_TITLES = {"prior": "Stage C checkpoint", "decoder": "Stage B checkpoint", "text_encoder": "text encoder",
               "stage_a": "Stage A (VAE)", "clip_vision": "CLIP vision model"}
INPUT_FLAGS = {"image": "--image", "decoder_image": "--decoder-image", "image_prompts": "--image-prompt"}


@dataclass
class Recalled:
    """What a PNG says about the generation that made it."""

    source: str  # "ComfyUI workflow" or "infotext"
    fields: dict[str, Any]  # flat request fields
    models: dict[str, tuple[str, str]] = field(default_factory=dict)  # role -> (name in the PNG, where it is named)
    inputs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # image field -> [(name, where)]
    loras: list[tuple[str, float | None, float | None, str]] = field(default_factory=list)  # (name, w, te w, where)
    size_from_image: bool = False  # img2img in ComfyUI: the output size is the init image's
    ignored: list[str] = field(default_factory=list)  # infotext keys that do not change the image here


# --- reading the PNG ---------------------------------------------------------------------------------------------
def png_parameters(path: str | Path) -> dict[str, str]:
    """The PNG's text chunks that describe a generation ("prompt", "workflow", "parameters")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are read only with the data
            text = {**getattr(image, "text", {}), **{k: v for k, v in image.info.items() if isinstance(v, str)}}
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidRequestError(f"--from {path}: not a readable image ({err})") from None
    return {k: text[k] for k in ("prompt", "workflow", "parameters") if k in text}


def recall_png(path: str | Path) -> Recalled:
    """The generation embedded in a PNG: ComfyUI's graph if it has one, else the A1111/SD.Next infotext."""
    chunks = png_parameters(path)
    if "prompt" in chunks:
        try:
            graph = json.loads(chunks["prompt"])
        except ValueError as err:
            raise InvalidRequestError(f"--from {path}: its ComfyUI 'prompt' text is not JSON ({err})") from None
        return from_comfyui_graph(graph)
    if "parameters" in chunks:
        return from_infotext(chunks["parameters"])
    what = " (it has only ComfyUI's UI 'workflow', not the API 'prompt' graph)" if "workflow" in chunks else ""
    raise InvalidRequestError(f"--from {path}: the PNG holds no generation parameters (neither ComfyUI's 'prompt' "
                              f"graph nor A1111/SD.Next 'parameters' text){what}")


# --- ComfyUI's API-format graph -----------------------------------------------------------------------------------
class _Graph:
    def __init__(self, graph: Any) -> None:
        if not isinstance(graph, dict) or not all(isinstance(n, dict) for n in graph.values()):
            raise InvalidRequestError("the ComfyUI 'prompt' graph is not an object of nodes")
        self.nodes = {str(k): v for k, v in graph.items()}

    def kind(self, node_id: str) -> str:
        return str(self.nodes[node_id].get("class_type"))

    def where(self, node_id: str) -> str:
        title = (self.nodes[node_id].get("_meta") or {}).get("title")
        extra = f" \"{title}\"" if title and title != self.kind(node_id) else ""
        return f"node {node_id} ({self.kind(node_id)}{extra})"

    def inputs(self, node_id: str) -> dict[str, Any]:
        inputs = self.nodes[node_id].get("inputs")
        return inputs if isinstance(inputs, dict) else {}

    def link(self, node_id: str, name: str, purpose: str) -> tuple[str, int]:
        """(source node, output index) of a linked input."""
        value = self.inputs(node_id).get(name)
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)):
            raise InvalidRequestError(f"{self.where(node_id)}: input '{name}' ({purpose}) is not connected")
        source = str(value[0])
        if source not in self.nodes:
            raise InvalidRequestError(f"{self.where(node_id)}: input '{name}' comes from node {source}, which is not "
                                      "in the graph")
        return source, value[1]

    def value(self, node_id: str, name: str, kind: type, default: Any = None) -> Any:
        """A widget value; a link here means a node computes it, which is not reproducible."""
        value = self.inputs(node_id).get(name, default)
        if isinstance(value, list):
            source, _ = self.link(node_id, name, name)
            raise _unknown(self, source, f"the '{name}' of {self.where(node_id)}")
        if value is None:
            raise InvalidRequestError(f"{self.where(node_id)} has no '{name}'")
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidRequestError(f"{self.where(node_id)}: '{name}' is {value!r}, not a {kind.__name__}")
        return value

    def expect(self, node_id: str, kinds: tuple[str, ...], purpose: str) -> str:
        if self.kind(node_id) not in kinds:
            raise _unknown(self, node_id, purpose, kinds)
        return self.kind(node_id)


def _unknown(graph: _Graph, node_id: str, purpose: str, expected: tuple[str, ...] = ()) -> InvalidRequestError:
    known = f" (expected {' or '.join(expected)})" if expected else ""
    return InvalidRequestError(f"{graph.where(node_id)} feeds {purpose}: this engine cannot reproduce that node"
                               f"{known}")


def _sampler_settings(graph: _Graph, node_id: str, stage: str) -> dict[str, Any]:
    from .names import UnknownNameError, resolve_sampler, resolve_scheduler

    out = {
        f"{stage}_steps": graph.value(node_id, "steps", int),
        f"{stage}_cfg": graph.value(node_id, "cfg", float),
        f"{stage}_denoise": graph.value(node_id, "denoise", float, 1.0),
    }
    for name, resolve in (("sampler_name", resolve_sampler), ("scheduler", resolve_scheduler)):
        value = graph.value(node_id, name, str)
        try:
            out[f"{stage}_{'sampler' if name == 'sampler_name' else 'scheduler'}"] = resolve(value, stage)
        except UnknownNameError as err:
            raise InvalidRequestError(f"{graph.where(node_id)}: {err}") from None
    return out


def _model_chain(graph: _Graph, node_id: str, output: int, stage: str, recalled: Recalled) -> dict[str, Any]:
    """The MODEL input of a KSampler back to its loader: shift, LoRAs, checkpoint name."""
    fields = {f"{stage}_shift": COMFY_SHIFT[stage]}
    shift_seen = False
    while True:
        kind = graph.expect(node_id, ("ModelSamplingStableCascade", "LoraLoader", "LoraLoaderModelOnly",
                                      "CheckpointLoaderSimple", "unCLIPCheckpointLoader", "UNETLoader"),
                            f"the {ROLE_TITLES[stage]}'s model")
        if kind == "ModelSamplingStableCascade":
            if not shift_seen:  # the one nearest the sampler is the one in effect
                fields[f"{stage}_shift"] = graph.value(node_id, "shift", float, 2.0)
                shift_seen = True
            node_id, output = graph.link(node_id, "model", "model")
        elif kind.startswith("LoraLoader"):
            if stage != "prior":
                raise InvalidRequestError(f"{graph.where(node_id)}: a LoRA on the Stage B model; this engine applies "
                                          "LoRAs to Stage C (and its text encoder) only")
            te = None if kind == "LoraLoaderModelOnly" else graph.value(node_id, "strength_clip", float, 1.0)
            recalled.loras.insert(0, (graph.value(node_id, "lora_name", str),
                                      graph.value(node_id, "strength_model", float, 1.0),
                                      0.0 if kind == "LoraLoaderModelOnly" else te, graph.where(node_id)))
            node_id, output = graph.link(node_id, "model", "model")
        else:
            key = "unet_name" if kind == "UNETLoader" else "ckpt_name"
            recalled.models[stage] = (graph.value(node_id, key, str), graph.where(node_id))
            return fields


def _text(graph: _Graph, node_id: str, purpose: str, recalled: Recalled) -> tuple[str, str]:
    """(prompt text, node id) of a CLIPTextEncode, recording the CLIP it uses."""
    graph.expect(node_id, ("CLIPTextEncode",), purpose)
    text = graph.value(node_id, "text", str)
    clip, _ = graph.link(node_id, "clip", "CLIP")
    while graph.kind(clip) == "LoraLoader":  # the LoRA's text-encoder half: recorded on the model chain
        clip, _ = graph.link(clip, "clip", "CLIP")
    kind = graph.expect(clip, ("CLIPLoader", "CheckpointLoaderSimple", "unCLIPCheckpointLoader"), f"the CLIP of {purpose}")
    if kind == "CLIPLoader":
        recalled.models["text_encoder"] = (graph.value(clip, "clip_name", str), graph.where(clip))
    return text, node_id


def _load_image(graph: _Graph, node_id: str, purpose: str) -> tuple[str, str]:
    graph.expect(node_id, ("LoadImage",), purpose)
    return graph.value(node_id, "image", str), graph.where(node_id)


def _positive_c(graph: _Graph, node_id: str, recalled: Recalled) -> tuple[str, str]:
    """Stage C's positive conditioning: CLIPTextEncode, under any number of unCLIPConditioning (image prompts)."""
    strengths = []
    while graph.kind(node_id) == "unCLIPConditioning":
        if graph.value(node_id, "noise_augmentation", float, 0.0) != 0.0:
            raise InvalidRequestError(f"{graph.where(node_id)}: noise_augmentation "
                                      f"{graph.value(node_id, 'noise_augmentation', float)} is not supported (use 0)")
        strengths.append(graph.value(node_id, "strength", float, 1.0))
        vision, _ = graph.link(node_id, "clip_vision_output", "CLIP vision output")
        graph.expect(vision, ("CLIPVisionEncode",), "unCLIPConditioning's CLIP vision output")
        if graph.value(vision, "crop", str, "center") != "center":
            raise InvalidRequestError(f"{graph.where(vision)}: crop 'none' is not supported (the engine crops the "
                                      "centre, ComfyUI's default)")
        loader, _ = graph.link(vision, "clip_vision", "CLIP vision model")
        if graph.expect(loader, ("CLIPVisionLoader", "unCLIPCheckpointLoader"), "CLIP vision") == "CLIPVisionLoader":
            recalled.models["clip_vision"] = (graph.value(loader, "clip_name", str), graph.where(loader))
        image, _ = graph.link(vision, "image", "image")
        recalled.inputs.setdefault("image_prompts", []).insert(0, _load_image(graph, image, "an image prompt"))
        node_id, _ = graph.link(node_id, "conditioning", "conditioning")
    if strengths:
        if len(set(strengths)) > 1:
            raise InvalidRequestError(f"image prompts with different strengths {strengths}: this engine uses one "
                                      "--image-prompt-strength for all")
        recalled.fields["image_prompt_strength"] = strengths[0]
    if graph.kind(node_id) == "ControlNetApplyAdvanced":
        net, _ = graph.link(node_id, "control_net", "ControlNet")
        name = graph.inputs(net).get("control_net_name", "?")
        raise InvalidRequestError(f"{graph.where(node_id)} applies the ControlNet {name!r} ({graph.where(net)}): "
                                  "ControlNets are not supported by this engine")
    return _text(graph, node_id, "Stage C's positive prompt", recalled)


def _negative(graph: _Graph, node_id: str, purpose: str, recalled: Recalled) -> tuple[str, str]:
    if graph.kind(node_id) == "ControlNetApplyAdvanced":
        return _positive_c(graph, node_id, recalled)  # names the ControlNet
    return _text(graph, node_id, purpose, recalled)


def from_comfyui_graph(data: Any) -> Recalled:
    """Request fields from ComfyUI's API-format graph (see the module docstring for the nodes followed)."""
    graph = _Graph(data)
    recalled = Recalled("ComfyUI workflow", {"noise": "comfyui", "prompt_syntax": "comfyui"})
    saves = [n for n in graph.nodes if graph.kind(n) == "SaveImage"] or [n for n in graph.nodes
                                                                          if graph.kind(n) in SAVE_NODES]
    if len(saves) != 1:
        found = ", ".join(graph.where(n) for n in saves) or "none"
        raise InvalidRequestError(f"the ComfyUI graph needs exactly one SaveImage node to follow back, found {found}")
    decode, _ = graph.link(saves[0], "images", "images")
    graph.expect(decode, ("VAEDecode",), "the saved images")
    vae, vae_out = graph.link(decode, "vae", "VAE")
    if graph.expect(vae, ("CheckpointLoaderSimple", "VAELoader"), "Stage A (the VAE)") == "VAELoader":
        recalled.models["stage_a"] = (graph.value(vae, "vae_name", str), graph.where(vae))

    ks_b, _ = graph.link(decode, "samples", "samples")
    graph.expect(ks_b, ("KSampler",), "VAEDecode's samples (the Stage B sampler)")
    fields = recalled.fields
    fields["decoder_seed"] = graph.value(ks_b, "seed", int)
    fields.update(_sampler_settings(graph, ks_b, "decoder"))
    fields.update(_model_chain(graph, *graph.link(ks_b, "model", "model"), "decoder", recalled))
    cond_b, _ = graph.link(ks_b, "positive", "positive")
    if graph.kind(cond_b) == "ConditioningZeroOut" or graph.kind(graph.link(ks_b, "negative", "negative")[0]) \
            == "ConditioningZeroOut":
        zero = cond_b if graph.kind(cond_b) == "ConditioningZeroOut" else graph.link(ks_b, "negative", "negative")[0]
        raise InvalidRequestError(f"{graph.where(zero)} zeroes Stage B's text conditioning; this engine conditions "
                                  "Stage B on the prompts' pooled CLIP embeddings, so it cannot reproduce that")
    graph.expect(cond_b, ("StableCascade_StageB_Conditioning",), "Stage B's positive conditioning")
    text_b, _ = graph.link(cond_b, "conditioning", "conditioning")
    if graph.kind(text_b) == "ConditioningZeroOut":
        raise InvalidRequestError(f"{graph.where(text_b)} zeroes Stage B's text conditioning; this engine conditions "
                                  "Stage B on the prompts' pooled CLIP embeddings, so it cannot reproduce that")
    ks_c, out_c = graph.link(cond_b, "stage_c", "stage_c latent")
    graph.expect(ks_c, ("KSampler",), "StableCascade_StageB_Conditioning's stage_c (the Stage C sampler)")

    fields["seed"] = graph.value(ks_c, "seed", int)
    fields.update(_sampler_settings(graph, ks_c, "prior"))
    fields.update(_model_chain(graph, *graph.link(ks_c, "model", "model"), "prior", recalled))
    prompt, prompt_node = _positive_c(graph, graph.link(ks_c, "positive", "positive")[0], recalled)
    negative, _ = _negative(graph, graph.link(ks_c, "negative", "negative")[0], "Stage C's negative prompt", recalled)
    fields["prompt"], fields["negative_prompt"] = prompt, negative
    prompt_b, _ = _text(graph, text_b, "Stage B's positive prompt", recalled)
    negative_b, _ = _negative(graph, graph.link(ks_b, "negative", "negative")[0], "Stage B's negative prompt", recalled)
    if prompt_b != prompt:
        raise InvalidRequestError(f"Stage B is conditioned on another prompt ({graph.where(text_b)}: {prompt_b!r}) "
                                  f"than Stage C ({graph.where(prompt_node)}); this engine uses one prompt for both")
    if negative_b != negative and fields["decoder_cfg"] != 1.0:
        raise InvalidRequestError(f"Stage B's negative prompt {negative_b!r} differs from Stage C's {negative!r} at "
                                  f"Stage B CFG {fields['decoder_cfg']:g}; this engine uses one negative prompt for both")

    latent_c, index_c = graph.link(ks_c, "latent_image", "latent_image")
    latent_b, index_b = graph.link(ks_b, "latent_image", "latent_image")
    kinds = ("StableCascade_EmptyLatentImage", "StableCascade_StageC_VAEEncode")
    graph.expect(latent_c, kinds, "the Stage C sampler's latent")
    graph.expect(latent_b, kinds, "the Stage B sampler's latent")
    if index_c != 0 or index_b != 1:
        raise InvalidRequestError(f"the Stage C sampler must take output 0 (stage_c) and the Stage B sampler output 1 "
                                  f"(stage_b) of {graph.where(latent_c)}")
    sizes = {_latent_size(graph, latent_c, recalled), _latent_size(graph, latent_b, recalled)}
    if len(sizes) > 1:
        raise InvalidRequestError(f"the two samplers' latents ({graph.where(latent_c)}, {graph.where(latent_b)}) "
                                  "describe different images")
    if fields["decoder_denoise"] != 1.0:
        raise InvalidRequestError(f"{graph.where(ks_b)}: Stage B denoise {fields['decoder_denoise']:g} on an empty "
                                  "latent cannot be reproduced (use 1)")
    if fields["prior_denoise"] != 1.0 and graph.kind(latent_c) == "StableCascade_EmptyLatentImage":
        raise InvalidRequestError(f"{graph.where(ks_c)}: Stage C denoise {fields['prior_denoise']:g} on an empty "
                                  "latent cannot be reproduced (use 1)")
    fields.update(dict(sizes.pop()))
    return recalled


def _latent_size(graph: _Graph, node_id: str, recalled: Recalled) -> tuple[tuple[str, Any], ...]:
    if graph.kind(node_id) == "StableCascade_EmptyLatentImage":
        return (("width", graph.value(node_id, "width", int, 1024)), ("height", graph.value(node_id, "height", int, 1024)),
                ("compression", float(graph.value(node_id, "compression", int, 42))),
                ("batch_size", graph.value(node_id, "batch_size", int, 1)))
    image, _ = graph.link(node_id, "image", "image")
    if not any(name == "image" for name in recalled.inputs):
        recalled.inputs["image"] = [_load_image(graph, image, "StableCascade_StageC_VAEEncode's image")]
    recalled.size_from_image = True
    return (("compression", float(graph.value(node_id, "compression", int, 42))),)


# --- A1111 / SD.Next infotext ------------------------------------------------------------------------------------
_INFOTEXT = {  # infotext key -> (flat field, type); cascade.infotext.generation_fields' names and SD.Next's older ones
    "Steps": ("prior_steps", int), "Sampler": ("prior_sampler", str), "Prior sampler": ("prior_sampler", str),
    "Schedule type": ("prior_scheduler", str), "Prior schedule": ("prior_scheduler", str),
    "CFG scale": ("prior_cfg", float), "Prior shift": ("prior_shift", float), "Seed": ("seed", int),
    "Refiner steps": ("decoder_steps", int), "Image CFG scale": ("decoder_cfg", float),
    "Decoder sampler": ("decoder_sampler", str), "Decoder schedule type": ("decoder_scheduler", str),
    "Decoder schedule": ("decoder_scheduler", str), "Decoder shift": ("decoder_shift", float),
    "Compression": ("compression", float), "Stage A scale": ("stage_a_scale", float),
    "Denoising strength": ("prior_denoise", float), "Decoder denoise": ("decoder_denoise", float),
    "CFG rescale": ("cfg_rescale", float), "Batch size": ("batch_size", int), "Decoder seed": ("decoder_seed", int),
    "Noise": ("noise", str), "Prompt syntax": ("prompt_syntax", str), "Upscale": ("upscale", int),
    "Image prompt strength": ("image_prompt_strength", float),
}
_INFORMATIONAL = {"Model hash", "Decoder hash", "Dtype", "Offload", "Preset", "Version", "App", "Batch index",
                  "Image prompts", "Size", "Model", "Decoder", "LoRA networks", "LoRA weights", "LoRA hashes", "Lora hashes",
                  "Pipeline", "Operations", "Backend"}


def from_infotext(text: str) -> Recalled:
    """Request fields from A1111 / SD.Next `parameters` text (the CLI's own included)."""
    from .infotext import parse_infotext

    parsed = parse_infotext(text)
    recalled = Recalled("infotext", {"prompt": parsed.pop("Prompt"), "negative_prompt": parsed.pop("Negative prompt")})
    fields = recalled.fields
    for key, raw in parsed.items():
        if key in _INFOTEXT:
            name, kind = _INFOTEXT[key]
            try:
                fields[name] = kind(float(raw)) if kind is int else kind(raw)
            except ValueError:
                raise InvalidRequestError(f"infotext field '{key}: {raw}' is not a {kind.__name__}") from None
        elif key not in _INFORMATIONAL:
            recalled.ignored.append(key)
    if "Size" in parsed:
        try:
            width, height = (int(v) for v in parsed["Size"].lower().split("x"))
        except ValueError:
            raise InvalidRequestError(f"infotext field 'Size: {parsed['Size']}' is not WIDTHxHEIGHT") from None
        fields["width"], fields["height"] = width, height
    index = int(parsed.get("Batch index", 0) or 0)
    if index and fields.get("noise", "cpu") != "comfyui":  # per-image seeds: back to the batch's first
        fields["seed"] = fields.get("seed", index) - index
        if "decoder_seed" in fields:
            fields["decoder_seed"] -= index
    for role, key in (("prior", "Model"), ("decoder", "Decoder")):
        if parsed.get(key):
            recalled.models[role] = (parsed[key], f"infotext '{key}'")
    if fields.get("prior_denoise", 1.0) < 1.0:
        recalled.inputs["image"] = [("the init image", f"infotext 'Denoising strength: {fields['prior_denoise']:g}'")]
    if fields.get("decoder_denoise", 1.0) < 1.0:
        recalled.inputs["decoder_image"] = [("the decoder image", "infotext 'Decoder denoise'")]
    names = [n.strip() for n in parsed.get("LoRA networks", "").split(",") if n.strip()]
    weights = [w.strip() for w in parsed.get("LoRA weights", "").split(",") if w.strip()]
    for i, name in enumerate(names):
        if len(weights) == len(names):
            unet, _, te = weights[i].partition(":")
            recalled.loras.append((name, float(unet), float(te) if te else None, "infotext 'LoRA networks'"))
        else:
            recalled.loras.append((name, None, None, "infotext 'LoRA networks', which records no weights"))
    if int(parsed.get("Image prompts", 0) or 0):
        n = int(parsed["Image prompts"])
        recalled.inputs["image_prompts"] = [(f"image prompt {i + 1}", "infotext 'Image prompts'") for i in range(n)]
    return recalled


# --- merging into the command line --------------------------------------------------------------------------------
def find_model(name: str, folder: str | Path) -> Path | None:
    """A file the PNG names, in `folder`: the exact relative path, else a file of that name (with or without its
    extension, as infotexts write it) anywhere below."""
    from .infotext import MODEL_SUFFIXES

    root = Path(folder)
    relative = Path(str(name).replace("\\", "/"))
    if (root / relative).is_file():
        return root / relative
    base = relative.name
    candidates = {base} | {base + s for s in MODEL_SUFFIXES}
    matches = sorted(p for p in root.rglob("*") if p.name in candidates and p.is_file())
    return matches[0] if matches else None


def merge_args(args: Any, recalled: Recalled, given: set[str]) -> tuple[Any, list[str]]:
    """A copy of the generate namespace with the PNG's fields, models and inputs as the base and the flags given on
    the command line (`given`: their dests) on top, and what is still missing (models, input images, LoRAs), each
    named with the flag that supplies it."""
    import argparse

    merged = argparse.Namespace(**vars(args))
    for name, value in recalled.fields.items():
        if name not in given and hasattr(merged, name):
            setattr(merged, name, value)
    if "preset" not in given:
        merged.preset = "none"  # the prompt in the PNG is the text that was encoded, preset tags included
    problems = _merge_models(merged, recalled, given) + _merge_inputs(merged, recalled) \
        + _merge_loras(merged, recalled, given)
    if recalled.size_from_image and getattr(merged, "image", None) and not {"width", "height"} & given:
        from PIL import Image

        with Image.open(merged.image) as image:  # ComfyUI's StageC_VAEEncode: the output has the image's size
            merged.width, merged.height = (image.width // 8) * 8, (image.height // 8) * 8
    return merged, problems


def _merge_models(merged: Any, recalled: Recalled, given: set[str]) -> list[str]:
    if {"prior", "decoder"} & given:
        return []
    names = {role: name for role, (name, _) in recalled.models.items()}
    tiny = [Path(names.get(r, "")).stem for r in ("prior", "decoder")] == list(TINY_MODELS)
    folder = getattr(merged, "models", None)
    if folder is None:
        if tiny or not names:
            return []  # the embedded tiny model made it (or the PNG names none): the tiny model again
        listed = ", ".join(f"{ROLE_TITLES[r]} {n!r} ({recalled.models[r][1]})" for r, n in names.items())
        return [f"it was made with {listed}: give --models DIR to find them by name, or --prior FILE --decoder FILE"]
    problems = []
    for role, (name, where) in recalled.models.items():
        if role in given or (tiny and role in ("prior", "decoder")):
            continue
        path = find_model(name, folder)
        if path is None:
            problems.append(f"the {ROLE_TITLES[role]} {name!r} ({where}) is not in --models {folder}: give it "
                            f"with {MODEL_ROLES[role]} FILE")
        else:
            setattr(merged, role, str(path))
    return problems


def _merge_inputs(merged: Any, recalled: Recalled) -> list[str]:
    problems = []
    for name, needed in recalled.inputs.items():
        have = getattr(merged, name, None)
        count = len(have) if isinstance(have, (list, tuple)) else int(have is not None)
        if count < len(needed):
            wanted = ", ".join(f"{n!r} ({where})" for n, where in needed)
            each = "each with " if len(needed) > 1 else "it with "
            problems.append(f"it loads {wanted}: give {each}{INPUT_FLAGS[name]} FILE")
    return problems


def _merge_loras(merged: Any, recalled: Recalled, given: set[str]) -> list[str]:
    if "loras" in given or not recalled.loras:
        return []
    folder = getattr(merged, "models", None)
    problems, loras = [], []
    for name, weight, te, where in recalled.loras:
        path = find_model(name, folder) if folder is not None else None
        if weight is None:
            problems.append(f"it used the LoRA {name!r} ({where}): give it with --lora FILE:WEIGHT")
        elif path is None:
            inside = f"in --models {folder}" if folder is not None else "(no --models DIR given)"
            flag = f"--lora FILE:{weight:g}" + (f":{te:g}" if te is not None else "")
            problems.append(f"the LoRA {name!r} ({where}) is not found {inside}: give it with {flag}")
        else:
            loras.append((str(path), weight, te))
    merged.loras = loras
    return problems


def as_flags(args: Any, recalled: Recalled, flags: dict[str, str], given: set[str] = frozenset()) -> str:
    """The settings read (and the flags given on top) as one `generate` command line (`flags`: dest -> option)."""
    from .request import request_field_names

    words = ["python", "-m", "cascade", "generate", str(getattr(args, "prompt", "") or "")]
    names = [n for n in request_field_names() if n != "prompt"] + list(MODEL_ROLES) + ["models", "preset", "loras"]
    shown = set(recalled.fields) | set(given) | {"preset", "loras", "width", "height"} | {
        role for role in MODEL_ROLES if getattr(args, role, None)}
    for name in (n for n in dict.fromkeys(names) if n in shown):
        value = getattr(args, name, None)
        option = flags.get(name)
        if option is None or value is None or value == [] or value == ():
            continue
        for item in value if isinstance(value, (list, tuple)) and name in ("image_prompts", "loras") else [value]:
            if name == "loras":
                path, weight, te = (list(item) + [1.0, None])[:3]
                item = f"{path}:{weight:g}" + (f":{te:g}" if te is not None else "")
            words += [option, f"{item:g}" if isinstance(item, float) else str(item)]
    for name, needed in recalled.inputs.items():
        if getattr(args, name, None) in (None, []):
            for image, _ in needed:
                words += [INPUT_FLAGS[name], image]
    return " ".join(shlex.quote(w) for w in words)
