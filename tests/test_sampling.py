"""cascade.sampling against the reference notes (§4), independent formulas, k-diffusion and diffusers.

What is compared with what:
* schedules: the printed reference tables (§4.5, at their printed precision), an independent float64 evaluation of
  each ComfyUI scheduler definition (rtol 1e-4), and ComfyUI's scipy-based beta scheduler (exact);
* euler / heun / dpm_2 / dpmpp_2m: k-diffusion's samplers on the same analytic denoiser (1e-5);
* euler_ancestral / dpmpp_2m_sde / dpmpp_sde: k-diffusion given a noise_sampler that replays our generator's draws
  (for dpmpp_sde combined into the nested Brownian increment k-diffusion asks for) (1e-5);
* ddpm: diffusers' DDPMWuerstchenScheduler.step on its own t grid and noise (float32, 1e-5);
* lcm: diffusers' LCMScheduler with its boundary condition switched off (c_skip -> 0), same noise (1e-5);
* uni_pc: diffusers' UniPCMultistepScheduler (bh1, order 3, lower_order_final) driven on our sigmas (1e-5), plus
  convergence to the exact probability-flow ODE solution.
The analytic denoiser: data ~ N(mu, s^2) per element, so D(x, σ) = (s²x + σ²mu)/(s²+σ²) exactly and the ODE solution
is x(σ) = mu + (x(σ0) - mu)·sqrt((s²+σ²)/(s²+σ0²)).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from cascade import sampling as S
from tests._kdiffusion import load as load_kdiffusion


K = load_kdiffusion()
SHAPE = (2, 3, 4, 4)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
class Gaussian:
    """Data ~ N(mu, s²) elementwise: the exact denoiser and ODE solution are known in closed form."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(SHAPE, generator=g).to(dtype)
        self.s = (0.5 + torch.rand(SHAPE, generator=g)).to(dtype)
        self.calls: list[tuple[torch.dtype, torch.dtype, tuple[int, ...]]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        sig = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        s2 = self.s**2
        return (s2 * x + sig**2 * self.mu) / (s2 + sig**2)

    def ode_solution(self, x0: torch.Tensor, sigma0: float, sigma1: float) -> torch.Tensor:
        s2 = self.s**2
        return self.mu + (x0 - self.mu) * torch.sqrt((s2 + sigma1**2) / (s2 + sigma0**2))


def start(sigmas: torch.Tensor, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return (z * S.initial_noise_scale(sigmas)).to(dtype)


def replay(seed: int, dtype: torch.dtype):
    """A k-diffusion noise_sampler returning exactly the draws cascade.sampling makes from Generator(seed)."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=g, dtype=torch.float32).to(dtype)


class BrownianReplay:
    """k-diffusion noise_sampler for dpmpp_sde: per step it asks for [σ_s, σ] and then the enclosing [σ', σ].

    Brownian motion makes the second the normalised sum of the first increment and an independent one on [σ', σ_s];
    both draws come from Generator(seed) in the order cascade.sampling makes them.
    """

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        self.g, self.dtype, self.sub = torch.Generator().manual_seed(seed), dtype, None

    def __call__(self, sigma, sigma_next):
        z = torch.randn(SHAPE, generator=self.g, dtype=torch.float32).to(self.dtype)
        sigma, sigma_next = float(sigma), float(sigma_next)
        if self.sub is None:
            self.sub = (z, sigma_next)
            return z
        z1, sigma_s = self.sub
        self.sub = None
        return (z1 * math.sqrt(sigma - sigma_s) + z * math.sqrt(sigma_s - sigma_next)) / math.sqrt(sigma - sigma_next)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------------
# noise schedule and reference tables (§4.1, §4.4, §4.5)
# ---------------------------------------------------------------------------------------------------------------
def printed(values: list[float], actual: torch.Tensor, decimals: int) -> None:
    """Reference values are printed to `decimals` places: agree to half a unit of the last printed digit."""
    assert len(actual) == len(values)
    np.testing.assert_allclose(actual.double().numpy(), values, rtol=0, atol=0.5 * 10**-decimals + 1e-9)


STAGE_C_30 = [99.995, 32.480, 17.624, 12.049, 9.115, 7.298, 6.056, 5.149, 4.455, 3.904, 3.453, 3.076, 2.755, 2.476,
              2.230, 2.012, 1.815, 1.635, 1.470, 1.317, 1.174, 1.039, 0.912, 0.790, 0.673, 0.560, 0.451, 0.343, 0.238,
              0.133, 0]  # fmt: skip
STAGE_C_20 = [99.995, 22.865, 12.049, 8.112, 6.056, 4.781, 3.904, 3.257, 2.755, 2.349, 2.012, 1.723, 1.470, 1.244,
              1.039, 0.850, 0.673, 0.505, 0.343, 0.185, 0]  # fmt: skip
STAGE_B_10 = [99.995, 55.231, 28.873, 14.125, 6.370, 2.593, 0.925, 0.276]
STAGE_B_10_TAIL = [0.0638, 0.0100, 0]
STAGE_B_10_R = [0.9936, 0.9884, 0.9778, 0.9546, 0.9001, 0.7638, 0.4709, 0.1648, 0.0337, 0.0023]


def test_reference_tables_stage_c_sgm_uniform_shift_2():
    s30 = S.get_sigmas("sgm_uniform", 30, shift=2.0)
    printed(STAGE_C_30, s30, 3)
    r30 = S.timestep_from_sigma(s30[:-1])
    printed([0.9936, 0.9803, 0.9636, 0.9469], r30[:4], 4)
    printed([0.1420, 0.0771], r30[-2:], 4)
    printed(STAGE_C_20, S.get_sigmas("sgm_uniform", 20, shift=2.0), 3)
    s40 = S.get_sigmas("sgm_uniform", 40, shift=2.0)
    assert len(s40) == 41
    printed([99.995, 41.100, 22.865, 15.805, 12.049, 9.711], s40[:6], 3)
    printed([0.343, 0.264, 0.185, 0.106, 0], s40[-5:], 3)


def test_reference_table_stage_b_karras_shift_1():
    s10 = S.get_sigmas("karras", 10, shift=1.0)
    printed(STAGE_B_10, s10[:8], 3)
    printed(STAGE_B_10_TAIL, s10[8:], 4)
    printed(STAGE_B_10_R, S.timestep_from_sigma(s10[:-1]), 4)


def test_schedule_constants():
    assert S.SIGMA_MIN == pytest.approx(0.0100013, abs=5e-8)
    assert S.SIGMA_MAX == pytest.approx(99.995, abs=5e-4)
    assert float(S.timestep_from_sigma(S.SIGMA_MAX)) == pytest.approx(0.99358, abs=5e-6)
    assert float(S.timestep_from_sigma(S.SIGMA_MIN)) == pytest.approx(0.002257, abs=5e-7)
    for shift in (1.0, 2.0, 4.0):
        schedule = S.NoiseSchedule(shift)
        assert (schedule.sigma_min, schedule.sigma_max) == (S.SIGMA_MIN, S.SIGMA_MAX)
        table = schedule.sigmas
        assert table.dtype == torch.float32 and len(table) == 10000
        assert torch.all(table[1:] >= table[:-1])
        assert torch.equal(table, S.sigma_from_t(torch.arange(1, 10001, dtype=torch.float64).float() / 10000, shift))
    assert S.NoiseSchedule(2.0).percent_to_sigma(0.0) > 1e8 and S.NoiseSchedule(2.0).percent_to_sigma(1.0) == 0.0


# Independent float64 evaluation of the same definitions (reference notes §4.1/§4.5), used for other steps/shifts.
def alpha_bar64(t: np.ndarray, shift: float) -> np.ndarray:
    s = 0.008
    ab = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    if shift != 1.0:
        ab = 1 / (1 + np.exp(-(np.log(ab / (1 - ab)) - 2 * np.log(shift))))
    return np.clip(ab, 1e-4, 0.9999)


def sigma64(t, shift: float) -> np.ndarray:
    ab = alpha_bar64(np.asarray(t, dtype=np.float64), shift)
    return np.sqrt((1 - ab) / ab)


def t_of_sigma64(sigma: float) -> float:
    s = 0.008
    init = np.cos(s / (1 + s) * np.pi / 2) ** 2
    return float(np.arccos(np.sqrt(init / (sigma**2 + 1))) / (np.pi / 2) * (1 + s) - s)


def scheduler64(name: str, n: int, shift: float) -> np.ndarray:
    smin, smax = S.NoiseSchedule(shift).sigma_min, S.NoiseSchedule(shift).sigma_max  # the table's (float32) ends
    if name == "karras":
        ramp = np.linspace(0, 1, n)
        sig = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    elif name == "exponential":
        sig = np.exp(np.linspace(np.log(smax), np.log(smin), n))
    elif name in ("normal", "sgm_uniform"):
        ts = np.linspace(t_of_sigma64(smax), t_of_sigma64(smin), n + 1)
        sig = sigma64(ts[:-1] if name == "sgm_uniform" else np.linspace(ts[0], ts[-1], n), shift)
    elif name == "simple":
        sig = sigma64([(10000 - int(i * 10000 / n)) / 10000 for i in range(n)], shift)
    elif name == "beta":
        idx = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 9999).astype(int)
        idx = [int(i) for k, i in enumerate(idx) if k == 0 or i != idx[k - 1]]
        sig = sigma64([(i + 1) / 10000 for i in idx], shift)
    return np.append(sig, 0.0)


def test_sigma_from_t_matches_float64_formula():
    """float32 like ComfyUI: 1e-4 relative down to t = 0.01 (σ ≈ 0.02); below, 1 - ᾱ cancels in float32 (~1e-3)."""
    t = np.linspace(0.01, 1.0, 1000)
    for shift in (1.0, 2.0, 4.0):
        ours = S.sigma_from_t(torch.tensor(t), shift).double().numpy()
        np.testing.assert_allclose(ours, sigma64(t, shift), rtol=1e-4)
        t_low = np.linspace(1e-4, 0.01, 100)
        ours = S.sigma_from_t(torch.tensor(t_low), shift).double().numpy()
        np.testing.assert_allclose(ours, sigma64(t_low, shift), rtol=4e-3)
    sig = np.geomspace(0.0101, 99.9, 500)
    r = S.timestep_from_sigma(torch.tensor(sig)).double().numpy()
    np.testing.assert_allclose(r, [t_of_sigma64(v) for v in sig], rtol=0, atol=5e-6)


@pytest.mark.parametrize("scheduler", S.SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 7, 40])
@pytest.mark.parametrize("shift", [1.0, 2.0, 4.0])
def test_schedulers_match_their_definition(scheduler, steps, shift):
    sigmas = S.get_sigmas(scheduler, steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.device.type == "cpu"
    assert len(sigmas) == steps + 1
    assert sigmas[-1] == 0 and torch.all(sigmas[1:] <= sigmas[:-1])
    # normal/sgm_uniform at shift 1 start at σ(t(σ_max)) = 99.9942 in float32, as in ComfyUI (still "max denoise")
    assert float(sigmas[0]) == pytest.approx(S.SIGMA_MAX, rel=1e-5)
    # 1e-4 relative; below σ(t = 0.01) float32's 1 - ᾱ cancellation, which ComfyUI shares, allows 1e-3
    actual, expected = sigmas.double().numpy(), scheduler64(scheduler, steps, shift)
    high = expected > sigma64(0.01, shift)
    np.testing.assert_allclose(actual[high], expected[high], rtol=1e-4, atol=0)
    np.testing.assert_allclose(actual[~high], expected[~high], rtol=1e-3, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 40, 64, 150])
def test_beta_scheduler_equals_comfyui_scipy_version(steps):
    table = S.NoiseSchedule(2.0).sigmas
    idx = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 9999)
    expected, last = [], -1
    for t in idx:
        if t != last:
            expected.append(float(table[int(t)]))
        last = t
    assert torch.equal(S.get_sigmas("beta", steps, 2.0), torch.tensor(expected + [0.0]))


@pytest.mark.parametrize("a,b", [(0.6, 0.6), (0.5, 2.0), (2.0, 3.0), (1.0, 1.0), (5.0, 0.7)])
def test_beta_quantile_matches_scipy(a, b):
    ps = np.concatenate([np.linspace(1e-6, 1 - 1e-6, 401), [0.5, 1e-3, 0.999]])
    mine = np.array([S._beta_ppf(float(p), a, b) for p in ps])
    np.testing.assert_allclose(mine, scipy.stats.beta.ppf(ps, a, b), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("scheduler", S.SCHEDULERS)
def test_denoise_keeps_tail_of_longer_schedule(scheduler):
    for steps, denoise in ((10, 0.5), (7, 0.6), (20, 0.3)):
        partial = S.get_sigmas(scheduler, steps, 2.0, denoise=denoise)
        full = S.get_sigmas(scheduler, int(steps / denoise), 2.0)
        assert torch.equal(partial, full[-(steps + 1) :])
        assert len(partial) == steps + 1 and partial[-1] == 0
    assert torch.equal(S.get_sigmas(scheduler, 9, 2.0, denoise=0.99995), S.get_sigmas(scheduler, 9, 2.0))
    with pytest.raises(ValueError):
        S.get_sigmas(scheduler, 0)
    with pytest.raises(ValueError):
        S.get_sigmas(scheduler, 5, denoise=0.0)


def test_sigmas_for_discards_penultimate_for_dpm2_and_unipc():
    for sampler in ("dpm_2", "uni_pc", "DPM2", "UniPC"):
        longer = S.get_sigmas("karras", 11, 1.0)
        assert torch.equal(S.sigmas_for(sampler, "karras", 10, 1.0), torch.cat([longer[:-2], longer[-1:]]))
        with_denoise = S.sigmas_for(sampler, "sgm_uniform", 10, 2.0, denoise=0.5)
        longer = S.get_sigmas("sgm_uniform", 21, 2.0)
        assert torch.equal(with_denoise, torch.cat([longer[:-2], longer[-1:]])[-11:])
    for sampler in ("euler", "dpmpp_2m", "euler_ancestral", "ddpm", "lcm"):
        assert torch.equal(S.sigmas_for(sampler, "beta", 12, 2.0, 0.8), S.get_sigmas("beta", 12, 2.0, 0.8))


def test_initial_noise_scale():
    full = S.get_sigmas("sgm_uniform", 20, 2.0)
    assert S.initial_noise_scale(full) == pytest.approx(math.sqrt(1 + S.SIGMA_MAX**2), rel=1e-6)
    partial = S.get_sigmas("sgm_uniform", 10, 2.0, denoise=0.5)
    assert S.initial_noise_scale(partial) == pytest.approx(float(partial[0]), rel=0)
    assert S.initial_noise_scale(torch.tensor([150.0, 0.0])) == pytest.approx(math.sqrt(1 + 150.0**2), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# samplers vs k-diffusion
# ---------------------------------------------------------------------------------------------------------------
SCHEDULES = {"karras-b": ("karras", 10, 1.0), "sgm-c": ("sgm_uniform", 12, 2.0), "exp-short": ("exponential", 4, 1.0)}


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2", "dpmpp_2m"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_deterministic_samplers_match_kdiffusion(sampler, schedule):
    sigmas = S.sigmas_for(sampler, *SCHEDULES[schedule])
    model = Gaussian()
    x = start(sigmas)
    ours = S.sample(sampler, model, x, sigmas)
    reference = getattr(K, f"sample_{sampler}")(model, x, sigmas, disable=True)
    assert_close(ours, reference)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_stochastic_samplers_match_kdiffusion_with_replayed_noise(sampler, schedule):
    sigmas = S.sigmas_for(sampler, *SCHEDULES[schedule])
    model = Gaussian()
    x = start(sigmas)
    ours = S.sample(sampler, model, x, sigmas, torch.Generator().manual_seed(7))
    noise = BrownianReplay(7, x.dtype) if sampler == "dpmpp_sde" else replay(7, x.dtype)
    reference = getattr(K, f"sample_{sampler}")(model, x, sigmas, disable=True, noise_sampler=noise)
    assert_close(ours, reference)
    assert not torch.allclose(ours, S.sample(sampler, model, x, sigmas, torch.Generator().manual_seed(8)))


def test_brownian_noise_pair_has_brownian_covariance():
    """dpmpp_sde's second noise must correlate with the first as nested Brownian increments do: corr = sqrt(Δ1/Δ)."""
    sigma, sigma_next = torch.tensor(4.0), torch.tensor(1.0)
    sigma_s = (sigma * sigma_next).sqrt()
    seen: list[torch.Tensor] = []

    def model(x, s):
        seen.append(x.clone())
        return torch.zeros_like(x)

    x = torch.zeros(20000, 1)
    out = S.sample("dpmpp_sde", model, x, torch.stack([sigma, sigma_next]), torch.Generator().manual_seed(3))
    _, sigma_up_1 = S._ancestral_step(sigma, sigma_s)
    _, sigma_up_2 = S._ancestral_step(sigma, sigma_next)
    n1 = seen[1] / float(sigma_up_1)  # x_2 = 0 + n1·σ_up
    n2 = out / float(sigma_up_2)  # with D = 0 the deterministic parts vanish
    corr = float((n1 * n2).mean() / (n1.std() * n2.std()))
    assert corr == pytest.approx(math.sqrt(float((sigma - sigma_s) / (sigma - sigma_next))), abs=0.02)
    assert float(n2.std()) == pytest.approx(1.0, abs=0.02)


# ---------------------------------------------------------------------------------------------------------------
# samplers vs diffusers
# ---------------------------------------------------------------------------------------------------------------
def test_ddpm_matches_diffusers_wuerstchen_scheduler():
    from diffusers import DDPMWuerstchenScheduler

    steps, seed = 12, 11
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(steps)
    sigmas = S.sigma_from_t(scheduler.timesteps, 1.0)  # the t grid as sigmas; t=0 is clamped to σ=0.0100005
    model = Gaussian(dtype=torch.float32)
    x = start(sigmas, dtype=torch.float32)

    states: list[torch.Tensor] = []
    S.sample("ddpm", model, x, sigmas, torch.Generator().manual_seed(seed),
             callback=lambda i, n, sigma, x_i, d: states.append(x_i))  # fmt: skip

    x_vp = x / math.sqrt(1 + float(sigmas[0]) ** 2)
    g = torch.Generator().manual_seed(seed)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        sigma = sigmas[i]
        x_ve = x_vp * math.sqrt(1 + float(sigma) ** 2)
        eps = (x_ve - model(x_ve, sigma.reshape(1))) / sigma
        x_vp = scheduler.step(eps, t.reshape(1), x_vp, generator=g).prev_sample
        ours = states[i] / math.sqrt(1 + float(sigmas[i + 1]) ** 2)
        if i == steps - 1:
            # diffusers adds no noise when landing on t = 0; we still sit at σ = 0.01 > 0 and add it: take it out
            ac, ac_prev = 1 / (1 + float(sigma) ** 2), 1 / (1 + float(sigmas[-1]) ** 2)
            alpha = ac / ac_prev
            std = math.sqrt((1 - alpha) * (1 - ac_prev) / (1 - ac))
            z = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                last_noise = torch.randn(SHAPE, generator=z)
            ours = ours - std * last_noise
        assert_close(ours, x_vp)


def test_ddpm_lands_on_denoised_when_last_sigma_is_zero():
    sigmas = S.get_sigmas("sgm_uniform", 6, 2.0)
    seen = []
    out = S.sample("ddpm", Gaussian(), start(sigmas), sigmas, torch.Generator().manual_seed(0),
                   callback=lambda i, n, s, x, d: seen.append(d))  # fmt: skip
    assert_close(out, seen[-1], tol=1e-6)


def test_lcm_matches_diffusers_lcm_scheduler():
    from diffusers import LCMScheduler

    seed = 5
    scheduler = LCMScheduler(timestep_scaling=1e7)  # c_skip ~ 1e-15, c_out ~ 1: plain LCM multistep sampling
    scheduler.set_timesteps(4)
    alphas = scheduler.alphas_cumprod[scheduler.timesteps]
    sigmas = torch.cat([((1 - alphas) / alphas).sqrt(), torch.zeros(1)]).float()
    model = Gaussian(dtype=torch.float32)
    x = start(sigmas, dtype=torch.float32)

    states: list[torch.Tensor] = []
    S.sample("lcm", model, x, sigmas, torch.Generator().manual_seed(seed),
             callback=lambda i, n, sigma, x_i, d: states.append(x_i))  # fmt: skip

    x_vp = x * alphas[0].sqrt()
    g = torch.Generator().manual_seed(seed)
    for i, t in enumerate(scheduler.timesteps):
        x_ve = x_vp / alphas[i].sqrt()
        eps = (x_ve - model(x_ve, sigmas[i].reshape(1))) / sigmas[i]
        x_vp = scheduler.step(eps, t, x_vp, generator=g).prev_sample
        scale = alphas[i + 1].sqrt() if i + 1 < len(alphas) else torch.tensor(1.0)  # final output is x0 itself
        assert_close(states[i] * scale, x_vp)


def test_lcm_is_exact_for_a_perfect_denoiser():
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    sigmas = S.get_sigmas("exponential", 5, 1.0)
    out = S.sample("lcm", lambda x, s: x0.clone(), start(sigmas, dtype=torch.float32), sigmas,
                   torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(out, x0)


def _diffusers_unipc(model: Gaussian, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    from diffusers import UniPCMultistepScheduler

    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001  # ComfyUI's uni_pc ends at σ = 0.001
    steps = len(ts) - 1
    scheduler = UniPCMultistepScheduler(solver_order=3, solver_type="bh1", lower_order_final=True, predict_x0=True)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = ts.double()  # float64 reference arithmetic on our (float32) sigma values
    scheduler.timesteps = torch.arange(steps)
    scheduler.set_begin_index(0)
    x_vp = x / math.sqrt(1 + float(ts[0]) ** 2)
    for i in range(steps):
        sigma = ts[i]
        x_ve = x_vp * math.sqrt(1 + float(sigma) ** 2)
        eps = (x_ve - model(x_ve, sigma.reshape(1))) / sigma
        x_vp = scheduler.step(eps, scheduler.timesteps[i], x_vp).prev_sample
    return x_vp * math.sqrt(1 + float(ts[-1]) ** 2)


@pytest.mark.parametrize("schedule", [("karras", 10, 1.0), ("sgm_uniform", 20, 2.0), ("simple", 5, 2.0),
                                      ("normal", 3, 1.0), ("exponential", 2, 1.0)])  # fmt: skip
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' set_timesteps vs numpy 2, harmless
def test_unipc_matches_diffusers_bh1(schedule):
    sigmas = S.sigmas_for("uni_pc", *schedule)
    model = Gaussian()
    x = start(sigmas)
    assert_close(S.sample("uni_pc", model, x, sigmas), _diffusers_unipc(model, x, sigmas))


def test_unipc_converges_to_exact_ode_solution():
    model = Gaussian()
    errors = []
    for steps in (8, 16, 32):
        sigmas = S.get_sigmas("exponential", steps, 1.0)
        x = start(sigmas)
        exact = model.ode_solution(x, float(sigmas[0]), 0.001)  # uni_pc stops at σ = 0.001
        errors.append(float((S.sample("uni_pc", model, x, sigmas) - exact).abs().max()))
    assert errors[-1] < 1e-3
    assert errors[0] / errors[1] > 4 and errors[1] / errors[2] > 4  # at least second order


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("dpm_2", 2), ("dpmpp_2m", 2), ("uni_pc", 3)])
def test_deterministic_samplers_converge_at_their_order(sampler, order):
    """Against the exact ODE solution: doubling the karras steps divides the error by about 2^order."""
    model = Gaussian()
    errors = []
    for steps in (30, 60):
        sigmas = S.sigmas_for(sampler, "karras", steps, 1.0)
        x = start(sigmas)
        exact = model.ode_solution(x, float(sigmas[0]), 0.001 if sampler == "uni_pc" else 0.0)
        errors.append(float((S.sample(sampler, model, x, sigmas) - exact).abs().max()))
    assert errors[0] / errors[1] > 0.85 * 2**order
    assert errors[1] < 0.15


# ---------------------------------------------------------------------------------------------------------------
# seeds, dtypes, callbacks, names
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "ddpm", "lcm"])
def test_seeds_reproduce_and_batch_items_are_independent(sampler):
    sigmas = S.sigmas_for(sampler, "karras", 6, 1.0)
    model = Gaussian(dtype=torch.float32)
    x = start(sigmas, dtype=torch.float32)

    def run(gen, x_in=x, den=model):
        return S.sample(sampler, den, x_in, sigmas, gen)

    a = run(torch.Generator().manual_seed(42))
    assert torch.equal(a, run(torch.Generator().manual_seed(42)))
    assert not torch.allclose(a, run(torch.Generator().manual_seed(43)))

    batched = run([torch.Generator().manual_seed(100), torch.Generator().manual_seed(200)])
    for i, seed in enumerate((100, 200)):

        def item_model(x_i, sigma, i=i):
            s2, mu = model.s[i : i + 1] ** 2, model.mu[i : i + 1]
            sig = sigma.reshape(-1, 1, 1, 1)
            return (s2 * x_i + sig**2 * mu) / (s2 + sig**2)

        alone = run(torch.Generator().manual_seed(seed), x[i : i + 1], item_model)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="generators"):
        run([torch.Generator()] * 3)


def test_noise_like_draws_on_cpu_in_float32():
    x = torch.zeros(2, 3, 4, dtype=torch.float16)
    noise = S.noise_like(x, torch.Generator().manual_seed(9))
    assert noise.dtype == torch.float16
    assert torch.equal(noise, torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9)).half())
    per_item = S.noise_like(x, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert torch.equal(per_item[1], torch.randn(3, 4, generator=torch.Generator().manual_seed(2)).half())


@pytest.mark.parametrize("sampler", S.SAMPLERS)
def test_denoiser_sees_caller_dtype_and_float32_batch_sigma(sampler):
    sigmas = S.sigmas_for(sampler, "karras", 4, 1.0)
    model = Gaussian(dtype=torch.bfloat16)
    out = S.sample(sampler, model, start(sigmas, dtype=torch.bfloat16), sigmas, torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and out.shape == SHAPE and torch.isfinite(out.float()).all()
    assert set(model.calls) == {(torch.bfloat16, torch.float32, (SHAPE[0],))}


@pytest.mark.parametrize("sampler", S.SAMPLERS)
def test_callback_once_per_step_and_exceptions_stop_sampling(sampler):
    sigmas = S.sigmas_for(sampler, "sgm_uniform", 5, 2.0)
    model = Gaussian()
    events = []
    S.sample(sampler, model, start(sigmas), sigmas, torch.Generator().manual_seed(0),
             callback=lambda i, n, sigma, x, d: events.append((i, n, float(sigma), x.shape, d.shape)))  # fmt: skip
    assert [e[0] for e in events] == list(range(5))
    assert all(e[1] == 5 and e[3] == SHAPE and e[4] == SHAPE for e in events)
    assert [e[2] for e in events] == [float(s) for s in sigmas[:-1]]

    class Stop(Exception):
        pass

    def interrupt(i, n, sigma, x, d):
        if i == 1:
            raise Stop

    calls_before = len(model.calls)
    model.calls.clear()
    with pytest.raises(Stop):
        S.sample(sampler, model, start(sigmas), sigmas, torch.Generator().manual_seed(0), callback=interrupt)
    assert 0 < len(model.calls) < calls_before  # stopped early


@pytest.mark.parametrize(
    "name,canonical",
    [("Euler", "euler"), ("Euler a", "euler_ancestral"), ("euler_ancestral", "euler_ancestral"), ("Heun", "heun"),
     ("DPM2", "dpm_2"), ("DPM++ 2M", "dpmpp_2m"), ("dpmpp_2m", "dpmpp_2m"), ("DPM++ 2M SDE", "dpmpp_2m_sde"),
     ("DPM++ SDE", "dpmpp_sde"), ("LCM", "lcm"), ("UniPC", "uni_pc"), ("uni_pc", "uni_pc"), ("DDPM", "ddpm"),
     ("  dpm++ 2m  ", "dpmpp_2m")],
)  # fmt: skip
def test_sampler_aliases(name, canonical):
    assert S.resolve_sampler(name) == canonical


@pytest.mark.parametrize(
    "name,canonical",
    [("Karras", "karras"), ("SGM Uniform", "sgm_uniform"), ("sgm_uniform", "sgm_uniform"),
     ("Exponential", "exponential"), ("Normal", "normal"), ("Simple", "simple"), ("Beta", "beta")],
)  # fmt: skip
def test_scheduler_aliases(name, canonical):
    assert S.resolve_scheduler(name) == canonical


def test_every_canonical_name_resolves_to_itself_and_unknown_names_are_explained():
    assert all(S.resolve_sampler(n) == n for n in S.SAMPLERS)
    assert all(S.resolve_scheduler(n) == n for n in S.SCHEDULERS)
    from cascade.names import SAMPLER_TITLES

    with pytest.raises(ValueError, match=r"DPM\+\+ 2M") as err:
        S.resolve_sampler("DPM++ 3M SDE")
    assert all(title in str(err.value) for title in SAMPLER_TITLES.values())
    with pytest.raises(ValueError, match="SGM Uniform"):
        S.resolve_scheduler("Align Your Steps")
    with pytest.raises(ValueError):
        S.sample("nope", Gaussian(), torch.zeros(SHAPE), S.get_sigmas("karras", 2))
    with pytest.raises(ValueError):
        S.get_sigmas("nope", 5)


def test_runtime_needs_neither_scipy_nor_kdiffusion():
    import subprocess
    import sys

    code = "import sys, cascade.sampling; print(sorted(m for m in ('scipy', 'k_diffusion', 'torchsde') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.stdout.strip() == "[]"
