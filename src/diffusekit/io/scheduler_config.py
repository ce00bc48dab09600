"""The reference's ``scheduler_config.json`` <-> our ``SamplerConfig`` (one verb for every component: io/*_config.py).

A config read from a reference file follows the reference's stepping rules (``reference_rules``; see
``samplers.config.build_grid``), unless the file was written by diffusekit (it then carries ``_diffusekit_version``).
"""

from __future__ import annotations

from typing import Any

from diffusekit import __version__
from diffusekit.diffusion.edm import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from diffusekit.errors import ConfigError
from diffusekit.limits import translating
from diffusekit.samplers.config import MULTISTEP_SAMPLERS, SamplerConfig
from diffusekit.samplers.ddpm import VARIANCES

EDM_REFERENCE_CLASS = "EDMEulerScheduler"  # the reference's scheduler with EDM preconditioning
# our own key (a leading underscore: the reference skips it): eps_hat re-derived from the clamped x0_hat
CLIP_EPS_KEY = "_diffusekit_clip_eps"
# the reference's scheduler class names -> our sampler names
REFERENCE_CLASSES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "PNDMScheduler": "pndm",
    "LCMScheduler": "lcm",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "kdpm2",
    "UniPCMultistepScheduler": "unipc",
}


@translating("scheduler config")
def scheduler_from_diffusers(cfg: dict[str, Any], sampler: str | None = None) -> SamplerConfig:
    """Translate a reference ``scheduler_config.json`` (keys that mean nothing here are ignored).

    ``sampler`` overrides the algorithm named by ``_class_name`` (pipelines swap schedulers while
    keeping the noise schedule). The result follows the reference's stepping rules, unless the file
    was written by diffusekit (it then carries ``_diffusekit_version``).
    """
    if not isinstance(cfg, dict):
        raise ConfigError("scheduler config must be a JSON object")
    cls_name = cfg.get("_class_name")
    edm = cls_name == EDM_REFERENCE_CLASS
    if sampler is None and edm:  # our own export names its sampler; the reference's EDM class is Euler
        sampler = cfg.get("_diffusekit_sampler", "euler") if "_diffusekit_version" in cfg else "euler"
    if sampler is None:
        if not isinstance(cls_name, str) or cls_name not in REFERENCE_CLASSES:
            raise ConfigError(
                f"scheduler _class_name={cls_name!r} is not supported; allowed: "
                f"{sorted([*REFERENCE_CLASSES, EDM_REFERENCE_CLASS])}"
            )
        sampler = REFERENCE_CLASSES[cls_name]
    used = {
        "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
        "rescale_betas_zero_snr", "prediction_type", "timestep_spacing", "steps_offset", "clip_sample",
        "clip_sample_range", "set_alpha_to_one", "variance_type", "use_karras_sigmas",
        "original_inference_steps", "timestep_scaling", "sigma_min", "sigma_max", "sigma_data", "sigma_schedule",
        "rho", "s_churn", "s_tmin", "s_tmax", "s_noise",
    }  # fmt: skip

    def get(key: str, default: Any) -> Any:
        value = cfg.get(key, default)
        if value is None:
            return default
        if isinstance(default, bool) and value not in (True, False):  # 0 and 1 are accepted too
            raise ConfigError(f"scheduler config {key}={value!r} must be true or false")
        return value

    variance = get("variance_type", "fixed_small")
    if sampler == "ddpm" and variance not in VARIANCES:
        raise ConfigError(f"variance_type={variance!r} is not supported; allowed: {list(VARIANCES)}")
    algorithm = cfg.get("algorithm_type", "dpmsolver++")
    if sampler == "dpmpp_2m" and (algorithm != "dpmsolver++" or cfg.get("solver_order", 2) != 2):
        raise ConfigError(
            f"DPM-Solver with algorithm_type={algorithm!r}, solver_order={cfg.get('solver_order')!r} is not "
            "supported; allowed: algorithm_type='dpmsolver++', solver_order=2"
        )
    if sampler == "unipc":
        unipc = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True}
        for key, allowed in unipc.items():
            if get(key, allowed) != allowed:
                raise ConfigError(f"UniPC with {key}={cfg.get(key)!r} is not supported; allowed: {key}={allowed!r}")
        if cfg.get("disable_corrector"):
            raise ConfigError("UniPC with disable_corrector is not supported; allowed: disable_corrector=[]")
    final_sigmas = get("final_sigmas_type", "zero")
    if sampler in MULTISTEP_SAMPLERS and final_sigmas != "zero":
        raise ConfigError(f"final_sigmas_type={final_sigmas!r} is not supported; allowed: final_sigmas_type='zero'")
    if sampler == "pndm" and cfg.get("skip_prk_steps") is False:
        raise ConfigError("PNDM with skip_prk_steps=false is not supported; allowed: skip_prk_steps=true")
    if cfg.get("thresholding"):
        raise ConfigError("dynamic thresholding (thresholding=true) is not supported; allowed: thresholding=false")
    if edm and (get("sigma_schedule", "karras"), get("rho", RHO), get("prediction_type", "epsilon")) != (
        "karras", RHO, "epsilon"
    ):
        raise ConfigError(
            f"{EDM_REFERENCE_CLASS} with sigma_schedule={cfg.get('sigma_schedule')!r}, rho={cfg.get('rho')!r}, "
            f"prediction_type={cfg.get('prediction_type')!r} is not supported; allowed: sigma_schedule='karras', "
            f"rho={RHO}, prediction_type='epsilon'"
        )
    trained = cfg.get("trained_betas")
    try:
        return SamplerConfig(
            sampler=sampler,
            num_train_timesteps=int(get("num_train_timesteps", 1000)),
            beta_schedule=get("beta_schedule", "linear"),
            beta_start=float(get("beta_start", 1e-4)),
            beta_end=float(get("beta_end", 0.02)),
            trained_betas=tuple(float(b) for b in trained) if trained else None,
            zero_terminal_snr=bool(get("rescale_betas_zero_snr", False)),
            prediction_type=get("prediction_type", "epsilon"),
            timestep_spacing=get("timestep_spacing", "leading"),
            steps_offset=int(get("steps_offset", 0)),
            clip_sample=float(get("clip_sample_range", 1.0)) if get("clip_sample", False) else None,
            clip_eps=bool(get(CLIP_EPS_KEY, False)),
            set_alpha_to_one=bool(get("set_alpha_to_one", True)),
            variance=variance if variance in VARIANCES else "fixed_small",
            karras_sigmas=bool(get("use_karras_sigmas", False)),
            original_inference_steps=int(get("original_inference_steps", 50)),
            timestep_scaling=float(get("timestep_scaling", 10.0)),
            reference_rules="_diffusekit_version" not in cfg,
            preconditioning="edm" if edm else "none",
            sigma_data=float(get("sigma_data", SIGMA_DATA)),
            sigma_min=float(get("sigma_min", SIGMA_MIN)),
            sigma_max=float(get("sigma_max", SIGMA_MAX)),
            s_churn=float(get("s_churn", 0.0)),
            s_tmin=float(get("s_tmin", 0.0)),
            s_tmax=None if cfg.get("s_tmax") is None else float(cfg["s_tmax"]),
            s_noise=float(get("s_noise", 1.0)),
            ignored_keys=tuple(sorted(k for k in cfg if k not in used and not k.startswith("_"))),
        )
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid scheduler config value: {e}") from None


def scheduler_to_diffusers(config: SamplerConfig) -> dict[str, Any]:
    """A reference-style ``scheduler_config.json`` for this config (for saving model folders)."""
    cls_name = {v: k for k, v in REFERENCE_CLASSES.items()}[config.sampler]
    marker = {} if config.reference_rules else {"_diffusekit_version": __version__}  # our rules on reload
    edm = {}
    if config.preconditioning == "edm":  # the reference's EDM class (its "epsilon" is eq. 7's F) + our sampler
        cls_name = EDM_REFERENCE_CLASS
        edm = {"_diffusekit_sampler": config.sampler, "sigma_min": config.sigma_min, "sigma_max": config.sigma_max,
               "sigma_data": config.sigma_data, "sigma_schedule": "karras", "rho": RHO}  # fmt: skip
    clip_eps = {CLIP_EPS_KEY: True} if config.clip_eps else {}  # only where set: the reference ignores it
    churn = {"s_churn": config.s_churn, "s_tmin": config.s_tmin, "s_tmax": config.s_tmax, "s_noise": config.s_noise}
    return {
        "_class_name": cls_name,
        **marker,
        **edm,
        **clip_eps,
        **(churn if config.s_churn > 0 else {}),
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": config.beta_schedule,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "trained_betas": list(config.trained_betas) if config.trained_betas else None,
        "rescale_betas_zero_snr": config.zero_terminal_snr,
        "prediction_type": config.prediction_type,
        "timestep_spacing": config.timestep_spacing,
        "steps_offset": config.steps_offset,
        "clip_sample": config.clip_sample is not None,
        "clip_sample_range": config.clip_sample if config.clip_sample is not None else 1.0,
        "set_alpha_to_one": config.set_alpha_to_one,
        "variance_type": config.variance,
        "use_karras_sigmas": config.karras_sigmas,
        "original_inference_steps": config.original_inference_steps,
        "timestep_scaling": config.timestep_scaling,
        "skip_prk_steps": True,
    }
