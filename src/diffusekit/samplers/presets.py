"""Named sampler presets: the noise schedules public model families were trained with.

Each preset is a ``SamplerConfig`` with the family's released default sampler; swap the sampler with
``preset.with_sampler("dpmpp_2m")`` (the schedule stays). They follow diffusekit's stepping rules; for the
reference implementation's rules use ``dataclasses.replace(preset, reference_rules=True)``.
"""

from __future__ import annotations

from diffusekit.samplers.config import SamplerConfig

# Stable Diffusion 1.x (and 2.x base): the latent-diffusion "scaled_linear" schedule over 1000 steps,
# beta from 0.00085 to 0.012 (Rombach et al. 2022), released with PLMS, leading spacing offset by 1
SD1 = SamplerConfig(
    sampler="pndm",
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    set_alpha_to_one=False,
)

# Stable Diffusion XL (Podell et al. 2023): the same schedule, released with the Euler sampler
SDXL = SD1.with_sampler("euler")

PRESETS: dict[str, SamplerConfig] = {"sd1": SD1, "sdxl": SDXL}
