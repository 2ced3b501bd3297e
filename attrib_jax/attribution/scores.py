"""Attribution scores from the loss sweep, their ranking, result files and ranking metrics.

τ(z) = L(z, θ') − L(z, θ0) per (item, flip); an image's score is the max over its two flips and
the ranking sorts images by score, most influential (most forgotten) first (SPEC §2.4).

Also the small I/O vocabulary every attribution stage shares: atomic npz/json writes (a killed
job never leaves a half-written file that a later run would trust) and a fingerprint of a
parameter tree (so a Fisher, a pre-loss cache or a result made for one model is never used with
another).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from attrib_jax import io_utils

RESULT_VERSION = 1


# ------------------------------------------------------------------------------------ I/O ---

def params_fingerprint(params: Any) -> str:
  """sha256 over every leaf's path, shape, dtype and bytes (hex, 16 characters).

  Hashes the exact values: two trees fingerprint equal only if they would compute the same.
  """
  h = hashlib.sha256()
  flat = traverse_util.flatten_dict(params) if isinstance(params, Mapping) else {
      ("leaf", str(i)): v for i, v in enumerate(jax.tree.leaves(params))}
  for path in sorted(flat, key=lambda p: tuple(map(str, p))):
    value = np.asarray(jax.device_get(flat[path]))
    h.update("/".join(map(str, path)).encode())
    h.update(f"{value.shape}{value.dtype}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()[:16]


def settings_digest(obj: Any) -> str:
  """sha256 (16 hex characters) of a JSON-able object with sorted keys."""
  text = json.dumps(obj, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def require_at_least(owner: str, minimum: int | float, **values: Any) -> None:
  """Settings validation at construction: each named value must be >= `minimum`; the error
  names the setting (`owner.name`), so a bad config fails before any work, not mid-pass."""
  for name, value in values.items():
    if value is None or value < minimum:
      raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value!r}")


def check_version(path: str, meta: Mapping[str, Any], expected: int, what: str) -> None:
  """A stored file's format version must be the one this code writes: a file of another
  version is refused with its path named, never read under the wrong layout."""
  found = meta.get("version")
  if found != expected:
    raise ValueError(f"{path} is a {what} of format version {found}; this code reads version "
                     f"{expected}: delete it (it is recomputed) or use the matching code")


# One atomic writer for the whole project (io_utils); these names are the attribution stages'.
atomic_savez = io_utils.atomic_savez
atomic_write_json = io_utils.atomic_write_json


@dataclasses.dataclass(frozen=True)
class Progress:
  """What a progress callback receives from the Fisher, unlearning and the loss sweep."""
  stage: str      # "fisher", "unlearn", "sweep"
  done: int       # units done so far (including those restored from a checkpoint)
  total: int
  unit: str       # "examples", "draws", "items"
  rate: float     # units per second in this run (restored units excluded)
  eta_s: float    # seconds left at that rate

  def __str__(self) -> str:
    return (f"{self.stage}: {self.done}/{self.total} {self.unit}, {self.rate:.1f} {self.unit}/s,"
            f" ETA {self.eta_s:.0f}s")


class ProgressMeter:
  """Turns counts into `Progress` (throughput measured from this run's first report)."""

  def __init__(self, stage: str, total: int, unit: str, start: int = 0):
    self.stage, self.total, self.unit = stage, total, unit
    self._start, self._t0 = start, time.perf_counter()

  def __call__(self, done: int) -> Progress:
    elapsed = max(time.perf_counter() - self._t0, 1e-9)
    rate = (done - self._start) / elapsed
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    return Progress(self.stage, done, self.total, self.unit, rate, eta)


# --------------------------------------------------------------------------------- scores ---

def image_scores(tau_per_flip: np.ndarray) -> np.ndarray:
  """[n, flips] -> [n]: the max over an image's flips (either view may carry the influence)."""
  tau_per_flip = np.asarray(tau_per_flip, np.float64)
  if tau_per_flip.ndim == 1:
    return tau_per_flip
  return tau_per_flip.max(axis=1)


def rank(scores: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
  """Dataset indices by descending score; ties broken by ascending index (deterministic)."""
  scores = np.asarray(scores, np.float64)
  index = np.arange(scores.size) if index is None else np.asarray(index)
  if not np.isfinite(scores).all():
    # ±inf sorts "first" or "last" as if it were a measurement; NaN has no order at all.
    bad = np.flatnonzero(~np.isfinite(scores))
    raise ValueError(f"{bad.size} non-finite attribution scores (e.g. {scores[bad[:3]].tolist()}"
                     f" at dataset indices {index[bad[:3]].tolist()}): the sweep diverged "
                     "(check the unlearning step) or a method failed")
  return index[np.lexsort((index, -scores))]


def save_result(path: str, scores: np.ndarray, ranking: np.ndarray, settings: Mapping[str, Any],
                model_fingerprint: str, *, index: np.ndarray | None = None,
                **extra_arrays: np.ndarray) -> tuple[str, str]:
  """Writes `{path}.npz` (arrays) then `{path}.json` (settings), each atomically.

  The json is written last and records a digest of the npz's score vector, so a crash
  between the two writes, or a json paired with another run's npz, is detected by
  `load_result`. Returns the two file names.
  """
  scores = np.asarray(scores, np.float64)
  index = np.arange(scores.size) if index is None else np.asarray(index, np.int64)
  ranking = np.asarray(ranking, np.int64)
  if not scores.shape == index.shape == ranking.shape:
    raise ValueError(f"scores {scores.shape}, index {index.shape} and ranking {ranking.shape} "
                     "must have the same shape")
  npz_path, json_path = path + ".npz", path + ".json"
  atomic_savez(npz_path, scores=scores, ranking=ranking, index=index,
               **{k: np.asarray(v) for k, v in extra_arrays.items()})
  atomic_write_json(json_path, {
      "version": RESULT_VERSION, "model_fingerprint": model_fingerprint,
      "settings": dict(settings), "num_items": int(scores.size),
      "scores_digest": hashlib.sha256(scores.tobytes()).hexdigest()[:16],
      "top10": ranking[:10].tolist()})
  return npz_path, json_path


def load_result(path: str, expected_fingerprint: str | None = None) -> dict[str, Any]:
  """Reads `save_result`'s pair: {'scores', 'ranking', 'index', extras..., 'meta'}."""
  npz_path, json_path = path + ".npz", path + ".json"
  if not os.path.exists(json_path):
    raise FileNotFoundError(f"{json_path} missing: the result at {path} is incomplete")
  with open(json_path) as f:
    meta = json.load(f)
  check_version(json_path, meta, RESULT_VERSION, "result")
  with io_utils.open_npz(npz_path) as data:
    out = {k: data[k] for k in data.files}
  digest = hashlib.sha256(out["scores"].astype(np.float64).tobytes()).hexdigest()[:16]
  if digest != meta["scores_digest"]:
    raise ValueError(f"{npz_path} does not belong to {json_path} (score digest mismatch)")
  if expected_fingerprint is not None and meta["model_fingerprint"] != expected_fingerprint:
    raise ValueError(f"{path} was computed for model {meta['model_fingerprint']}, not "
                     f"{expected_fingerprint}")
  out["meta"] = meta
  return out


# -------------------------------------------------------------------------------- metrics ---

def top_k(scores: np.ndarray, k: int, index: np.ndarray | None = None) -> np.ndarray:
  """The dataset indices of the k highest scores."""
  return rank(scores, index)[:k]


def average_precision(ranking: Sequence[int], positives: Iterable[int]) -> float:
  """Mean over positives of (j / rank of the j-th positive found), ranks from 1.

  A positive absent from `ranking` counts as never retrieved (contributes 0).
  """
  positives = np.unique(np.asarray(list(positives)))
  if positives.size == 0:
    raise ValueError("average_precision needs at least one positive")
  hit = np.isin(np.asarray(ranking), positives)
  ranks = np.flatnonzero(hit) + 1
  return float(np.sum(np.arange(1, ranks.size + 1) / ranks) / positives.size)


def mean_average_precision(rankings: Sequence[Sequence[int]],
                           positives: Sequence[Iterable[int]]) -> float:
  """AP averaged over queries (one ranking and one positive set each)."""
  if len(rankings) != len(positives):
    raise ValueError(f"{len(rankings)} rankings for {len(positives)} positive sets")
  return float(np.mean([average_precision(r, p) for r, p in zip(rankings, positives)]))


def recall_at_k(ranking: Sequence[int], positives: Iterable[int], k: int) -> float:
  """Fraction of the positives among the first k of `ranking`."""
  positives = np.unique(np.asarray(list(positives)))
  if positives.size == 0:
    raise ValueError("recall_at_k needs at least one positive")
  return float(np.isin(positives, np.asarray(ranking)[:k]).sum() / positives.size)
