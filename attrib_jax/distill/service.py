"""The FastGDA query service behind launch/serve.py, free of HTTP: a query (an image and its
prompt, or a named generated query) -> the top-k training items by the student, via the index.

Per query: features of the query (UNet bottleneck ⊕ text tower, teacher.Featurizer), one MLP
pass, one index search. Per item it returns
  `score`          −(scale · cos + bias), the student's logit negated: HIGHER = MORE influential,
                   whatever sign training gave the scale (the ranking is the student's own);
  `rank_fraction`  sigmoid(scale · cos + bias), the predicted teacher rank j / K among a query's
                   candidates (0 = the most influential);
  `cosine`         cos(f(q), f(z)) between the embeddings (its direction follows the scale's sign).

`QueryEncoder` is the fast path from launch.serve: one jitted program takes the uploaded image
and the prompt's token ids to the student's input features (image codec or VAE, text tower,
UNet bottleneck, both halves normalised), a second the features to the signed unit retrieval
vector, with no host round trip between the stages and one compilation for every query.
Measured by benchmarks/fastgda_latency.py; without it, a query paid `query_from_image` (which
builds a new jitted text encoder, i.e. a compilation, per call) and float64 numpy features.
"""
from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

import jax
import jax.numpy as jnp

from attrib_jax import generation
from attrib_jax.baselines import features as features_lib
from attrib_jax.distill import index as index_lib
from attrib_jax.distill import student as student_lib


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class QueryEncoder:
  """(uint8 image [H, W, 3], prompt) or a generation.Query -> the student's input features
  [1, d] and the retrieval vector [1, out_dim] (student.retrieval_query of its unit embedding),
  as teacher.Featurizer.queries + student.embed compute them, in two jitted programs.

  The image reaches the model's input as generation.query_from_image makes it (the pixel codec,
  or a VAE sample keyed by seed 0), the prompt's states are the text tower's last hidden states
  averaged over tokens (Featurizer.text), the image feature the UNet's `settings.layer` at
  `settings.timestep` under the empty prompt (Featurizer.image). Weights are arguments of the
  programs, not constants folded into them."""

  def __init__(self, pipe: Any, null_text_states: np.ndarray, settings: Any,
               student_settings: student_lib.StudentSettings, student_params: Any):
    self.pipe, self.student_params = pipe, student_params
    scale = (pipe.pixel_patch if pipe.vae is None
             else 2 ** (len(pipe.configs["vae"]["block_out_channels"]) - 1))
    h, w, _ = pipe.latent_shape
    self.image_shape = (h * scale, w * scale, 3)
    image_feature = features_lib.unet_feature_fn(
        pipe.unet, pipe.schedule, np.asarray(null_text_states), layer=settings.layer,
        timestep=settings.timestep, pool=settings.pool)
    student = student_lib.make_model(student_settings)
    text_encoder, vae, patch = pipe.text_encoder, pipe.vae, pipe.pixel_patch
    from attrib_jax.models import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top

    def features(unet_params, schedule, x0, text_states):
      image = _unit(image_feature(unet_params, schedule, x0))
      text = _unit(jnp.mean(text_states, axis=1))
      return jnp.concatenate([image, text], axis=1)

    def from_image(unet_params, schedule, vae_params, text_params, image, ids):
      x0 = pipeline_lib.images_to_latents(image[None], vae=vae, vae_params=vae_params,
                                          pixel_patch=patch, key=jax.random.key(0))
      states = text_encoder.apply({"params": text_params}, ids).last_hidden_state
      return features(unet_params, schedule, x0, states)

    def vector(params, x):
      emb = _unit(student.apply({"params": params}, x, method=student_lib.Student.embed))
      return jnp.where(params["scale"] > 0, -1.0, 1.0) * emb   # student.retrieval_query

    self._from_image = jax.jit(from_image)
    self._from_query = jax.jit(features)
    self._vector = jax.jit(vector)

  def features_of_image(self, image: np.ndarray, prompt: str) -> jax.Array:
    image = np.asarray(image)
    if image.shape != self.image_shape or image.dtype != np.uint8:
      raise ValueError(f"the query image is {image.dtype} {'x'.join(map(str, image.shape))}, "
                       f"but the model takes uint8 {'x'.join(map(str, self.image_shape))} RGB "
                       "images: resize it first")
    self.pipe.tokenizer.check_fits(prompt)
    ids = self.pipe.tokenizer([prompt]).input_ids
    p = self.pipe
    return self._from_image(p.unet_params, p.schedule, p.vae_params, p.text_params, image, ids)

  def features_of_query(self, query: generation.Query) -> jax.Array:
    return self._from_query(self.pipe.unet_params, self.pipe.schedule,
                            np.asarray(query.latent, np.float32)[None],
                            np.asarray(query.text_states, np.float32)[None])

  def vector(self, features: jax.Array) -> np.ndarray:
    return np.asarray(self._vector(self.student_params, features))


@dataclasses.dataclass
class Service:
  """Everything a query needs, already loaded.

  make_query: (uint8 image [H, W, 3], prompt) -> generation.Query (the model's encoders).
  query_features: [Query] -> [n, d] student inputs.
  images: rows -> uint8 [n, H, W, 3] training images; captions: one list per row.
  named_queries: name -> directory of a generated query (generation.save_query's layout).
  """
  student_settings: student_lib.StudentSettings
  params: Any
  index: Any
  make_query: Callable[[np.ndarray, str], generation.Query]
  query_features: Callable[[Sequence[generation.Query]], np.ndarray]
  images: Callable[[np.ndarray], np.ndarray]
  captions: Sequence[Sequence[str]]
  dataset_index: np.ndarray
  named_queries: Mapping[str, str] = dataclasses.field(default_factory=dict)
  image_size: tuple[int, int] | None = None
  encoder: QueryEncoder | None = None   # the fast path (replaces make_query, query_features)

  def health(self) -> dict:
    return {"ok": True, "items": int(self.index.size), "index": self.index.kind,
            "embedding_dim": int(self.index.dim), "queries": len(self.named_queries),
            "image_size": list(self.image_size) if self.image_size else None}

  def list_queries(self) -> list[dict]:
    out = []
    for name, directory in sorted(self.named_queries.items()):
      query = generation.load_query(directory)
      out.append({"name": name, "prompt": query.info.get("prompt", "")})
    return out

  def named_query(self, name: str) -> generation.Query:
    if name not in self.named_queries:
      raise KeyError(f"no generated query named {name!r}; known: "
                     f"{sorted(self.named_queries)[:20]}")
    return generation.load_query(self.named_queries[name])

  def query_image_png(self, name: str) -> bytes:
    return png_bytes(self.named_query(name).image)

  def search(self, query: generation.Query, k: int) -> dict:
    """Top-k training items for one query, most influential first, with timings in ms."""
    k = self._check_k(k)
    t0 = time.perf_counter()
    if self.encoder is not None:
      features = self.encoder.features_of_query(query).block_until_ready()
      t1 = time.perf_counter()
      vector = self.encoder.vector(features)
    else:
      features = self.query_features([query])
      t1 = time.perf_counter()
      emb = student_lib.embed(self.student_settings, self.params, features)
      vector = student_lib.retrieval_query(self.params, emb)
    return self._top_k(query.info.get("prompt", ""), vector, k, t0, t1)

  def search_image(self, image: np.ndarray, prompt: str, k: int) -> dict:
    if not prompt or not prompt.strip():
      raise ValueError("a query image needs its prompt")
    image = np.asarray(image)
    if self.image_size and image.shape[:2] != tuple(self.image_size):
      image = np.asarray(Image.fromarray(image).resize(self.image_size[::-1],
                                                       Image.BICUBIC))
    if self.encoder is None:
      return self.search(self.make_query(image, prompt), k)
    k = self._check_k(k)
    t0 = time.perf_counter()
    features = self.encoder.features_of_image(image, prompt).block_until_ready()
    t1 = time.perf_counter()
    return self._top_k(prompt, self.encoder.vector(features), k, t0, t1)

  def _check_k(self, k: int) -> int:
    if k < 1:
      raise ValueError(f"k must be positive, got {k}")
    return min(k, self.index.size)

  def _top_k(self, prompt: str, vector: np.ndarray, k: int, t0: float, t1: float) -> dict:
    """The index's top k for a retrieval vector; t0, t1: when features began and ended."""
    t2 = time.perf_counter()
    rows, inner = self.index.search(vector, k)
    t3 = time.perf_counter()
    rows, inner = rows[0], inner[0]
    scale, bias = float(self.params["scale"]), float(self.params["bias"])
    sign = -1.0 if scale > 0 else 1.0
    cosine = sign * inner       # the index held sign·cos (see student.retrieval_query)
    logit = scale * cosine + bias
    # Negated so that the shown number grows with influence for either sign of the learnt
    # scale: a person reads "higher = more influential", and the order is the index's.
    score = -logit
    fraction = 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))
    items = [{"rank": r + 1, "row": int(row), "index": int(self.dataset_index[row]),
              "score": float(s), "rank_fraction": float(f), "cosine": float(c),
              "captions": list(self.captions[row]), "thumbnail": f"/thumb/{int(row)}.png"}
             for r, (row, s, f, c) in enumerate(zip(rows, score, fraction, cosine))]
    return {"prompt": prompt, "k": k, "items": items,
            "ms": {"features": 1e3 * (t1 - t0), "embed": 1e3 * (t2 - t1),
                   "search": 1e3 * (t3 - t2), "total": 1e3 * (t3 - t0)}}

  def thumbnail_png(self, row: int) -> bytes:
    if not 0 <= row < self.index.size:
      raise KeyError(f"no training item at row {row} (0..{self.index.size - 1})")
    return png_bytes(self.images(np.array([row]))[0])


def png_bytes(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """PNG / JPEG bytes -> uint8 RGB [H, W, 3]; a clear error for anything else."""
  try:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  except Exception as e:  # PIL raises several types for undecodable bytes
    raise ValueError(f"the uploaded image could not be decoded ({e})") from e


def from_workdir(config: Any, workdir: str, log: Callable[[str], None] = print) -> Service:
  """A Service over launch.distill's outputs in workdir/distill (and the trained model)."""
  from attrib_jax.data import precompute  # pylint: disable=g-import-not-at-top
  from attrib_jax.distill import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  from attrib_jax.models import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "distill")
  pipe = pipeline_lib.load_pipeline(os.path.join(workdir, "model"))
  arrays = precompute.load(os.path.join(workdir, "precomputed"))
  settings, params, _ = student_lib.load(os.path.join(out, "student.npz"))
  index = index_lib.load_index(os.path.join(out, "index"))
  feature_settings = teacher_lib.FeatureSettings(**dict(config.distill.features))
  featurizer = teacher_lib.Featurizer(pipe, arrays, feature_settings)
  source = recipe.open_dataset(config, os.path.join(workdir, "tfds"))
  dataset_index = np.asarray(arrays["index"])
  _, captions, _ = source.get_items(dataset_index)
  named = {}
  for root in (os.path.join(workdir, "queries"), os.path.join(out, "train_queries")):
    if os.path.isdir(root):
      for directory in generation.list_queries(root):
        named[os.path.basename(directory.rstrip("/"))] = directory
  first = source.get_items(dataset_index[:1])[0][0]
  log(f"serve: {index.size} items ({index.kind} index), {len(named)} generated queries")
  return Service(settings, params, index,
                 make_query=lambda image, prompt: generation.query_from_image(pipe, image,
                                                                              prompt),
                 query_features=featurizer.queries,
                 images=lambda rows: source.get_items(dataset_index[rows])[0],
                 captions=captions, dataset_index=dataset_index, named_queries=named,
                 image_size=tuple(first.shape[:2]),
                 encoder=QueryEncoder(pipe, arrays["null_text_states"], feature_settings,
                                      settings, params))
