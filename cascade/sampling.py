"""Stable Cascade noise schedule, sigma schedules and samplers, with ComfyUI semantics.

What this module is
-------------------
The engine samples in ComfyUI's "VE" convention: the sampler state is ``x = x0 + sigma * eps``, the denoiser maps
``(x, sigma)`` to an x0 prediction, and Stage B / Stage C are ε-prediction models on the Würstchen cosine schedule
(reference notes §4.1, §4.4). Everything here is independent of the model, so it is testable against published
implementations with analytic denoisers.

Noise schedule (§4.1, §4.4)
    ``ᾱ(t) = cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2)`` with ``s = 0.008``; the *shift* moves logSNR by
    ``-2·ln(shift)``; ``ᾱ`` is clamped to ``[1e-4, 0.9999]`` and ``σ = sqrt((1-ᾱ)/ᾱ)``. ComfyUI tabulates it as
    ``sigmas[x] = σ((x+1)/10000)``; its ends give ``SIGMA_MIN`` / ``SIGMA_MAX``. The model is conditioned on the
    *unshifted* inverse ``r = timestep_from_sigma(σ)``.

Schedulers (§4.5): ``karras, exponential, sgm_uniform, normal, simple, beta`` exactly as ComfyUI's
    ``calculate_sigmas`` builds them on that table, in float32, always ending in 0. ``denoise < 1`` computes
    ``int(steps/denoise)`` steps and keeps the last ``steps + 1`` sigmas; ``sigmas_for`` adds the KSampler rule that
    ``dpm_2`` / ``uni_pc`` compute one extra sigma and drop the penultimate one.

Samplers (§4.6): ``euler, euler_ancestral, heun, dpm_2, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde, ddpm, lcm, uni_pc`` —
    the ComfyUI defaults (eta = 1, s_noise = 1, dpmpp_2m_sde with the midpoint solver, uni_pc = UniPC-bh1 with
    orders up to 3 and its final sigma 0 replaced by 0.001).

Precision: sigma arithmetic is float32 on the CPU and reaches the tensors as Python scalars, so nothing float64
ever touches the device (Intel Arc has no fp64). The sampler state keeps the caller's dtype/device; the denoiser
gets ``x`` in that dtype and ``sigma`` as a float32 ``(B,)`` tensor on ``x``'s device. Two host-only exceptions:
the UniPC ``B(h)`` coefficient recurrence is evaluated in float64 (it cancels catastrophically in float32; ComfyUI
does the same) and the beta scheduler's quantiles are float64 Python (they only choose table indices).

Randomness, two modes (``StageNoise``; the samplers take any k-diffusion style ``noise(sigma, sigma_next)``):
    * ``"cpu"``: all noise comes from the caller's ``torch.Generator`` (or one generator per batch item), drawn
      on the CPU in float32 and then moved, so a seed gives the same image on every device (``GeneratorNoise``).
      SDE samplers get Brownian increments built from the generator: the joint law of what they ask for is
      ComfyUI's (disjoint intervals independent N(0, 1), dpmpp_sde's nested sub-interval combined as Brownian
      motion requires), the numbers are not.
    * ``"comfyui"``: ComfyUI's numbers: initial noise as ``comfy/sample.py prepare_noise`` draws it, ancestral /
      ddpm / lcm noise from its ``default_noise_sampler`` (its own generator on the sampling device, seed + 1 on
      the CPU), SDE noise from its ``BrownianTreeNoiseSampler`` (torchsde, seeded with the seed, on the CPU).

Deviations from ComfyUI (deliberate; everything else is meant to match it)
    * ``uni_pc`` with a single step takes one first-order step; ComfyUI computes order 0 and returns the input noise.
    * ``uni_pc`` uses ``λ = -ln σ`` directly instead of ComfyUI's ``log(α) - 0.5·log(1-α²)`` detour (same value,
      without its float32 cancellation near σ = 0.001).
    * ``get_sigmas`` rejects ``steps < 1`` and ``denoise <= 0`` (ComfyUI returns an empty schedule).
    * None for ``beta``: it keeps ComfyUI's de-duplication of repeated table indices, so from about 560 steps on it
      returns fewer than ``steps + 1`` sigmas, exactly as ComfyUI does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "COSINE_S",
    "NUM_TIMESTEPS",
    "SIGMA_MIN",
    "SIGMA_MAX",
    "SAMPLERS",
    "SCHEDULERS",
    "NoiseSchedule",
    "sigma_from_t",
    "timestep_from_sigma",
    "get_sigmas",
    "sigmas_for",
    "initial_noise_scale",
    "noise_like",
    "NOISE_MODES",
    "NoiseSampler",
    "GeneratorNoise",
    "BrownianTreeNoise",
    "StageNoise",
    "comfyui_default_noise",
    "resolve_sampler",
    "resolve_scheduler",
    "sample",
]

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
StepCallback = Callable[[int, int, Tensor, Tensor, Tensor], None]

COSINE_S = 0.008
NUM_TIMESTEPS = 10000
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
_F32 = torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------------------------------
def _f32(value: float | Tensor) -> Tensor:
    """A float32 tensor of `value`, keeping a tensor's device."""
    if isinstance(value, Tensor):
        return value.to(_F32)
    return torch.tensor(value, dtype=_F32)


def _cosine_consts(device: torch.device) -> tuple[Tensor, Tensor]:
    s = torch.tensor(COSINE_S, dtype=_F32, device=device)
    init_alpha_cumprod = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    return s, init_alpha_cumprod


def sigma_from_t(t: float | Tensor, shift: float = 1.0) -> Tensor:
    """σ(t) of the shifted cosine schedule, float32 (ComfyUI ``StableCascadeSampling.sigma``).

    The shift is a logSNR offset of ``-2·ln(shift)``; ᾱ is clamped to [1e-4, 0.9999] after shifting, so σ stays in
    [0.0100013, 99.995].
    """
    t = _f32(t)
    s, init = _cosine_consts(t.device)
    alpha_cumprod = torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / init
    if shift != 1.0:
        log_snr = (alpha_cumprod / (1 - alpha_cumprod)).log()
        log_snr = log_snr + 2 * torch.log(1.0 / torch.tensor(float(shift), dtype=_F32, device=t.device))
        alpha_cumprod = log_snr.sigmoid()
    alpha_cumprod = alpha_cumprod.clamp(0.0001, 0.9999)
    return ((1 - alpha_cumprod) / alpha_cumprod) ** 0.5


def timestep_from_sigma(sigma: float | Tensor) -> Tensor:
    """Model conditioning ratio r for σ: the *unshifted* cosine inverse, float32, on σ's device.

    Stage B/C are trained on r of the unshifted schedule whatever shift the sampler uses (original
    ``CosineTNoiseCond``; ComfyUI ``StableCascadeSampling.timestep``).
    """
    sigma = _f32(sigma)
    s, init = _cosine_consts(sigma.device)
    var = (1 / (sigma * sigma + 1)).clamp(0, 1.0)
    return (((var * init) ** 0.5).acos() / (torch.pi * 0.5)) * (1 + s) - s


@lru_cache(maxsize=16)
def _sigma_table(shift: float) -> Tensor:
    """ComfyUI's 10000-entry ascending table ``sigmas[x] = σ((x+1)/10000)``; read-only by convention."""
    t = torch.arange(1, NUM_TIMESTEPS + 1, dtype=torch.float64) / NUM_TIMESTEPS  # Python's (x+1)/10000, then fp32
    return sigma_from_t(t.to(_F32), float(shift))


SIGMA_MIN: float = float(_sigma_table(1.0)[0])
SIGMA_MAX: float = float(_sigma_table(1.0)[-1])


@dataclass(frozen=True)
class NoiseSchedule:
    """The schedule at one shift: σ(t), the model's r(σ), ComfyUI's table and its ends."""

    shift: float = 1.0

    def sigma(self, t: float | Tensor) -> Tensor:
        return sigma_from_t(t, self.shift)

    def timestep(self, sigma: float | Tensor) -> Tensor:
        return timestep_from_sigma(sigma)

    @property
    def sigmas(self) -> Tensor:
        return _sigma_table(float(self.shift)).clone()

    @property
    def sigma_min(self) -> float:
        return float(_sigma_table(float(self.shift))[0])

    @property
    def sigma_max(self) -> float:
        return float(_sigma_table(float(self.shift))[-1])

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's mapping of a 0..1 sampling progress to σ (used for ControlNet/conditioning start/end)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(1.0 - percent))


# ---------------------------------------------------------------------------------------------------------------
# Schedulers (comfy/samplers.py calculate_sigmas on the Stable Cascade table)
# ---------------------------------------------------------------------------------------------------------------
def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(_F32), sigmas.new_zeros(1, dtype=_F32)])


def _karras(n: int, shift: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: uniform in σ^(1/ρ) between the table's ends."""
    table = _sigma_table(shift)
    min_inv_rho = float(table[0]) ** (1 / rho)
    max_inv_rho = float(table[-1]) ** (1 / rho)
    ramp = torch.linspace(0, 1, n, dtype=_F32)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def _exponential(n: int, shift: float) -> Tensor:
    """Uniform in log σ between the table's ends."""
    table = _sigma_table(shift)
    return _append_zero(torch.linspace(math.log(float(table[-1])), math.log(float(table[0])), n, dtype=_F32).exp())


def _uniform_timesteps(n: int, shift: float, sgm: bool) -> Tensor:
    """``normal`` / ``sgm_uniform``: uniform in model time between t(σ_max) and t(σ_min).

    sgm_uniform takes n of n+1 points (never reaching σ_min); normal takes n points including σ_min. (ComfyUI's
    extra branch for schedules whose σ_min is ~0 never applies here: σ_min is 0.01.)
    """
    table = _sigma_table(shift)
    start, end = float(timestep_from_sigma(table[-1])), float(timestep_from_sigma(table[0]))
    ts = torch.linspace(start, end, n + 1, dtype=_F32)[:-1] if sgm else torch.linspace(start, end, n, dtype=_F32)
    return _append_zero(sigma_from_t(ts, shift))


def _simple(n: int, shift: float) -> Tensor:
    """Every (10000/n)-th table entry from the top."""
    table = _sigma_table(shift)
    stride = len(table) / n
    return _append_zero(torch.stack([table[-(1 + int(i * stride))] for i in range(n)]))


def _beta(n: int, shift: float, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Table entries at Beta(0.6, 0.6) quantiles (Lee et al. 2024, arXiv:2407.12173; ComfyUI ``beta_scheduler``).

    Repeated indices are dropped like ComfyUI does.
    """
    table = _sigma_table(shift)
    last = len(table) - 1
    quantiles = 1 - np.linspace(0, 1, n, endpoint=False)
    indices = np.rint(np.array([_beta_ppf(float(q), alpha, beta) for q in quantiles]) * last)
    picked, previous = [], None
    for index in indices:
        if index != previous:
            picked.append(table[int(index)])
        previous = index
    return _append_zero(torch.stack(picked))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) in float64, by its continued fraction (modified Lentz).

    Uses the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) so the fraction is always evaluated where it converges fast.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c = 1.0
    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1))
    result = d
    for m in range(1, 500):
        # even term d_{2m} = m(b-m)x / ((a+2m-1)(a+2m)), odd term d_{2m+1} = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1))
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 / guard(1.0 + numerator * d)
            c = guard(1.0 + numerator / c)
            result *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return result


def _beta_ppf(p: float, a: float, b: float) -> float:
    """Inverse of I_x(a, b) (the Beta(a, b) quantile) by safeguarded Newton iteration; replaces scipy's ppf."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if a == b and p == 0.5:
        # Exact by symmetry. It matters: the scheduler rounds 0.5 * 9999 = 4999.5 half-to-even, and scipy lands on
        # the same side (5000) as the exact value; a result one ulp low would pick index 4999.
        return 0.5
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(400):
        f = _betainc(a, b, x) - p
        if f == 0.0:
            return x
        lo, hi = (x, hi) if f < 0 else (lo, x)
        pdf = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_beta)
        x_new = x - f / pdf if pdf > 0 else -1.0
        if not lo < x_new < hi:  # Newton left the bracket: bisect instead
            x_new = 0.5 * (lo + hi)
        if abs(x_new - x) <= 2e-16 * x_new:
            return x_new
        x = x_new
    return x


_SCHEDULER_FNS: dict[str, Callable[[int, float], Tensor]] = {
    "normal": lambda n, shift: _uniform_timesteps(n, shift, sgm=False),
    "karras": _karras,
    "exponential": _exponential,
    "sgm_uniform": lambda n, shift: _uniform_timesteps(n, shift, sgm=True),
    "simple": _simple,
    "beta": _beta,
}
SCHEDULERS: tuple[str, ...] = tuple(_SCHEDULER_FNS)

# ComfyUI's KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS restricted to the samplers offered here.
_DISCARD_PENULTIMATE = frozenset({"dpm_2", "uni_pc"})


def _schedule(scheduler: str, steps: int, shift: float, denoise: float, discard_penultimate: bool) -> Tensor:
    """ComfyUI ``KSampler.set_steps`` + ``calculate_sigmas``."""
    name = resolve_scheduler(scheduler)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if denoise <= 0.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    full = denoise > 0.9999
    n = steps if full else int(steps / denoise)
    sigmas = _SCHEDULER_FNS[name](n + int(discard_penultimate), float(shift))
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    if not full:
        sigmas = sigmas[-(steps + 1) :]
    return sigmas.contiguous()


def get_sigmas(scheduler: str, steps: int, shift: float = 1.0, denoise: float = 1.0) -> Tensor:
    """``steps + 1`` float32 CPU sigmas ending in 0 for `scheduler` on the schedule at `shift` (ComfyUI semantics)."""
    return _schedule(scheduler, steps, shift, denoise, discard_penultimate=False)


def sigmas_for(sampler: str, scheduler: str, steps: int, shift: float, denoise: float = 1.0) -> Tensor:
    """The sigmas a ComfyUI KSampler would give `sampler`: dpm_2 / uni_pc get steps+1 sigmas minus the penultimate.

    (Those samplers are unstable on the last tiny step to 0, so ComfyUI widens it.)
    """
    name = resolve_sampler(sampler)
    return _schedule(scheduler, steps, shift, denoise, discard_penultimate=name in _DISCARD_PENULTIMATE)


def initial_noise_scale(sigmas: Tensor | Sequence[float]) -> float:
    """Factor for unit noise at the start (ComfyUI ``EPS.noise_scaling``).

    A full-denoise run starts at σ_max, where ComfyUI treats the latent as pure noise of variance 1 + σ²; a partial
    run adds σ0·noise to the encoded latent.
    """
    sigma0 = _f32(float(sigmas[0]))
    if math.isclose(float(sigma0), SIGMA_MAX, rel_tol=1e-5) or float(sigma0) > SIGMA_MAX:
        return float(torch.sqrt(1.0 + sigma0**2.0))
    return float(sigma0)


# ---------------------------------------------------------------------------------------------------------------
# Name resolution
# ---------------------------------------------------------------------------------------------------------------
# Names: one table for the CLI, SD.Next, the server and the infotext (cascade.names); re-exported here because
# `cascade.sampling.resolve_sampler` is public.
from .names import SAMPLERS as _SAMPLER_TABLE  # noqa: E402
from .names import NOISE_MODES, resolve_sampler, resolve_scheduler  # noqa: E402,F401 - re-exported

SAMPLERS: tuple[str, ...] = tuple(_SAMPLER_TABLE)


# ---------------------------------------------------------------------------------------------------------------
# Noise and model adapters
# ---------------------------------------------------------------------------------------------------------------
def _generator_list(generator: Generators, batch: int) -> list[torch.Generator] | None:
    if generator is None:
        return None
    generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
    if any(g.device.type != "cpu" for g in generators):
        raise ValueError("sampler noise is drawn on the CPU so a seed reproduces on every device: pass CPU generators")
    if len(generators) == 1:
        return generators
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
    return generators


def noise_like(x: Tensor, generator: Generators = None) -> Tensor:
    """N(0, I) shaped like `x`, drawn on the CPU in float32 and moved to x's device/dtype.

    One generator (or None: torch's default CPU generator) draws the whole batch; a sequence with one generator per
    item draws item i from generator i, so an item's noise does not depend on what it is batched with.
    """
    generators = _generator_list(generator, x.shape[0])
    if generators is None or len(generators) == 1:
        gen = None if generators is None else generators[0]
        noise = torch.randn(x.shape, generator=gen, dtype=_F32, device="cpu")
    else:
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=_F32, device="cpu") for g in generators])
    return noise.to(device=x.device, dtype=x.dtype)


class GeneratorNoise:
    """Noise from the caller's CPU generators (``noise_like``): the "cpu" mode, device-independent.

    Every call draws fresh N(0, I), except one case that must be a Brownian increment of an earlier one: a call
    whose interval encloses the previous call's interval and shares its upper end (dpmpp_sde's second stage asks
    for [σ', σ] after [σ_s, σ]). That increment is built from the earlier draw z1 and one fresh draw z2 as Brownian
    motion requires: n = (z1·sqrt(σ - σ_s) + z2·sqrt(σ_s - σ')) / sqrt(σ - σ'), so the pair has the covariance
    of ComfyUI's Brownian tree (not its numbers).
    """

    def __init__(self, x: Tensor, generator: Generators = None) -> None:
        _generator_list(generator, x.shape[0])
        self.x, self.generator = x, generator
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (upper, lower, unit noise) of the previous call

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        upper, lower = (sigma, sigma_next) if sigma >= sigma_next else (sigma_next, sigma)
        last = self._last
        if last is not None and bool(last[0] == upper) and bool(lower < last[1]):
            z1, middle = last[2], last[1]
            z2 = noise_like(self.x, self.generator)
            noise = (z1 * _f((upper - middle).sqrt()) + z2 * _f((middle - lower).sqrt())) / _f((upper - lower).sqrt())
        else:
            noise = noise_like(self.x, self.generator)
        self._last = (upper, lower, noise)
        return noise


def comfyui_default_noise(x: Tensor, seed: int) -> NoiseSampler:
    """ComfyUI's ``default_noise_sampler(x, seed)`` (comfy/k_diffusion/sampling.py), which its ancestral samplers,
    ddpm and lcm use: a generator of its own on x's device, seeded with the KSampler seed (seed + 1 on the CPU,
    so the CPU stream differs from the initial noise's), drawing ``randn(x.size())`` in x's dtype on x's device at
    every call, whatever the interval."""
    device = x.device
    value = seed + 1 if device.type == "cpu" else seed
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed {seed}: ComfyUI's CPU noise sampler seeds seed + 1, which passes 2^64-1 (ComfyUI "
                         "fails there too); use a smaller seed")
    generator = torch.Generator(device=device).manual_seed(value)

    def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=device, generator=generator)

    return draw


class BrownianTreeNoise:
    """ComfyUI's ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=True)`` with its
    ``BatchedBrownianTree`` (comfy/k_diffusion/sampling.py), the noise of its dpmpp_sde / dpmpp_2m_sde.

    One ``torchsde.BrownianTree(t0, w0, t1, entropy=seed)`` for the whole batch (an int seed: not one tree per
    image), on the CPU with t0 = σ_min (the smallest positive sigma) < t1 = σ_max and w0 = zeros like x; a query
    (σ, σ') returns sign·(W(max) - W(min)) / sqrt(|σ' - σ|), moved to x's device, float32 like the sigmas.
    torchsde is imported here only: the other samplers never need it.
    """

    def __init__(self, x: Tensor, sigma_min: float | Tensor, sigma_max: float | Tensor, seed: int) -> None:
        import torchsde

        t0, t1 = _f32(torch.as_tensor(sigma_min)).cpu(), _f32(torch.as_tensor(sigma_max)).cpu()
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros_like(x).detach().cpu()
        self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)
        self.device, self.dtype = x.device, x.dtype

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        a, b = _f32(torch.as_tensor(sigma)).cpu(), _f32(torch.as_tensor(sigma_next)).cpu()
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        with warnings.catch_warnings():  # torchsde compares the float32 ends to its own rounding of them and warns
            warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
            w = self.tree(lo, hi).to(device=self.device, dtype=_F32) * (self.sign * sign)
        return (w / (b - a).abs().sqrt().to(self.device)).to(self.dtype)


SDE_SAMPLERS = frozenset({"dpmpp_2m_sde", "dpmpp_sde"})  # Brownian-tree noise in ComfyUI


class StageNoise:
    """All the randomness of one stage's sampling, for a batch that starts at `seed`.

    ``"cpu"``: image i's initial noise is drawn from its own CPU generator seeded ``seed + i``, and that generator
    goes on to draw its sampler noise (``GeneratorNoise``): a seed gives the same image on every device, and image
    i of a batch equals a single run at seed + i.
    ``"comfyui"``: exactly what ComfyUI's KSampler draws for its `seed`: the initial noise of the whole batch from
    one CPU generator seeded with the seed (comfy/sample.py ``prepare_noise``, no ``batch_index``: one
    ``randn`` of the batch's shape, float32); ancestral / ddpm / lcm noise from ``comfyui_default_noise`` on the
    sampler state's device; dpmpp_sde / dpmpp_2m_sde from ``BrownianTreeNoise`` over the stage's sigmas.
    """

    def __init__(self, mode: str, seed: int, batch_size: int) -> None:
        if mode not in NOISE_MODES:
            raise ValueError(f"unknown noise mode {mode!r}; use one of: {', '.join(NOISE_MODES)}")
        self.mode, self.seed, self.batch_size = mode, int(seed), int(batch_size)
        self.generators = None
        if mode == "cpu":
            self.generators = [torch.Generator().manual_seed(self.seed + i) for i in range(self.batch_size)]

    def initial(self, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """Unit initial noise of `shape` (batch first), float32 on `device`."""
        shape = tuple(shape)
        if shape[0] != self.batch_size:
            raise ValueError(f"noise for a batch of {self.batch_size} asked for shape {shape}")
        if self.mode == "cpu":
            return noise_like(torch.empty(shape, device=device), self.generators)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=generator, dtype=_F32, device="cpu").to(device)

    def sampler(self, sampler: str, x: Tensor, sigmas: Tensor) -> NoiseSampler | None:
        """The noise sampler `sampler` draws from for state `x` along `sigmas` (None for deterministic ones)."""
        name = resolve_sampler(sampler)
        if name not in _STOCHASTIC:
            return None
        if self.mode == "cpu":
            return GeneratorNoise(x, self.generators)
        if name in SDE_SAMPLERS:
            sigmas = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=_F32).reshape(-1)
            positive = sigmas[sigmas > 0]
            if len(positive) == 0:
                return None
            return BrownianTreeNoise(x, positive.min(), sigmas.max(), self.seed)
        return comfyui_default_noise(x, self.seed)


class _Model:
    """Calls the caller's denoiser with a float32 (B,) sigma on x's device and returns x0 in x's dtype."""

    def __init__(self, denoiser: Denoiser, x: Tensor) -> None:
        self.denoiser, self.batch, self.device, self.dtype = denoiser, x.shape[0], x.device, x.dtype

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma_in = sigma.reshape(1).repeat(self.batch).to(self.device)
        return self.denoiser(x, sigma_in).to(self.dtype)


NoiseSampler = Callable[[Tensor, Tensor], Tensor]
"""k-diffusion's noise-sampler protocol: ``noise(sigma, sigma_next)`` -> unit noise shaped like x for the step
σ -> σ' (the interval lets a Brownian tree answer consistently; generator-backed samplers may ignore it)."""
Noise = NoiseSampler  # the samplers' parameter type (older name)
Report = Callable[[int, Tensor, Tensor], None] | None


def _f(value: Tensor) -> float:
    """A float32 scalar as a Python float (exact), so it scales device tensors without moving anything."""
    return float(value)


def _report(callback: Report, i: int, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)


def _ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step σ→σ' into a deterministic step to σ_down plus fresh noise of std σ_up (σ_down² + σ_up² = σ'²)."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


# ---------------------------------------------------------------------------------------------------------------
# Samplers. Each: (model, x, sigmas[, noise], callback) -> x, with sigmas a float32 CPU tensor; callback(i, x, x0)
# receives the state after step i and the x0 prediction made at sigmas[i].
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler(model: _Model, x: Tensor, sigmas: Tensor, callback: Report = None) -> Tensor:
    """Euler steps on the probability-flow ODE dx/dσ = (x - D(x, σ))/σ (Karras et al. 2022, Alg. 2, no churn)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = (x - denoised) / _f(sigma)
        x = x + d * _f(sigma_next - sigma)
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: _Model, x: Tensor, sigmas: Tensor, noise: Noise, callback: Report = None) -> Tensor:
    """Euler step to σ_down, then add σ_up of fresh noise (ancestral sampling, Ho et al. 2020 in VE form; eta = 1)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            x = denoised
        else:
            d = (x - denoised) / _f(sigma)
            x = x + d * _f(sigma_down - sigma) + noise(sigma, sigma_next) * _f(sigma_up)
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_heun(model: _Model, x: Tensor, sigmas: Tensor, callback: Report = None) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1/2): average the slopes at σ and at the Euler guess at σ'.

    The last step to σ = 0 is a plain Euler step (the slope is undefined at 0).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = (x - denoised) / _f(sigma)
        dt = _f(sigma_next - sigma)
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigma_next)) / _f(sigma_next)
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(model: _Model, x: Tensor, sigmas: Tensor, callback: Report = None) -> Tensor:
    """DPM-Solver-2 style midpoint method (Lu et al. 2022; k-diffusion ``sample_dpm_2``).

    Slope at the log-midpoint σ_mid = sqrt(σ·σ') after an Euler half step, applied over the whole step; the last
    step to σ = 0 is Euler.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = (x - denoised) / _f(sigma)
        if sigma_next == 0:
            x = x + d * _f(sigma_next - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
            x_2 = x + d * _f(sigma_mid - sigma)
            d_2 = (x_2 - model(x_2, sigma_mid)) / _f(sigma_mid)
            x = x + d_2 * _f(sigma_next - sigma)
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: _Model, x: Tensor, sigmas: Tensor, callback: Report = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) in λ = -ln σ.

    x' = (σ'/σ)·x - expm1(-h)·D̃ with h = λ' - λ and D̃ = (1 + 1/2r)·D - (1/2r)·D_prev, r = h_prev/h; first-order
    (D̃ = D) on the first step, and the last step returns D.
    """
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = -sigma.log(), -sigma_next.log()
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (t + sigmas[i - 1].log()) / h
                denoised_d = denoised * _f(1 + 1 / (2 * r)) - old_denoised * _f(1 / (2 * r))
            x = x * _f(sigma_next / sigma) - denoised_d * _f(torch.expm1(-h))
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: _Model, x: Tensor, sigmas: Tensor, noise: Noise, callback: Report = None, eta: float = 1.0
) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022, arXiv:2211.01095, eq. 15-16; k-diffusion/ComfyUI).

    With h = λ' - λ: x' = (σ'/σ)·e^{-ηh}·x + (1 - e^{-(1+η)h})·D + ½(1 - e^{-(1+η)h})/r·(D - D_prev)
    + σ'·sqrt(1 - e^{-2ηh})·z. The last step returns D.
    """
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            phi = -torch.expm1(-h - eta_h)
            x = x * _f(sigma_next / sigma * (-eta_h).exp()) + denoised * _f(phi)
            if old_denoised is not None:
                r = h_last / h
                x = x + (denoised - old_denoised) * _f(0.5 * phi / r)
            if eta > 0:
                x = x + noise(sigma, sigma_next) * _f(sigma_next * (-torch.expm1(-2 * eta_h)).sqrt())
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model: _Model, x: Tensor, sigmas: Tensor, noise: Noise, callback: Report = None, r: float = 0.5
) -> Tensor:
    """DPM-Solver++ (stochastic, 2 stages; k-diffusion/ComfyUI ``sample_dpmpp_sde``, eta = 1).

    Stage 1: ancestral first-order step to σ_s = exp(-(λ + r·h)); stage 2: ancestral step σ→σ' with the blended
    prediction (1 - 1/2r)·D + (1/2r)·D_s. Each ancestral step moves to σ_down by DPM-Solver++(1),
    x' = (σ_down/σ)·x - expm1(ln σ_down - ln σ)·D, then adds σ_up of noise.

    The two noises are the normalised Brownian increments over [σ_s, σ] and the enclosing [σ', σ], asked of the
    noise sampler in that order (ComfyUI's call order): a Brownian tree answers both consistently, and
    ``GeneratorNoise`` builds the second from the first plus one fresh draw.
    """
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = -sigma.log(), -sigma_next.log()
            sigma_s = (-(t + r * (t_next - t))).exp()

            sigma_down, sigma_up = _ancestral_step(sigma, sigma_s)
            x_2 = x * _f(sigma_down / sigma) - denoised * _f(torch.expm1(sigma_down.log() - sigma.log()))
            x_2 = x_2 + noise(sigma, sigma_s) * _f(sigma_up)
            denoised_2 = model(x_2, sigma_s)

            sigma_down, sigma_up = _ancestral_step(sigma, sigma_next)
            denoised_d = denoised * (1 - fac) + denoised_2 * fac
            x = x * _f(sigma_down / sigma) - denoised_d * _f(torch.expm1(sigma_down.log() - sigma.log()))
            x = x + noise(sigma, sigma_next) * _f(sigma_up)
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(model: _Model, x: Tensor, sigmas: Tensor, noise: Noise, callback: Report = None) -> Tensor:
    """DDPM ancestral step (Ho et al. 2020, eq. 11 + posterior variance β̃) between arbitrary sigmas.

    In VP space x_vp = x/sqrt(1+σ²) with ᾱ = 1/(1+σ²), α = ᾱ/ᾱ': μ = (x_vp - (1-α)/sqrt(1-ᾱ)·ε)/sqrt(α), plus
    sqrt((1-α)(1-ᾱ')/(1-ᾱ))·z unless σ' = 0; back to VE by ·sqrt(1+σ'²). Same update as diffusers'
    DDPMWuerstchenScheduler, on any sigma schedule (ComfyUI ``generic_step_sampler`` + ``DDPMSampler_step``).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        eps = (x - denoised) / _f(sigma)
        alpha_cumprod = 1 / (sigma * sigma + 1)
        alpha_cumprod_prev = 1 / (sigma_next * sigma_next + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        x_vp = x / _f(torch.sqrt(1.0 + sigma**2.0))
        x = (x_vp - eps * _f((1 - alpha) / (1 - alpha_cumprod).sqrt())) * _f((1.0 / alpha).sqrt())
        if sigma_next > 0:
            std = ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt()
            x = x + noise(sigma, sigma_next) * _f(std)
        if sigma_next != 0:
            x = x * _f(torch.sqrt(1.0 + sigma_next**2.0))
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_lcm(model: _Model, x: Tensor, sigmas: Tensor, noise: Noise, callback: Report = None) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 1): jump to x0, re-noise to σ'."""
    for i in range(len(sigmas) - 1):
        sigma_next = sigmas[i + 1]
        denoised = model(x, sigmas[i])
        x = denoised
        if sigma_next > 0:
            x = x + noise(sigmas[i], sigma_next) * _f(sigma_next)
        _report(callback, i, x, denoised)
    return x


@dataclass
class _UniPCCorrection:
    """What UniPC's corrector needs once the model has been evaluated at the predicted point."""

    x_base: Tensor  # (σ_t/σ_s0)·x - expm1(-h)·D0
    denoised_0: Tensor
    d1s: list[Tensor]
    rhos_c: Tensor
    b_h: float


def _unipc_coefficients(
    lambdas: list[Tensor], lambda_t: Tensor, order: int
) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """h, r_k, the bh1 right-hand side b and the matrix R of UniPC (Zhao et al. 2023, arXiv:2302.04867, Alg. 2/3).

    `lambdas` are λ of the last `order` model evaluations, newest last.
    """
    lambda_0 = lambdas[-1]
    h = lambda_t - lambda_0
    rks = [(lambdas[-(k + 1)] - lambda_0) / h for k in range(1, order)] + [torch.ones((), dtype=_F32)]
    rks_t = torch.stack(rks)
    hh = -h  # data-prediction form
    hh64 = float(hh)
    # h·φ_k(h) recurrence in float64 on the host: it cancels catastrophically in float32 for small h.
    h_phi_k = math.expm1(hh64) / hh64 - 1
    factorial, b = 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / hh64)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh64 - 1 / factorial
    r_matrix = torch.stack([rks_t ** (k - 1) for k in range(1, order + 1)])
    return h, rks, torch.tensor(b, dtype=_F32), r_matrix


@torch.no_grad()
def sample_uni_pc(model: _Model, x: Tensor, sigmas: Tensor, callback: Report = None) -> Tensor:
    """UniPC-bh1 multistep, data prediction, orders up to 3 (Zhao et al. 2023, arXiv:2302.04867), as ComfyUI runs it.

    Written in VE form (UniPC's α_t factors cancel): predictor x_t = (σ_t/σ_s)·x - expm1(-h)·D0 + h·Σ ρ_k·D1_k (bh1); after
    the model is evaluated at x_t the corrector redoes the step with that value (UniC), and the evaluation is reused
    for the next predictor. ComfyUI's quirks are kept: a final σ of 0 is replaced by 0.001 (so the output keeps
    σ = 0.001 of noise), the order is min(3, steps - 1) with lower orders for warm-up and for the last steps, and the
    last step has no corrector.
    """
    steps = len(sigmas) - 1
    if steps < 1:
        return x
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001
    max_order = max(1, min(3, steps - 1))
    lambdas: list[Tensor] = []
    history: list[Tensor] = []
    pending: _UniPCCorrection | None = None
    for i in range(steps):
        denoised = model(x, ts[i])
        if pending is not None:  # UniC: redo the previous step with the model value at its end point
            corr_res = sum((d1 * _f(rho) for d1, rho in zip(pending.d1s, pending.rhos_c[:-1])), torch.zeros_like(x))
            d1_t = denoised - pending.denoised_0
            x = pending.x_base - (corr_res + d1_t * _f(pending.rhos_c[-1])) * pending.b_h
        lambdas = (lambdas + [-ts[i].log()])[-max_order:]
        history = (history + [denoised])[-max_order:]

        k = i + 1  # the step lands on ts[k]
        order = k if k < max_order else min(max_order, steps + 1 - k)
        lambda_t = -ts[k].log()
        h, rks, b, r_matrix = _unipc_coefficients(lambdas[-order:], lambda_t, order)
        denoised_0 = history[-1]
        d1s = [(history[-(j + 1)] - denoised_0) / _f(rks[j - 1]) for j in range(1, order)]
        b_h = _f(-h)
        x_base = x * _f(ts[k] / ts[i]) - denoised_0 * _f(torch.expm1(-h))
        if order == 1:
            x = x_base
        else:
            rhos_p = torch.tensor([0.5], dtype=_F32) if order == 2 else torch.linalg.solve(r_matrix[:-1, :-1], b[:-1])
            pred_res = sum(d1 * _f(rho) for d1, rho in zip(d1s, rhos_p))
            x = x_base - pred_res * b_h
        if k < steps:
            rhos_c = torch.tensor([0.5], dtype=_F32) if order == 1 else torch.linalg.solve(r_matrix, b)
            pending = _UniPCCorrection(x_base, denoised_0, d1s, rhos_c, b_h)
        _report(callback, i, x, denoised)
    return x


_DETERMINISTIC = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpmpp_2m": sample_dpmpp_2m,
    "uni_pc": sample_uni_pc,
}
_STOCHASTIC = {
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
}
assert set(SAMPLERS) == set(_DETERMINISTIC) | set(_STOCHASTIC)


def sample(
    sampler: str,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generators = None,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Run `sampler` from state `x` (already scaled noise + latent) along `sigmas`; returns the final x.

    ``denoiser(x, sigma) -> x0`` receives x in x's dtype and sigma as a float32 (B,) tensor on x's device. Sampler
    noise comes from `noise_sampler` (k-diffusion style ``noise(sigma, sigma_next)``; ``StageNoise.sampler`` makes
    ComfyUI's), else from `generator` (``GeneratorNoise``, see ``noise_like``). ``callback(step, total, sigma, x, denoised)`` runs after
    every step with sigma = sigmas[step] (where `denoised` was predicted) and x the new state; an exception raised
    by it propagates and ends sampling (interrupts).
    """
    name = resolve_sampler(sampler)
    sigmas = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=_F32).reshape(-1)
    total = len(sigmas) - 1
    if total < 1:
        return x
    _generator_list(generator, x.shape[0])  # validate before the first model call
    model = _Model(denoiser, x)
    report = None
    if callback is not None:

        def report(i: int, x_i: Tensor, denoised: Tensor) -> None:
            callback(i, total, sigmas[i], x_i, denoised)

    if name in _DETERMINISTIC:
        return _DETERMINISTIC[name](model, x, sigmas, callback=report)
    noise = noise_sampler if noise_sampler is not None else GeneratorNoise(x, generator)
    return _STOCHASTIC[name](model, x, sigmas, noise, callback=report)
