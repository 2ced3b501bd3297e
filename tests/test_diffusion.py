"""Parity of the diffusion maths with diffusers' DDPMScheduler / DDIMScheduler (PyTorch).

Randomness is matched by construction: our steps draw noise as jax.random.normal(key, ...), and
the reference is handed exactly that noise (DDIM's `variance_noise`; for DDPM, which has no such
argument, the module's `randn_tensor` is replaced for the call).
"""
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm

from attrib_jax.diffusion import (NoiseSchedule, add_noise, ddim_sample, ddim_step, ddpm_sample,
                                  ddpm_step, guided_prediction, inference_timesteps,
                                  per_example_loss)
from attrib_jax.models.configuration import UnsupportedConfigError

BETA_RANGES = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (1e-4, 0.02),  # unused by the cosine schedule
}
SHAPE = (3, 8, 8, 4)  # NHWC latents; the scheduler maths is elementwise, layout-free


def _config(beta_schedule="linear", **overrides):
  start, end = BETA_RANGES[beta_schedule]
  return dict(beta_schedule=beta_schedule, beta_start=start, beta_end=end, **overrides)


def _assert_close(ours, theirs, tol=1e-5):
  """max |ours - theirs| <= tol * max(1, max |theirs|)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  scale = max(1.0, float(np.abs(theirs).max()))
  err = float(np.abs(ours - theirs).max())
  assert err <= tol * scale, f"max error {err} > {tol} * {scale}"


def _torch(x):
  return torch.from_numpy(np.array(x, np.float32))


def _random(seed, shape=SHAPE, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [diffusers.DDPMScheduler, diffusers.DDIMScheduler])
@pytest.mark.parametrize("beta_schedule", list(BETA_RANGES))
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_tables_match_diffusers(cls, beta_schedule, set_alpha_to_one):
  config = _config(beta_schedule, num_train_timesteps=1000)
  if cls is diffusers.DDIMScheduler:
    config["set_alpha_to_one"] = set_alpha_to_one
  theirs = cls(**config)
  ours = NoiseSchedule.from_config(config)
  np.testing.assert_allclose(ours.betas, theirs.betas.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(ours.alphas, theirs.alphas.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
  if cls is diffusers.DDIMScheduler:
    np.testing.assert_allclose(ours.final_alpha_cumprod, theirs.final_alpha_cumprod.numpy(),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("cls", [diffusers.DDPMScheduler, diffusers.DDIMScheduler])
def test_saved_scheduler_config_loads(cls, tmp_path):
  """Every key save_pretrained writes (with non-default values where we support them) loads."""
  theirs = cls(**_config("scaled_linear", num_train_timesteps=500, clip_sample=False,
                         clip_sample_range=2.5, steps_offset=1, timestep_spacing="trailing",
                         prediction_type="v_prediction"))
  theirs.save_pretrained(tmp_path)
  ours = NoiseSchedule.from_pretrained(tmp_path)
  assert (ours.num_train_timesteps, ours.clip_sample, ours.clip_sample_range, ours.steps_offset,
          ours.timestep_spacing, ours.prediction_type) == (500, False, 2.5, 1, "trailing",
                                                           "v_prediction")
  np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), atol=1e-6)
  with open(tmp_path / "scheduler_config.json") as f:
    assert json.load(f)["_class_name"] == cls.__name__


def test_defaults_are_diffusers_defaults():
  ours = NoiseSchedule.from_config({})
  theirs = diffusers.DDPMScheduler()
  assert ours.clip_sample and ours.clip_sample_range == 1.0 and ours.set_alpha_to_one
  assert ours.timestep_spacing == "leading" and ours.prediction_type == "epsilon"
  np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), atol=1e-6)


@pytest.mark.parametrize("cls", [diffusers.DDPMScheduler, diffusers.DDIMScheduler])
def test_trained_betas_match_diffusers(cls):
  from attrib_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  betas = schedules.shifted_cosine_betas(1000, 3.0)
  config = dict(beta_schedule="squaredcos_cap_v2", trained_betas=betas, prediction_type="sample")
  ours = NoiseSchedule.from_config(config)
  theirs = cls.from_config(config)
  np.testing.assert_allclose(ours.betas, theirs.betas.numpy(), rtol=0, atol=0)
  np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-5,
                             atol=1e-7)


def test_shifted_cosine_divides_every_snr():
  from attrib_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  plain = NoiseSchedule.from_config(_config("squaredcos_cap_v2"))
  same = NoiseSchedule.from_config(
      {**_config("squaredcos_cap_v2"), "trained_betas": schedules.shifted_cosine_betas(1000, 1.0)})
  np.testing.assert_allclose(same.alphas_cumprod, plain.alphas_cumprod, rtol=1e-4, atol=1e-7)
  shifted = NoiseSchedule.from_config(
      {**_config("squaredcos_cap_v2"), "trained_betas": schedules.shifted_cosine_betas(1000, 3.0)})
  snr = lambda s: np.asarray(s.alphas_cumprod[:950], np.float64) / (
      1 - np.asarray(s.alphas_cumprod[:950], np.float64))
  np.testing.assert_allclose(snr(shifted), snr(plain) / 9.0, rtol=1e-3)
  with pytest.raises(ValueError, match="shift"):
    schedules.shifted_cosine_betas(1000, 0.0)


@pytest.mark.parametrize("bad,named", [
    ([0.1, 0.2], "shape"),
    ([0.0] * 1000, r"\(0, 1\)"),
])
def test_bad_trained_betas_are_named(bad, named):
  with pytest.raises(UnsupportedConfigError, match=named):
    NoiseSchedule.from_config({**_config(), "trained_betas": bad})


@pytest.mark.parametrize("bad", [
    {"not_a_scheduler_option": 1},
    {"thresholding": True},
    {"rescale_betas_zero_snr": True},
    {"trained_betas": [0.1, 0.2]},
    {"variance_type": "learned_range"},
    {"beta_schedule": "sigmoid"},
    {"timestep_spacing": "karras"},
    {"_class_name": "EulerDiscreteScheduler"},
])
def test_unsupported_config_raises(bad):
  with pytest.raises(UnsupportedConfigError):
    NoiseSchedule.from_config({**_config(), **bad})


def test_schedule_is_a_pytree_under_jit():
  schedule = NoiseSchedule.from_config(_config())
  leaves = jax.tree_util.tree_leaves(schedule)
  assert len(leaves) == 4  # the static options are not leaves
  x0, noise = _random(0), _random(1)
  t = jnp.array([1, 2, 3])
  np.testing.assert_allclose(jax.jit(add_noise)(schedule, x0, noise, t),
                             add_noise(schedule, x0, noise, t), atol=1e-6)  # jit may fuse FMAs


def test_add_noise_matches_diffusers():
  config = _config("scaled_linear")
  schedule, theirs = NoiseSchedule.from_config(config), diffusers.DDPMScheduler(**config)
  x0, noise = _random(0), _random(1)
  t = np.array([0, 417, 999])
  expected = theirs.add_noise(_torch(x0), _torch(noise), torch.from_numpy(t)).numpy()
  _assert_close(add_noise(schedule, x0, noise, jnp.asarray(t)), expected, 1e-5)
  # bf16 latents stay bf16, computed from float32 coefficients.
  out = add_noise(schedule, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16),
                  jnp.asarray(t))
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_steps", [1, 3, 7, 10, 50, 333, 999, 1000])
def test_inference_timesteps_match_set_timesteps(spacing, steps_offset, num_steps):
  config = _config(timestep_spacing=spacing, steps_offset=steps_offset)
  schedule = NoiseSchedule.from_config(config)
  for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
    theirs = cls(**config)
    theirs.set_timesteps(num_steps)
    expected = theirs.timesteps.numpy()
    if expected.max() >= 1000:  # diffusers would index past its table at the first step
      with pytest.raises(ValueError):
        inference_timesteps(schedule, num_steps)
      continue
    np.testing.assert_array_equal(inference_timesteps(schedule, num_steps), expected)


# --- single steps ------------------------------------------------------------------------------


@pytest.fixture
def fixed_ddpm_noise(monkeypatch):
  """Makes DDPMScheduler.step draw the noise we hand it instead of torch's."""
  holder = {}

  def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
    assert tuple(shape) == holder["noise"].shape
    return _torch(holder["noise"])

  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake_randn)
  return holder


@pytest.mark.parametrize("beta_schedule", list(BETA_RANGES))
@pytest.mark.parametrize("prediction_type,clip_sample", [
    ("epsilon", True), ("epsilon", False), ("v_prediction", True), ("sample", True)])
def test_ddpm_step_matches_diffusers(beta_schedule, prediction_type, clip_sample,
                                     fixed_ddpm_noise):
  config = _config(beta_schedule, prediction_type=prediction_type, clip_sample=clip_sample,
                   clip_sample_range=1.5)
  schedule = NoiseSchedule.from_config(config)
  x_t, eps = _random(2), _random(3)
  for i, t in enumerate([999, 640, 1, 0]):
    key = jax.random.key(i)
    fixed_ddpm_noise["noise"] = np.asarray(jax.random.normal(key, SHAPE, jnp.float32))
    theirs = diffusers.DDPMScheduler(**config)
    expected = theirs.step(_torch(eps), t, _torch(x_t)).prev_sample.numpy()
    ours = jax.jit(ddpm_step)(schedule, jnp.asarray(eps), t, jnp.asarray(x_t), key)
    _assert_close(ours, expected, 1e-5)


def test_ddpm_step_after_set_timesteps(fixed_ddpm_noise):
  """Fewer inference steps: diffusers jumps to the next listed timestep, and to ᾱ = 1 at the end."""
  config = _config("scaled_linear", steps_offset=1)
  schedule = NoiseSchedule.from_config(config)
  theirs = diffusers.DDPMScheduler(**config)
  theirs.set_timesteps(10)
  timesteps = list(theirs.timesteps.numpy())
  x_t, eps = _random(4), _random(5)
  for i, t in enumerate(timesteps):
    t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
    key = jax.random.key(i)
    fixed_ddpm_noise["noise"] = np.asarray(jax.random.normal(key, SHAPE, jnp.float32))
    expected = theirs.step(_torch(eps), int(t), _torch(x_t)).prev_sample.numpy()
    ours = ddpm_step(schedule, jnp.asarray(eps), int(t), jnp.asarray(x_t), key, t_prev=t_prev)
    _assert_close(ours, expected, 1e-5)


@pytest.mark.parametrize("beta_schedule", list(BETA_RANGES))
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("options", [
    dict(),
    dict(clip_sample=False, set_alpha_to_one=False),
    dict(prediction_type="v_prediction", clip_sample_range=0.8),
    dict(prediction_type="sample", clip_sample_range=0.8),
])
def test_ddim_step_matches_diffusers(beta_schedule, eta, options):
  config = _config(beta_schedule, **options)
  schedule = NoiseSchedule.from_config(config)
  theirs = diffusers.DDIMScheduler(**config)
  num_steps = 20
  theirs.set_timesteps(num_steps)
  x_t, eps = _random(6), _random(7)
  step = jax.jit(ddim_step, static_argnames="use_clipped_model_output")
  timesteps = theirs.timesteps.numpy()
  for t in [timesteps[0], timesteps[9], timesteps[-2], timesteps[-1]]:  # incl. the last step
    key = jax.random.key(int(t))
    noise = np.asarray(jax.random.normal(key, SHAPE, jnp.float32))
    t_prev = int(t) - 1000 // num_steps
    for clipped in (False, True):
      expected = theirs.step(_torch(eps), int(t), _torch(x_t), eta=eta,
                             use_clipped_model_output=clipped,
                             variance_noise=_torch(noise)).prev_sample.numpy()
      ours = step(schedule, jnp.asarray(eps), int(t), t_prev, jnp.asarray(x_t), eta, key,
                  use_clipped_model_output=clipped)
      _assert_close(ours, expected, 1e-5)


def test_steps_accept_per_example_timesteps():
  schedule = NoiseSchedule.from_config(_config())
  x_t, eps = _random(8), _random(9)
  t = jnp.array([900, 450, 0])
  key = jax.random.key(0)
  batched = ddim_step(schedule, eps, t, t - 50, x_t, 0.5, key)
  noise = jax.random.normal(key, SHAPE)
  for b in range(3):
    single = ddim_step(schedule, eps[b:b + 1], t[b], t[b] - 50, x_t[b:b + 1], 0.5, None)
    std = 0.5 * np.sqrt(_ddim_variance(schedule, int(t[b]), int(t[b]) - 50))
    _assert_close(batched[b:b + 1], single + std * noise[b:b + 1], 1e-6)


def _ddim_variance(schedule, t, t_prev):
  a = np.float64(schedule.alphas_cumprod[t])
  a_prev = np.float64(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
  return (1 - a_prev) / (1 - a) * (1 - a / a_prev)


# --- guidance and full samplers ----------------------------------------------------------------

TEXT_SHAPE = (2, 5, 6)  # [B, L, D]
LATENT = (4, 4, 3)


def toy_apply(params, x_t, t, text_states):
  """A smooth stand-in for the UNet: depends on the sample, the timestep and the text."""
  text = jnp.mean(text_states, axis=(1, 2))[:, None, None, None]
  time = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
  return jnp.tanh(params["w"] * x_t + params["b"] * time + text)


TOY_PARAMS = {"w": jnp.float32(0.7), "b": jnp.float32(-0.4)}


def _text():
  return _random(10, TEXT_SHAPE), _random(11, (1,) + TEXT_SHAPE[1:])


def _reference_guided(x, t, text, uncond, scale):
  """Guidance as the diffusers pipeline does it, with two separate network calls."""
  x = jnp.asarray(x)
  ts = jnp.full((x.shape[0],), t, jnp.int32)
  cond = toy_apply(TOY_PARAMS, x, ts, jnp.asarray(text))
  unc = toy_apply(TOY_PARAMS, x, ts, jnp.broadcast_to(uncond, text.shape))
  return np.asarray(unc + scale * (cond - unc))


def test_guided_prediction():
  text, uncond = _text()
  x = _random(12, (2,) + LATENT)
  calls = []

  def counting_apply(params, x_t, t, text_states):
    calls.append(x_t.shape[0])
    return toy_apply(params, x_t, t, text_states)

  ours = guided_prediction(counting_apply, TOY_PARAMS, x, 321, text, uncond, 7.5)
  _assert_close(ours, _reference_guided(x, 321, text, uncond, 7.5), 1e-6)
  assert calls == [4]  # one call on the doubled batch
  conditional = toy_apply(TOY_PARAMS, x, jnp.full((2,), 321), text)
  _assert_close(guided_prediction(toy_apply, TOY_PARAMS, x, 321, text, uncond, 1.0), conditional,
                1e-6)
  _assert_close(guided_prediction(toy_apply, TOY_PARAMS, x, 321, text, None, 7.5), conditional,
                1e-6)


def _sampler_keys(key, num_steps):
  init_key, steps_key = jax.random.split(key)
  x_T = np.asarray(jax.random.normal(init_key, (TEXT_SHAPE[0],) + LATENT, jnp.float32))
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(steps_key, i), x_T.shape))
            for i in range(num_steps)]
  return x_T, noises


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_sampler_matches_diffusers_loop(spacing, eta):
  config = _config("scaled_linear", steps_offset=1, timestep_spacing=spacing, clip_sample=False)
  schedule = NoiseSchedule.from_config(config)
  text, uncond = _text()
  key, num_steps, scale = jax.random.key(42), 8, 3.0
  ours = ddim_sample(schedule, toy_apply, TOY_PARAMS, text, uncond, key, latent_shape=LATENT,
                     num_steps=num_steps, guidance_scale=scale, eta=eta)

  theirs = diffusers.DDIMScheduler(**config)
  theirs.set_timesteps(num_steps)
  x, noises = _sampler_keys(key, num_steps)
  x = _torch(x)
  for i, t in enumerate(theirs.timesteps.numpy()):
    eps = _reference_guided(x.numpy(), int(t), text, uncond, scale)
    x = theirs.step(_torch(eps), int(t), x, eta=eta, variance_noise=_torch(noises[i])).prev_sample
  _assert_close(ours, x.numpy(), 1e-5)


def test_ddpm_sampler_matches_diffusers_loop(fixed_ddpm_noise):
  config = _config("linear")
  schedule = NoiseSchedule.from_config(config)
  text, uncond = _text()
  key, num_steps, scale = jax.random.key(7), 6, 2.0
  ours = ddpm_sample(schedule, toy_apply, TOY_PARAMS, text, uncond, key, latent_shape=LATENT,
                     num_steps=num_steps, guidance_scale=scale)

  theirs = diffusers.DDPMScheduler(**config)
  theirs.set_timesteps(num_steps)
  x, noises = _sampler_keys(key, num_steps)
  x = _torch(x)
  for i, t in enumerate(theirs.timesteps.numpy()):
    eps = _reference_guided(x.numpy(), int(t), text, uncond, scale)
    fixed_ddpm_noise["noise"] = noises[i]
    x = theirs.step(_torch(eps), int(t), x).prev_sample
  _assert_close(ours, x.numpy(), 1e-5)


def test_samplers_are_deterministic_in_the_key():
  schedule = NoiseSchedule.from_config(_config())
  text, uncond = _text()
  run = lambda k: ddpm_sample(schedule, toy_apply, TOY_PARAMS, text, uncond, jax.random.key(k),
                              latent_shape=LATENT, num_steps=5)
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  out = ddim_sample(schedule, toy_apply, TOY_PARAMS, text, None, jax.random.key(0),
                    latent_shape=LATENT, num_steps=5, eta=1.0)
  assert out.shape == (TEXT_SHAPE[0],) + LATENT and np.all(np.isfinite(out))


# --- loss --------------------------------------------------------------------------------------


def _linear_apply(params, x_t, t, text_states):
  del t
  return params["w"] * x_t + jnp.mean(text_states, axis=(1, 2))[:, None, None, None]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_matches_numpy(prediction_type):
  schedule = NoiseSchedule.from_config(_config(prediction_type=prediction_type))
  x0, noise = _random(20), _random(21)
  text = _random(22, (SHAPE[0], 5, 6))
  t = np.array([0, 500, 999])
  params = {"w": jnp.float32(0.3)}
  ours = jax.jit(per_example_loss, static_argnums=0)(_linear_apply, params, x0, text, t, noise,
                                                     schedule=schedule)

  a = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  prediction = 0.3 * x_t + text.mean(axis=(1, 2))[:, None, None, None]
  target = {"epsilon": noise, "v_prediction": np.sqrt(a) * noise - np.sqrt(1 - a) * x0,
            "sample": x0}[prediction_type]
  expected = ((prediction - target)**2).mean(axis=(1, 2, 3))
  assert ours.shape == (SHAPE[0],) and ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_loss_bf16_activations_and_gradient():
  schedule = NoiseSchedule.from_config(_config())
  x0, noise = _random(23), _random(24)
  text = _random(25, (SHAPE[0], 5, 6))
  t = jnp.array([10, 20, 30])

  def bf16_apply(params, x_t, t, text_states):
    return _linear_apply(params, x_t.astype(jnp.bfloat16), t, text_states.astype(jnp.bfloat16))

  params = {"w": jnp.bfloat16(0.3)}
  loss = per_example_loss(bf16_apply, params, x0, text, t, noise, schedule=schedule)
  reference = per_example_loss(_linear_apply, {"w": jnp.float32(0.3)}, x0, text, t, noise,
                               schedule=schedule)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, reference, rtol=2e-2)
  grad = jax.grad(lambda p: per_example_loss(_linear_apply, p, x0, text, t, noise,
                                             schedule=schedule).sum())({"w": jnp.float32(0.3)})
  assert np.isfinite(grad["w"]) and grad["w"] != 0
