"""The denoising loss L(z, θ) that training, the Fisher, unlearning and the loss sweep all share.

Per example, not averaged over the batch: attribution compares the loss of each training item
before and after an update, and the Fisher needs per-example gradients. The caller supplies the
timesteps and the noise, so two evaluations can use exactly the same draws (common random
numbers: the before/after difference of the loss sweep is meaningless without them).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from attrib_jax.diffusion.schedules import NoiseSchedule, add_noise, velocity

# apply_fn(params, x_t, t, text_states) -> the network's prediction, shaped like x_t.
ApplyFn = Callable[[Any, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def per_example_loss(apply_fn: ApplyFn, params: Any, x0: jnp.ndarray, text_states: jnp.ndarray,
                     t: jnp.ndarray, noise: jnp.ndarray, *,
                     schedule: NoiseSchedule, mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean squared error of the network's prediction at x_t = add_noise(x0, noise, t); shape [B].

  Args:
    apply_fn: the denoiser, `apply_fn(params, x_t, t, text_states)`.
    params: its parameters (the argument to differentiate).
    x0: [B, ...] clean latents.
    text_states: [B, L, D] text-encoder states of each example's caption.
    t: [B] integer timesteps.
    noise: [B, ...] standard normal noise, shaped like x0.
    schedule: the noise schedule; its prediction_type picks the target (the noise for
      "epsilon", the velocity for "v_prediction", the clean latent for "sample").
    mask: optional [h, w] weights of the latent cells (a query region, `attribution/region.py`):
      the error is averaged over the masked cells only (all their channels).

  Returns:
    [B] float32: the squared error averaged over every latent element of each example. The
    error is squared and averaged in float32 even when the network computes in bf16, so the
    tiny before/after loss differences of attribution are not lost to rounding.
  """
  t = jnp.asarray(t)
  x_t = add_noise(schedule, x0, noise, t)
  prediction = apply_fn(params, x_t, t, text_states).astype(jnp.float32)
  if schedule.prediction_type == "epsilon":
    target = noise.astype(jnp.float32)
  elif schedule.prediction_type == "v_prediction":
    target = velocity(schedule, x0, noise, t)
  elif schedule.prediction_type == "sample":
    target = x0.astype(jnp.float32)
  else:
    raise ValueError(f"prediction_type {schedule.prediction_type!r} is not supported")
  if prediction.shape != target.shape:
    raise ValueError(f"apply_fn returned shape {prediction.shape}, expected {target.shape}")
  squared_error = jnp.square(prediction - target)
  if mask is not None:
    if mask.shape != x0.shape[1:-1]:
      raise ValueError(f"mask shape {mask.shape} != the latent's cells {x0.shape[1:-1]}")
    weights = jnp.broadcast_to(mask.astype(jnp.float32)[..., None], x0.shape[1:])
    # Σ(m·e²) / Σm: a mask of ones is the plain mean exactly (e²·1 and the integer count are
    # exact in float32), so a region covering the image changes nothing.
    return (jnp.sum((squared_error * weights).reshape(squared_error.shape[0], -1), axis=1)
            / jnp.sum(weights))
  return jnp.mean(squared_error.reshape(squared_error.shape[0], -1), axis=1)


def min_snr_weights(schedule: Any, t: jax.Array, gamma: float) -> jax.Array:
  """Min-SNR-γ loss weights (Hang et al. 2023) for the schedule's prediction target.

  The plain loss weights low-noise timesteps by their SNR (ε target) or SNR + 1 (v target), so
  early training spends most of its signal on removing barely visible noise. Clamping the
  weight at γ moves it to the timesteps that decide layout, colour and shape: the paper
  measured ~3x faster convergence.
  """
  alpha_bar = schedule.alphas_cumprod[t]
  snr = alpha_bar / (1.0 - alpha_bar)
  # Per unit of x_0 error the ε loss weighs SNR, the v loss SNR + 1, the x_0 loss 1; the
  # weights below make every target weigh min(SNR, γ).
  if schedule.prediction_type == "epsilon":
    return jnp.minimum(snr, gamma) / snr
  if schedule.prediction_type == "v_prediction":
    return jnp.minimum(snr, gamma) / (snr + 1.0)
  return jnp.minimum(snr, gamma)


def check_min_snr_gamma(gamma: float | None) -> None:
  """A settings field's γ: positive, or None for the plain loss."""
  if gamma is not None and not gamma > 0:
    raise ValueError(f"min_snr_gamma must be positive or None, got {gamma}")


def loss_weights(schedule: Any, t: jax.Array, gamma: float | None) -> jax.Array:
  """The training loss's weight of each timestep in `t`, float32, scaled to mean 1 over the
  uniform timestep distribution; ones when `gamma` is None (the plain mean, SPEC's loss).

  Attribution's per-example passes (Fisher, EK-FAC, the unlearning gradient) use it to work on
  the loss the model was trained on. Mean 1 keeps α's scale: only how the timesteps share the
  step changes. `gamma` is a Python float (static under jit).
  """
  check_min_snr_gamma(gamma)
  if gamma is None:
    return jnp.ones(jnp.shape(t), jnp.float32)
  every = jnp.arange(schedule.num_train_timesteps)
  return (min_snr_weights(schedule, t, gamma)
          / jnp.mean(min_snr_weights(schedule, every, gamma))).astype(jnp.float32)
