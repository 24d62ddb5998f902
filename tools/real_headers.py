"""Regenerate tests/fixtures/headers/: the tensor names, shapes and dtypes of the published Stable Cascade files.

Why: the loader's layout tests write their files with our own inverse key maps, so they cannot catch a key map that
is wrong in both directions. These fixtures come from code that is not ours and that writes or loads the real files
unmodified; tests/test_real_headers.py builds sparse safetensors files from them.

Sources (each fixture records repo, file and commit/version in its "source" field):
- Stability layout (stabilityai/stable-cascade root files): Stability-AI/StableCascade `modules/stage_c.py`,
  `modules/stage_b.py`, `modules/effnet.py`, `modules/previewer.py` (the training code whose state_dict() these
  files are), configs from `train/train_c.py` / `train/train_b.py` (model_version 3.6B/1B, 3B/700M). Stage A from
  ComfyUI `comfy/ldm/cascade/stage_a.py` (loads stage_a.safetensors unmodified; Stability's own needs torchtools).
- ComfyUI layout (stabilityai/stable-cascade comfyui_checkpoints/): the state dict ComfyUI's `sd.save_checkpoint`
  writes (`model_base.state_dict_for_saving` + `supported_models_base` prefixes, `supported_models.Stable_Cascade_C`
  / `_B`): `model.diffusion_model.` + ComfyUI's StageC/StageB, `text_encoder.` + `sdxl_clip.StableCascadeClipModel`,
  `vae.` + `stage_c_coder.StageC_coder` (Stage C file) or `stage_a.StageA` (Stage B file), `clip_l_vision.` +
  `clip_model.CLIPVisionModelProjection` with ComfyUI's `clip_vision_config_vitl.json` (Stage C file only).
- diffusers layout (stabilityai/stable-cascade-prior, stabilityai/stable-cascade): diffusers' StableCascadeUNet with
  the configs of `scripts/convert_stable_cascade.py` / `convert_stable_cascade_lite.py`, PaellaVQModel defaults,
  transformers' CLIPTextModelWithProjection (laion/CLIP-ViT-bigG-14 text config) and CLIPVisionModelWithProjection
  (openai/clip-vit-large-patch14), all as `save_pretrained` writes them (persistent state_dict entries).
dtypes: the *_bf16 / .bf16 variants and the ComfyUI files hold bfloat16 floats; stage_a, effnet_encoder and
previewer are float32; BatchNorm's num_batches_tracked stays int64. Every model is built on the meta device.

Usage (fetch the sources yourself, outside this repo; nothing of them is copied here):
    python tools/real_headers.py --comfyui /tmp/ComfyUI --stablecascade /tmp/StableCascade \
        [--comfyui-repo OWNER/NAME] [--comfyui-commit SHA] [--stablecascade-commit SHA] [--out tests/fixtures/headers]
The committed fixtures were made from pollockjj/ComfyUI 618b803d (a fork tracking comfyanonymous/ComfyUI master,
2026-01-07) and Stability-AI/StableCascade 7a7d341f, diffusers 0.42.1, transformers 5.23.0; the output is
byte-for-byte reproducible (gzip mtime 0).
diffusers and transformers are the installed packages. ComfyUI needs `einops` and `torchvision` importable
(`pip install --target DIR einops torchvision` and add DIR with --pythonpath); torchvision's C ops are not needed.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path

DTYPE_CODES = {"torch.float32": "F32", "torch.int64": "I64", "torch.float16": "F16", "torch.bfloat16": "BF16"}
ITEMSIZE = {"F32": 4, "I64": 8, "F16": 2, "BF16": 2}  # bytes per element of those codes
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "headers"

# diffusers scripts/convert_stable_cascade.py and convert_stable_cascade_lite.py (the published config.json values).
_CTA = ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]
_CT = ["SDCascadeResBlock", "SDCascadeTimestepBlock"]
_PRIOR = dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, clip_text_in_channels=1280,
              clip_text_pooled_in_channels=1280, clip_image_in_channels=768, clip_seq=4, kernel_size=3,
              dropout=[0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca", "crp"], switch_level=[False],
              block_types_per_layer=[_CTA, _CTA], down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1])
_DECODER = dict(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=1280,
                clip_text_pooled_in_channels=1280, clip_seq=4, effnet_in_channels=16, pixel_mapper_in_channels=3,
                kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca"],
                block_types_per_layer=[_CT, _CT, _CTA, _CTA], down_blocks_repeat_mappers=[1, 1, 1, 1])
DIFFUSERS_UNETS = {
    "prior": dict(_PRIOR, conditioning_dim=2048, block_out_channels=[2048, 2048], num_attention_heads=[32, 32],
                  down_num_layers_per_block=[8, 24], up_num_layers_per_block=[24, 8]),
    "prior_lite": dict(_PRIOR, conditioning_dim=1536, block_out_channels=[1536, 1536], num_attention_heads=[24, 24],
                       down_num_layers_per_block=[4, 12], up_num_layers_per_block=[12, 4]),
    "decoder": dict(_DECODER, block_out_channels=[320, 640, 1280, 1280], num_attention_heads=[0, 0, 20, 20],
                    down_num_layers_per_block=[2, 6, 28, 6], up_num_layers_per_block=[6, 28, 6, 2],
                    up_blocks_repeat_mappers=[3, 3, 2, 2]),
    "decoder_lite": dict(_DECODER, block_out_channels=[320, 576, 1152, 1152], num_attention_heads=[0, 9, 18, 18],
                         down_num_layers_per_block=[2, 4, 14, 4], up_num_layers_per_block=[4, 14, 4, 2],
                         up_blocks_repeat_mappers=[2, 2, 2, 2]),
}
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k config.json text_config (+ projection_dim, as the convert script sets it).
CLIP_G_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# openai/clip-vit-large-patch14 config.json vision_config (stable-cascade-prior image_encoder/).
CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# Stability-AI/StableCascade train/train_c.py and train/train_b.py, by model_version.
STABILITY_UNETS = {
    "stage_c": ("stage_c", {}),
    "stage_c_lite": ("stage_c", dict(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]])),
    "stage_b": ("stage_b", dict(c_hidden=[320, 640, 1280, 1280], nhead=[-1, -1, 20, 20], blocks=[[2, 6, 28, 6], [6, 28, 6, 2]],
                                block_repeat=[[1, 1, 1, 1], [3, 3, 2, 2]])),
    "stage_b_lite": ("stage_b", dict(c_hidden=[320, 576, 1152, 1152], nhead=[-1, 9, 18, 18], blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
                                     block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]])),
}
# ComfyUI comfy/model_detection.py: the unet_config it detects for each variant (passed to StageC/StageB).
COMFY_UNETS = {
    "stage_c": {}, "stage_b": STABILITY_UNETS["stage_b"][1],
}


def tensors(state: dict, *, prefix: str = "", float_dtype: str = "BF16", drop=()) -> list[list]:
    """[[key, shape, dtype], ...] of a state dict as a file would hold it: floats at `float_dtype`, ints kept."""
    rows = []
    for key, t in state.items():
        if key in drop:
            continue
        code = DTYPE_CODES[str(t.dtype)]
        rows.append([prefix + key, list(t.shape), float_dtype if t.is_floating_point() else code])
    return rows


def commit_of(path: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit(f"{path}: not a git checkout; pass its commit with --comfyui-commit / --stablecascade-commit")


def _meta_model(build):
    import torch

    with torch.device("meta"):
        return build()


def _meta(build):
    return _meta_model(build).state_dict()


def _config_json(model) -> dict:
    """The config.json save_pretrained writes (diffusers ConfigMixin or transformers PretrainedConfig), as JSON."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    for private in ("_use_default_values", "_ignore_files"):  # diffusers' to_json_string leaves these out
        config.pop(private, None)
    return json.loads(json.dumps(config, default=list))


def _no_tv_meta_registrations() -> None:
    """torchvision registers fake kernels for its C ops at import; a wheel whose ops do not load here would fail on
    that, and only its pure-Python model definitions are needed."""
    try:
        import torch
        import importlib.util
        spec = importlib.util.find_spec("torchvision")
        lib = Path(spec.origin).parent / "_C.so" if spec else None
        torch.ops.load_library(str(lib))
    except Exception:
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def stability_modules(root: Path):
    """Stability-AI/StableCascade `modules/` as a package, without its ControlNet import chain (kornia, cv2,
    insightface), which stage_c.py imports only for a type it does not build."""
    pkg = types.ModuleType("sc_modules")
    pkg.__path__ = [str(root / "modules")]
    sys.modules["sc_modules"] = pkg
    stub = types.ModuleType("sc_modules.controlnet")
    stub.ControlNetDeliverer = object
    sys.modules["sc_modules.controlnet"] = stub
    return {name: importlib.import_module(f"sc_modules.{name}") for name in ("stage_c", "stage_b", "effnet", "previewer")}


def stability_fixtures(root: Path, commit: str, comfy: dict, comfy_source: dict) -> dict[str, dict]:
    mods = stability_modules(root)
    import torchvision

    # modules/effnet.py asks torchvision for pretrained weights (a download); the architecture is all we need.
    mods["effnet"].torchvision = types.SimpleNamespace(
        models=types.SimpleNamespace(efficientnet_v2_s=lambda weights=None: torchvision.models.efficientnet_v2_s()))
    src = lambda path: {"repo": "Stability-AI/StableCascade", "file": path, "commit": commit}  # noqa: E731
    out = {}
    for name, (module, config) in STABILITY_UNETS.items():
        cls = mods[module].StageC if module == "stage_c" else mods[module].StageB
        state = _meta(lambda: cls(**config))
        source = src(f"modules/{module}.py") | {"config": f"train/train_{module[-1]}.py"}
        for dtype, suffix in (("BF16", "_bf16"), ("F32", "")):
            out[f"stability/{name}{suffix}.safetensors"] = dict(
                repo="stabilityai/stable-cascade", layout="stability", source=source,
                tensors=tensors(state, float_dtype=dtype))
    out["stability/effnet_encoder.safetensors"] = dict(
        repo="stabilityai/stable-cascade", layout="stability", source=src("modules/effnet.py"),
        tensors=tensors(_meta(mods["effnet"].EfficientNetEncoder), float_dtype="F32"))
    out["stability/previewer.safetensors"] = dict(
        repo="stabilityai/stable-cascade", layout="stability", source=src("modules/previewer.py"),
        tensors=tensors(_meta(mods["previewer"].Previewer), float_dtype="F32"))
    out["stability/stage_a.safetensors"] = dict(
        repo="stabilityai/stable-cascade", layout="stability", source=comfy_source | {"file": "comfy/ldm/cascade/stage_a.py"},
        tensors=tensors(_meta(comfy["stage_a"].StageA), float_dtype="F32"))
    return out


def comfy_modules(root: Path) -> dict:
    sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        names = ("ldm.cascade.stage_c", "ldm.cascade.stage_b", "ldm.cascade.stage_a", "ldm.cascade.stage_c_coder",
                 "sdxl_clip", "clip_model", "ops")
        mods = {n.rsplit(".", 1)[-1]: importlib.import_module(f"comfy.{n}") for n in names}
    finally:
        sys.argv = argv
    return mods


def comfy_fixtures(root: Path, mods: dict, source: dict) -> dict[str, dict]:
    import torch

    ops = mods["ops"].disable_weight_init
    unet_c = _meta(lambda: mods["stage_c"].StageC(operations=ops))
    unet_b = _meta(lambda: mods["stage_b"].StageB(operations=ops, **COMFY_UNETS["stage_b"]))
    clip = _meta(lambda: mods["sdxl_clip"].StableCascadeClipModel(device="meta"))
    coder = _meta(mods["stage_c_coder"].StageC_coder)
    stage_a = _meta(mods["stage_a"].StageA)
    vision_config = json.loads((root / "comfy" / "clip_vision_config_vitl.json").read_text())
    vision = _meta(lambda: mods["clip_model"].CLIPVisionModelProjection(vision_config, torch.float32, "meta", ops))
    files = {
        "stable_cascade_stage_c.safetensors": (
            tensors(unet_c, prefix="model.diffusion_model.") + tensors(clip, prefix="text_encoder.")
            + tensors(coder, prefix="vae.") + tensors(vision, prefix="clip_l_vision."),
            ["comfy/ldm/cascade/stage_c.py", "comfy/sdxl_clip.py", "comfy/ldm/cascade/stage_c_coder.py",
             "comfy/clip_model.py", "comfy/clip_vision_config_vitl.json"]),
        "stable_cascade_stage_b.safetensors": (
            tensors(unet_b, prefix="model.diffusion_model.") + tensors(clip, prefix="text_encoder.")
            + tensors(stage_a, prefix="vae."),
            ["comfy/ldm/cascade/stage_b.py", "comfy/sdxl_clip.py", "comfy/ldm/cascade/stage_a.py"]),
    }
    saving = ["comfy/sd.py (save_checkpoint)", "comfy/model_base.py (state_dict_for_saving)",
              "comfy/supported_models_base.py", "comfy/supported_models.py (Stable_Cascade_C/_B)"]
    return {f"comfyui/{name}": dict(repo="stabilityai/stable-cascade (comfyui_checkpoints/)", layout="comfyui",
                                    source=source | {"file": files_used + saving}, tensors=rows)
            for name, (rows, files_used) in files.items()}


def diffusers_fixtures() -> dict[str, dict]:
    import diffusers
    import transformers
    from diffusers import StableCascadeUNet
    try:  # moved under pipelines.deprecated in diffusers 0.38
        from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    except ImportError:
        from diffusers.pipelines.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    d_src = {"repo": "huggingface/diffusers", "version": diffusers.__version__}
    t_src = {"repo": "huggingface/transformers", "version": transformers.__version__}
    out = {}
    for folder, config in DIFFUSERS_UNETS.items():
        repo = "stabilityai/stable-cascade-prior" if folder.startswith("prior") else "stabilityai/stable-cascade"
        script = "scripts/convert_stable_cascade" + ("_lite.py" if folder.endswith("lite") else ".py")
        unet = _meta_model(lambda: StableCascadeUNet(**config))
        out[f"diffusers/{folder}/diffusion_pytorch_model.bf16.safetensors"] = dict(
            repo=repo, layout="diffusers", config=_config_json(unet),
            source=d_src | {"file": ["src/diffusers/models/unets/unet_stable_cascade.py", script]},
            tensors=tensors(unet.state_dict()))
    text = _meta_model(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT)))
    out["diffusers/text_encoder/model.bf16.safetensors"] = dict(
        repo="stabilityai/stable-cascade-prior", layout="hf", config=_config_json(text),
        source=t_src | {"file": "src/transformers/models/clip/modeling_clip.py",
                        "config": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k config.json text_config"},
        tensors=tensors(text.state_dict()))
    vision = _meta_model(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_VISION)))
    out["diffusers/image_encoder/model.bf16.safetensors"] = dict(
        repo="stabilityai/stable-cascade-prior", layout="hf", config=_config_json(vision),
        source=t_src | {"file": "src/transformers/models/clip/modeling_clip.py",
                        "config": "openai/clip-vit-large-patch14 config.json vision_config"},
        tensors=tensors(vision.state_dict()))
    vqgan = _meta_model(PaellaVQModel)
    out["diffusers/vqgan/diffusion_pytorch_model.bf16.safetensors"] = dict(
        repo="stabilityai/stable-cascade", layout="diffusers", config=_config_json(vqgan),
        source=d_src | {"file": PaellaVQModel.__module__.replace(".", "/") + ".py (defaults)"},
        tensors=tensors(vqgan.state_dict()))
    return out


def write(fixtures: dict[str, dict], out: Path) -> None:
    """One gzip JSON document, keys in file order; the same bytes for the same inputs (mtime 0)."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"format": "name -> {repo, layout, source, [config (config.json)], tensors: [[key, shape, dtype]]}; shapes only, no data",
           "files": dict(sorted(fixtures.items()))}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    with open(out / "published.json.gz", "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=9) as z:
        z.write(raw)
    for name, fx in sorted(fixtures.items()):
        nbytes = sum(ITEMSIZE[d] * math.prod(s) for _, s, d in fx["tensors"])
        print(f"{name:72s} {len(fx['tensors']):5d} tensors {nbytes / 1e9:8.3f} GB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (comfyanonymous/ComfyUI or a fork)")
    p.add_argument("--stablecascade", type=Path, required=True, help="a Stability-AI/StableCascade checkout")
    p.add_argument("--comfyui-repo", default="comfyanonymous/ComfyUI", help="the repo the ComfyUI checkout is from")
    p.add_argument("--comfyui-commit")
    p.add_argument("--stablecascade-commit")
    p.add_argument("--pythonpath", type=Path, action="append", default=[], help="extra import folder (einops, torchvision)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    sys.path[:0] = [str(x) for x in args.pythonpath]
    _no_tv_meta_registrations()
    comfy_source = {"repo": args.comfyui_repo, "commit": commit_of(args.comfyui, args.comfyui_commit)}
    comfy = comfy_modules(args.comfyui)
    fixtures = {}
    fixtures.update(stability_fixtures(args.stablecascade, commit_of(args.stablecascade, args.stablecascade_commit),
                                       comfy, comfy_source))
    fixtures.update(comfy_fixtures(args.comfyui, comfy, comfy_source))
    fixtures.update(diffusers_fixtures())
    write(fixtures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
