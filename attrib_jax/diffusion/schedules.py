"""The DDPM noise schedule, read from a diffusers `scheduler_config.json`, and the forward process.

A `NoiseSchedule` is a pytree: the per-timestep tables (betas, alphas_cumprod, ...) are arrays that
travel through `jit`, and the scheduler options (prediction type, clipping, timestep spacing) are
static fields, so the step functions branch on them in Python and compile one specialised graph.

The tables are built to equal diffusers' own float32 tables: the betas are computed in float64 and
rounded once to float32 (torch's float32 `linspace` agrees to within an ulp), and the cumulative
product of the float32 alphas runs in float64 before rounding, as torch's CPU `cumprod` does. A
model trained with diffusers saw those numbers (to ~1e-7).

Config keys are read strictly (see `models/configuration.py`): the union of what diffusers 0.42's
`DDPMScheduler` and `DDIMScheduler` write is either used, pinned to the one supported value, or an
error naming it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import struct

from attrib_jax.models.configuration import UnsupportedConfigError, check_config

SUPPORTED_SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers' defaults for keys a config may omit (identical in DDPMScheduler and DDIMScheduler).
_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "variance_type": "fixed_small",
}
_USED = ("num_train_timesteps", "beta_start", "beta_end", "clip_sample", "clip_sample_range",
         "set_alpha_to_one", "steps_offset", "trained_betas")
_PINNED = {
    "beta_schedule": list(BETA_SCHEDULES),
    "prediction_type": list(PREDICTION_TYPES),
    "timestep_spacing": list(TIMESTEP_SPACINGS),
    "variance_type": "fixed_small",  # DDPM's posterior variance; the learned variants need a
                                     # model that predicts a variance, which ours do not.
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}
# Read by diffusers only when `thresholding` is on, which is pinned off.
_IGNORED = ("dynamic_thresholding_ratio", "sample_max_value")
# PNDMScheduler (Stable Diffusion 1.x snapshots) shares the betas and the forward process;
# only its multistep sampler differs, which we do not implement (our samplers are DDIM/DDPM).
# Its sampler-only key is ignored, and it never clips x_0, so clip_sample defaults to off.
_PNDM_IGNORED = ("skip_prk_steps",)
_PNDM_DEFAULTS = {"clip_sample": False}


@struct.dataclass
class NoiseSchedule:
  """The discrete-time diffusion: q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I), t = 0..T-1.

  Attributes:
    betas: [T] float32, β_t.
    alphas: [T] float32, 1 - β_t.
    alphas_cumprod: [T] float32, ᾱ_t = Π_{s<=t} α_s.
    final_alpha_cumprod: scalar float32, the ᾱ a DDIM step uses when it steps past t = 0: 1 if
      `set_alpha_to_one`, else ᾱ_0 (DDPM steps always use 1, as diffusers does).
    num_train_timesteps: T.
    prediction_type: what the network predicts: "epsilon", "v_prediction" or "sample" (x_0).
    clip_sample: whether the sampler clips its x_0 estimate to ±clip_sample_range.
    clip_sample_range: the clip bound.
    set_alpha_to_one: kept for reference; already folded into final_alpha_cumprod.
    steps_offset: added to "leading" inference timesteps (Stable Diffusion uses 1).
    timestep_spacing: how inference timesteps are chosen: "leading", "trailing" or "linspace".
  """
  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  final_alpha_cumprod: jnp.ndarray
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")
  clip_sample: bool = struct.field(pytree_node=False, default=True)
  clip_sample_range: float = struct.field(pytree_node=False, default=1.0)
  set_alpha_to_one: bool = struct.field(pytree_node=False, default=True)
  steps_offset: int = struct.field(pytree_node=False, default=0)
  timestep_spacing: str = struct.field(pytree_node=False, default="leading")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
    """Builds the schedule from a parsed DDPMScheduler / DDIMScheduler config dict."""
    class_name = config.get("_class_name")
    if class_name is not None and class_name not in SUPPORTED_SCHEDULER_CLASSES:
      raise UnsupportedConfigError(
          f"scheduler class {class_name!r} is not supported (supported: "
          f"{SUPPORTED_SCHEDULER_CLASSES}); its options may mean something else")
    pndm = class_name == "PNDMScheduler"
    check_config(config, component=class_name or "scheduler", used=_USED, pinned=_PINNED,
                 ignored=_IGNORED + (_PNDM_IGNORED if pndm else ()))
    c = {**_DEFAULTS, **(_PNDM_DEFAULTS if pndm else {}), **config}
    if c.get("trained_betas") is not None:  # diffusers: an explicit table overrides the rest
      betas = _explicit_betas(c["trained_betas"], int(c["num_train_timesteps"]))
    else:
      betas = beta_table(c["beta_schedule"], int(c["num_train_timesteps"]),
                         float(c["beta_start"]), float(c["beta_end"]))
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    final = np.float32(1.0) if c["set_alpha_to_one"] else alphas_cumprod[0]
    return cls(
        betas=jnp.asarray(betas),
        alphas=jnp.asarray(alphas),
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        num_train_timesteps=int(c["num_train_timesteps"]),
        prediction_type=c["prediction_type"],
        clip_sample=bool(c["clip_sample"]),
        clip_sample_range=float(c["clip_sample_range"]),
        set_alpha_to_one=bool(c["set_alpha_to_one"]),
        steps_offset=int(c["steps_offset"]),
        timestep_spacing=c["timestep_spacing"],
    )

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "NoiseSchedule":
    """Reads `scheduler_config.json` (or a directory holding it, e.g. a pipeline's `scheduler/`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "scheduler_config.json")
    with open(path) as f:
      return cls.from_config(json.load(f))


def _explicit_betas(trained_betas: Any, num_train_timesteps: int) -> np.ndarray:
  betas = np.asarray(trained_betas, np.float64)
  if betas.shape != (num_train_timesteps,):
    raise UnsupportedConfigError(
        f"trained_betas has shape {betas.shape}, expected ({num_train_timesteps},) "
        "(one beta per training timestep)")
  if not np.all((betas > 0) & (betas < 1)):
    raise UnsupportedConfigError("trained_betas must all lie in (0, 1)")
  return betas.astype(np.float32)


def shifted_cosine_betas(num_train_timesteps: int, shift: float) -> list[float]:
  """Betas of the cosine schedule with every SNR divided by shift² ("simple diffusion").

  Why: an image whose content is large smooth regions stays readable through noise that hides
  fine texture, because a region's mean survives averaging over its pixels. Under the plain
  cosine schedule most timesteps then show the layout already, and only the last few teach the
  model to take it from the prompt. Dividing every SNR by shift² (Hoogeboom et al. 2023 shift by
  resolution for the same reason) gives the prompt-led regime more of the timesteps, in
  training and in sampling. Written into the scheduler config as `trained_betas`, which
  diffusers reads the same way; shift 1 gives the squaredcos_cap_v2 table.
  """
  if shift <= 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  base = beta_table("squaredcos_cap_v2", num_train_timesteps, 0.0, 0.0).astype(np.float64)
  alpha_bar = np.cumprod(1.0 - base)
  snr = alpha_bar / (1.0 - alpha_bar) / shift**2
  shifted = snr / (1.0 + snr)
  betas = 1.0 - shifted / np.concatenate([[1.0], shifted[:-1]])
  return [float(b) for b in np.clip(betas, 1e-8, 0.999).astype(np.float32)]


def beta_table(beta_schedule: str, num_train_timesteps: int, beta_start: float,
               beta_end: float) -> np.ndarray:
  """The [T] float32 betas of a named schedule."""
  steps = num_train_timesteps
  if beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
  elif beta_schedule == "scaled_linear":
    # Linear in sqrt(β): the latent-diffusion / Stable Diffusion schedule.
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64)
    # Square after rounding the roots to float32, the order in which diffusers rounds.
    betas = betas.astype(np.float32).astype(np.float64)**2
  elif beta_schedule == "squaredcos_cap_v2":
    # Nichol & Dhariwal's cosine ᾱ(s); each β is the ratio of consecutive ᾱ, capped at 0.999.
    def alpha_bar(s: float) -> float:
      return math.cos((s + 0.008) / 1.008 * math.pi / 2)**2
    betas = np.array([min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                      for i in range(steps)], dtype=np.float64)
  else:
    raise UnsupportedConfigError(
        f"beta_schedule {beta_schedule!r} is not supported (supported: {BETA_SCHEDULES})")
  return betas.astype(np.float32)


def broadcast_per_example(coef: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a scalar or [B] coefficient so it broadcasts against x of shape [B, ...]."""
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def add_noise(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray,
              t: jnp.ndarray) -> jnp.ndarray:
  """Samples q(x_t | x_0): sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise, with t a scalar or one per example.

  The coefficients are formed in float32 and the result cast back to x0's dtype, so bf16 latents
  lose no precision in the schedule itself.
  """
  alpha_bar = schedule.alphas_cumprod[jnp.asarray(t)]
  a = broadcast_per_example(jnp.sqrt(alpha_bar), x0)
  s = broadcast_per_example(jnp.sqrt(1.0 - alpha_bar), x0)
  return (a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray,
             t: jnp.ndarray) -> jnp.ndarray:
  """The v-prediction target sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0 (Salimans & Ho), in float32."""
  alpha_bar = schedule.alphas_cumprod[jnp.asarray(t)]
  a = broadcast_per_example(jnp.sqrt(alpha_bar), x0)
  s = broadcast_per_example(jnp.sqrt(1.0 - alpha_bar), x0)
  return a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)


def inference_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
  """The descending timesteps a sampler visits, equal to diffusers' `set_timesteps(num_steps)`.

  Host-side numpy (int32): the step count fixes the loop length, so it is static under jit.
  """
  total = schedule.num_train_timesteps
  if not 1 <= num_steps <= total:
    raise ValueError(f"num_steps must be in [1, {total}], got {num_steps}")
  spacing = schedule.timestep_spacing
  if spacing == "linspace":
    # Evenly spread over [0, T-1], both ends included.
    steps = np.linspace(0, total - 1, num_steps).round()[::-1]
  elif spacing == "leading":
    # Every (T // n)-th step from 0 upwards, shifted by steps_offset; never reaches T-1.
    steps = (np.arange(num_steps) * (total // num_steps))[::-1] + schedule.steps_offset
  elif spacing == "trailing":
    # Every (T / n)-th step from T downwards, minus one: always starts at T-1.
    steps = np.round(np.arange(total, 0, -total / num_steps)) - 1
  else:
    raise UnsupportedConfigError(f"timestep_spacing {spacing!r} is not supported")
  steps = np.ascontiguousarray(steps).astype(np.int64)
  if steps.max() >= total:  # "leading" with steps_offset at num_steps close to T
    raise ValueError(f"timestep {steps.max()} >= num_train_timesteps {total} with "
                     f"{num_steps} {spacing!r} steps and steps_offset {schedule.steps_offset}")
  return steps.astype(np.int32)
