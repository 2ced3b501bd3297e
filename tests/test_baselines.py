"""Attribution baselines against direct numpy computations on a micro pixel-space denoiser.

The micro denoiser works on 4x4x3 "latents" that are the images' pixels in [-1, 1] (as the
tiny world's model does) and names its text layers like diffusers (`attn2/to_k`), so the
weight selections apply to it. TRAK's reference computes each example's gradient with its own
`jax.grad` loop over examples and timesteps, projects with the explicit matrix R and solves
the Gram system with `np.linalg.solve` in float64.
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
from attrib_jax import baselines
from attrib_jax.attribution import selection
from attrib_jax.baselines import features as features_lib
from attrib_jax.baselines import trak as trak_lib
from attrib_jax.diffusion.schedules import NoiseSchedule
from attrib_jax.generation import Query

N, K, L, D = 5, 2, 3, 4
SIDE = 4
SCHEDULE = NoiseSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 1000})


class MicroDenoiser(nn.Module):
  """Pixels as tokens, a time embedding, text read through attn2/to_k, to_v, an output layer."""

  @nn.compact
  def __call__(self, x, t, text):
    b, h, w, c = x.shape
    t = jnp.broadcast_to(jnp.asarray(t), (b,)).astype(jnp.float32)
    freqs = jnp.exp(-jnp.arange(2) * math.log(1000.0) / 2)
    emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    tokens = nn.Dense(6, name="proj_in")(x.reshape(b, h * w, c))
    tokens = tokens + nn.Dense(6, name="time")(emb)[:, None]
    tokens = tokens + _TextRead(name="attn2")(tokens, text)
    return nn.Dense(c, name="proj_out")(jax.nn.silu(tokens)).reshape(x.shape)


class _TextRead(nn.Module):
  @nn.compact
  def __call__(self, tokens, text):
    k = nn.Dense(6, use_bias=False, name="to_k")(text)
    v = nn.Dense(6, use_bias=False, name="to_v")(text)
    weights = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", tokens, k) / math.sqrt(6), -1)
    return jnp.einsum("bqk,bkd->bqd", weights, v)


MODULE = MicroDenoiser()
APPLY = lambda p, x, t, c: MODULE.apply({"params": p}, x, t, c)


def to_pixels(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float64) / 127.5 - 1.0


@pytest.fixture(scope="module")
def world():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, SIDE, SIDE, 3), dtype=np.uint8)
  latents = np.stack([to_pixels(images), to_pixels(images[:, :, ::-1])], 1).astype(np.float32)
  arrays = {"latents": latents,
            "text_states": rng.normal(size=(N, K, L, D)).astype(np.float32),
            "num_captions": np.array([1, 2, 2, 1, 2], np.int32),
            "index": np.array([40, 7, 123456, 3, 99], np.int64),
            "null_text_states": rng.normal(size=(L, D)).astype(np.float32)}
  params = jax.device_get(jax.jit(MODULE.init)(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3)),
                                      jnp.zeros((1,), jnp.int32), jnp.zeros((1, L, D)))["params"])
  q_image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  queries = [Query(to_pixels(q_image).astype(np.float32), rng.normal(size=(L, D)).astype(
      np.float32), q_image, {"prompt": "q0"})]
  q_image = images[2, :, ::-1].copy()  # a flipped training image: pixel cosine 1 at item 2
  queries.append(Query(to_pixels(q_image).astype(np.float32),
                       arrays["text_states"][2, 0], q_image, {"prompt": "q1"}))
  return dict(images=images, arrays=arrays, params=params, queries=queries)


def make_context(world, **kw) -> baselines.Context:
  kw.setdefault("mesh", parallel.make_mesh(1))
  return baselines.Context(arrays=world["arrays"], images=world["images"], apply_fn=APPLY,
                           params=world["params"], schedule=SCHEDULE, module=MODULE, **kw)


def cosine_max(q: np.ndarray, train: np.ndarray) -> np.ndarray:
  """Direct numpy: q [d], train [N, F, d] -> max over F of the cosine, float64."""
  q, train = q.astype(np.float64), train.astype(np.float64)
  cos = train @ q / (np.linalg.norm(train, axis=-1) * np.linalg.norm(q))
  return cos.max(axis=1)


# ----------------------------------------------------------------------- interface ---

def test_registry_and_errors(world):
  assert {"pixel", "features", "trak", "d-trak", "random"} <= set(baselines.available_methods())
  with pytest.raises(ValueError, match="unknown attribution method 'sscd'"):
    baselines.make_method("sscd")
  with pytest.raises(ValueError, match="'dino' needs a weights directory"):  # the user's files
    baselines.make_method("dino")
  with pytest.raises(ValueError, match="no setting.*'centre'"):
    baselines.make_method("pixel", centre=True)
  with pytest.raises(ValueError, match="objective"):
    baselines.make_method("trak", objective="score")
  with pytest.raises(ValueError, match="unknown extractor"):
    baselines.make_method("features", extractor="dino")
  assert isinstance(baselines.make_method("d-trak"), baselines.TRAK)
  assert baselines.make_method("d-trak").objective == "output_norm"

  @dataclasses.dataclass(frozen=True)
  class Constant(baselines.Method):
    name = "pixel"
    def score(self, query, context):
      return np.zeros(context.num_items)
  with pytest.raises(ValueError, match="already registered"):
    baselines.register(Constant)

  context = baselines.Context(arrays=world["arrays"])
  with pytest.raises(ValueError, match=r"'trak' needs context field\(s\) \['apply_fn'"):
    baselines.make_method("trak").score(world["queries"][0], context)
  with pytest.raises(ValueError, match="training images"):
    baselines.make_method("pixel").score(world["queries"][0], context)


def test_random_is_deterministic(world):
  context = make_context(world)
  q0, q1 = world["queries"]
  a = baselines.make_method("random", seed=3).score(q0, context)
  assert a.dtype == np.float64 and a.shape == (N,) and (0 <= a).all() and (a < 1).all()
  np.testing.assert_array_equal(a, baselines.make_method("random", seed=3).score(q0, context))
  assert not np.array_equal(a, baselines.make_method("random", seed=4).score(q0, context))
  assert not np.array_equal(a, baselines.make_method("random", seed=3).score(q1, context))


# --------------------------------------------------------------------- cosine ones ---

@pytest.mark.parametrize("center", [False, True])
def test_pixel_cosine_matches_numpy(world, center):
  images = world["images"]
  train = np.stack([to_pixels(images), to_pixels(images[:, :, ::-1])], 1).reshape(N, 2, -1)
  for query in world["queries"]:
    q = to_pixels(query.image).reshape(-1)
    t = train
    if center:
      q, t = q - q.mean(), t - t.mean(axis=-1, keepdims=True)
    expected = cosine_max(q, t)
    got = baselines.make_method("pixel", center=center).score(query, make_context(world))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # Streamed (no cache), small chunks, images from a getter: the same numbers.
    context = make_context(world)
    context.images = lambda rows: images[rows]
    streamed = baselines.make_method("pixel", center=center, cache_bytes=0, chunk_size=2)
    np.testing.assert_allclose(streamed.score(query, context), expected, rtol=0, atol=1e-6)
  flipped_copy = baselines.make_method("pixel").score(world["queries"][1], make_context(world))
  assert np.argmax(flipped_copy) == 2 and flipped_copy[2] == pytest.approx(1.0, abs=1e-6)


def test_feature_cosine_matches_numpy(world):
  w = np.random.default_rng(1).normal(size=(SIDE * SIDE * 3, 5))
  extractor = lambda images: np.tanh(to_pixels(images).reshape(len(images), -1) @ w)
  images = world["images"]
  for flips in [(0, 1), (0,)]:
    method = baselines.make_method("features", extractor=extractor, flips=flips)
    train = np.stack([extractor(images if f == 0 else images[:, :, ::-1]) for f in flips], 1)
    for query in world["queries"]:
      expected = cosine_max(extractor(query.image[None])[0], train)
      np.testing.assert_allclose(method.score(query, make_context(world)), expected, rtol=0,
                                 atol=1e-6)


def test_unet_extractor_reads_the_named_layer(world):
  """features of layer proj_in = (sqrt(ᾱ_t) x0) W + b, computed by hand."""
  t = 100
  config = {"layer": "proj_in", "timestep": t}
  images = world["images"]
  kernel = np.asarray(world["params"]["proj_in"]["kernel"], np.float64)
  bias = np.asarray(world["params"]["proj_in"]["bias"], np.float64)
  scale = math.sqrt(float(SCHEDULE.alphas_cumprod[t]))
  by_hand = lambda im: ((scale * to_pixels(im)).reshape(len(im), -1, 3) @ kernel + bias)
  extract = features_lib.unet_features(MODULE, world["params"], SCHEDULE,
                                       world["arrays"]["null_text_states"], batch_size=2,
                                       **config)
  np.testing.assert_allclose(extract(images), by_hand(images).reshape(N, -1), atol=1e-5)
  pooled = features_lib.unet_features(MODULE, world["params"], SCHEDULE,
                                      world["arrays"]["null_text_states"], pool="mean", **config)
  np.testing.assert_allclose(pooled(images), by_hand(images).mean(1), atol=1e-5)

  # Through the method, built from the context (empty-prompt conditioning from the arrays).
  method = baselines.make_method("features", extractor="unet", extractor_config=config)
  train = np.stack([by_hand(images), by_hand(images[:, :, ::-1])], 1).reshape(N, 2, -1)
  query = world["queries"][0]
  np.testing.assert_allclose(method.score(query, make_context(world)),
                             cosine_max(by_hand(query.image[None]).reshape(-1), train),
                             atol=1e-5)
  bad = baselines.make_method("features", extractor="unet", extractor_config={"layer": "nope"})
  with pytest.raises(ValueError, match="no submodule 'nope'"):
    bad.score(query, make_context(world))
  folded = make_context(world, encode_images=lambda im: to_pixels(im).reshape(len(im), 2, 2, 12))
  with pytest.raises(ValueError, match="encode to .* set context.encode_images"):
    method.score(query, folded)


def test_random_conv_extractor():
  images = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  a = features_lib.random_conv_features(seed=0, widths=(4, 8), grid=2)(images)
  assert a.shape == (3, 2 * 2 * 8) and (a >= 0).all()
  assert not np.allclose(a, features_lib.random_conv_features(seed=1, widths=(4, 8),
                                                              grid=2)(images))
  with pytest.raises(ValueError, match="does not pool"):
    features_lib.random_conv_features(grid=3)(images)


# --------------------------------------------------------------------------- TRAK ---

def reference_objective(objective, params, x0, text, t, noise):
  """The objective written out: x_t by hand, then the loss or the squared output."""
  ab = SCHEDULE.alphas_cumprod[t]
  x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise
  eps = APPLY(params, x_t[None], t[None], text[None])[0]
  return jnp.mean((eps - noise) ** 2) if objective == "loss" else jnp.mean(eps ** 2)


@jax.jit
def _flat_grad(objective_is_loss, selected, rest, x0, text, t, noise):
  def f(sel):
    params = traverse_util.unflatten_dict({**rest, **sel})
    return jax.lax.cond(objective_is_loss,
                        lambda: reference_objective("loss", params, x0, text, t, noise),
                        lambda: reference_objective("output_norm", params, x0, text, t, noise))
  return jax.grad(f)(selected)


def reference_features(method, params, examples):
  """Φ [len(examples), k] float64: a jax.grad per (example, timestep), averaged, times R.

  examples: (x0, texts [K, L, D], num_captions, index, flip, domain) tuples.
  """
  flat_mask = traverse_util.flatten_dict(selection.select(params, method.selection))
  flat = traverse_util.flatten_dict(params)
  paths = sorted(p for p in flat if flat_mask[p])
  shapes = {p: flat[p].shape for p in paths}
  r = trak_lib.projection_matrix(sum(int(np.prod(s)) for s in shapes.values()),
                                method.proj_dim, method.seed, method.projection)
  selected = {p: flat[p] for p in paths}
  rest = {p: v for p, v in flat.items() if p not in selected}
  rows = []
  for x0, texts, num_captions, index, flip, domain in examples:
    total = np.zeros(r.shape[0])
    for t in method.timesteps:
      caption, noise = trak_lib.draw(method.seed, domain, index, flip, t, num_captions,
                                     x0.shape)
      g = _flat_grad(method.objective == "loss", selected, rest, x0, texts[int(caption)],
                     jnp.asarray(t), noise)
      total += np.concatenate([np.asarray(g[p], np.float64).reshape(-1) for p in paths])
    rows.append(total / len(method.timesteps) @ r.astype(np.float64))
  return np.stack(rows)


def reference_scores(method, phi_train, phi_query):
  """float64: Φ (ΦᵀΦ + λI)⁻¹ φ_q by np.linalg.solve, reduced over flips."""
  flat = phi_train.reshape(-1, phi_train.shape[-1])
  gram = flat.T @ flat
  lam = method.damping * np.trace(gram) / gram.shape[0]
  w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), phi_query.T)
  per = (flat @ w).T.reshape(len(phi_query), N, -1)
  return per.sum(-1) if method.flip_reduce == "sum" else per.max(-1)


def training_examples(world, flips):
  a = world["arrays"]
  return [(a["latents"][i, f], a["text_states"][i], a["num_captions"][i], a["index"][i], f,
           trak_lib.TRAIN) for i in range(N) for f in flips]


def query_examples(world):
  out = []
  for q in world["queries"]:
    texts = np.zeros((K, L, D), np.float32)
    texts[0] = q.text_states
    out.append((q.latent, texts, 1, 0, 0, trak_lib.QUERY))
  return out


def test_projection_is_rademacher_and_block_free():
  big = trak_lib.projection_matrix(4000, 64, seed=0)
  signs = big * 8
  np.testing.assert_array_equal(np.abs(signs), np.ones_like(signs))
  assert abs(signs.mean()) < 0.02
  corr = signs.T @ signs / 4000
  assert np.abs(corr - np.eye(64)).max() < 0.1   # columns ~ orthogonal (σ = 0.016)
  assert not np.array_equal(big, trak_lib.projection_matrix(4000, 64, seed=1))

  g = {("b", "bias"): np.random.default_rng(0).normal(size=(2, 4)),
       ("a", "kernel"): np.random.default_rng(1).normal(size=(2, 5, 3))}
  flat = np.concatenate([g[("a", "kernel")].reshape(2, -1), g[("b", "bias")]], 1)
  np.testing.assert_array_equal(trak_lib.flatten_gradients(g), flat.astype(np.float32))
  r = trak_lib.projection_matrix(19, 40, seed=1)
  for block_rows in (4, 100):
    got = trak_lib.project(jnp.asarray(flat, jnp.float32), 1, 40, "rademacher", block_rows)
    np.testing.assert_allclose(got, flat @ r, atol=1e-5)
  gaussian = trak_lib.projection_matrix(50, 8, seed=1, kind="gaussian")
  assert abs(gaussian.std() * math.sqrt(8) - 1) < 0.2


def test_trak_features_and_scores_match_numpy(world):
  method = baselines.make_method("trak", proj_dim=6, timesteps=(0, 300, 700), batch_size=3,
                                 block_rows=7, damping=1e-2, seed=5)
  context = make_context(world)
  phi = method.training_features(context)
  expected = reference_features(method, world["params"], training_examples(world, (0, 1)))
  assert phi.shape == (N, 2, 6)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(phi.reshape(-1, 6), expected, rtol=0, atol=1e-5 * scale)

  phi_q = method.query_features(world["queries"], context)
  expected_q = reference_features(method, world["params"], query_examples(world))
  np.testing.assert_allclose(phi_q, expected_q, rtol=0, atol=1e-5 * np.abs(expected_q).max())

  scores = method.score_many(world["queries"], context)
  ref = reference_scores(method, expected.reshape(N, 2, 6), expected_q)
  assert scores.dtype == np.float64 and scores.shape == (2, N)
  np.testing.assert_allclose(scores, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
  np.testing.assert_allclose(method.score(world["queries"][1], context), scores[1])

  # 8 devices, another batch size and block size: the same Φ.
  sharded = dataclasses.replace(method, batch_size=5, block_rows=1 << 16)
  phi8 = sharded.training_features(make_context(world, mesh=parallel.make_mesh(8)))
  np.testing.assert_allclose(phi8, phi, rtol=0, atol=1e-6 * scale)


def test_dtrak_output_norm_and_selection_match_numpy(world, tmp_path):
  a = world["arrays"]
  x0, text = jnp.asarray(a["latents"][:3, 0]), jnp.asarray(a["text_states"][:3, 0])
  t = jnp.asarray([0, 400, 999])
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  got = trak_lib.objective_values("output_norm", APPLY, world["params"], x0, text, t, noise,
                                  schedule=SCHEDULE)
  ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
  x_t = np.sqrt(ab) * np.asarray(x0, np.float64) + np.sqrt(1 - ab) * np.asarray(noise)
  eps = np.asarray(APPLY(world["params"], jnp.asarray(x_t, jnp.float32), t, text), np.float64)
  np.testing.assert_allclose(got, (eps ** 2).reshape(3, -1).mean(1), rtol=1e-5)

  method = baselines.make_method("d-trak", proj_dim=4, timesteps=(100, 800), flips=(0,),
                                 selection="cross-attn-kv", flip_reduce="max", batch_size=4)
  context = make_context(world, cache_dir=str(tmp_path))
  phi = method.training_features(context)
  expected = reference_features(method, world["params"], training_examples(world, (0,)))
  np.testing.assert_allclose(phi.reshape(-1, 4), expected, rtol=0,
                             atol=1e-5 * np.abs(expected).max())
  expected_q = reference_features(method, world["params"], query_examples(world))
  ref = reference_scores(method, expected.reshape(N, 1, 4), expected_q)
  scores = method.score_many(world["queries"], context)
  np.testing.assert_allclose(scores, ref, rtol=0, atol=1e-4 * np.abs(ref).max())

  # A new context finds Φ on disk: its network is never run for the training set.
  def broken(*args):
    raise AssertionError("Φ should have come from the disk cache")
  again = make_context(world, cache_dir=str(tmp_path))
  again.apply_fn = broken
  np.testing.assert_array_equal(method.training_features(again), phi)


# --------------------------------------------------------------------- text only ---

CAPTIONS = [["a red circle"], ["a blue square", "a small blue square on the left"],
            ["a rainbow", "a rainbow on black"], ["a red square"], ["a green moon", "the moon"]]


@pytest.mark.parametrize("pooling", ["flat", "mean"])
def test_caption_cosine_matches_numpy(world, pooling):
  arrays = world["arrays"]
  states = arrays["text_states"].astype(np.float64)
  pooled = states.reshape(N, K, -1) if pooling == "flat" else states.mean(axis=2)
  valid = np.arange(K)[None] < arrays["num_captions"][:, None]
  method = baselines.make_method("caption", pooling=pooling)
  context = baselines.Context(arrays=arrays)
  for query in world["queries"]:
    q = query.text_states.astype(np.float64)
    q = q.reshape(-1) if pooling == "flat" else q.mean(axis=0)
    cos = pooled @ q / (np.linalg.norm(pooled, axis=-1) * np.linalg.norm(q))
    expected = np.where(valid, cos, -np.inf).max(axis=1)
    np.testing.assert_allclose(method.score(query, context), expected, rtol=1e-6, atol=1e-7)
  # Query 1's states are item 2's first caption: a perfect match, whatever the padding rows say.
  assert np.argmax(method.score(world["queries"][1], context)) == 2
  with pytest.raises(ValueError, match="pooling"):
    baselines.make_method("caption", pooling="max")


def _bm25_reference(prompt, captions, k1=1.2, b=0.75):
  """Okapi BM25 written out per term, in float64, max over each item's captions."""
  docs = [c.lower().split() for item in captions for c in item]
  n, avg = len(docs), sum(map(len, docs)) / len(docs)
  out = []
  for item in captions:
    best = 0.0
    for caption in item:
      doc = caption.lower().split()
      total = 0.0
      for term in set(prompt.lower().split()):
        df = sum(term in d for d in docs)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        tf = doc.count(term)
        total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avg))
      best = max(best, total)
    out.append(best)
  return np.array(out)


def test_caption_words_bm25(world):
  context = baselines.Context(arrays=world["arrays"], captions=CAPTIONS)
  method = baselines.make_method("caption-words")
  for prompt in ("a rainbow on the left", "blue square", "the moon is green", "zebra"):
    query = world["queries"][0]._replace(info={"prompt": prompt})
    np.testing.assert_allclose(method.score(query, context),
                               _bm25_reference(prompt, CAPTIONS), rtol=1e-12)
  query = world["queries"][0]._replace(info={"prompt": "a rainbow"})
  assert int(np.argmax(method.score(query, context))) == 2
  # A getter works like a list, and the captions and the prompt are required, by name.
  getter = baselines.Context(arrays=world["arrays"],
                             captions=lambda rows: [CAPTIONS[r] for r in rows])
  np.testing.assert_array_equal(method.score(query, getter), method.score(query, context))
  with pytest.raises(ValueError, match="training captions"):
    method.score(query, baselines.Context(arrays=world["arrays"]))
  with pytest.raises(ValueError, match="no prompt"):
    method.score(query._replace(info={}), context)
  with pytest.raises(ValueError, match=r"rows \[1\] have no captions"):
    method.score(query, baselines.Context(
        arrays=world["arrays"], captions=[["x"], [], ["y"], ["z"], ["w"]]))
