"""Diffusion maths: the noise schedule, the per-example denoising loss, DDPM/DDIM sampling."""
from attrib_jax.diffusion.loss import per_example_loss
from attrib_jax.diffusion.sampling import (ddim_sample, ddim_step, ddpm_sample, ddpm_step,
                                           guided_prediction)
from attrib_jax.diffusion.schedules import (NoiseSchedule, add_noise, inference_timesteps,
                                            velocity)

__all__ = [
    "NoiseSchedule", "add_noise", "velocity", "inference_timesteps", "per_example_loss",
    "ddpm_step", "ddim_step", "guided_prediction", "ddpm_sample", "ddim_sample",
]
