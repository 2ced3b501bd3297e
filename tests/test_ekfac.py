"""AbU+ (EK-FAC) on a micro denoiser against float64 definitions, and end to end on a micro UNet.

The micro denoiser's attention layers also expose their Dense inputs (`sow`) and outputs
(`perturb`) through flax's own mechanisms, so the float64 reference gets a and g = ∂L/∂s by a
route independent of ekfac.py's method interception (both are no-ops unless asked for).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from attrib_jax import parallel
from attrib_jax.attribution import ekfac
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import scores
from attrib_jax.attribution import selection
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.diffusion.schedules import NoiseSchedule

N, K, L, D, WIDTH = 12, 2, 3, 6, 8
LATENT = (4, 4, 2)
SCHEDULE = NoiseSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 1000})
# to_q reads the image tokens, to_k / to_v the text, to_out_0 has a bias: every case at once.
SETTINGS = ekfac.EKFACSettings(selection="cross-attn", num_epochs=1, batch_size=8, flush_every=2)
# 37 draws over 8 devices: 5 per device, the last 3 padding (masked).
UNLEARN = ekfac.EKFACUnlearnSettings(num_draws=37, micro_batch=8, selection="cross-attn")
ATTN2 = ("blocks_0", "attn2")


# ----------------------------------------------------------------------- micro model ---

class Attention(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    def project(name, inputs, bias=False):
      self.sow("inputs", name + "_in", inputs)
      out = nn.Dense(WIDTH, use_bias=bias, name=name, dtype=self.dtype)(inputs)
      return self.perturb(name + "_out", out)
    q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
    split = lambda a: a.reshape(a.shape[:-1] + (2, WIDTH // 2))
    logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(WIDTH // 2)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), split(v))
    return project("to_out_0", out.reshape(x.shape), bias=True)


class Block(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, h, text):
    h = h + Attention(self.dtype, name="attn2")(h, text)
    return h + nn.Dense(WIDTH, name="ff", dtype=self.dtype)(jax.nn.gelu(h))


class MicroDenoiser(nn.Module):
  """Tokens = latent pixels, a time embedding, cross-attention on the text, an MLP."""
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, t, text):
    b, h, w, c = x.shape
    t = jnp.broadcast_to(jnp.asarray(t), (b,)).astype(self.dtype)
    freqs = jnp.exp(-jnp.arange(WIDTH // 2) * (math.log(1000.0) / (WIDTH // 2)))
    emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    tokens = (nn.Dense(WIDTH, name="proj_in", dtype=self.dtype)(x.reshape(b, h * w, c))
              + nn.Dense(WIDTH, name="time", dtype=self.dtype)(emb)[:, None])
    tokens = Block(self.dtype, name="blocks_0")(tokens, text.astype(self.dtype))
    return nn.Dense(c, name="proj_out", dtype=self.dtype)(jax.nn.silu(tokens)).reshape(x.shape)


MODULE = MicroDenoiser()
APPLY = lambda p, x, t, c: MODULE.apply({"params": p}, x, t, c)


def make_arrays(n: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"latents": rng.normal(size=(n, 2) + LATENT).astype(np.float32),
          "text_states": rng.normal(size=(n, K, L, D)).astype(np.float32),
          "num_captions": rng.integers(1, K + 1, n).astype(np.int32),
          "index": (500 + 3 * rng.permutation(n)).astype(np.int64)}


def to64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.fixture(scope="module")
def world():
  arrays = make_arrays(N)
  variables = jax.jit(MODULE.init)(jax.random.key(0), jnp.zeros((1,) + LATENT),
                                   jnp.zeros((1,), jnp.int32), jnp.zeros((1, L, D)))
  params = jax.device_get(variables["params"])
  factors = ekfac.compute_ekfac(APPLY, params, arrays, SCHEDULE, settings=SETTINGS,
                                mesh=parallel.make_mesh(8))
  return dict(arrays=arrays, params=params, factors=factors,
              perturbations=jax.device_get(variables["perturbations"]))


def reference_tokens(world, min_snr_gamma=None):
  """Per example, float64, the Fisher's draws: {layer: (a [E,T,in(+1)], g [E,T,out])} and the
  per-example gradients of the selected weights (plain jax.grad of the parameters). With
  `min_snr_gamma`, of the loss scaled by √w(t), w the Min-SNR weight at mean 1 over t."""
  arrays, params = world["arrays"], world["params"]
  rows = np.arange(N)
  e, r, f = (np.asarray(a) for a in zip(*[(0, i, fl) for i in rows for fl in (0, 1)]))
  keys = jax.vmap(fisher_lib.example_key, in_axes=(None, 0, 0, 0))(
      np.uint32(SETTINGS.seed), e.astype(np.int32), arrays["index"][r].astype(np.uint32),
      f.astype(np.int32))
  caption = np.asarray(jax.vmap(fisher_lib.draw_caption)(keys, arrays["num_captions"][r]))
  t, noise = jax.vmap(lambda k: fisher_lib.draw_timestep_and_noise(k, LATENT, 1000))(keys)
  t, noise = np.asarray(t), np.asarray(noise, np.float64)
  root_w = np.ones(t.shape)
  if min_snr_gamma is not None:   # ε target: min(SNR, γ) / SNR, written out in float64
    all_ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
    w = np.minimum(all_ab / (1 - all_ab), min_snr_gamma) / (all_ab / (1 - all_ab))
    root_w = np.sqrt(w[t] / w.mean())
  ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[t][:, None, None, None]
  x_t = np.sqrt(ab) * arrays["latents"][r, f] + np.sqrt(1 - ab) * noise
  text = arrays["text_states"][r, caption].astype(np.float64)
  with jax.enable_x64(True):
    module = MicroDenoiser(dtype=jnp.float64)
    selected, rest = selection.split(to64(params), selection.select(params, SETTINGS.selection))
    zeros = jax.tree.map(lambda a: np.zeros(a.shape), world["perturbations"])

    def loss(sel, taps, x, tt, c, n, scale):
      out, state = module.apply({"params": selection.merge(sel, rest), "perturbations": taps},
                                x[None], tt[None], c[None], mutable=["inputs"])
      return scale * jnp.mean(jnp.square(out[0] - n)), state["inputs"]
    grad = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1), has_aux=True),
                            in_axes=(None, None, 0, 0, 0, 0, 0)))
    (g_params, g_taps), inputs = jax.device_get(grad(selected, zeros, x_t, t, text, noise,
                                                     root_w))
  tokens = {}
  for name in ("to_q", "to_k", "to_v", "to_out_0"):
    a = inputs["blocks_0"]["attn2"][name + "_in"][0]
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    if name == "to_out_0":
      a = np.concatenate([a, np.ones(a.shape[:2] + (1,))], -1)
    g = g_taps["blocks_0"]["attn2"][name + "_out"]
    tokens[ATTN2 + (name,)] = (a, g.reshape(g.shape[0], -1, g.shape[-1]))
  return tokens, g_params


def joined(grads, module, has_bias):
  kernel = grads[module + ("kernel",)]
  if not has_bias:
    return kernel
  return np.concatenate([kernel, grads[module + ("bias",)][..., None, :]], -2)


# --------------------------------------------------------------------------- factors ---

def test_factors_equal_float64_definitions(world):
  factors = world["factors"]
  assert factors.num_examples == 2 * N
  assert set(factors.layers) == {ATTN2 + (n,) for n in ("to_q", "to_k", "to_v", "to_out_0")}
  assert factors.param_paths() == set(selection.split(
      world["params"], selection.select(world["params"], "cross-attn"))[0])
  tokens, g_params = reference_tokens(world)
  for module, (a, g) in tokens.items():
    f = factors.layers[module]
    assert f.has_bias == (module[-1] == "to_out_0")
    assert f.tokens_per_example == a.shape[1] == (L if module[-1] in ("to_k", "to_v") else 16)
    # The reference's own consistency: Σ_t a_t g_tᵀ is jax.grad's kernel (+ bias) gradient.
    per_example = joined(g_params, module, f.has_bias)
    np.testing.assert_allclose(np.einsum("eti,eto->eio", a, g), per_example, rtol=1e-9,
                               atol=1e-12 * np.abs(per_example).max())
    rows = a.shape[0] * a.shape[1]
    a_ref = np.einsum("eti,etj->ij", a, a) / rows
    g_ref = np.einsum("eto,etp->op", g, g) / rows
    np.testing.assert_allclose(f.activation_cov, a_ref, rtol=0, atol=1e-5 * np.abs(a_ref).max())
    np.testing.assert_allclose(f.gradient_cov, g_ref, rtol=0, atol=1e-5 * np.abs(g_ref).max())
    # Eigendecompositions of the stored covariances: orthonormal, reconstructing.
    for cov, lam, q in ((f.activation_cov, f.activation_eigvals, f.activation_eigvecs),
                        (f.gradient_cov, f.gradient_eigvals, f.gradient_eigvecs)):
      np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-12)
      np.testing.assert_allclose(q @ np.diag(lam) @ q.T, cov, atol=1e-12 * np.abs(cov).max())
    # Λ: its definition, the per-example jax.grad gradients rotated into the stored bases.
    qa, qg = f.activation_eigvecs, f.gradient_eigvecs
    lam_ref = np.mean(np.square(np.einsum("ij,eio,op->ejp", qa, per_example, qg)), axis=0)
    assert f.eigenvalues.shape == per_example.shape[1:]
    np.testing.assert_allclose(f.eigenvalues, lam_ref, rtol=0, atol=1e-5 * lam_ref.max())


def test_min_snr_weighted_factors_describe_the_weighted_loss(world):
  """With `min_snr_gamma` the per-token g (so G and Λ) are those of √w(t)·L: each example's
  curvature weighs w(t), as in the Min-SNR training loss; A does not change."""
  settings = dataclasses.replace(SETTINGS, min_snr_gamma=5.0)
  weighted = ekfac.compute_ekfac(APPLY, world["params"], world["arrays"], SCHEDULE,
                                 settings=settings, mesh=parallel.make_mesh(8))
  assert weighted.fingerprint() != world["factors"].fingerprint()
  assert weighted.fingerprint() == ekfac.expected_fingerprint(
      world["params"], world["arrays"]["index"], SCHEDULE, settings)
  tokens, g_params = reference_tokens(world, min_snr_gamma=5.0)
  for module, (a, g) in tokens.items():
    f, plain = weighted.layers[module], world["factors"].layers[module]
    np.testing.assert_allclose(f.activation_cov, plain.activation_cov, rtol=1e-6,
                               atol=1e-7 * np.abs(plain.activation_cov).max())
    rows = a.shape[0] * a.shape[1]
    g_ref = np.einsum("eto,etp->op", g, g) / rows
    np.testing.assert_allclose(f.gradient_cov, g_ref, rtol=0, atol=1e-5 * np.abs(g_ref).max())
    assert not np.allclose(f.gradient_cov, plain.gradient_cov, rtol=1e-2)
    per_example = joined(g_params, module, f.has_bias)
    lam_ref = np.mean(np.square(np.einsum("ij,eio,op->ejp", f.activation_eigvecs, per_example,
                                          f.gradient_eigvecs)), axis=0)
    np.testing.assert_allclose(f.eigenvalues, lam_ref, rtol=0, atol=1e-5 * lam_ref.max())


def test_sharded_equals_unsharded(world):
  """Each pass on one device (another batch size) against the 8-device pass, same inputs.

  Λ is refitted in the 8-device run's bases: eigenvectors of nearly equal eigenvalues rotate
  with float32 rounding of A and G, so a Λ in self-computed bases differs by more than rounding
  where the spectrum is nearly degenerate (P barely notices)."""
  settings = dataclasses.replace(SETTINGS, batch_size=5, flush_every=1)
  mesh = parallel.make_mesh(1)
  covariances = ekfac.compute_covariances(APPLY, world["params"], world["arrays"], SCHEDULE,
                                          settings=settings, mesh=mesh)
  refit = ekfac.fit_eigenvalues(APPLY, world["params"], world["arrays"], SCHEDULE,
                                world["factors"], settings=settings, mesh=mesh)
  assert covariances.fingerprint() == world["factors"].fingerprint()
  for module, f in world["factors"].layers.items():
    for field, other in (("activation_cov", covariances), ("gradient_cov", covariances),
                         ("eigenvalues", refit)):
      ref = getattr(f, field)
      np.testing.assert_allclose(getattr(other.layers[module], field), ref, rtol=0,
                                 atol=1e-6 * np.abs(ref).max(), err_msg=f"{module} {field}")


def test_save_load_and_fingerprint(world, tmp_path):
  factors = world["factors"]
  path = str(tmp_path / "ekfac.npz")
  ekfac.save_ekfac(path, factors)
  assert factors.fingerprint() == ekfac.expected_fingerprint(
      world["params"], world["arrays"]["index"], SCHEDULE, SETTINGS)
  loaded = ekfac.load_ekfac(path, factors.fingerprint())
  assert loaded.num_examples == factors.num_examples and loaded.meta == factors.meta
  for module, f in factors.layers.items():
    for field in dataclasses.fields(f):
      np.testing.assert_array_equal(getattr(loaded.layers[module], field.name),
                                    getattr(f, field.name))
  with pytest.raises(ValueError, match="other settings"):
    ekfac.load_ekfac(path, "0" * 16)


# ---------------------------------------------------------------------- preconditioner ---

def random_factors(rng, n_in, n_out, *, has_bias=False, lam=None) -> ekfac.LayerFactors:
  """Factors from random SPD A, G (well conditioned) and a random positive Λ."""
  def spd(n):
    m = rng.normal(size=(n, n))
    return m @ m.T / n + 0.5 * np.eye(n)
  f = ekfac.layer_factors(spd(n_in + has_bias), spd(n_out), has_bias=has_bias)
  f.eigenvalues = rng.uniform(0.1, 2.0, (n_in + has_bias, n_out)) if lam is None else lam
  return f


def test_preconditioned_update_equals_dense_float64():
  rng = np.random.default_rng(1)
  layers = {("a", "to_k"): random_factors(rng, 5, 3), ("b", "to_out_0"): random_factors(
      rng, 4, 2, has_bias=True)}
  factors = ekfac.EKFAC(layers, 1, {})
  grads = {p: rng.normal(size=(5, 3) if p[0] == "a" else ((4, 2) if p[-1] == "kernel" else 2))
           for p in factors.param_paths()}
  update = ekfac.precondition(factors, grads, damping_scale=0.1)
  for module, f in layers.items():
    # The dense matrix: (Q_A ⊗ Q_G) diag(1 / (vec Λ + d)) (Q_A ⊗ Q_G)ᵀ on row-major vec(Ḡ).
    q = np.kron(f.activation_eigvecs, f.gradient_eigvecs)
    d = 0.1 * f.eigenvalues.mean()
    dense = q @ np.diag(1.0 / (f.eigenvalues.reshape(-1) + d)) @ q.T
    w = joined(grads, module, f.has_bias)
    expected = (dense @ w.reshape(-1)).reshape(w.shape)
    np.testing.assert_allclose(joined(update, module, f.has_bias), expected, rtol=1e-12)
  with pytest.raises(ValueError, match="cover exactly"):
    ekfac.precondition(factors, {p: v for p, v in list(grads.items())[1:]})


def test_kfac_limit():
  """Λ = λ_A λ_Gᵀ and no damping: EK-FAC is K-FAC, the inverse of A ⊗ G."""
  rng = np.random.default_rng(2)
  f = random_factors(rng, 4, 3)
  f.eigenvalues = ekfac.kfac_eigenvalues(f)
  factors = ekfac.EKFAC({("m",): f}, 1, {})
  g = rng.normal(size=(4, 3))
  update = ekfac.precondition(factors, {("m", "kernel"): g}, damping_scale=0.0)[("m", "kernel")]
  kron_inverse = np.linalg.inv(np.kron(f.activation_cov, f.gradient_cov))
  np.testing.assert_allclose(update, (kron_inverse @ g.reshape(-1)).reshape(g.shape), rtol=1e-10)
  np.testing.assert_allclose(update, np.linalg.solve(f.activation_cov, g) @ np.linalg.inv(
      f.gradient_cov), rtol=1e-10)
  f.eigenvalues[0, 0] = 0.0
  with pytest.raises(ValueError, match="not positive"):
    ekfac.precondition(factors, {("m", "kernel"): g}, damping_scale=0.0)


# --------------------------------------------------------------------------- unlearn ---

def test_ekfac_unlearn_equals_its_closed_form(world):
  params, factors, arrays = world["params"], world["factors"], world["arrays"]
  x0, text = arrays["latents"][4, 0], arrays["text_states"][4, 0]
  after = ekfac.ekfac_unlearn(APPLY, params, factors, x0, text, SCHEDULE, num_train=N,
                              settings=UNLEARN, mesh=parallel.make_mesh(8))
  t, noise = ekfac.query_draws(UNLEARN.seed, 0, UNLEARN.num_draws, LATENT, 1000)
  small, _ = ekfac.query_draws(0, 0, 50, (1,), 5)  # timesteps come with replacement
  assert np.unique(small).size < small.size
  ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[t][:, None, None, None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * np.asarray(noise, np.float64)
  with jax.enable_x64(True):
    module = MicroDenoiser(dtype=jnp.float64)
    selected, rest = selection.split(to64(params), selection.select(params, UNLEARN.selection))

    def mean_loss(sel):
      out = module.apply({"params": selection.merge(sel, rest)}, x_t, t,
                         np.broadcast_to(text.astype(np.float64), (t.size,) + text.shape))
      return jnp.mean(jnp.square(out - np.asarray(noise, np.float64)))
    g64 = {p: np.asarray(v) for p, v in jax.jit(jax.grad(mean_loss))(selected).items()}
  step = ekfac.precondition(factors, g64, damping_scale=UNLEARN.damping_scale)
  before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(
      jax.device_get(after))
  for p, s in step.items():
    expected = before[p] + UNLEARN.alpha / N * s
    np.testing.assert_allclose(after[p], expected, rtol=0,
                               atol=1e-4 * UNLEARN.alpha / N * np.abs(s).max(), err_msg=str(p))
  for p in before:
    if p not in step:
      np.testing.assert_array_equal(after[p], before[p])


def test_unsupported_selections_are_errors(world):
  only_bias = lambda p: p[-1] == "bias" and "to_out_0" in p and "attn2" in p
  with pytest.raises(ValueError, match="only with its kernel"):
    ekfac.compute_covariances(APPLY, world["params"], world["arrays"], SCHEDULE,
                              settings=dataclasses.replace(SETTINGS, selection=only_bias))
  with pytest.raises(ValueError, match="another model, items"):
    ekfac.fit_eigenvalues(APPLY, world["params"], world["arrays"], SCHEDULE, world["factors"],
                          settings=SETTINGS, rows=np.arange(N - 1))
  with pytest.raises(ValueError, match="cover the selection"):
    ekfac.ekfac_unlearn(APPLY, world["params"], world["factors"], world["arrays"]["latents"][0, 0],
                        world["arrays"]["text_states"][0, 0], SCHEDULE, num_train=N,
                        settings=dataclasses.replace(UNLEARN, selection="cross-attn-kv"))


# ------------------------------------------------------------------- micro UNet, e2e ---

UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=[8], norm_num_groups=4,
                   down_block_types=["CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D"], attention_head_dim=2,
                   cross_attention_dim=12)


def test_abu_plus_end_to_end_on_the_unet_over_two_devices():
  from attrib_jax.models import unet
  module = unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(UNET_CONFIG))
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(unet.abstract_params(module))
  params = traverse_util.unflatten_dict({
      p: (rng.normal(size=v.shape) / np.sqrt(np.prod(v.shape[:-1])) if p[-1] == "kernel"
          else np.ones(v.shape) if p[-1] == "scale" else 0.1 * rng.normal(size=v.shape)
          ).astype(np.float32) for p, v in flat.items()})
  apply_fn = lambda p, x, t, c: module.apply({"params": p}, x, t, c)
  n = 6
  arrays = {"latents": rng.normal(size=(n, 2, 8, 8, 4)).astype(np.float32),
            "text_states": rng.normal(size=(n, 2, 5, 12)).astype(np.float32),
            "num_captions": np.array([1, 2, 2, 1, 2, 2], np.int32),
            "index": np.arange(100, 100 + n)}
  schedule = NoiseSchedule.from_config({})
  mesh = parallel.make_mesh(2)
  with pytest.raises(ValueError, match="nn.Dense kernels and biases only"):
    ekfac.compute_covariances(apply_fn, params, arrays, schedule, mesh=mesh, settings=
                              ekfac.EKFACSettings(selection=lambda p: "conv_in" in p))

  factors = ekfac.compute_ekfac(apply_fn, params, arrays, schedule, mesh=mesh,
                                settings=ekfac.EKFACSettings(batch_size=4))
  assert sum(np.prod(f.eigenvalues.shape) for f in factors.layers.values()) == selection.count(
      params, selection.select(params)) == 4 * 2 * 12 * 8  # 4 transformer blocks: K, V 12x8
  assert all(f.tokens_per_example == 5 and (f.eigenvalues > 0).all()
             for f in factors.layers.values())
  query = 1
  after = ekfac.ekfac_unlearn(
      apply_fn, params, factors, arrays["latents"][query, 0], arrays["text_states"][query, 0],
      schedule, num_train=n, mesh=mesh,
      settings=ekfac.EKFACUnlearnSettings(num_draws=8, micro_batch=4))
  result = sweep_lib.sweep(apply_fn, params, after, arrays, schedule, mesh=mesh,
                           settings=sweep_lib.SweepSettings(timesteps=(100, 600), num_captions=2,
                                                            items_per_device=1))
  tau = scores.image_scores(result.delta)
  assert scores.rank(tau, result.index)[0] == arrays["index"][query]
