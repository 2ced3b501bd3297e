"""DDPM and DDIM sampling with classifier-free guidance, the whole loop compiled as one program.

The single-step functions reproduce diffusers' `DDPMScheduler.step` and `DDIMScheduler.step`
(including `clip_sample`, `set_alpha_to_one` and diffusers' choice of the previous timestep), so
queries generated here are the images the reference PyTorch pipeline would generate from the same
latents and noise. Randomness comes only from the PRNG key passed in, so a query regenerated
with the same key after retraining starts from the same noise (the ΔG measure of SPEC §3).

Key recipe of the samplers (fixed, so a run can be reproduced outside them):
  init_key, steps_key = jax.random.split(key)
  x_T = jax.random.normal(init_key, (B, *latent_shape), float32)
  step i (0-based) draws its noise as jax.random.normal(fold_in(steps_key, i), x.shape, x.dtype).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax.diffusion.schedules import (NoiseSchedule, broadcast_per_example,
                                            inference_timesteps)

# apply_fn(params, x_t, t, text_states) -> the network's prediction, shaped like x_t.
ApplyFn = Callable[[Any, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _alpha_bar(schedule: NoiseSchedule, t: jnp.ndarray, x: jnp.ndarray,
               before_start: jnp.ndarray | float) -> jnp.ndarray:
  """ᾱ_t broadcast against x; `before_start` stands in for t < 0 (the step past t = 0)."""
  t = jnp.asarray(t)
  value = jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], before_start)
  return broadcast_per_example(value.astype(jnp.float32), x)


def _predict_x0_and_eps(schedule: NoiseSchedule, model_output: jnp.ndarray, x_t: jnp.ndarray,
                        alpha_bar_t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The network's estimates of x_0 and of ε, whichever of the two (or v) it predicts."""
  beta_bar_t = 1.0 - alpha_bar_t
  if schedule.prediction_type == "epsilon":
    x0 = (x_t - jnp.sqrt(beta_bar_t) * model_output) / jnp.sqrt(alpha_bar_t)
    eps = model_output
  elif schedule.prediction_type == "v_prediction":
    x0 = jnp.sqrt(alpha_bar_t) * x_t - jnp.sqrt(beta_bar_t) * model_output
    eps = jnp.sqrt(alpha_bar_t) * model_output + jnp.sqrt(beta_bar_t) * x_t
  elif schedule.prediction_type == "sample":
    x0 = model_output
    eps = (x_t - jnp.sqrt(alpha_bar_t) * model_output) / jnp.sqrt(beta_bar_t)
  else:
    raise ValueError(f"prediction_type {schedule.prediction_type!r} is not supported")
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  return x0, eps


def ddpm_step(schedule: NoiseSchedule, model_output: jnp.ndarray, t: jnp.ndarray,
              x_t: jnp.ndarray, key: jax.Array,
              t_prev: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """One ancestral step x_t -> x_{t_prev} of DDPM (Ho et al. eq. 7), as `DDPMScheduler.step`.

  Args:
    schedule: the noise schedule (variance_type fixed_small).
    model_output: the network's prediction at (x_t, t), shaped like x_t.
    t: the current timestep, a scalar or one per example.
    x_t: the current sample.
    key: PRNG key of the posterior noise, drawn as `jax.random.normal(key, x_t.shape,
      x_t.dtype)`; no noise is added at t = 0.
    t_prev: the timestep stepped to; default t - 1. With fewer inference steps than training
      steps diffusers steps to the next entry of its timestep list, or to -1 after the last;
      -1 means ᾱ = 1 (the clean sample).

  Returns:
    The sample at t_prev, in x_t's dtype.
  """
  t = jnp.asarray(t)
  t_prev = t - 1 if t_prev is None else jnp.asarray(t_prev)
  x = x_t.astype(jnp.float32)
  alpha_bar_t = _alpha_bar(schedule, t, x, 1.0)
  alpha_bar_prev = _alpha_bar(schedule, t_prev, x, 1.0)
  beta_bar_t, beta_bar_prev = 1.0 - alpha_bar_t, 1.0 - alpha_bar_prev
  alpha_step = alpha_bar_t / alpha_bar_prev  # the α of the (possibly multi-step) jump
  beta_step = 1.0 - alpha_step
  x0, _ = _predict_x0_and_eps(schedule, model_output.astype(jnp.float32), x, alpha_bar_t)
  # Mean of the posterior q(x_prev | x_t, x0).
  mean = (jnp.sqrt(alpha_bar_prev) * beta_step / beta_bar_t) * x0 + (
      jnp.sqrt(alpha_step) * beta_bar_prev / beta_bar_t) * x
  # Its variance ("fixed_small"), floored as diffusers does before taking roots.
  variance = jnp.maximum(beta_bar_prev / beta_bar_t * beta_step, 1e-20)
  std = jnp.where(broadcast_per_example(t, x) > 0, jnp.sqrt(variance), 0.0)
  noise = jax.random.normal(key, x_t.shape, x_t.dtype).astype(jnp.float32)
  return (mean + std * noise).astype(x_t.dtype)


def ddim_step(schedule: NoiseSchedule, model_output: jnp.ndarray, t: jnp.ndarray,
              t_prev: jnp.ndarray, x_t: jnp.ndarray, eta: float | jnp.ndarray,
              key: Optional[jax.Array], *, use_clipped_model_output: bool = False) -> jnp.ndarray:
  """One DDIM step x_t -> x_{t_prev} (Song et al. eq. 12), as `DDIMScheduler.step`.

  Args:
    schedule: the noise schedule.
    model_output: the network's prediction at (x_t, t), shaped like x_t.
    t: the current timestep, a scalar or one per example.
    t_prev: the timestep stepped to; negative means past the start, where ᾱ is
      `final_alpha_cumprod` (1 if set_alpha_to_one). diffusers always uses
      t - num_train_timesteps // num_inference_steps, whatever the timestep spacing.
    x_t: the current sample.
    eta: the share of the DDPM posterior noise, 0 (deterministic DDIM) to 1 (DDPM-like).
    key: PRNG key of that noise, drawn as `jax.random.normal(key, x_t.shape, x_t.dtype)` and
      scaled by σ_t(eta) (so eta = 0 adds exactly zero); None adds none.
    use_clipped_model_output: re-derive ε from the clipped x_0 estimate (as diffusers' flag).

  Returns:
    The sample at t_prev, in x_t's dtype.
  """
  x = x_t.astype(jnp.float32)
  alpha_bar_t = _alpha_bar(schedule, t, x, 1.0)
  alpha_bar_prev = _alpha_bar(schedule, t_prev, x, schedule.final_alpha_cumprod)
  beta_bar_t = 1.0 - alpha_bar_t
  x0, eps = _predict_x0_and_eps(schedule, model_output.astype(jnp.float32), x, alpha_bar_t)
  if use_clipped_model_output:
    eps = (x - jnp.sqrt(alpha_bar_t) * x0) / jnp.sqrt(beta_bar_t)
  variance = (1.0 - alpha_bar_prev) / beta_bar_t * (1.0 - alpha_bar_t / alpha_bar_prev)
  std = jnp.asarray(eta, jnp.float32) * jnp.sqrt(variance)
  # The floor at 0 only guards rounding at eta = 1, where the difference is exactly 0 in theory.
  direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - std**2, 0.0)) * eps
  x_prev = jnp.sqrt(alpha_bar_prev) * x0 + direction
  if key is not None:
    x_prev = x_prev + std * jax.random.normal(key, x_t.shape, x_t.dtype).astype(jnp.float32)
  return x_prev.astype(x_t.dtype)


def guided_prediction(apply_fn: ApplyFn, params: Any, x_t: jnp.ndarray, t: jnp.ndarray,
                      text_states: jnp.ndarray, uncond_states: Optional[jnp.ndarray],
                      guidance_scale: float | jnp.ndarray) -> jnp.ndarray:
  """Classifier-free guidance: ε_u + s (ε_c - ε_u), both from one network call on 2B examples.

  Args:
    apply_fn: the denoiser, `apply_fn(params, x_t, t, text_states)`.
    params: its parameters.
    x_t: [B, ...] current samples.
    t: the current timestep (scalar; passed to the network as one per example).
    text_states: [B, L, D] states of the prompts.
    uncond_states: [1 or B, L, D] states of the empty prompt, or None for no guidance.
    guidance_scale: s; 1 gives the conditional prediction.
  """
  batch = x_t.shape[0]
  t_batch = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (batch,))
  if uncond_states is None:
    return apply_fn(params, x_t, t_batch, text_states)
  uncond_states = jnp.broadcast_to(uncond_states, text_states.shape).astype(text_states.dtype)
  both = apply_fn(params, jnp.concatenate([x_t, x_t]), jnp.concatenate([t_batch, t_batch]),
                  jnp.concatenate([uncond_states, text_states]))
  uncond, cond = jnp.split(both.astype(jnp.float32), 2)
  return uncond + guidance_scale * (cond - uncond)


def _run_sampler(step_fn, apply_fn, params, text_states, uncond_states, guidance_scale, key,
                 latent_shape, timesteps: np.ndarray, prev_timesteps: np.ndarray) -> jnp.ndarray:
  """The shared loop: x_T from the key, then one guided prediction and one step per timestep."""
  init_key, steps_key = jax.random.split(key)
  x = jax.random.normal(init_key, (text_states.shape[0], *latent_shape), jnp.float32)

  def body(x, inputs):
    index, t, t_prev = inputs
    prediction = guided_prediction(apply_fn, params, x, t, text_states, uncond_states,
                                   guidance_scale)
    return step_fn(prediction, t, t_prev, x, jax.random.fold_in(steps_key, index)), None

  inputs = (jnp.arange(len(timesteps)), jnp.asarray(timesteps, jnp.int32),
            jnp.asarray(prev_timesteps, jnp.int32))
  x, _ = jax.lax.scan(body, x, inputs)
  return x


@functools.partial(jax.jit, static_argnames=("apply_fn", "latent_shape", "num_steps"))
def ddim_sample(schedule: NoiseSchedule, apply_fn: ApplyFn, params: Any,
                text_states: jnp.ndarray, uncond_states: Optional[jnp.ndarray], key: jax.Array, *,
                latent_shape: tuple[int, ...], num_steps: int,
                guidance_scale: float | jnp.ndarray = 7.5,
                eta: float | jnp.ndarray = 0.0) -> jnp.ndarray:
  """Generates latents with DDIM and classifier-free guidance; returns the final x_0 [B, ...].

  Args:
    schedule: the noise schedule.
    apply_fn: the denoiser (static under jit: pass the same function object to reuse the
      compiled program).
    params: its parameters.
    text_states: [B, L, D] states of the prompts.
    uncond_states: [1 or B, L, D] states of the empty prompt, or None for no guidance.
    key: the PRNG key; it fixes x_T and every step's noise (see the module docstring).
    latent_shape: one latent's shape, e.g. (16, 16, 4) (NHWC without the batch).
    num_steps: the number of inference steps (timesteps as diffusers' `set_timesteps`).
    guidance_scale: the classifier-free guidance scale.
    eta: DDIM's noise share.
  """
  timesteps = inference_timesteps(schedule, num_steps)
  # diffusers' DDIM steps back by a fixed stride, whatever the spacing of its timestep list.
  prev_timesteps = timesteps - schedule.num_train_timesteps // num_steps

  def step(prediction, t, t_prev, x, step_key):
    return ddim_step(schedule, prediction, t, t_prev, x, eta, step_key)

  return _run_sampler(step, apply_fn, params, text_states, uncond_states, guidance_scale, key,
                      latent_shape, timesteps, prev_timesteps)


@functools.partial(jax.jit, static_argnames=("apply_fn", "latent_shape", "num_steps"))
def ddpm_sample(schedule: NoiseSchedule, apply_fn: ApplyFn, params: Any,
                text_states: jnp.ndarray, uncond_states: Optional[jnp.ndarray], key: jax.Array, *,
                latent_shape: tuple[int, ...], num_steps: Optional[int] = None,
                guidance_scale: float | jnp.ndarray = 7.5) -> jnp.ndarray:
  """Generates latents with ancestral DDPM sampling and classifier-free guidance.

  Arguments as `ddim_sample`; num_steps defaults to every training timestep (the MSCOCO queries
  use 1000-step DDPM). With fewer steps, each step jumps to the next listed timestep, as
  diffusers' DDPMScheduler does after `set_timesteps`.
  """
  num_steps = schedule.num_train_timesteps if num_steps is None else num_steps
  timesteps = inference_timesteps(schedule, num_steps)
  prev_timesteps = np.append(timesteps[1:], -1).astype(np.int32)

  def step(prediction, t, t_prev, x, step_key):
    return ddpm_step(schedule, prediction, t, x, step_key, t_prev=t_prev)

  return _run_sampler(step, apply_fn, params, text_states, uncond_states, guidance_scale, key,
                      latent_shape, timesteps, prev_timesteps)
