"""The FastGDA query service behind launch/serve.py, free of HTTP: a query (an image and its
prompt, or a named generated query) -> the top-k training items by the student, via the index.

Per query: features of the query (UNet bottleneck ⊕ text tower, teacher.Featurizer), one MLP
pass, one index search. Per item it returns
  `score`          −(scale · cos + bias), the student's logit negated: HIGHER = MORE influential,
                   whatever sign training gave the scale (the ranking is the student's own);
  `rank_fraction`  sigmoid(scale · cos + bias), the predicted teacher rank j / K among a query's
                   candidates (0 = the most influential);
  `cosine`         cos(f(q), f(z)) between the embeddings (its direction follows the scale's sign).
"""
from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from attrib_jax import generation
from attrib_jax.distill import index as index_lib
from attrib_jax.distill import student as student_lib


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
    if k < 1:
      raise ValueError(f"k must be positive, got {k}")
    k = min(k, self.index.size)
    t0 = time.perf_counter()
    features = self.query_features([query])
    t1 = time.perf_counter()
    emb = student_lib.embed(self.student_settings, self.params, features)
    t2 = time.perf_counter()
    rows, inner = self.index.search(student_lib.retrieval_query(self.params, emb), k)
    t3 = time.perf_counter()
    rows, inner = rows[0], inner[0]
    sign = -1.0 if float(self.params["scale"]) > 0 else 1.0
    cosine = sign * inner       # the index held sign·cos (see student.retrieval_query)
    logit = float(self.params["scale"]) * cosine + float(self.params["bias"])
    # Negated so that the shown number grows with influence for either sign of the learnt
    # scale: a person reads "higher = more influential", and the order is the index's.
    score = -logit
    fraction = 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))
    items = [{"rank": r + 1, "row": int(row), "index": int(self.dataset_index[row]),
              "score": float(s), "rank_fraction": float(f), "cosine": float(c),
              "captions": list(self.captions[row]), "thumbnail": f"/thumb/{int(row)}.png"}
             for r, (row, s, f, c) in enumerate(zip(rows, score, fraction, cosine))]
    return {"prompt": query.info.get("prompt", ""), "k": k, "items": items,
            "ms": {"features": 1e3 * (t1 - t0), "embed": 1e3 * (t2 - t1),
                   "search": 1e3 * (t3 - t2), "total": 1e3 * (t3 - t0)}}

  def search_image(self, image: np.ndarray, prompt: str, k: int) -> dict:
    if not prompt or not prompt.strip():
      raise ValueError("a query image needs its prompt")
    image = np.asarray(image)
    if self.image_size and image.shape[:2] != tuple(self.image_size):
      image = np.asarray(Image.fromarray(image).resize(self.image_size[::-1],
                                                       Image.BICUBIC))
    return self.search(self.make_query(image, prompt), k)

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
  featurizer = teacher_lib.Featurizer(
      pipe, arrays, teacher_lib.FeatureSettings(**dict(config.distill.features)))
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
                 image_size=tuple(first.shape[:2]))
