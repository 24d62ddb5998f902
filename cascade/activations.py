"""Activation memory per stage: measured by tracing full-size models on the meta device, then fitted.

`measure(stage, ...)` traces one denoiser call (Stage C / Stage B, CFG math included), one text-encoder call or
one Stage A decode with the real full-size configs and returns the live-tensor peak (cascade.memtrace).
`ActivationModel` is the fit the planner uses: per stage and element size,
    peak = c0 + c1 * n + c2 * n * t
with n = effective batch x tokens of the stage's working grid and t = tokens per image (attention is quadratic in
t). `benchmarks/measure_activations.py` re-measures and rewrites `cascade/data/activation_model.json`; a test
checks the fit against fresh traces at sizes it was not fitted on.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import configs
from .checkpoints import DECODER, PRIOR, STAGE_A, TEXT_ENCODER
from .memtrace import peak_activation_bytes

MODEL_FILE = Path(__file__).resolve().parent / "data" / "activation_model.json"
_KIND = {"text_encoder": TEXT_ENCODER, "prior": PRIOR, "decoder": DECODER, "vqgan": STAGE_A}


@dataclass(frozen=True)
class Shape:
    """The workload dimensions activations depend on."""

    width: int
    height: int
    batch: int = 1
    compression: float = 42.0
    prior_cfg: float = 7.0
    decoder_cfg: float = 1.0
    chunks: int = 1  # 77-token prompt chunks

    def effective_batch(self, phase: str) -> int:
        """Images per UNet call: CFG runs cond and uncond in one batch."""
        cfg = {"prior": self.prior_cfg, "decoder": self.decoder_cfg}.get(phase, 1.0)
        per_prompt = 2 if cfg != 1.0 else 1
        if phase == "text_encoder":
            return 2 * self.chunks  # prompt and negative prompt, each 77-token chunk encoded as its own sequence
        return self.batch * per_prompt

    def tokens(self, phase: str) -> int:
        """Positions of the stage's working grid per image."""
        if phase == "prior":
            return int(self.height // self.compression) * int(self.width // self.compression)
        if phase == "decoder":
            return (self.height // 8) * (self.width // 8)  # Stage B works at H/8 after its 2x2 patching
        if phase == "vqgan":
            return (self.height // 2) * (self.width // 2)  # Stage A's widest level
        return 77


def features(phase: str, shape: Shape) -> tuple[float, float, float]:
    n = shape.effective_batch(phase) * shape.tokens(phase)
    return 1.0, float(n), float(n) * shape.tokens(phase)


@functools.lru_cache(maxsize=8)
def _meta_model(phase: str, dtype: torch.dtype):
    from .loader import instantiate

    config = {"text_encoder": configs.CLIP_G, "vqgan": configs.STAGE_A}.get(phase) or configs.unet_config(phase, "big")
    with torch.device("meta"):
        model = instantiate(_KIND[phase], dict(config))
        return model.to(dtype=dtype).eval()


def measure(phase: str, shape: Shape, dtype: torch.dtype = torch.bfloat16) -> int:
    """Traced live-activation peak (bytes) of one call of the phase's model at full size."""
    from .pipeline import cfg_denoiser

    model = _meta_model(phase, dtype)
    batch = shape.batch
    with torch.device("meta"):
        if phase == "text_encoder":
            ids = torch.zeros(shape.effective_batch(phase), 77, dtype=torch.long)
            return peak_activation_bytes(lambda: model(ids, output_hidden_states=True))
        if phase == "vqgan":
            latents = torch.zeros(batch, 4, shape.height // 4, shape.width // 4, dtype=dtype)
            return peak_activation_bytes(lambda: model.decode(latents).sample.float().clamp(0, 1))
        cfg = shape.prior_cfg if phase == "prior" else shape.decoder_cfg
        if phase == "prior":
            x = torch.zeros(batch, 16, int(shape.height // shape.compression), int(shape.width // shape.compression))
            cond = {"clip_text": torch.zeros(batch, 77 * shape.chunks, 1280, dtype=dtype),
                    "clip_text_pooled": torch.zeros(batch, 1, 1280, dtype=dtype),
                    "clip_img": torch.zeros(batch, 1, 768, dtype=dtype)}
        else:
            x = torch.zeros(batch, 4, shape.height // 4, shape.width // 4)
            cond = {"clip_text_pooled": torch.zeros(batch, 1, 1280, dtype=dtype),
                    "effnet": torch.zeros(batch, 16, shape.height // 8, shape.width // 8, dtype=dtype)}
        denoise = cfg_denoiser(model, cond, dict(cond) if cfg != 1.0 else None, cfg)
        sigma = torch.ones(batch)
        return peak_activation_bytes(lambda: denoise(x, sigma))


REFERENCE_ITEMSIZE = 2  # fitted on bf16 traces; activations scale with the compute dtype's element size


@dataclass
class ActivationModel:
    """Fitted coefficients per phase, at 2-byte activations."""

    coefficients: dict[str, list[float]]

    def predict(self, phase: str, shape: Shape, itemsize: int) -> int:
        c = self.coefficients[phase]
        at_reference = max(0.0, sum(ci * fi for ci, fi in zip(c, features(phase, shape))))
        return int(at_reference * itemsize / REFERENCE_ITEMSIZE)

    def to_json(self) -> str:
        return json.dumps({"format": 1, "coefficients": self.coefficients}, indent=1)

    @classmethod
    def from_file(cls, path: Path = MODEL_FILE) -> "ActivationModel":
        return cls(json.loads(path.read_text())["coefficients"])


@functools.lru_cache(maxsize=1)
def default_model() -> ActivationModel:
    return ActivationModel.from_file()


def fit(samples: list[tuple[str, int, Shape, int]]) -> ActivationModel:
    """Least squares per phase over samples (phase, itemsize, shape, traced peak), normalised to 2-byte activations."""
    groups: dict[str, tuple[list, list]] = {}
    for phase, itemsize, shape, peak in samples:
        rows, targets = groups.setdefault(phase, ([], []))
        rows.append(features(phase, shape))
        targets.append(float(peak) * REFERENCE_ITEMSIZE / itemsize)
    coefficients = {}
    for key, (rows, targets) in groups.items():
        a = torch.tensor(rows, dtype=torch.float64)
        b = torch.tensor(targets, dtype=torch.float64).unsqueeze(1)
        scale = a.abs().amax(0).clamp_min(1.0)  # condition the solve: features span 1 .. 1e9
        solution = torch.linalg.lstsq(a / scale, b).solution.squeeze(1) / scale
        coefficients[key] = [float(v) for v in solution]
    return ActivationModel(coefficients)


# --- Stage A strip geometry: how much of an image Stage A decodes at once (pipeline.decode_in_strips decodes it;
# the planner sizes Stage A's activations by it) ---------------------------------------------------------------
STAGE_A_STRIP_PIXELS = 256 * 128  # latent pixels Stage A decodes at once (~ a 1024x512 image)


def stage_a_strips(height: int, width: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Latent row ranges (read_lo, read_hi, keep_lo, keep_hi) covering `height` rows in strips of about
    STAGE_A_STRIP_PIXELS, each read with `overlap` rows of context that are decoded and then cut away."""
    rows = max(1, STAGE_A_STRIP_PIXELS // width)
    if height <= rows + overlap:
        return [(0, height, 0, height)]
    return [(max(0, lo - overlap), min(height, lo + rows + overlap), lo, min(height, lo + rows)) for lo in range(0, height, rows)]


def stage_a_working_height(width: int, height: int, overlap: int = 16) -> int:
    """Image height Stage A decodes at once for a width x height image (the memory planner's activation input)."""
    strips = stage_a_strips(height // 4, width // 4, overlap)
    return 4 * max(hi - lo for lo, hi, _, _ in strips)
