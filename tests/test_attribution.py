"""Attribution by Unlearning on a micro denoiser: each kernel against a float64 reference, and
the sweep's invariances (device count, batch size, subsets, resume) and numerics (SPEC §6).

The micro denoiser names its layers like diffusers (`blocks_0/attn2/to_k`), so the selection
rules apply to it unchanged; it is small enough that compiling dominates the test time.
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
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import scores
from attrib_jax.attribution import selection
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.attribution import unlearn as unlearn_lib
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.diffusion.schedules import NoiseSchedule

N, K, L, D = 24, 2, 3, 6
LATENT = (4, 4, 2)
SWEEP = sweep_lib.SweepSettings(timesteps=(0, 250, 500, 750), num_captions=K,
                                items_per_device=1)
UNLEARN = unlearn_lib.UnlearnSettings(num_draws=40, draws_per_batch=20, micro_batch=8)
FISHER = fisher_lib.FisherSettings(num_epochs=2, batch_size=5, flush_every=3)


# ----------------------------------------------------------------------- micro model ---

class Attention(nn.Module):
  heads: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    width = x.shape[-1]
    dense = lambda name, bias=False: nn.Dense(width, use_bias=bias, name=name, dtype=self.dtype,
                                              param_dtype=self.dtype if self.dtype == jnp.float64
                                              else jnp.float32)
    q, k, v = dense("to_q")(x), dense("to_k")(context), dense("to_v")(context)
    split = lambda a: a.reshape(a.shape[:-1] + (self.heads, width // self.heads))
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // self.heads)
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(self.dtype, jnp.float32)), -1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
    return dense("to_out_0", bias=True)(out.reshape(x.shape[:-1] + (width,)))


class MicroDenoiser(nn.Module):
  """Tokens = latent pixels; time embedding; self-attention (attn1), cross-attention on the
  text (attn2), an MLP. `dtype` is the computation dtype (bf16 for the low-precision path,
  float64 for references)."""
  width: int = 8
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, t, text):
    pdt = self.dtype if self.dtype == jnp.float64 else jnp.float32
    dense = lambda n, name: nn.Dense(n, name=name, dtype=self.dtype, param_dtype=pdt)
    b, h, w, c = x.shape
    t = jnp.broadcast_to(jnp.asarray(t), (b,)).astype(pdt)
    freqs = jnp.exp(-jnp.arange(self.width // 2) * (math.log(1000.0) / (self.width // 2)))
    emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    tokens = dense(self.width, "proj_in")(x.reshape(b, h * w, c)) + dense(self.width,
                                                                          "time")(emb)[:, None]
    tokens = _Block(self.dtype, name="blocks_0")(tokens, text.astype(self.dtype))
    out = dense(c, "proj_out")(jax.nn.silu(tokens))
    return out.reshape(x.shape).astype(pdt)


class _Block(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, h, text):
    pdt = self.dtype if self.dtype == jnp.float64 else jnp.float32
    h = h + Attention(2, self.dtype, name="attn1")(h, h)
    h = h + Attention(2, self.dtype, name="attn2")(h, text)
    width = h.shape[-1]
    inner = nn.Dense(2 * width, name="ff_in", dtype=self.dtype, param_dtype=pdt)(h)
    return h + nn.Dense(width, name="ff_out", dtype=self.dtype, param_dtype=pdt)(
        jax.nn.gelu(inner))


def make_apply(dtype=jnp.float32):
  module = MicroDenoiser(dtype=dtype)
  return lambda p, x, t, c: module.apply({"params": p}, x, t, c)


APPLY = make_apply()
APPLY_BF16 = make_apply(jnp.bfloat16)
SCHEDULE = NoiseSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 1000})


def make_arrays(n: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"latents": rng.normal(size=(n, 2) + LATENT).astype(np.float32),
          "text_states": rng.normal(size=(n, K, L, D)).astype(np.float32),
          "num_captions": rng.integers(1, K + 1, n).astype(np.int32),
          "index": (1000 + 7 * rng.permutation(n)).astype(np.int64)}


@pytest.fixture(scope="module")
def world():
  arrays = make_arrays(N)
  params = jax.jit(MicroDenoiser().init)(jax.random.key(0), jnp.zeros((1,) + LATENT),
                                         jnp.zeros((1,), jnp.int32), jnp.zeros((1, L, D)))["params"]
  params = jax.device_get(params)
  fisher = fisher_lib.compute_fisher(APPLY, params, arrays, SCHEDULE, settings=FISHER,
                                     mesh=parallel.make_mesh(8))
  query = (arrays["latents"][3, 0], arrays["text_states"][3, 0])
  after = unlearn_lib.unlearn(APPLY, params, fisher, *query, SCHEDULE, num_train=N,
                              settings=UNLEARN, mesh=parallel.make_mesh(8))
  return dict(arrays=arrays, params=params, fisher=fisher, query=query,
              after=jax.device_get(after))


def to64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def spearman(a, b) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


# ------------------------------------------------------------------------- selection ---

def test_selection_paths_counts_and_split(world):
  params = world["params"]
  flat = traverse_util.flatten_dict(params)
  kv = selection.select(params)
  names = sorted(selection.path_name(p) for p, v in traverse_util.flatten_dict(kv).items() if v)
  assert names == ["blocks_0/attn2/to_k/kernel", "blocks_0/attn2/to_v/kernel"]
  assert selection.count(params, kv) == 2 * D * 8
  # to_q 8x8, to_k and to_v Dx8, to_out_0 8x8 + bias 8.
  assert selection.count(params, selection.select(params, "cross-attn")) == 64 + 2 * D * 8 + 72
  attn = selection.select(params, "attn")
  assert selection.count(params, attn) == sum(
      v.size for p, v in flat.items() if "attn1" in p or "attn2" in p)
  assert selection.count(params, selection.select(params, "all")) == selection.count(params)
  selected, rest = selection.split(params, attn)
  assert set(selected) | set(rest) == set(flat) and not set(selected) & set(rest)
  merged = selection.merge(selected, rest)
  assert jax.tree.all(jax.tree.map(np.array_equal, merged, params))
  with pytest.raises(ValueError, match="Unknown weight selection"):
    selection.select(params, "attn3")
  with pytest.raises(ValueError, match="matches no parameter"):
    selection.select({"conv": {"kernel": np.zeros(3)}})


def test_selection_counts_on_the_mscoco_unet():
  from attrib_jax.models import unet
  config = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[128, 256, 256, 256],
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                attention_head_dim=8, cross_attention_dim=1024)
  shapes = unet.abstract_params(unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(config)))
  assert selection.count(shapes, selection.select(shapes)) == 7_077_888
  assert selection.count(shapes) == 57_373_316


# ---------------------------------------------------------------------------- fisher ---

def min_snr_weights64(t, gamma):
  """The Min-SNR-γ weight of an ε-prediction loss at t, normalised to mean 1 over every t
  (float64, written out here independently of diffusion/loss.py)."""
  ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
  snr = ab / (1 - ab)
  w = np.minimum(snr, gamma) / snr
  return w[np.asarray(t)] / w.mean()


def fisher_float64(params, arrays, settings, rows):
  """Direct per-example gradients in float64 (same draws), squared and averaged; with
  `settings.min_snr_gamma` each square weighs the example's Min-SNR weight."""
  index, ncap = arrays["index"][rows], arrays["num_captions"][rows]
  examples = [(e, r, f) for e in range(settings.num_epochs) for r in range(rows.size)
              for f in (0, 1)]
  e, r, f = (np.asarray(a) for a in zip(*examples))
  keys = jax.vmap(fisher_lib.example_key, in_axes=(None, 0, 0, 0))(
      np.uint32(settings.seed), e.astype(np.int32), index[r].astype(np.uint32), f.astype(np.int32))
  caption = np.asarray(jax.vmap(fisher_lib.draw_caption)(keys, ncap[r]))
  t, noise = jax.vmap(lambda k: fisher_lib.draw_timestep_and_noise(k, LATENT, 1000))(keys)
  x0 = arrays["latents"][rows[r], f]
  text = arrays["text_states"][rows[r], caption]
  ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * np.asarray(noise, np.float64)
  with jax.enable_x64(True):
    apply64 = make_apply(jnp.float64)
    selected, rest = selection.split(to64(params), selection.select(params))

    def loss(sel, x, tt, c, n):
      out = apply64(selection.merge(sel, rest), x[None], tt[None], c[None])[0]
      return jnp.mean(jnp.square(out - n))
    w = (np.ones(t.shape) if settings.min_snr_gamma is None
         else min_snr_weights64(t, settings.min_snr_gamma))
    fisher = jax.jit(lambda *a: jax.tree.map(
        lambda g: jnp.mean(jnp.einsum("e,e...->e...", w, jnp.square(g)), axis=0),
        jax.vmap(jax.grad(loss), (None, 0, 0, 0, 0))(*a)))
    values = fisher(selected, x_t, np.asarray(t), text.astype(np.float64),
                    np.asarray(noise, np.float64))
    return {p: np.asarray(v) for p, v in values.items()}


def test_fisher_equals_float64_per_example_gradients(world, tmp_path):
  fisher = world["fisher"]
  assert fisher.num_examples == FISHER.num_epochs * 2 * N
  reference = fisher_float64(world["params"], world["arrays"], FISHER, np.arange(N))
  for p, ref in reference.items():
    np.testing.assert_allclose(fisher.values[p], ref, rtol=1e-4, atol=1e-6 * ref.max())
  # A checkpointed run interrupted after 4 micro-batches, resumed: the same Fisher.
  path = str(tmp_path / "fisher_ckpt.npz")

  def interrupt(progress):
    if progress.done >= 20:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    fisher_lib.compute_fisher(APPLY, world["params"], world["arrays"], SCHEDULE,
                              settings=FISHER, mesh=parallel.make_mesh(8),
                              checkpoint_path=path, progress=interrupt, progress_every=1)
  resumed = fisher_lib.compute_fisher(APPLY, world["params"], world["arrays"], SCHEDULE,
                                      settings=FISHER, mesh=parallel.make_mesh(8),
                                      checkpoint_path=path)
  for p in reference:
    np.testing.assert_allclose(resumed.values[p], fisher.values[p], rtol=1e-6)
  # Save / load with the fingerprint check.
  fisher_lib.save_fisher(str(tmp_path / "f.npz"), fisher)
  loaded = fisher_lib.load_fisher(str(tmp_path / "f.npz"), fisher.fingerprint())
  assert fisher.fingerprint() == fisher_lib.expected_fingerprint(
      world["params"], world["arrays"]["index"], SCHEDULE, FISHER)
  for p in reference:
    np.testing.assert_array_equal(loaded.values[p], fisher.values[p])
  with pytest.raises(ValueError, match="other settings"):
    fisher_lib.load_fisher(str(tmp_path / "f.npz"), "0" * 16)


# --------------------------------------------------------------------------- unlearn ---

def query_gradient64(params, x0, text, settings, mask=None, draws=None):
  """ḡ in float64 over the step's draws (`unlearn.query_draws`, or `draws` = (t, noise)),
  each draw's loss weighed by its Min-SNR weight when `settings.min_snr_gamma` is set, and
  with `mask` ([h, w] latent cells) the mean squared error over the masked cells only:
  (timesteps, {path: gradient})."""
  t, noise = draws or unlearn_lib.query_draws(settings.seed, 0, settings, LATENT, 1000)
  cells = np.ones(LATENT[:2]) if mask is None else np.asarray(mask, np.float64)
  ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[t][:, None, None, None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * np.asarray(noise, np.float64)
  w = (np.ones(t.shape) if settings.min_snr_gamma is None
       else min_snr_weights64(t, settings.min_snr_gamma))
  with jax.enable_x64(True):
    apply64 = make_apply(jnp.float64)
    selected, rest = selection.split(to64(params), selection.select(params))

    def mean_loss(sel):
      out = apply64(selection.merge(sel, rest), x_t, t, np.broadcast_to(
          text.astype(np.float64), (t.size,) + text.shape))
      squared = jnp.square(out - np.asarray(noise, np.float64))
      per_draw = (jnp.sum(squared * cells[None, :, :, None], axis=(1, 2, 3))
                  / (cells.sum() * LATENT[2]))
      return jnp.mean(w * per_draw)
    return t, {p: np.asarray(v) for p, v in jax.jit(jax.grad(mean_loss))(selected).items()}


def test_unlearning_step_equals_its_closed_form(world):
  params, fisher = world["params"], world["fisher"]
  x0, text = world["query"]
  t, g64 = query_gradient64(params, x0, text, UNLEARN)
  for b in range(UNLEARN.num_draws // UNLEARN.draws_per_batch):  # distinct within a batch
    assert np.unique(t[b * 20:(b + 1) * 20]).size == 20
  after = traverse_util.flatten_dict(world["after"])
  before = traverse_util.flatten_dict(params)
  for p, g in g64.items():
    expected = before[p] + UNLEARN.alpha / N * g / fisher.values[p]
    step = expected - before[p]
    np.testing.assert_allclose(after[p], expected, rtol=0, atol=1e-4 * np.abs(step).max())
  for p in before:
    if p not in g64:
      np.testing.assert_array_equal(after[p], before[p])
  # The mean gradient does not depend on the device count or the micro-batch.
  g1 = unlearn_lib.query_gradient(APPLY, params, x0, text, SCHEDULE, mesh=parallel.make_mesh(1),
                                  settings=dataclasses.replace(UNLEARN, micro_batch=40))
  for p, g in g64.items():
    np.testing.assert_allclose(g1[p], g, rtol=0, atol=1e-5 * np.abs(g).max())


def test_min_snr_weighted_fisher_and_query_gradient_equal_float64(world):
  """With `min_snr_gamma` the Fisher is E[w(t) (∇L)²] and ḡ the mean of w(t)·∇L over the
  draws, w the training's Min-SNR weights at mean 1 over the timesteps."""
  with pytest.raises(ValueError, match="min_snr_gamma"):
    fisher_lib.FisherSettings(min_snr_gamma=0.0)
  with pytest.raises(ValueError, match="min_snr_gamma"):
    unlearn_lib.UnlearnSettings(min_snr_gamma=-1.0)
  every = np.arange(1000)
  np.testing.assert_allclose(np.asarray(loss_lib.loss_weights(SCHEDULE, every, 5.0)),
                             min_snr_weights64(every, 5.0), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(loss_lib.loss_weights(SCHEDULE, every[:3], None)), 1)
  params, (x0, text) = world["params"], world["query"]

  settings = dataclasses.replace(FISHER, num_epochs=1, min_snr_gamma=5.0)
  weighted = fisher_lib.compute_fisher(APPLY, params, world["arrays"], SCHEDULE,
                                       settings=settings, mesh=parallel.make_mesh(8))
  reference = fisher_float64(params, world["arrays"], settings, np.arange(N))
  plain = fisher_float64(params, world["arrays"], dataclasses.replace(settings,
                                                                      min_snr_gamma=None),
                         np.arange(N))
  for p, ref in reference.items():
    np.testing.assert_allclose(weighted.values[p], ref, rtol=1e-4, atol=1e-6 * ref.max())
    assert not np.allclose(ref, plain[p], rtol=1e-2)   # the weights do change F
  # A weighted Fisher is another cache entry; the plain fingerprint is as before weighting.
  assert weighted.fingerprint() != fisher_lib.expected_fingerprint(
      params, world["arrays"]["index"], SCHEDULE, dataclasses.replace(settings,
                                                                      min_snr_gamma=None))

  unlearn = dataclasses.replace(UNLEARN, min_snr_gamma=5.0)
  _, g64 = query_gradient64(params, x0, text, unlearn)
  for mesh in (parallel.make_mesh(8), parallel.make_mesh(1)):
    g = unlearn_lib.query_gradient(APPLY, params, x0, text, SCHEDULE, mesh=mesh,
                                   settings=unlearn)
    for p, ref in g64.items():
      np.testing.assert_allclose(g[p], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_runner_sets_aside_a_preconditioner_of_other_settings(world, tmp_path):
  """Changing the Fisher's settings recomputes it without losing the old one; switching back
  reuses the old one (no recomputation)."""
  from attrib_jax.attribution import runner  # pylint: disable=g-import-not-at-top
  plain = runner.AbUSettings(dataclasses.replace(FISHER, num_epochs=1), UNLEARN, SWEEP)
  weighted = dataclasses.replace(plain, fisher=dataclasses.replace(plain.fisher,
                                                                   min_snr_gamma=5.0))
  logs = []
  make = lambda settings: runner.AbU(APPLY, world["params"], world["arrays"], SCHEDULE,
                                     settings, str(tmp_path), mesh=parallel.make_mesh(2),
                                     log=logs.append)
  first = make(plain).fisher
  second = make(weighted).fisher
  assert first.fingerprint() != second.fingerprint()
  assert (tmp_path / f"fisher.{first.fingerprint()}.npz").exists()
  logs.clear()
  again = make(plain).fisher
  assert any("reusing" in line for line in logs)
  assert not any("examples in" in line for line in logs)   # not recomputed
  assert again.fingerprint() == first.fingerprint()
  assert (tmp_path / f"fisher.{second.fingerprint()}.npz").exists()
  for p in first.values:
    np.testing.assert_array_equal(again.values[p], first.values[p])


# ------------------------------------------------------------------ local attribution ---

IMAGE_SIDE = 16   # the micro latent's 4x4 cells as a 16 px image: 4x4 pixels per cell


def test_region_latent_cells_pixel_codec_and_vae():
  from attrib_jax.attribution import region as region_lib  # pylint: disable=g-import-not-at-top
  # Cells overlap [5, 12) x [0, 7): columns 1-2 (pixels 4-11), rows 0-1 (pixels 0-7).
  mask = region_lib.Region(5, 0, 12, 7).latent_mask((IMAGE_SIDE,) * 2, LATENT[:2])
  expected = np.zeros((4, 4), np.float32)
  expected[0:2, 1:3] = 1
  np.testing.assert_array_equal(mask, expected)
  # The end is exclusive: x1 = 8 stops at column 1 (pixels 4-7); one pixel on is column 2.
  assert region_lib.Region(4, 4, 8, 8).latent_mask((16, 16), (4, 4)).sum() == 1
  assert region_lib.Region(4, 4, 9, 8).latent_mask((16, 16), (4, 4)).sum() == 2
  # A VAE's factor 8 (128 px -> 16x16 latent): [9, 16) x [9, 17) overlaps column 1, rows 1-2.
  vae = region_lib.Region(9, 9, 16, 17).latent_mask((128, 128), (16, 16))
  assert [tuple(c) for c in np.argwhere(vae)] == [(1, 1), (2, 1)]


def test_region_query_gradient_equals_float64(world):
  """The region's ḡ is the gradient of the mean squared error over its latent cells only, for
  AbU's draws and AbU+'s (float64 reference), on any mesh; it differs from the whole image's."""
  from attrib_jax.attribution import ekfac as ekfac_lib  # pylint: disable=g-import-not-at-top
  from attrib_jax.attribution import region as region_lib  # pylint: disable=g-import-not-at-top
  params, (x0, text) = world["params"], world["query"]
  mask = region_lib.Region(5, 0, 12, 7).latent_mask((IMAGE_SIDE,) * 2, LATENT[:2])
  _, g64 = query_gradient64(params, x0, text, UNLEARN, mask=mask)
  _, whole64 = query_gradient64(params, x0, text, UNLEARN)
  for mesh in (parallel.make_mesh(8), parallel.make_mesh(1)):
    g = unlearn_lib.query_gradient(APPLY, params, x0, text, SCHEDULE, settings=UNLEARN,
                                   mesh=mesh, region_mask=mask)
    for p, ref in g64.items():
      np.testing.assert_allclose(g[p], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
      assert not np.allclose(ref, whole64[p], rtol=0.05)   # the region does change ḡ
  plus = ekfac_lib.EKFACUnlearnSettings(num_draws=40, micro_batch=8)
  draws = ekfac_lib.query_draws(plus.seed, 0, plus.num_draws, LATENT, 1000)
  _, g64 = query_gradient64(params, x0, text, UNLEARN, mask=mask, draws=draws)
  g = ekfac_lib.query_gradient(APPLY, params, x0, text, SCHEDULE, settings=plus,
                               mesh=parallel.make_mesh(8), region_mask=mask)
  for p, ref in g64.items():
    np.testing.assert_allclose(g[p], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_region_covering_the_image_equals_no_region(world):
  """A box that overlaps every latent cell (the whole image, or one a pixel short on each
  side) unlearns exactly as no region: the masked mean of a mask of ones is the mean."""
  from attrib_jax.attribution import ekfac as ekfac_lib  # pylint: disable=g-import-not-at-top
  from attrib_jax.attribution import region as region_lib  # pylint: disable=g-import-not-at-top
  params, fisher, (x0, text) = world["params"], world["fisher"], world["query"]
  mesh = parallel.make_mesh(8)
  for box in ((0, 0, IMAGE_SIDE, IMAGE_SIDE), (1, 1, IMAGE_SIDE - 1, IMAGE_SIDE - 1)):
    mask = region_lib.Region(*box).latent_mask((IMAGE_SIDE,) * 2, LATENT[:2])
    after = unlearn_lib.unlearn(APPLY, params, fisher, x0, text, SCHEDULE, num_train=N,
                                settings=UNLEARN, mesh=mesh, region_mask=mask)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after), world["after"])
  plus = ekfac_lib.EKFACUnlearnSettings(num_draws=40, micro_batch=8)
  whole = ekfac_lib.query_gradient(APPLY, params, x0, text, SCHEDULE, settings=plus, mesh=mesh)
  boxed = ekfac_lib.query_gradient(APPLY, params, x0, text, SCHEDULE, settings=plus, mesh=mesh,
                                   region_mask=np.ones(LATENT[:2], np.float32))
  for p in whole:
    np.testing.assert_array_equal(boxed[p], whole[p])


def test_bad_regions_are_clear_errors(world):
  from attrib_jax.attribution import region as region_lib  # pylint: disable=g-import-not-at-top
  for text, match in (("1,2,3", "four integers"), ("a,b,c,d", "four integers"),
                      ("1.5,0,4,4", "four integers"), ("4,0,4,8", "x0 < x1"),
                      ("0,8,4,2", "y0 < y1"), ("-1,0,4,4", ">= 0")):
    with pytest.raises(ValueError, match=match):
      region_lib.Region.parse(text)
  for box in ((0, 0, 17, 8), (0, 0, 8, 17)):
    with pytest.raises(ValueError, match="outside the 16x16 query image"):
      region_lib.Region(*box).latent_mask((16, 16), (4, 4))
  with pytest.raises(ValueError, match="cannot map pixels to latent cells"):
    region_lib.Region(0, 0, 4, 4).latent_mask((18, 18), (4, 4))
  params, fisher, (x0, text) = world["params"], world["fisher"], world["query"]
  with pytest.raises(ValueError, match="mask shape"):
    unlearn_lib.query_gradient(APPLY, params, x0, text, SCHEDULE, settings=UNLEARN,
                               mesh=parallel.make_mesh(1), region_mask=np.ones((2, 2)))


def test_runner_keeps_each_regions_result_apart(world, tmp_path):
  """A region's scores are cached under the query and the region, recorded in the result,
  reused for the same region and recomputed for another; the whole query's stay apart."""
  from attrib_jax import generation  # pylint: disable=g-import-not-at-top
  from attrib_jax.attribution import region as region_lib  # pylint: disable=g-import-not-at-top
  from attrib_jax.attribution import runner  # pylint: disable=g-import-not-at-top
  logs = []
  abu = runner.AbU(APPLY, world["params"], world["arrays"], SCHEDULE,
                   runner.AbUSettings(dataclasses.replace(FISHER, num_epochs=1), UNLEARN, SWEEP),
                   str(tmp_path), mesh=parallel.make_mesh(2), log=logs.append)
  x0, text = world["query"]
  query = generation.Query(x0, text, np.zeros((IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8),
                           {"prompt": "q"})
  left, right = region_lib.Region(0, 0, 8, 16), region_lib.Region(8, 0, 16, 16)
  whole = abu.score(query, "q")
  a = abu.score(query, "q", left)
  b = abu.score(query, "q", right)
  assert a["meta"]["settings"]["region"] == [0, 0, 8, 16]
  assert (tmp_path / "q.region-0-0-8-16" / "result.json").exists()
  assert whole["meta"]["settings"]["region"] is None
  assert not np.allclose(a["scores"], b["scores"]) and not np.allclose(a["scores"],
                                                                      whole["scores"])
  logs.clear()
  again = abu.score(query, "q", left)
  assert not any("unlearn" in line for line in logs)   # reused, not recomputed
  np.testing.assert_array_equal(again["scores"], a["scores"])
  with pytest.raises(ValueError, match="outside"):
    abu.score(query, "q", region_lib.Region(0, 0, 32, 32))


def test_launch_attribute_names_the_region_flag(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  run = subprocess.run([sys.executable, "-m", "launch.attribute", "--config=configs/tiny.py:smoke",
                        f"--workdir={tmp_path}", "--region=0,0,8"], capture_output=True,
                       text=True, cwd=__file__.rsplit("/tests/", 1)[0], timeout=300)
  assert run.returncode != 0
  assert "--region=0,0,8: region '0,0,8': expected four integers" in run.stderr


def test_preconditioner_zero_fisher_rules():
  values = {("w",): np.array([0.0, 1e-3, 4.0])}
  scale = unlearn_lib.preconditioner(values, alpha=0.5, num_train=10)
  np.testing.assert_allclose(scale[("w",)], [0.05 / 1e-3, 0.05 / 1e-3, 0.05 / 4], rtol=1e-6)
  frozen = unlearn_lib.preconditioner(values, alpha=0.5, num_train=10, zero_fisher="freeze")
  np.testing.assert_allclose(frozen[("w",)], [0.0, 50.0, 0.0125], rtol=1e-6)
  damped = unlearn_lib.preconditioner(values, alpha=0.5, num_train=10, damping=1.0)
  np.testing.assert_allclose(damped[("w",)], [0.05, 0.05 / 1.001, 0.01], rtol=1e-6)
  with pytest.raises(ValueError, match="zero"):
    unlearn_lib.preconditioner(values, alpha=0.5, num_train=10, zero_fisher="error")
  with pytest.raises(ValueError, match="zero everywhere"):
    unlearn_lib.preconditioner({("w",): np.zeros(3)}, alpha=0.5, num_train=10)
  with pytest.raises(ValueError, match="overflows"):
    unlearn_lib.preconditioner({("w",): np.array([1e-45, 1.0])}, alpha=1.0, num_train=1)


# ----------------------------------------------------------------------------- sweep ---

def run_sweep(world, devices=8, per_device=1, **kwargs):
  settings = dataclasses.replace(SWEEP, items_per_device=per_device,
                                 **{k: kwargs.pop(k) for k in ("method", "timesteps") if k in kwargs})
  return sweep_lib.sweep(kwargs.pop("apply_fn", APPLY), world["params"],
                         kwargs.pop("after", world["after"]), kwargs.pop("arrays", world["arrays"]),
                         SCHEDULE, settings=settings, mesh=parallel.make_mesh(devices), **kwargs)


@pytest.fixture(scope="module")
def base_sweep(world):
  return run_sweep(world)


def sweep_float64(world, arrays, rows=None):
  """τ per (item, flip) in float64: both passes, per-slot differences, same keyed noise."""
  rows = np.arange(len(arrays["index"])) if rows is None else rows
  ts, flips = np.asarray(SWEEP.timesteps), np.asarray(SWEEP.flips)
  grid = np.stack(np.meshgrid(rows, flips, np.arange(K), ts, indexing="ij"), -1).reshape(-1, 4)
  r, f, k, t = grid.T
  noise = np.asarray(jax.vmap(lambda i, a, b, c: sweep_lib.slot_noise(
      SWEEP.seed, i, a, b, c, LATENT))(arrays["index"][r].astype(np.uint32), f, k, t), np.float64)
  ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[t][:, None, None, None]
  x_t = np.sqrt(ab) * arrays["latents"][r, f] + np.sqrt(1 - ab) * noise
  text = arrays["text_states"][r, k].astype(np.float64)
  with jax.enable_x64(True):
    apply64 = jax.jit(make_apply(jnp.float64))
    loss = lambda p: np.asarray(jnp.mean(jnp.square(apply64(to64(p), x_t, t, text) - noise),
                                         axis=(1, 2, 3)))
    delta = (loss(world["after"]) - loss(world["params"])).reshape(rows.size, len(flips), K,
                                                                     len(ts))
  mask = (np.arange(K)[None] < arrays["num_captions"][rows][:, None]).astype(np.float64)
  return np.einsum("nfk,nk->nf", delta.mean(-1), mask) / mask.sum(1)[:, None]


def test_sweep_is_invariant_to_devices_and_batch_size(world, base_sweep):
  tau = scores.image_scores(base_sweep.delta)
  scale = np.abs(tau).max()
  assert base_sweep.pre.shape == (N, 2) and np.all(base_sweep.pre > 0)
  for devices, per_device in ((1, 5), (2, 3), (8, 2)):
    other = run_sweep(world, devices, per_device)
    np.testing.assert_array_equal(other.index, base_sweep.index)
    # The network always sees one item's slots per call, so the numbers are identical; the
    # tolerance only leaves room for a backend that reorders sums by layout.
    np.testing.assert_allclose(other.delta, base_sweep.delta, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(other.pre, base_sweep.pre, rtol=1e-6)


def test_changed_leaves_are_found_wherever_the_weights_live(world):
  before = world["params"]                                   # host numpy
  after = world["after"]                                     # replicated over 8 devices
  changed = sweep_lib._changed_leaves(before, after)  # pylint: disable=protected-access
  assert set(changed) == set(selection.split(before, selection.select(before))[0])
  on_one = jax.device_put(before, jax.devices()[1])          # θ0 committed to one device
  assert set(sweep_lib._changed_leaves(on_one, after)) == set(changed)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="nothing was unlearned"):
    sweep_lib._changed_leaves(before, before)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="different paths"):
    sweep_lib._changed_leaves(before, {"other": before})  # pylint: disable=protected-access


def test_sweep_subset_equals_the_full_sweep_restricted(world, base_sweep):
  rows = np.array([17, 2, 9, 11, 3])
  subset = run_sweep(world, rows=rows)
  np.testing.assert_array_equal(subset.index, world["arrays"]["index"][rows])
  np.testing.assert_allclose(subset.delta, base_sweep.delta[rows], rtol=0,
                             atol=1e-6 * np.abs(base_sweep.delta).max())


def test_shared_noise_gives_duplicates_equal_scores(world, base_sweep):
  # Two copies of item 5 under other indices: with per-item noise their τ differ by the noise
  # draws alone; with shared noise (common random numbers across items) they are equal.
  arrays = {k: np.concatenate([v, v[[5, 5]]]) for k, v in world["arrays"].items()}
  arrays["index"][-2:] = [5001, 5002]
  per_item = run_sweep(world, arrays=arrays, rows=np.array([N, N + 1]))
  assert not np.allclose(per_item.delta[0], per_item.delta[1], rtol=1e-3)
  shared = sweep_lib.sweep(APPLY, world["params"], world["after"], arrays, SCHEDULE,
                           settings=dataclasses.replace(SWEEP, noise="shared"),
                           mesh=parallel.make_mesh(8), rows=np.array([5, N, N + 1]))
  np.testing.assert_allclose(shared.delta[1:], shared.delta[[0, 0]], rtol=1e-6)
  assert not np.allclose(shared.delta[0], base_sweep.delta[5], rtol=1e-3)
  assert sweep_lib.SweepSettings(noise="shared").loss_definition()["noise"] == "shared"
  assert "noise" not in SWEEP.loss_definition()  # older caches keep their keys
  with pytest.raises(ValueError, match="noise"):
    sweep_lib.SweepSettings(noise="fresh")


def test_repeated_timesteps_are_extra_noise_draws_of_equal_total_weight(world):
  """A timestep listed r times: r noise draws averaged, then weighted like any other timestep."""
  draws, weights = sweep_lib.timestep_draws((0, 5, 0, 0))
  np.testing.assert_array_equal(draws, [0, 0, 1, 2])
  np.testing.assert_allclose(weights, [1 / 6, 1 / 2, 1 / 6, 1 / 6])
  a, b = SWEEP.timesteps[0], SWEEP.timesteps[-1]
  tau = lambda ts: run_sweep(world, timesteps=ts).delta
  only_a, only_b, twice_b = tau((a,)), tau((b,)), tau((b, b))
  # Calls of other slot counts round the float32 network differently (~3e-5 of the scale).
  scale = np.abs(only_b).max()
  np.testing.assert_allclose(tau((a, b)), (only_a + only_b) / 2, rtol=0, atol=2e-4 * scale)
  np.testing.assert_allclose(tau((a, b, b)), (only_a + twice_b) / 2, rtol=0, atol=2e-4 * scale)
  second_draw = 2 * twice_b - only_b          # τ at b from the repeat's noise alone
  assert np.abs(second_draw - only_b).max() > 1e-2 * scale   # a fresh draw, not a copy
  # Draw 0 keeps the key of settings without repeats (cached pre losses stay valid).
  key = jax.random.key(SWEEP.seed)
  for value in (7, 1, 0, b):
    key = jax.random.fold_in(key, value)
  np.testing.assert_array_equal(sweep_lib.slot_noise(SWEEP.seed, 7, 1, 0, b, LATENT),
                                jax.random.normal(key, LATENT, jnp.float32))
  assert not np.allclose(sweep_lib.slot_noise(SWEEP.seed, 7, 1, 0, b, LATENT, 1),
                         sweep_lib.slot_noise(SWEEP.seed, 7, 1, 0, b, LATENT, 0))


def test_min_snr_weighting_weighs_each_timestep_by_its_training_loss_weight(world):
  """τ with `min_snr_gamma` = the single-timestep τs combined with weights ∝ min(SNR, γ)
  (in units of the schedule's target), normalised; without it, the plain mean."""
  a, b = SWEEP.timesteps[0], SWEEP.timesteps[-1]
  gamma = 2.0
  ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[[a, b]]
  snr = ab / (1 - ab)
  w = np.minimum(snr, gamma) / snr          # ε-prediction: min(SNR, γ) / SNR (trainer docs)
  weighted = dataclasses.replace(SWEEP, timesteps=(a, b), min_snr_gamma=gamma)
  np.testing.assert_allclose(sweep_lib.timestep_weights(weighted, SCHEDULE), w / w.sum())
  assert sweep_lib.timestep_weights(dataclasses.replace(weighted, min_snr_gamma=None),
                                    SCHEDULE).tolist() == [0.5, 0.5]
  only = {t: run_sweep(world, timesteps=(t,)).delta for t in (a, b)}
  got = sweep_lib.sweep(APPLY, world["params"], world["after"], world["arrays"], SCHEDULE,
                        settings=dataclasses.replace(weighted, items_per_device=1),
                        mesh=parallel.make_mesh(8)).delta
  scale = np.abs(only[b]).max()
  np.testing.assert_allclose(got, (w[0] * only[a] + w[1] * only[b]) / w.sum(), rtol=0,
                             atol=2e-4 * scale)
  with pytest.raises(ValueError, match="min_snr_gamma"):
    sweep_lib.SweepSettings(min_snr_gamma=0.0)


def test_sweep_resumes_after_interruption(world, base_sweep, tmp_path):
  path = str(tmp_path / "sweep_ckpt.npz")
  seen = []

  def interrupt(progress):
    seen.append(progress)
    if progress.done >= 16:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    run_sweep(world, checkpoint_path=path, checkpoint_every=1, progress=interrupt,
              progress_every=1)
  assert seen[0].unit == "items" and seen[0].rate > 0 and np.isfinite(seen[0].eta_s)
  after_resume = []
  resumed = run_sweep(world, 2, 3, checkpoint_path=path, progress=after_resume.append,
                      progress_every=1)  # another layout resumes too
  assert after_resume[0].done > 16  # it did not start over
  np.testing.assert_allclose(resumed.delta, base_sweep.delta, rtol=0,
                             atol=1e-6 * np.abs(base_sweep.delta).max())
  with pytest.raises(ValueError, match="another sweep"):
    run_sweep(world, rows=np.arange(5), checkpoint_path=path)


def test_sweep_agrees_with_float64(world, base_sweep, tmp_path):
  reference = sweep_float64(world, world["arrays"])
  tau64 = scores.image_scores(reference)
  rel = lambda d: np.abs(d - reference).max() / np.abs(reference).max()
  # The deltas are in the hard regime: ~1e-3 of the loss.
  assert 1e-5 < np.abs(reference).mean() / base_sweep.pre.mean() < 1e-2
  assert rel(base_sweep.delta) < 1e-3
  assert spearman(scores.image_scores(base_sweep.delta), tau64) >= 0.99
  jvp = run_sweep(world, method="jvp")
  assert spearman(scores.image_scores(jvp.delta), tau64) >= 0.99
  # Cached pre losses (computed once, reused for a subset in another order): "cached" method.
  pre = sweep_lib.compute_pre_losses(APPLY, world["params"], world["arrays"], SCHEDULE,
                                     settings=SWEEP, mesh=parallel.make_mesh(8))
  np.testing.assert_allclose(pre.pre, base_sweep.pre, rtol=1e-6)
  key = sweep_lib.cache_key(scores.params_fingerprint(world["params"]), SWEEP, SCHEDULE)
  assert key != sweep_lib.cache_key("other", SWEEP, SCHEDULE)
  sweep_lib.save_pre_cache(str(tmp_path / "pre.npz"), key, pre)
  rows = np.arange(N)[::-1]
  cached_pre = sweep_lib.load_pre_cache(str(tmp_path / "pre.npz"), key,
                                        world["arrays"]["index"][rows])
  cached = run_sweep(world, method="cached", rows=rows, pre_slot_losses=cached_pre)
  assert rel(cached.delta[::-1]) < 1e-3
  assert spearman(scores.image_scores(cached.delta[::-1]), tau64) >= 0.99
  with pytest.raises(ValueError, match="other settings"):
    sweep_lib.load_pre_cache(str(tmp_path / "pre.npz"), "0" * 16, world["arrays"]["index"])


def _dot_precisions(jaxpr) -> list:
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn.params["precision"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _dot_precisions(inner)
  return found


def test_sweep_traces_the_network_with_full_float32_matmuls(world):
  """Default-precision f32 matmuls are TF32 on NVIDIA GPUs: the sweep must not use them."""
  program = sweep_lib._sweep_program(APPLY, parallel.make_mesh(1), SWEEP.timesteps, SWEEP.flips,
                                     K, "paired", 1, "highest")
  batch = {"latents": np.zeros((1, 2) + LATENT, np.float32),
           "text": np.zeros((1, K, L, D), np.float32), "index": np.zeros(1, np.uint32)}
  jaxpr = jax.make_jaxpr(program)(world["params"], {}, SCHEDULE, np.uint32(0), batch).jaxpr
  precisions = _dot_precisions(jaxpr)
  assert len(precisions) >= 20
  assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions), set(precisions)


def test_bf16_network_refused_by_paired_and_accurate_with_jvp(world):
  arrays = make_arrays(400, seed=1)
  with pytest.raises(ValueError, match="bfloat16"):
    run_sweep(world, apply_fn=APPLY_BF16, arrays=arrays)
  with pytest.raises(ValueError, match="TF32"):
    dataclasses.replace(SWEEP, matmul_precision="default")
  bf16 = run_sweep(world, per_device=25, apply_fn=APPLY_BF16, arrays=arrays, method="jvp")
  tau64 = scores.image_scores(sweep_float64(world, arrays))
  tau = scores.image_scores(bf16.delta)
  positives = scores.top_k(tau64, 100, bf16.index)
  assert scores.average_precision(scores.rank(tau, bf16.index), positives) >= 0.95


# ---------------------------------------------------------------------------- scores ---

def test_scores_ranking_metrics_and_result_files(tmp_path):
  pre = np.array([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
  post = pre + np.array([[1e-3, 3e-3], [2e-3, 0.0], [-1e-3, 0.0]])
  tau = scores.image_scores(post - pre)
  np.testing.assert_allclose(tau, [3e-3, 2e-3, 0.0], atol=1e-15)
  index = np.array([10, 20, 30])
  ranking = scores.rank(tau, index)
  np.testing.assert_array_equal(ranking, [10, 20, 30])
  np.testing.assert_array_equal(scores.rank(np.zeros(3), index), [10, 20, 30])  # ties by index
  assert scores.average_precision([5, 1, 7, 2], [1, 2]) == pytest.approx((1 / 2 + 2 / 4) / 2)
  assert scores.average_precision([1, 2, 3], [9]) == 0.0
  assert scores.mean_average_precision([[1, 2], [2, 1]], [[1], [1]]) == pytest.approx(0.75)
  assert scores.recall_at_k([5, 1, 7, 2], [1, 2], 2) == 0.5
  path = str(tmp_path / "result")
  scores.save_result(path, tau, ranking, {"alpha": 0.01}, "abc", index=index, pre=pre)
  loaded = scores.load_result(path, "abc")
  np.testing.assert_array_equal(loaded["scores"], tau)
  np.testing.assert_array_equal(loaded["ranking"], ranking)
  np.testing.assert_array_equal(loaded["pre"], pre)
  assert loaded["meta"]["settings"] == {"alpha": 0.01}
  with pytest.raises(ValueError, match="computed for model"):
    scores.load_result(path, "xyz")
  scores.save_result(str(tmp_path / "other"), tau + 1, ranking, {}, "abc", index=index)
  (tmp_path / "other.npz").replace(tmp_path / "result.npz")
  with pytest.raises(ValueError, match="does not belong"):
    scores.load_result(path)
