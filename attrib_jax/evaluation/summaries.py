"""Summaries of measured cells: mean ± standard error over queries, per (method, K).

Contract: `summarize(rows)` turns leave-K-out rows (`counterfactual.run_counterfactual`) into one
entry per (method, K): ΔL, ΔL − random (paired over the queries both have), ΔG pixel MSE and
feature cosine, each as mean ± s.e. over queries, a query's random value being the mean over
its draws; `mean_and_se` is the statistic (the LDS uses it too).

Invariants: a value not measured (None) is skipped, a NaN or inf is an error, never a gap, so
every n counts only real measurements; the standard error is the sample std (ddof 1) / sqrt(n),
NaN for n < 2.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RANDOM = "random"                                  # the method name of the random-removal floor


def mean_and_se(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, standard error = sample std (ddof 1) / sqrt(n), n); s.e. is NaN for n < 2.
  None (a field not measured) is skipped; a NaN or inf value is an error."""
  x = np.asarray([v for v in values if v is not None], np.float64)
  if not np.isfinite(x).all():
    # A dropped value would leave a table whose n counts it: a NaN or inf is a failed
    # measurement to look at, never a gap.
    raise ValueError(f"{int((~np.isfinite(x)).sum())} of {x.size} values are not finite "
                     f"({x[~np.isfinite(x)][:5].tolist()}): a measurement failed (diverged "
                     "retraining or loss?); inspect and delete its stored cell to remeasure")
  if x.size == 0:
    return float("nan"), float("nan"), 0
  se = float(np.std(x, ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
  return float(np.mean(x)), se, int(x.size)


def per_query(rows: Sequence[dict], field: str) -> dict[tuple[str, int], dict[str, float]]:
  """(method, K) -> query -> the field's value (random: the mean over its draws)."""
  collected: dict[tuple[str, int], dict[str, list[float]]] = {}
  for r in rows:
    if r is None or r.get(field) is None:
      continue
    collected.setdefault((r["method"], r["k"]), {}).setdefault(r["query"], []).append(r[field])
  return {mk: {q: float(np.mean(v)) for q, v in sorted(qs.items())}
          for mk, qs in sorted(collected.items())}


def summarize(rows: Sequence[dict]) -> list[dict]:
  """Per (method, K): ΔL, ΔL − random (paired over queries), ΔG MSE and feature cosine,
  each as mean ± s.e. over queries."""
  fields = {"delta_loss": "dl", "delta_g_mse": "mse", "delta_g_feature_cos": "cos"}
  tables = {f: per_query(rows, f) for f in fields}
  out = []
  for method, k in sorted(tables["delta_loss"], key=lambda mk: (mk[0] == RANDOM, mk[0], mk[1])):
    entry = {"method": method, "k": k}
    for field, short in fields.items():
      entry[short], entry[short + "_se"], _ = mean_and_se(
          list(tables[field].get((method, k), {}).values()))
    entry["n"] = len(tables["delta_loss"][(method, k)])
    floor = tables["delta_loss"].get((RANDOM, k))
    mine = tables["delta_loss"][(method, k)]
    if method != RANDOM and floor:
      common = sorted(set(mine) & set(floor))
      entry["vs_random"], entry["vs_random_se"], _ = mean_and_se(
          [mine[q] - floor[q] for q in common])
    else:
      entry["vs_random"] = entry["vs_random_se"] = float("nan")
    out.append(entry)
  return out
