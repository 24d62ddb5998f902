"""LoRA files for Stable Cascade: what a file is, and which of our model's weights each of its layers patches.

Reading is header-only: `read_lora(path)` parses the safetensors header, refuses what is not a plain LoRA (another
model family, a LyCORIS algorithm we do not merge, a checkpoint, an embedding) and groups the tensors by layer.
`bind(lora, models)` then maps every layer onto one weight of the loaded Stage C / Stage B / CLIP-G and checks its
shapes, so a LoRA for the other variant (big vs lite) or stage is refused before any weight changes.
`cascade.lora_apply` merges bound LoRAs into the weights and restores them exactly.

Accepted naming schemes (README "LoRA"); each layer is `<module>.lora_down.weight` / `.lora_up.weight` (+ `.alpha`,
optional `.lora_mid.weight`, `.dora_scale`) or PEFT's `<module>.lora_A.weight` / `.lora_B.weight`:
- kohya sd-scripts, branch stable-cascade (networks/lora.py LoRANetwork: prefixes `lora_unet` / `lora_te`, every
  Linear and non-grouped Conv2d of StageC, module path with '.' -> '_'; library/stable_cascade.py Attention2D has
  `attn.to_q/to_k/to_v/out_proj`): `lora_unet_down_blocks_0_2_attention_attn_to_q`,
  `lora_te_text_model_encoder_layers_0_self_attn_q_proj`.
- OneTrainer (modules/util/convert/convert_stable_cascade_lora_diffusers_to_ckpt.py and, newer,
  modules/util/convert/lora/convert_stable_cascade_lora.py legacy names): `lora_prior_unet_` / `lora_prior_te_` with
  the same module names; its dotted internal form `lora_prior_unet.down_blocks.0.2.attention.to_q` and OMI form
  `unet.down_blocks.0.2.attention.attn.in_proj.0` / `clip_g.text_model...`. ComfyUI comfy/lora.py
  model_lora_keys_unet/clip reads `lora_prior_unet_`, `lora_unet_` and `lora_prior_te_` the same way.
- diffusers / PEFT (`lora_A` = down, `lora_B` = up; scale lora_alpha / r from `.alpha` tensors, the
  `lora_adapter_metadata` safetensors metadata diffusers writes, or a PEFT adapter_config.json beside the file;
  none of these = scale 1, diffusers utils/peft_utils.get_peft_kwargs): `unet.` / `prior.` / `decoder.` /
  `text_encoder.` / `base_model.model.` / bare prefixes over diffusers module names, e.g.
  `prior.down_blocks.0.2.attention.to_q.lora_A.weight`.
- Stage B LoRAs in ComfyUI's generic naming (`lora_unet_` + ComfyUI module path, e.g. `lora_unet_clip_mapper`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .errors import CascadeError
from .tensorfile import SafetensorsHeader, printable, read_header

PRIOR, DECODER, TEXT_ENCODER = "prior", "decoder", "text_encoder"
UNET_ANY = "unet"  # a UNet layer that may belong to Stage C or Stage B: decided by names and shapes
COMPONENT_TITLES = {PRIOR: "Stage C", DECODER: "Stage B", TEXT_ENCODER: "CLIP-G text encoder"}


class LoraError(CascadeError):
    """A LoRA file cannot be used with the loaded model."""


class NotALoraError(LoraError):
    """The file is a model checkpoint, an embedding or something else, not a LoRA."""


class UnsupportedLoraError(LoraError):
    """A LyCORIS algorithm (LoHa, LoKr, ...) or another adapter type we do not merge."""


class IncompatibleLoraError(LoraError):
    """A LoRA for another model family, stage or variant."""


# --- tensor roles -----------------------------------------------------------------------------------------------

# suffix -> (role, naming); longest suffixes first so '.lora_magnitude_vector.weight' wins over '.weight'-like ones.
_ROLES: tuple[tuple[str, str, str], ...] = (
    (".lora_magnitude_vector.weight", "magnitude", "peft"),
    (".lora_magnitude_vector", "magnitude", "peft"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".dora_scale", "dora", ""),
    (".alpha", "alpha", ""),
)
# Adapter types named by their tensors (LyCORIS lycoris/modules/*, ComfyUI comfy/weight_adapter/*, PEFT).
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (".hada_w1_a", "LyCORIS LoHa"), (".hada_w2_a", "LyCORIS LoHa"), (".hada_t1", "LyCORIS LoHa"),
    (".lokr_w1", "LyCORIS LoKr"), (".lokr_w2", "LyCORIS LoKr"), (".lokr_w1_a", "LyCORIS LoKr"),
    (".lokr_w2_a", "LyCORIS LoKr"), (".lokr_t2", "LyCORIS LoKr"),
    (".oft_blocks", "LyCORIS OFT/BOFT"), (".oft_diag", "LyCORIS OFT"), (".oft_R.weight", "PEFT OFT"),
    (".a1.weight", "LyCORIS GLoRA"), (".on_input", "LyCORIS (IA)^3"),
    (".diff", "LyCORIS full fine-tune (diff)"), (".diff_b", "LyCORIS full fine-tune (diff)"),
    (".w_norm", "LyCORIS norm fine-tune"), (".b_norm", "LyCORIS norm fine-tune"),
    (".lora_B.bias", "PEFT LoRA with biases (lora_bias=True)"), (".lora_up.bias", "LoRA with biases"),
    (".lora_embedding_A", "PEFT LoRA on embeddings"), (".reshape_weight", "LoRA with reshaped weights"),
)
_EMBEDDING_KEYS = ("emb_params", "string_to_param.*", "clip_g", "clip_l", "clip_g_out")


@dataclass
class LoraLayer:
    """One adapted layer as the file stores it: the tensor keys of its factors and options."""

    name: str  # the file's module name (key minus the role suffix)
    naming: str  # 'kohya' (lora_down/lora_up) or 'peft' (lora_A/lora_B)
    keys: dict[str, str] = field(default_factory=dict)  # role -> tensor key

    def shape(self, header: SafetensorsHeader, role: str) -> tuple[int, ...] | None:
        key = self.keys.get(role)
        return header.tensors[key].shape if key else None

    @property
    def rank_key(self) -> str:
        return self.keys["down"]


@dataclass
class LoraFile:
    """A parsed LoRA file: its layers by file module name, naming scheme and notes for the user."""

    path: Path
    header: SafetensorsHeader
    layers: dict[str, LoraLayer]
    naming: str  # 'kohya', 'onetrainer', 'peft' or a '+'-joined mix
    notes: list[str] = field(default_factory=list)
    peft_config: dict[str, dict] = field(default_factory=dict)  # PEFT LoraConfig fields by file prefix ('' = all)

    @property
    def name(self) -> str:
        return self.path.stem

    def alpha(self, layer: LoraLayer, prefix: str, module: str) -> float | None:
        """alpha of a layer: its `.alpha` tensor, else PEFT's lora_alpha (alpha_pattern first); None = rank."""
        if "alpha" in layer.keys:
            return None  # read from the tensor by the caller (it needs the data, not the header)
        config = self.peft_config.get(prefix) or self.peft_config.get("")
        if not config:
            return None
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            # PEFT tuners_utils.get_pattern_key: a key matches a pattern when it ends with it at a '.' boundary
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
                return float(value)
        alpha = config.get("lora_alpha")
        return float(alpha) if alpha is not None else None

    def uses_rslora(self, prefix: str) -> bool:
        config = self.peft_config.get(prefix) or self.peft_config.get("") or {}
        return bool(config.get("use_rslora"))


def read_lora(path: str | Path) -> LoraFile:
    """Parse and classify a LoRA file from its header; raise a LoraError subclass naming what the file is."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{printable(str(path), 300)}: no such LoRA file.")
    header = read_header(path)
    name = printable(path.name)
    layers: dict[str, LoraLayer] = {}
    unsupported: dict[str, str] = {}
    unknown: list[str] = []
    notes: list[str] = []
    embeddings = []
    for key in header.keys():
        if key.startswith("bundle_emb."):  # OneTrainer bundles its textual-inversion embeddings into the LoRA
            embeddings.append(key)
            continue
        algo = next((a for suffix, a in _UNSUPPORTED if key.endswith(suffix)), None)
        if algo is not None:
            unsupported.setdefault(algo, key)
            continue
        role = next(((s, r, n) for s, r, n in _ROLES if key.endswith(s)), None)
        if role is None:
            unknown.append(key)
            continue
        suffix, kind, naming = role
        module = key[: -len(suffix)]
        layer = layers.setdefault(module, LoraLayer(module, naming or ""))
        if naming and layer.naming and layer.naming != naming:
            raise LoraError(f"{name}: layer {printable(module)} mixes lora_down/lora_up and lora_A/lora_B tensors; "
                            "the file is damaged or was merged wrongly.")
        layer.naming = layer.naming or naming
        layer.keys[kind] = key
    if unsupported:
        algos = ", ".join(f"{a} (e.g. {printable(k)})" for a, k in unsupported.items())
        raise UnsupportedLoraError(
            f"{name} is a {algos} network, which this engine does not merge. Only plain LoRA/LoCon files "
            "(lora_down/lora_up or lora_A/lora_B, optionally with DoRA) are supported; convert it to a LoRA (e.g. "
            "with kohya's extract/resize tools) or use ComfyUI for it.")
    real = {m: layer for m, layer in layers.items() if "down" in layer.keys or "up" in layer.keys}
    if not real:
        raise NotALoraError(_not_a_lora(header, name, embeddings))
    for module, layer in layers.items():
        missing = [r for r in ("down", "up") if r not in layer.keys]
        if missing:
            raise LoraError(f"{name}: layer {printable(module)} has no lora_{missing[0]} tensor "
                            f"({'lora_A' if missing[0] == 'down' else 'lora_B'} in PEFT naming); the file is "
                            "incomplete. Download it again.")
        for role, key in layer.keys.items():
            if not header.tensors[key].torch_dtype.is_floating_point:
                raise LoraError(f"{name}: tensor {printable(key)} is not floating point; not a usable LoRA.")
    if unknown:
        raise LoraError(f"{name}: {len(unknown)} tensors are no part of a LoRA layer (e.g. "
                        f"{', '.join(printable(k) for k in unknown[:3])}); the file is not a LoRA this engine "
                        "understands.")
    if embeddings:
        notes.append(f"{len(embeddings)} bundled embedding tensors (bundle_emb.*) are not applied; textual-inversion "
                     "embeddings are not supported")
    family = classify_family(header, layers)
    if family:
        raise IncompatibleLoraError(f"{name} is a LoRA for {family}, not for Stable Cascade. Use a LoRA trained on "
                                    "Stable Cascade / Würstchen v3 (kohya stable-cascade branch, OneTrainer).")
    lora = LoraFile(path, header, layers, _naming(layers), notes, _peft_config(path, header))
    if lora.naming.startswith("peft") and not lora.peft_config and not any("alpha" in l.keys for l in layers.values()):
        notes.append("no alpha in the file (PEFT without metadata): scale 1, the diffusers convention")
    return lora


def _naming(layers: dict[str, LoraLayer]) -> str:
    names = set()
    for module, layer in layers.items():
        if layer.naming == "peft":
            names.add("peft")
        elif module.startswith(("lora_prior_unet", "lora_prior_te")):
            names.add("onetrainer")
        elif module.startswith(("unet.", "clip_g.")):
            names.add("omi")
        else:
            names.add("kohya")
    return "+".join(sorted(names))


def _peft_config(path: Path, header: SafetensorsHeader) -> dict[str, dict]:
    """PEFT LoraConfig fields by the file's component prefix: diffusers' `lora_adapter_metadata` (lora_base.py
    write_lora_layers: the config packed as '<prefix>.<field>') or a PEFT `adapter_config.json` beside the file."""
    out: dict[str, dict] = {}
    raw = header.metadata.get("lora_adapter_metadata")
    if raw:
        try:
            data = json.loads(raw)
        except ValueError:
            raise LoraError(f"{printable(path.name)}: its lora_adapter_metadata is not valid JSON; the file is "
                            "damaged.") from None
        if isinstance(data, dict):
            for key, value in data.items():
                prefix, _, fieldname = str(key).rpartition(".")
                out.setdefault(prefix, {})[fieldname] = value
    side = path.with_name("adapter_config.json")
    if not out and side.is_file():
        try:
            data = json.loads(side.read_text())
        except (OSError, ValueError):
            raise LoraError(f"{printable(side.name)} beside {printable(path.name)} is not readable JSON.") from None
        if isinstance(data, dict):
            out[""] = data
    return out


def _not_a_lora(header: SafetensorsHeader, name: str, embeddings: list[str]) -> str:
    from .checkpoints import checkpoint_from_header, looks_like

    keys = set(header.keys())
    if embeddings or (keys and all(k in _EMBEDDING_KEYS or k.startswith("string_to_param.") for k in keys)):
        return (f"{name} is a textual-inversion embedding, not a LoRA; embeddings are not supported as LoRAs.")
    try:
        checkpoint = checkpoint_from_header(header)
    except CascadeError:
        checkpoint = None
    if checkpoint is not None and checkpoint.parts:
        return (f"{name} is a {checkpoint.title} checkpoint, not a LoRA. Load it as a model (--prior / --decoder), "
                "or pick a LoRA file.")
    return f"{name} is not a LoRA: it has no lora_down/lora_up or lora_A/lora_B tensors ({looks_like(keys)})."


# --- other model families ---------------------------------------------------------------------------------------

_SD_UNET = re.compile(r"(^|[._])(input_blocks|output_blocks|middle_block|mid_block|time_embedding|time_embed|conv_in|"
                      r"conv_out|add_embedding|label_emb)([._]|$)|(down|up)_blocks[._]\d+[._](attentions|resnets|"
                      r"downsamplers|upsamplers)[._]")
_FLUX = re.compile(r"(double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn|img_mlp|txt_mlp)")
_SD3 = re.compile(r"(joint_blocks|context_block|x_block|context_embedder)")
_DIT = re.compile(r"(transformer_blocks|\bblocks[._]\d+[._](attn|cross_attn|mlp|ff))")


def classify_family(header: SafetensorsHeader, layers: dict[str, LoraLayer]) -> str | None:
    """The model family a LoRA belongs to when it is not Stable Cascade ('SDXL', 'FLUX', ...), else None.

    Names first (kohya/diffusers names of SD UNets, FLUX and SD3 blocks, SDXL's two text encoders), then the width
    of the text-encoder layers: CLIP-L (768, SD 1.x) and OpenCLIP-H (1024, SD 2.x) differ from CLIP-G (1280).
    """
    names = list(layers)
    if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "te1.", "te2.")) for n in names):
        return "SDXL (it has two text encoders)"
    if any(_FLUX.search(n) for n in names):
        return "FLUX"
    if any(_SD3.search(n) for n in names):
        return "Stable Diffusion 3"
    if any(_SD_UNET.search(n) for n in names):
        widths = {layer.shape(header, "down")[1] for n, layer in layers.items()
                  if re.search(r"attn2[._]to_[kv]$", n) and len(layer.shape(header, "down") or ()) >= 2}
        if any(re.search(r"(add_embedding|label_emb)", n) for n in names) or 2048 in widths:
            return "SDXL"
        if 1024 in widths:
            return "Stable Diffusion 2.x"
        if 768 in widths:
            return "Stable Diffusion 1.x"
        return "Stable Diffusion 1.x/2.x/XL"
    if any(_DIT.search(n) and "text_model" not in n for n in names):
        return "a diffusion transformer of another family (SD3, FLUX, PixArt, ...)"
    te = [layer for n, layer in layers.items() if "text_model" in n and re.search(r"self_attn[._]q_proj$", n)]
    widths = {layer.shape(header, "down")[-1] for layer in te if layer.shape(header, "down")}
    if widths and 1280 not in widths:
        if 768 in widths:
            return "Stable Diffusion 1.x (its text encoder is CLIP-L, 768 wide)"
        if 1024 in widths:
            return "Stable Diffusion 2.x (its text encoder is OpenCLIP-H, 1024 wide)"
    return None


# --- our model's layer names ------------------------------------------------------------------------------------

# (file prefix, component group); the first matching prefix wins, so longer prefixes come first.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_prior_unet_", PRIOR), ("lora_prior_unet.", PRIOR), ("lora_prior_te_", TEXT_ENCODER),
    ("lora_prior_te.", TEXT_ENCODER), ("lora_unet_", UNET_ANY), ("lora_te_", TEXT_ENCODER),
    ("model.diffusion_model.", UNET_ANY), ("diffusion_model.", UNET_ANY), ("base_model.model.", UNET_ANY),
    ("unet.", UNET_ANY), ("prior.", PRIOR), ("decoder.", DECODER),
    ("text_encoder.clip_g.transformer.", TEXT_ENCODER), ("clip_g.transformer.", TEXT_ENCODER),
    ("clip_g.", TEXT_ENCODER), ("text_encoder.", TEXT_ENCODER),
)


def split_prefix(module: str) -> tuple[str, str, str]:
    """(prefix, group, rest) of a file module name; bare names are CLIP when they start with `text_model`."""
    for prefix, group in PREFIXES:
        if module.startswith(prefix):
            return prefix, group, module[len(prefix):]
    if module.startswith(("text_model.", "text_model_", "text_projection")):
        return "", TEXT_ENCODER, module
    return "", UNET_ANY, module


def unet_aliases(name: str, stage: str) -> list[str]:
    """Every dotted name a trainer uses for the diffusers StableCascadeUNet module `name`.

    diffusers (`attention.to_q`, `attention.to_out.0`), Stability/ComfyUI/kohya (`attention.attn.to_q`,
    `attention.attn.out_proj`; kohya forks also `attention.attn.to_out`), OneTrainer's OMI form
    (`attention.attn.in_proj.0/1/2`), and Stage B's `clip_mapper` for diffusers' `clip_txt_pooled_mapper`
    (cascade.keymaps has the checkpoint side of the same rules).
    """
    out = [name]
    for i, qkv in enumerate(("to_q", "to_k", "to_v")):
        marker = f".attention.{qkv}"
        if name.endswith(marker):
            head = name[: -len(marker)]
            out += [f"{head}.attention.attn.{qkv}", f"{head}.attention.attn.in_proj.{i}"]
    if name.endswith(".attention.to_out.0"):
        head = name[: -len(".attention.to_out.0")]
        out += [f"{head}.attention.attn.out_proj", f"{head}.attention.attn.to_out"]
    if stage == DECODER and name.startswith("clip_txt_pooled_mapper"):
        out.append("clip_mapper" + name[len("clip_txt_pooled_mapper"):])
    return out


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA can patch: Linear and Conv2d modules by their module path (the weight is `<path>.weight`)."""
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) or
            (isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, nn.ConvTranspose2d))}


def alias_table(model: nn.Module, component: str) -> dict[str, str]:
    """alias (dotted and kohya's '_'-joined form) -> our module path, for one loaded component."""
    table: dict[str, str] = {}
    clashes: set[str] = set()
    for name in adaptable_layers(model):
        aliases = unet_aliases(name, component) if component in (PRIOR, DECODER) else [name]
        for alias in aliases:
            for form in {alias, alias.replace(".", "_")}:
                if table.get(form, name) != name:
                    clashes.add(form)
                table[form] = name
    for form in clashes:
        del table[form]
    return table


# --- binding ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """One LoRA layer bound to one weight of our model."""

    component: str  # 'prior' | 'decoder' | 'text_encoder'
    param: str  # '<module path>.weight'
    layer: LoraLayer
    prefix: str  # the file prefix (PEFT configs are per prefix)
    module: str  # the file module name without its prefix


@dataclass
class BoundLora:
    """A LoRA file mapped onto the loaded model."""

    lora: LoraFile
    patches: list[Patch]

    def components(self) -> set[str]:
        return {p.component for p in self.patches}


def bind(lora: LoraFile, models: dict[str, nn.Module]) -> BoundLora:
    """Map each layer of `lora` onto a weight of `models` ({'prior','decoder','text_encoder'} -> module) and check
    every shape; raise IncompatibleLoraError naming what the LoRA fits instead."""
    tables = {c: alias_table(m, c) for c, m in models.items() if c in (PRIOR, DECODER, TEXT_ENCODER)}
    weights = {c: {n: m.weight for n, m in adaptable_layers(models[c]).items()} for c in tables}
    groups: dict[str, list[tuple[LoraLayer, str, str]]] = {}
    for layer in lora.layers.values():
        prefix, group, rest = split_prefix(layer.name)
        groups.setdefault(group, []).append((layer, prefix, rest))

    patches: list[Patch] = []
    unet_any = groups.pop(UNET_ANY, [])
    if unet_any:
        stage = _choose_stage(lora, unet_any, tables, weights)
        groups.setdefault(stage, []).extend(unet_any)
    for component, items in groups.items():
        bad = _mismatches(lora, items, tables[component], weights[component])
        if bad:
            raise IncompatibleLoraError(_mismatch_message(lora, component, items, bad))
        for layer, prefix, rest in items:
            patches.append(Patch(component, tables[component][rest] + ".weight", layer, prefix.rstrip("._"), rest))
    return BoundLora(lora, patches)


def _choose_stage(lora: LoraFile, items, tables, weights) -> str:
    """Stage C or Stage B for layers whose prefix does not say (`lora_unet_`, `unet.`, bare): the stage where every
    layer exists with fitting shapes; Stage C when both fit (kohya's stable-cascade branch trains Stage C)."""
    fits = [s for s in (PRIOR, DECODER) if s in tables and not _mismatches(lora, items, tables[s], weights[s])]
    if fits:
        return fits[0]
    # Neither fits: report against the stage the names match best.
    scores = {s: sum(rest in tables[s] for _, _, rest in items) for s in (PRIOR, DECODER) if s in tables}
    best = max(scores, key=lambda s: scores[s])
    problems = _mismatches(lora, items, tables[best], weights[best])
    raise IncompatibleLoraError(_mismatch_message(lora, best, items, problems))


def _mismatches(lora: LoraFile, items, table: dict[str, str], weights: dict[str, torch.Tensor]) -> list[str]:
    """Why layers do not fit: missing layers and shape problems (empty when all fit)."""
    problems = []
    for layer, _, rest in items:
        module = table.get(rest)
        if module is None:
            problems.append(f"{rest}: no such layer")
            continue
        problem = layer_shape_problem(lora.header, layer, tuple(weights[module].shape))
        if problem:
            problems.append(f"{rest}: {problem}")
    return problems


def layer_shape_problem(header: SafetensorsHeader, layer: LoraLayer, target: tuple[int, ...]) -> str | None:
    """None when the layer's factors make a delta of the weight's shape (Linear [out,in], Conv2d [out,in,kh,kw])."""
    down, up, mid = (layer.shape(header, r) for r in ("down", "up", "mid"))
    if len(down) < 2 or len(up) < 2:
        return f"factors of shapes {list(down)} / {list(up)} are not matrices"
    out_dim, in_numel = target[0], math.prod(target[1:])
    rank = down[0]
    if not 1 <= rank <= min(out_dim, in_numel):
        # rank 0 adds nothing and divides alpha by 0; above min(out, in) no trainer writes it (full rank is min)
        return f"it declares rank {rank} for a weight of {list(target)} (1 to {min(out_dim, in_numel)} possible)"
    if up[0] != out_dim or math.prod(up[1:]) != up[1] * 1 or up[1] != (mid[0] if mid else rank):
        if math.prod(up[2:]) != 1 or up[0] != out_dim:
            return f"lora_up is {list(up)}, the weight has {out_dim} outputs"
        return f"lora_up {list(up)} does not fit lora_down {list(down)}"
    if mid is not None:
        if (len(target) != 4 or tuple(mid[2:]) != tuple(target[2:]) or mid[1] != rank
                or math.prod(down[1:]) != target[1]):
            return f"Tucker factors {list(down)}/{list(mid)}/{list(up)} do not fit the weight {list(target)}"
    elif math.prod(down[1:]) != in_numel:
        return f"lora_down is {list(down)}, the weight is {list(target)}"
    for role in ("dora", "magnitude"):
        shape = layer.shape(header, role)
        if shape is not None and math.prod(shape) not in (out_dim, target[1] if len(target) > 1 else -1):
            return f"its DoRA magnitude {list(shape)} fits neither {out_dim} outputs nor {target[1]} inputs"
    if "alpha" in layer.keys and math.prod(layer.shape(header, "alpha")) != 1:
        return f"alpha has shape {list(layer.shape(header, 'alpha'))}, not a scalar"
    return None


def _mismatch_message(lora: LoraFile, component: str, items, problems: list[str]) -> str:
    """Name what the LoRA fits (an official variant of another stage/size) and what the loaded model is."""
    head = f"{printable(lora.path.name)} does not fit the loaded {COMPONENT_TITLES[component]}"
    fits = fitting_variants(lora, items)
    where = f"; it fits {' / '.join(fits)}" if fits else ""
    examples = "; ".join(printable(p) for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return (f"{head}{where}. {len(problems)} of its {len(items)} layers do not match: {examples}{more}. Use a LoRA "
            "trained on the model you loaded (big and lite Stage C LoRAs are not interchangeable).")


def fitting_variants(lora: LoraFile, items) -> list[str]:
    """Which official models (Stage C big/lite, Stage B big/lite, CLIP-G) all of `items` fit; built on meta."""
    from . import configs
    from .loader import instantiate

    candidates = [(("prior", "big"), "Stage C big (3.6B)"), (("prior", "lite"), "Stage C lite (1B)"),
                  (("decoder", "big"), "Stage B big (1.5B)"), (("decoder", "lite"), "Stage B lite (700M)")]
    found = []
    for (stage, variant), title in candidates:
        with torch.device("meta"):
            model = instantiate(stage, configs.unet_config(stage, variant))
        table = alias_table(model, stage)
        weights = {n: m.weight for n, m in adaptable_layers(model).items()}
        if not _mismatches(lora, items, table, weights):
            found.append(title)
        del model
    return found


def parse_lora_arg(text: str) -> tuple[str, float, float | None]:
    """CLI `FILE[:UNET_W[:TE_W]]` -> (path, unet weight, text-encoder weight or None = same). Numbers are taken
    from the right, so a path with ':' (C:\\x.safetensors) works when the weights are given or omitted."""
    parts = text.rsplit(":", 2)
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        if not math.isfinite(value):
            raise ValueError(f"LoRA weight {parts[-1]!r} in {text!r} is not a finite number")
        numbers.insert(0, value)
        parts = parts[:-1]
        if len(parts) == 1:
            break
        parts = [":".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts
    path = ":".join(parts)
    if not path:
        raise ValueError(f"--lora {text!r}: no file name")
    unet = numbers[0] if numbers else 1.0
    te = numbers[1] if len(numbers) > 1 else None
    return path, unet, te


def describe(lora: LoraFile) -> dict:
    """JSON-friendly summary (inspect output, logs)."""
    groups: dict[str, int] = {}
    for layer in lora.layers.values():
        groups[split_prefix(layer.name)[1]] = groups.get(split_prefix(layer.name)[1], 0) + 1
    ranks = sorted({lora.header.tensors[layer.rank_key].shape[0] for layer in lora.layers.values()})
    return {"file": lora.path.name, "naming": lora.naming, "layers": groups, "ranks": ranks,
            "dora": any(("dora" in l.keys or "magnitude" in l.keys) for l in lora.layers.values()),
            "notes": list(lora.notes)}


def iter_layers(lora: LoraFile) -> Iterable[LoraLayer]:
    return lora.layers.values()


def lora_arg(text: str) -> tuple[str, float, float | None]:
    """argparse `type` of `--lora FILE[:WEIGHT[:TE_WEIGHT]]`: the parsed entry, or a one-line usage error."""
    import argparse

    try:
        path, unet, te = parse_lora_arg(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    head, _, tail = path.rpartition(":")
    if head and not Path(path).exists() and Path(head.rsplit(":", 1)[0] if ":" in head else head).is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: {tail!r} is not a weight (a number, e.g. {head}:0.8)")
    return path, unet, te


def addnet_hash(path: str | Path) -> str:
    """sha256 of a safetensors file's tensor data (everything after the header), the 'addnet' hash A1111 and
    SD.Next use for LoRAs (SD.Next modules/hashes.py addnet_hash_safetensors): metadata edits do not change it."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def infotext_fields(paths: Iterable[str | Path]) -> dict[str, str]:
    """SD.Next's infotext fields for the LoRAs of an image (modules/lora/extra_networks_lora.py infotext):
    `LoRA networks` (names, comma-joined) and `LoRA hashes` (first 8 hex of each addnet hash)."""
    paths = [Path(p) for p in paths]
    if not paths:
        return {}
    return {"LoRA networks": ", ".join(p.stem for p in paths),
            "LoRA hashes": ", ".join(addnet_hash(p)[:8] for p in paths)}
