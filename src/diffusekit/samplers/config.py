"""Sampler configuration: our own dataclass, the translation from a reference ``scheduler_config.json``,
grid construction, and one entry point that runs any sampler by its config.

Our samplers step along their grid. Configs read from the reference implementation reproduce its
stepping rules where they differ from ours; those rules are built as explicit grids in ``build_grid``
(see ``_reference_stride_grid``), nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from diffusekit.diffusion.edm import (
    PRECONDITIONINGS,
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    edm_scalings,
    sigma_of_c_noise,
)
from diffusekit.diffusion.grids import (
    SPACINGS,
    Grid,
    consistency_timesteps,
    interpolate_sigma,
    karras_sigmas,
    linspace64,
    sigma_to_timestep,
    spaced_timesteps,
)
from diffusekit.diffusion.parametrization import PREDICTION_TYPES
from diffusekit.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule, make_betas, rescale_zero_terminal_snr
from diffusekit.errors import ConfigError, check_choice, check_positive_int, check_range
from diffusekit.limits import check_flag, check_float, translating
from diffusekit.samplers.common import Denoiser, EDMDenoiser, Generator, Model, StepInfo
from diffusekit.samplers.ddim import sample_ddim
from diffusekit.samplers.ddpm import VARIANCES, sample_ddpm
from diffusekit.samplers.dpm_solver import sample_dpmpp_2m
from diffusekit.samplers.euler import sample_euler, sample_euler_ancestral
from diffusekit.samplers.guidance import Gate, interval_gate
from diffusekit.samplers.heun import Churn, sample_heun
from diffusekit.samplers.kdpm2 import midpoint_sigma, sample_kdpm2
from diffusekit.samplers.lcm import sample_lcm
from diffusekit.samplers.pndm import sample_pndm
from diffusekit.samplers.unipc import sample_unipc

SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "pndm", "lcm", "heun", "kdpm2", "unipc")
SIGMA_SAMPLERS = ("euler", "euler_ancestral", "heun", "kdpm2")  # state is the VE sample x0 + sigma eps
MULTISTEP_SAMPLERS = ("dpmpp_2m", "unipc")  # VP state, integer times, grids on the sigma table
MAX_TRAIN_TIMESTEPS = 100_000  # the schedule is materialised: refuse a file claiming more before allocating
# the samplers that run on an EDM-preconditioned model: those whose only use of the grid's times is to pass
# them to the network (the EDM denoiser reads sigma instead)
EDM_SAMPLERS = ("ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "unipc")
ALIASES = {"euler-a": "euler_ancestral", "euler_a": "euler_ancestral", "dpm++2m": "dpmpp_2m", "plms": "pndm"}



@dataclass(frozen=True)
class SamplerConfig:
    """Everything that decides a sampling trajectory except the network, the noise and the step count."""

    sampler: str = "ddim"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    trained_betas: tuple[float, ...] | None = None
    zero_terminal_snr: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample: float | None = None  # clamp range for x0_hat, None = no clamp
    clip_eps: bool = False  # re-derive eps_hat from the clamped x0_hat (samplers.common.Denoiser)
    set_alpha_to_one: bool = True  # DDIM/PNDM: the last step lands on abar = 1 (else on abar_0)
    variance: str = "fixed_small"  # DDPM
    eta: float = 0.0  # DDIM
    karras_sigmas: bool = False  # Euler, Euler-ancestral, Heun, KDPM2, DPM-Solver++
    original_inference_steps: int = 50  # LCM: the number of times the consistency model was distilled on
    timestep_scaling: float = 10.0  # LCM: s = timestep_scaling * t in the boundary conditions
    reference_rules: bool = False  # reproduce the reference's stepping quirks (set by io.scheduler_config)
    # the EDM preconditioning (Karras et al. 2022, Table 1): the network is F of eq. 7 (prediction_type and the
    # beta schedule do not apply) and every grid is eq. 5's rho = 7 spacing of [sigma_min, sigma_max]
    preconditioning: str = "none"  # "none" | "edm"
    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    # Heun's stochastic variant (Karras et al. 2022, Alg. 2; S_churn = 0 is the deterministic Alg. 1)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float | None = None  # None: no upper bound
    s_noise: float = 1.0
    ignored_keys: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        name = ALIASES.get(self.sampler, self.sampler) if isinstance(self.sampler, str) else self.sampler
        object.__setattr__(self, "sampler", check_choice("sampler", name, SAMPLERS))
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        check_choice("variance", self.variance, VARIANCES)
        check_positive_int("num_train_timesteps", self.num_train_timesteps, minimum=2)
        if self.num_train_timesteps > MAX_TRAIN_TIMESTEPS:
            raise ConfigError(
                f"num_train_timesteps={self.num_train_timesteps} is too large; allowed: 2..{MAX_TRAIN_TIMESTEPS}"
            )
        check_range("eta", self.eta, 0.0, 1.0)
        if self.clip_sample is not None:
            check_range("clip_sample", self.clip_sample, 1e-6, float("inf"))
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ConfigError(
                f"trained_betas has {len(self.trained_betas)} entries, num_train_timesteps={self.num_train_timesteps}"
            )
        check_positive_int("steps_offset", self.steps_offset, minimum=0)
        check_positive_int("original_inference_steps", self.original_inference_steps)  # <= T: checked by the grid
        check_range("timestep_scaling", self.timestep_scaling, 1e-6, 1e6)
        for name in ("zero_terminal_snr", "set_alpha_to_one", "karras_sigmas", "reference_rules", "clip_eps"):
            check_flag(name, getattr(self, name))
        self._check_edm()
        self.schedule()  # validates beta_start/beta_end/trained_betas now, not at the first use

    def _check_edm(self) -> None:
        check_choice("preconditioning", self.preconditioning, PRECONDITIONINGS)
        check_float("sigma_data", self.sigma_data, 0.0, 1e3, open_low=True)
        check_float("sigma_min", self.sigma_min, 0.0, 1e3, open_low=True)
        check_float("sigma_max", self.sigma_max, self.sigma_min, 1e6, open_low=True)
        self.churn()  # checks s_churn, s_tmin, s_tmax, s_noise
        if self.preconditioning == "edm" and self.sampler not in EDM_SAMPLERS:
            raise ConfigError(f"sampler {self.sampler!r} does not run on an EDM-preconditioned model; allowed: "
                              f"{', '.join(EDM_SAMPLERS)}")  # fmt: skip
        if self.s_churn > 0 and (self.sampler != "heun" or self.preconditioning != "edm"):
            raise ConfigError(
                "s_churn > 0 (stochastic sampling, Karras et al. 2022 Alg. 2) needs sampler 'heun' and "
                f"preconditioning 'edm', got {self.sampler!r} and {self.preconditioning!r}"
            )

    def churn(self) -> Churn:
        """Heun's churn settings (Karras et al. 2022, Alg. 2)."""
        return Churn(self.s_churn, self.s_tmin, self.s_tmax, self.s_noise)

    def with_sampler(self, sampler: str, **changes: Any) -> SamplerConfig:
        """The same schedule with another sampler (as pipelines swap schedulers)."""
        return replace(self, sampler=sampler, **changes)

    def schedule(self) -> NoiseSchedule:
        """The noise schedule; under ``reference_rules`` computed in float32 as the reference does."""
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float64)
        else:
            betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
            if self.reference_rules and self.beta_schedule in ("linear", "scaled_linear"):
                # the reference evaluates these two in float32 (its cosine schedule in float64)
                betas = _float32_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return NoiseSchedule.from_betas(betas, float32_cumprod=self.reference_rules)

    def sigma_at(self, t: Tensor | float) -> float:
        """The noise level sigma (the variance-exploding one of Karras et al. 2022, eq. 5) at network time ``t``:
        with the EDM preconditioning t is c_noise = ln(sigma) / 4, otherwise a (fractional) training timestep of
        the schedule, sigma_t = sqrt((1 - abar_t) / abar_t). Per-step callers use :meth:`sigma_map`."""
        return self.sigma_map()(t)

    def sigma_map(self) -> Callable[[Tensor | float], float]:
        """:meth:`sigma_at` as a function, the schedule built once (the guidance gate calls it at every step)."""
        schedule = None if self.preconditioning == "edm" else self.schedule()

        def sigma(t: Tensor | float) -> float:
            t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[:1].cpu()
            return float((sigma_of_c_noise(t) if schedule is None else interpolate_sigma(schedule, t))[0])

        return sigma

    def guidance_gate(self, interval: Sequence[float] | None) -> Gate | None:
        """The gate limiting guidance to lo < sigma <= hi (:func:`~diffusekit.samplers.guidance.interval_gate`,
        Kynkäänniemi et al. 2024) on this config's noise levels; None (no interval): no gate, and no schedule
        built."""
        return None if interval is None else interval_gate(self.sigma_map(), interval)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ignored_keys")
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d

    @classmethod
    @translating("sampler config")
    def from_dict(cls, d: dict[str, Any]) -> SamplerConfig:
        """Our own saved form (see ``to_dict``); unknown keys are an error."""
        if not isinstance(d, dict):
            raise ConfigError(f"a sampler config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - {"ignored_keys"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown sampler config keys {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        if d.get("trained_betas") is not None:
            d["trained_betas"] = tuple(float(b) for b in d["trained_betas"])
        return cls(**d)


def _float32_betas(name: str, T: int, start: float, end: float) -> Tensor:
    if name == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32).double()
    return (torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2).double()


def _final_alpha_cumprod(config: SamplerConfig, schedule: NoiseSchedule) -> float:
    return 1.0 if config.set_alpha_to_one else float(schedule.alphas_cumprod[0])


def _reference_stride_grid(schedule: NoiseSchedule, timesteps: Tensor, num_steps: int, final: float) -> Grid:
    """The reference's DDIM/PNDM rule: step t lands on t - T // N, not on the next grid entry.

    The two agree for ``leading`` spacing; they differ for ``linspace`` and for ``trailing`` when N does
    not divide T. Kept so users migrating from the reference get the same image from the same seed.
    """
    t = timesteps.double()
    prev = t.long() - schedule.num_train_timesteps // num_steps
    abar = schedule.alphas_cumprod
    nxt = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
    return Grid(t, abar[t.long()], nxt)


def build_grid(config: SamplerConfig, num_steps: int) -> Grid:
    """The grid of ``num_steps`` steps that ``config.sampler`` walks."""
    if config.preconditioning == "edm":
        return _edm_grid(config, num_steps)
    schedule = config.schedule()
    T = schedule.num_train_timesteps
    check_positive_int("num_inference_steps", num_steps)
    if num_steps > T:
        raise ConfigError(f"num_inference_steps={num_steps} must be <= num_train_timesteps={T}")
    spacing, offset = config.timestep_spacing, config.steps_offset
    final = _final_alpha_cumprod(config, schedule)

    if config.sampler in SIGMA_SAMPLERS or config.sampler in MULTISTEP_SAMPLERS:
        # sigma = sqrt((1 - abar) / abar) is infinite where abar = 0 (zero terminal SNR): these samplers
        # start from abar = 2^-24 instead, as the reference does
        schedule = NoiseSchedule(schedule.alphas_cumprod.clamp(min=2.0**-24))
        if config.sampler in MULTISTEP_SAMPLERS and config.reference_rules and spacing == "linspace":
            # the reference's DPM-Solver and UniPC: N + 1 rounded linspace points, the last one dropped
            t = linspace64(0, T - 1, num_steps + 1).round().flip(0)[:-1]
        elif config.sampler in MULTISTEP_SAMPLERS and config.reference_rules and spacing == "leading":
            # ... and for leading spacing N + 1 multiples of T // (N + 1), the last (0) dropped, plus the offset
            # (SD-1.5 with 20 steps: 941, 894, ..., 48 where DDIM's rule gives 951, 901, ..., 1)
            t = (torch.arange(num_steps + 1, dtype=torch.float64) * (T // (num_steps + 1))).flip(0)[:-1] + offset
        else:
            integer = config.sampler in MULTISTEP_SAMPLERS
            t = spaced_timesteps(T, num_steps, spacing, offset, integer=integer)
        sigmas = interpolate_sigma(schedule, t)
        if config.karras_sigmas:
            sigmas = karras_sigmas(float(schedule.sigmas[0]), float(schedule.sigmas[-1]), num_steps)
            t = sigma_to_timestep(schedule, sigmas)
            if config.sampler in MULTISTEP_SAMPLERS and config.reference_rules:
                t = t.round()  # the reference's DPM-Solver and UniPC call the network at the nearest integer time
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        if config.sampler in SIGMA_SAMPLERS:
            init = float((sigmas[0] ** 2 + 1).sqrt())
            if config.reference_rules and spacing in ("linspace", "trailing"):
                init = float(sigmas[0])  # the reference's init_noise_sigma for these spacings
        else:
            init = 1.0
        grid = Grid.from_sigmas(t, sigmas, init_noise_sigma=init)
        if config.sampler == "kdpm2":
            mid = [midpoint_sigma(float(a), float(b)) for a, b in zip(sigmas[:-1], sigmas[1:])]
            mid_t = sigma_to_timestep(schedule, torch.tensor(mid[:-1], dtype=torch.float64))
            grid = replace(grid, midpoint_timesteps=torch.cat([mid_t, mid_t.new_zeros(1)]))  # (unused at sigma' = 0)
        return grid

    if config.sampler == "lcm":
        # the consistency model's own times (spacing and offset play no part); the last step lands on data
        t = consistency_timesteps(T, num_steps, config.original_inference_steps)
        grid = Grid.on_schedule(schedule, t, 1.0)
        return grid.to_precision(torch.float32) if config.reference_rules else grid

    t = spaced_timesteps(T, num_steps, spacing, offset)
    if config.reference_rules and config.sampler in ("ddim", "pndm"):
        grid = _reference_stride_grid(schedule, t, num_steps, final)
    else:
        grid = Grid.on_schedule(schedule, t, 1.0 if config.sampler == "ddpm" else final)
    # the reference does these samplers' coefficient arithmetic in float32; near t = 0 that changes
    # results beyond rounding (1 - abar cancels), so reproduce it
    return grid.to_precision(torch.float32) if config.reference_rules else grid


def _edm_grid(config: SamplerConfig, num_steps: int) -> Grid:
    """Karras et al. 2022 eq. 5 (rho = 7) from sigma_max down to sigma_min, then sigma = 0; the network times are
    c_noise = ln(sigma) / 4 (only shown to callbacks: the EDM denoiser reads sigma). The initial state is
    N(0, sigma_max^2 I) (Alg. 1 line 1): scale sigma_0 for the VE samplers, sigma_0 sqrt(abar_0) for the VP ones."""
    check_positive_int("num_inference_steps", num_steps)
    sigmas = karras_sigmas(config.sigma_min, config.sigma_max, num_steps, RHO)
    t = edm_scalings(sigmas, config.sigma_data).c_noise
    s0 = float(sigmas[0])
    init = s0 if config.sampler in SIGMA_SAMPLERS else s0 / (1 + s0**2) ** 0.5
    return Grid.from_sigmas(t, torch.cat([sigmas, sigmas.new_zeros(1)]), init_noise_sigma=init)


def ddpm_noise_mask(config: SamplerConfig, grid: Grid) -> list[bool]:
    """Which DDPM steps add noise: ours, every step that does not land on clean data; the reference's,
    every step whose timestep is > 0 (so a final step from t = 1 still draws)."""
    if config.reference_rules:
        return [bool(t > 0) for t in grid.timesteps]
    return [bool(a < 1) for a in grid.alphas_cumprod_next]


def run_sampler(
    config: SamplerConfig,
    model: Model,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    generator: Generator = None,
    noise: Sequence[Tensor] | Callable[[int, Tensor], Tensor] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Sample along ``grid`` from the state ``x`` (already scaled by ``grid.init_noise_sigma``)."""
    if config.preconditioning == "edm":
        denoiser = EDMDenoiser(model, config.sigma_data, config.clip_sample)
    else:
        denoiser = Denoiser(model, config.prediction_type, config.clip_sample, config.clip_eps)
    s = config.sampler
    if s == "ddpm":
        mask = ddpm_noise_mask(config, grid)
        return sample_ddpm(denoiser, x, grid, cond=cond, variance=config.variance, inject_noise=mask,
                           generator=generator, noise=noise, callback=callback)  # fmt: skip
    if s == "ddim":
        return sample_ddim(denoiser, x, grid, cond=cond, eta=config.eta, generator=generator, noise=noise,
                           callback=callback)  # fmt: skip
    if s == "euler":
        return sample_euler(denoiser, x, grid, cond=cond, callback=callback)
    if s == "euler_ancestral":
        return sample_euler_ancestral(denoiser, x, grid, cond=cond, generator=generator, noise=noise,
                                      callback=callback)  # fmt: skip
    if s == "dpmpp_2m":
        return sample_dpmpp_2m(denoiser, x, grid, cond=cond, callback=callback)
    if s == "heun":
        return sample_heun(denoiser, x, grid, cond=cond, churn=config.churn(), generator=generator, noise=noise,
                           callback=callback)  # fmt: skip
    if s == "kdpm2":
        return sample_kdpm2(denoiser, x, grid, cond=cond, callback=callback)
    if s == "unipc":
        return sample_unipc(denoiser, x, grid, cond=cond, callback=callback)
    if s == "lcm":
        return sample_lcm(denoiser, x, grid, cond=cond, timestep_scaling=config.timestep_scaling, generator=generator,
                          noise=noise, callback=callback)  # fmt: skip
    return sample_pndm(denoiser, x, grid, cond=cond, callback=callback)


def noised_state(config: SamplerConfig, grid: Grid, x0: Tensor, noise: Tensor) -> Tensor:
    """The sampler state at the start of ``grid`` for clean data x0 (image-to-image).

    VP samplers: sqrt(abar) x0 + sqrt(1 - abar) noise (DDPM eq. 4); sigma samplers: x0 + sigma noise.
    """
    a = float(grid.alphas_cumprod[0])
    if config.sampler in SIGMA_SAMPLERS:
        return x0 + float(grid.sigmas[0]) * noise
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise
