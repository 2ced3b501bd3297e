"""Embedding retrieval: exact search (the reference and fallback) and ScaNN, one interface.

Both answer `search(queries [q, d], k) -> (indices [q, k] int64, scores [q, k] float32)` by
inner product, best first. ScaNN (tree + asymmetric hashing + exact reordering) is the scale
path: a partitioning tree picks `leaves_to_search` of `num_leaves` clusters, anisotropic
product quantisation scores their points approximately, and the best `reorder` candidates are
rescored exactly. A saved index is a folder holding `index.json` (kind, size, dim, settings)
beside the backend's files; `load_index` reads any kind.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import numpy as np

from attrib_jax import io_utils

KINDS = ("exact", "scann")
_META = "index.json"


@dataclasses.dataclass(frozen=True)
class IndexSettings:
  """kind "exact" or "scann"; the rest configures ScaNN (0 leaves: ~sqrt(n), see `resolved`)."""
  kind: str = "scann"
  num_leaves: int = 0
  leaves_to_search: int = 0       # 0: 5 % of the leaves
  training_sample_size: int = 250_000
  dims_per_block: int = 2         # asymmetric hashing: dimensions per 16-centre codebook
  anisotropic_threshold: float = 0.2
  spherical: bool = False         # the tree's k-means on the unit sphere (unit data)
  reorder: int = 0                # 0: 4·k at build time's k
  k: int = 100                    # the default number of neighbours baked into the searcher

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"index.kind must be one of {KINDS}, got {self.kind!r}")

  def resolved(self, n: int) -> "IndexSettings":
    """Defaults filled in for a database of n items (leaves never exceed n)."""
    # Below ~10k items a tree saves nothing (AH over everything is microseconds) and its few
    # small leaves can hold fewer than k points: one leaf then.
    leaves = self.num_leaves or (1 if n < 10_000 else int(round(np.sqrt(n))))
    leaves = min(leaves, n)
    search = self.leaves_to_search or max(1, int(round(0.05 * leaves)))
    return dataclasses.replace(self, num_leaves=leaves, leaves_to_search=min(search, leaves),
                               training_sample_size=min(self.training_sample_size, n),
                               reorder=self.reorder or 4 * self.k)


def _check_db(db: np.ndarray) -> np.ndarray:
  db = np.ascontiguousarray(db, np.float32)
  if db.ndim != 2:
    raise ValueError(f"an index needs a [n, d] database, got shape {db.shape}")
  if db.shape[0] == 0:
    raise ValueError("cannot build an index over an empty database (0 items)")
  if not np.isfinite(db).all():
    raise ValueError("the database holds non-finite values")
  return db


class _Index:
  size: int
  dim: int

  def _check_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim == 1:
      queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries of shape {queries.shape} do not match the index's dimension "
                       f"{self.dim}")
    if not 1 <= k <= self.size:
      raise ValueError(f"k = {k} must lie in [1, {self.size}] (the index holds {self.size} "
                       "items)")
    return queries


class ExactIndex(_Index):
  """Brute-force inner products in numpy, in query chunks (memory ~ chunk · n floats)."""
  kind = "exact"

  def __init__(self, db: np.ndarray, chunk: int = 256):
    self.db = _check_db(db)
    self.size, self.dim = self.db.shape
    self.chunk = chunk

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = self._check_queries(queries, k)
    out_i = np.empty((queries.shape[0], k), np.int64)
    out_s = np.empty((queries.shape[0], k), np.float32)
    for start in range(0, queries.shape[0], self.chunk):
      s = queries[start:start + self.chunk] @ self.db.T
      top = (np.argpartition(-s, k - 1, axis=1)[:, :k] if k < self.size
             else np.broadcast_to(np.arange(self.size), s.shape).copy())
      top_s = np.take_along_axis(s, top, axis=1)
      order = np.lexsort((top, -top_s), axis=1)   # best first, ties by row
      out_i[start:start + self.chunk] = np.take_along_axis(top, order, axis=1)
      out_s[start:start + self.chunk] = np.take_along_axis(top_s, order, axis=1)
    return out_i, out_s

  def save(self, directory: str) -> None:
    with io_utils.atomic_directory(directory) as staging:
      np.save(os.path.join(staging, "db.npy"), self.db)
      _write_meta(staging, self, {"kind": "exact"})


class ScannIndex(_Index):
  """A ScaNN searcher over an inner-product database (build with `build`, or `load`)."""
  kind = "scann"

  def __init__(self, searcher: Any, size: int, dim: int, settings: IndexSettings):
    self.searcher, self.size, self.dim, self.settings = searcher, size, dim, settings
    self.build_seconds = None

  @classmethod
  def build(cls, db: np.ndarray, settings: IndexSettings) -> "ScannIndex":
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
    db = _check_db(db)
    s = settings.resolved(db.shape[0])
    t0 = time.perf_counter()
    builder = scann_ops_pybind.builder(db, min(s.k, db.shape[0]), "dot_product")
    if s.num_leaves > 1:   # a tree over one leaf is no tree: skip it for tiny databases
      builder = builder.tree(num_leaves=s.num_leaves, num_leaves_to_search=s.leaves_to_search,
                             training_sample_size=s.training_sample_size,
                             spherical=s.spherical)
    if db.shape[1] >= s.dims_per_block:
      builder = builder.score_ah(s.dims_per_block,
                                 anisotropic_quantization_threshold=s.anisotropic_threshold)
    else:
      builder = builder.score_brute_force()
    searcher = builder.reorder(s.reorder).build()
    index = cls(searcher, db.shape[0], db.shape[1], s)
    index.build_seconds = time.perf_counter() - t0
    return index

  def search(self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None,
             reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One thread (ScaNN's search_batched); `leaves_to_search` / `reorder` override the
    build's settings for this call."""
    queries = self._check_queries(queries, k)
    reorder = max(reorder or self.settings.reorder, k)
    kwargs = {"final_num_neighbors": k, "pre_reorder_num_neighbors": reorder}
    if self.settings.num_leaves > 1:
      kwargs["leaves_to_search"] = leaves_to_search or self.settings.leaves_to_search
    indices, distances = self.searcher.search_batched(queries, **kwargs)
    return np.asarray(indices, np.int64), np.asarray(distances, np.float32)

  def save(self, directory: str) -> None:
    with io_utils.atomic_directory(directory) as staging:
      self.searcher.serialize(staging)
      _write_meta(staging, self, {"kind": "scann",
                                  "settings": dataclasses.asdict(self.settings)})


def _write_meta(directory: str, index: _Index, meta: dict) -> None:
  io_utils.atomic_write_json(os.path.join(directory, _META),
                             dict(meta, size=index.size, dim=index.dim))


def build_index(db: np.ndarray, settings: IndexSettings) -> _Index:
  """An exact or a ScaNN index over the rows of `db`, by `settings.kind`."""
  if settings.kind == "exact":
    return ExactIndex(db)
  return ScannIndex.build(db, settings)


def load_index(directory: str) -> _Index:
  """An index saved by `.save(directory)`."""
  path = os.path.join(directory, _META)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no index in {directory!r} ({_META} is missing): build it first "
                            "(launch.distill's index stage)")
  with open(path) as f:
    meta = json.load(f)
  if meta["kind"] == "exact":
    return ExactIndex(np.load(os.path.join(directory, "db.npy")))
  if meta["kind"] != "scann":
    raise ValueError(f"{path}: unknown index kind {meta['kind']!r}")
  return ScannIndex(_load_searcher(directory), meta["size"], meta["dim"],
                    IndexSettings(**meta["settings"]))


_ASSET_PATH = re.compile(r'asset_path: "([^"]*)"')


def _load_searcher(directory: str) -> Any:
  """ScaNN's `load_searcher`, but with every asset read from `directory` itself: ScaNN 1.4.2
  writes absolute asset paths into scann_assets.pbtxt, so a folder that was moved (or, here,
  built in a staging folder and renamed into place) would point at files that are gone."""
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  assets = os.path.join(directory, "scann_assets.pbtxt")
  if not os.path.exists(assets):
    raise FileNotFoundError(f"{directory!r} has {_META} but no scann_assets.pbtxt: a torn "
                            "index; build it again")
  with open(assets) as f:
    text = _ASSET_PATH.sub(lambda m: 'asset_path: "%s"' % os.path.join(
        os.path.abspath(directory), os.path.basename(m.group(1))), f.read())
  missing = [p for p in _ASSET_PATH.findall(text) if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"ScaNN index {directory!r} lacks {missing}")
  return scann_ops_pybind.ScannSearcher(scann_ops_pybind.scann_pybind.ScannNumpy(
      os.path.abspath(directory), text), None)
