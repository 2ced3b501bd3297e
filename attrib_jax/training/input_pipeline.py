"""Batches of precomputed training arrays, as a pure function of (seed, step).

The order of examples is a fresh permutation of all rows each epoch, from
`numpy.random.default_rng((seed, epoch))`, with excluded rows skipped. A batch is therefore
determined by its step alone: a resumed run reads exactly what an uninterrupted one would, with
no iterator state to save.

Leave-K-out retraining passes the dataset indices to exclude; excluded rows are skipped in the
permutation before any read, so they are never read (the arrays are only ever indexed with
allowed rows).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np


def allowed_rows(item_index: np.ndarray, excluded: Iterable[int] = ()) -> np.ndarray:
  """Rows whose dataset `index` is not excluded; an excluded index that does not exist is an
  error (a typo in an exclusion file must not silently train on everything)."""
  excluded = np.unique(np.asarray(list(excluded), dtype=np.int64))
  unknown = np.setdiff1d(excluded, item_index)
  if unknown.size:
    raise ValueError(f"Excluded indices not in the dataset: {unknown[:10].tolist()}"
                     f"{' ...' if unknown.size > 10 else ''}")
  rows = np.flatnonzero(~np.isin(item_index, excluded))
  if rows.size == 0:
    raise ValueError("Every training item is excluded: nothing to train on")
  return rows


def read_excluded_file(path: str) -> np.ndarray:
  """One integer dataset index per line (blank lines and `#` comments allowed)."""
  values = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      try:
        values.append(int(line))
      except ValueError:
        raise ValueError(f"{path}:{line_no}: not an integer index: {line!r}") from None
  return np.asarray(values, dtype=np.int64)


def batch_rows(rows: np.ndarray, seed: int, step: int, batch_size: int,
               num_rows: int | None = None) -> np.ndarray:
  """The rows of batch number `step` in the stream of per-epoch permutations of `rows`.

  With `num_rows` (the arrays' row count N), each epoch is a permutation of *all* N rows with
  the excluded ones skipped, rather than a permutation of the allowed rows alone. Without
  exclusions the two are the same stream; with them, a leave-K-out retraining sees the full
  run's batches with K items dropped and the rest slid up, instead of a different shuffle: the
  retrainings share the full run's randomness (common random numbers), which is what makes
  the small loss changes of removing K items measurable (see evaluation/counterfactual.py).
  """
  n = rows.size
  allowed = None
  if num_rows is not None:
    allowed = np.zeros(num_rows, bool)
    allowed[rows] = True
  start = step * batch_size
  out, filled = np.empty(batch_size, np.int64), 0
  while filled < batch_size:
    epoch, offset = divmod(start + filled, n)
    take = min(batch_size - filled, n - offset)
    if allowed is None:
      perm = np.random.default_rng((seed, epoch)).permutation(n)
      out[filled:filled + take] = rows[perm[offset:offset + take]]
    else:
      perm = np.random.default_rng((seed, epoch)).permutation(num_rows)
      out[filled:filled + take] = perm[allowed[perm]][offset:offset + take]
    filled += take
  return out


def gather(arrays: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
  """Reads `rows` (sorted for memmap locality, then put back in batch order)."""
  order = np.argsort(rows, kind="stable")
  inverse = np.empty_like(order)
  inverse[order] = np.arange(order.size)
  sorted_rows = rows[order]
  return {name: np.asarray(array[sorted_rows])[inverse] for name, array in arrays.items()}
