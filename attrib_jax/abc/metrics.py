"""AbC's retrieval metrics (SPEC §4), numpy float64: Recall@K and AP over the full ranking.

Contract: `scores` [Q, C] (higher = more influential), `positives` bool [Q, C] (a query's true
exemplars among its candidates). Per query:
- rank of the k-th positive (1-based) = k + #{negatives scoring >= that positive};
- AP = mean over its m positives of k / rank of the k-th (AbC's `average_precision`);
- Recall@K = #{positives with rank <= K} / m.

Ties are broken pessimistically: a negative with the same score as a positive ranks before it
(AbC's `argsort(-score)` leaves ties to the sort's whim; pessimism makes a method that scores
everything alike earn the worst rank, never a lucky one). Ties among positives do not matter:
whichever comes first, the ranks of the k-th positive are the same.

Statistics: `mean_and_se` is the project's (sample std, ddof 1, / sqrt n); `summarize_by_split`
gives mean ± s.e. per split over queries (AbC's average) or, with `clusters`, over sets (a set's
queries share a model, so they are not independent: the s.e. over sets is the honest one).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from attrib_jax.evaluation import summaries


def _check(scores, positives) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64)
  positives = np.asarray(positives)
  if scores.ndim != 2 or positives.shape != scores.shape:
    raise ValueError(f"scores {scores.shape} and positives {positives.shape} must both be "
                     "[queries, candidates]")
  if positives.dtype != bool:
    if not np.isin(positives, (0, 1)).all():
      raise ValueError(f"positives must be boolean (or 0/1), got dtype {positives.dtype}")
    positives = positives.astype(bool)
  bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
  if bad.size:
    raise ValueError(f"scores of queries {bad[:10].tolist()} are not finite (a method failed?)")
  empty = np.flatnonzero(~positives.any(axis=1))
  if empty.size:
    raise ValueError(f"queries {empty[:10].tolist()} have no positive candidate (each query "
                     "needs its set's exemplars among the candidates)")
  return scores, positives


def positive_ranks(scores, positives) -> list[np.ndarray]:
  """Per query, the 1-based ranks of its positives, ascending (ties pessimistic)."""
  scores, positives = _check(scores, positives)
  out = []
  for s, pos in zip(scores, positives):
    p = np.sort(s[pos])[::-1]
    # Comparisons, not a sort of all C candidates: m (exemplars) is small, C may be 1M.
    negatives_ahead = (s[~pos][None, :] >= p[:, None]).sum(axis=1)
    out.append(np.arange(1, p.size + 1) + negatives_ahead)
  return out


def _recall_from_ranks(ranks: Sequence[np.ndarray], k: int) -> np.ndarray:
  if int(k) != k or k < 1:
    raise ValueError(f"Recall@K needs an integer K >= 1, got {k}")
  return np.array([np.mean(r <= k) for r in ranks], np.float64)


def _ap_from_ranks(ranks: Sequence[np.ndarray]) -> np.ndarray:
  return np.array([np.mean(np.arange(1, r.size + 1) / r) for r in ranks], np.float64)


def recall_at_k(scores, positives, k: int) -> np.ndarray:
  """[Q] fraction of each query's positives among its top k candidates."""
  return _recall_from_ranks(positive_ranks(scores, positives), k)


def average_precision(scores, positives) -> np.ndarray:
  """[Q] mean over a query's positives of (k / rank of its k-th positive), full ranking."""
  return _ap_from_ranks(positive_ranks(scores, positives))


def retrieval_metrics(scores, positives, ks: Sequence[int]) -> dict[str, np.ndarray]:
  """{"ap": [Q], "recall@K": [Q] for each K} from one ranking pass."""
  ranks = positive_ranks(scores, positives)
  out = {"ap": _ap_from_ranks(ranks)}
  for k in ks:
    out[f"recall@{int(k)}"] = _recall_from_ranks(ranks, k)
  return out


def recall_ks(num_candidates: int, fraction: float = 0.1) -> tuple[int, ...]:
  """The issue's K values: 5, 10 and the one nearest `fraction` of the candidates (deduplicated,
  each at most num_candidates)."""
  if num_candidates < 1:
    raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
  ks = {min(5, num_candidates), min(10, num_candidates),
        max(1, min(num_candidates, int(round(fraction * num_candidates))))}
  return tuple(sorted(ks))


def mean_and_se(values) -> tuple[float, float]:
  """(mean, standard error = sample std (ddof 1) / sqrt n); s.e. NaN for n < 2."""
  mean, se, _ = summaries.mean_and_se(np.asarray(values, np.float64).ravel().tolist())
  return mean, se


def summarize_by_split(values, splits: Sequence[str], clusters: Sequence[str] | None = None
                       ) -> dict[str, tuple[float, float, int]]:
  """split -> (mean, s.e., n) of per-query `values`.

  clusters=None: over queries (n = queries). clusters (e.g. each query's set name): values are
  first averaged within each cluster of a split, then mean ± s.e. over clusters (n = sets).
  """
  values = np.asarray(values, np.float64).ravel()
  splits = np.asarray(splits)
  if splits.shape != values.shape:
    raise ValueError(f"{values.size} values but {splits.size} split labels")
  if clusters is not None:
    clusters = np.asarray(clusters)
    if clusters.shape != values.shape:
      raise ValueError(f"{values.size} values but {clusters.size} cluster labels")
  out = {}
  for split in sorted(set(splits.tolist())):
    sel = splits == split
    v = values[sel]
    if clusters is not None:
      c = clusters[sel]
      v = np.array([v[c == name].mean() for name in sorted(set(c.tolist()))])
    mean, se = mean_and_se(v)
    out[str(split)] = (mean, se, int(v.size))
  return out
