"""The linear datamodeling score (LDS): does a method predict the loss of models trained on
random subsets?

Subsets. M random subsets of the training set, each `fraction` (1/2) of it: subset m keeps
the items numpy PCG64 seeded by (subset_seed, m) chooses without replacement. A model is
retrained on each kept subset, with every training seed asked for (`ModelCache` per seed: the
same cached retraining path as the counterfactual evaluation, so a rerun reuses them); the
subset's actual query loss is the mean over those seeds (D-TRAK: 64 subsets × 3 seeds).

Prediction. A method's scores say how much removing an item raises the query's loss, so the
attribution-predicted loss of a model trained on S falls as Σ_{i∈S} score_i rises (the
linear datamodel, loss ≈ c − Σ_{i∈S} τ_i). Per query, LDS = Spearman(Σ_{i∈S_m} score_i,
−L(query, θ_{S_m})) over the M subsets; we report its mean ± standard error over queries.
Equivalently it is Spearman(Σ over the *removed* items, L), the counterfactual direction.

The query loss is `counterfactual.query_loss` (same keyed noise, same slots), so every model
of every subset sees identical noise per query.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.stats

from attrib_jax import generation
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.diffusion.schedules import NoiseSchedule
from attrib_jax.evaluation import counterfactual as cf
from attrib_jax.generation import Query


@dataclasses.dataclass(frozen=True)
class LDSSettings:
  num_subsets: int = 8
  fraction: float = 0.5
  subset_seed: int = 0

  def __post_init__(self):
    if self.num_subsets < 3:
      raise ValueError("LDS needs at least 3 subsets (a rank correlation of 2 points is ±1)")
    if not 0 < self.fraction < 1:
      raise ValueError(f"fraction must lie in (0, 1), got {self.fraction}")


def subsets(index: np.ndarray, settings: LDSSettings) -> list[np.ndarray]:
  """The kept dataset indices (sorted) of each subset."""
  index = np.sort(np.asarray(index, np.int64))
  size = int(round(settings.fraction * index.size))
  if not 0 < size < index.size:
    raise ValueError(f"a {settings.fraction} subset of {index.size} items is empty or full")
  return [np.sort(np.random.default_rng([settings.subset_seed, m]).choice(
      index, size, replace=False)) for m in range(settings.num_subsets)]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman's rank correlation (average ranks for ties); NaN if either side is constant."""
  ra = scipy.stats.rankdata(np.asarray(a, np.float64))
  rb = scipy.stats.rankdata(np.asarray(b, np.float64))
  if ra.size < 2 or np.ptp(ra) == 0 or np.ptp(rb) == 0:
    return float("nan")
  ra, rb = ra - ra.mean(), rb - rb.mean()
  return float(ra @ rb / np.sqrt((ra @ ra) * (rb @ rb)))


def subset_losses(kept: Sequence[np.ndarray], index: np.ndarray,
                  queries: Mapping[str, Query], caches: Sequence[cf.ModelCache], *,
                  apply_fn: Callable, schedule: NoiseSchedule, store: cf.ResultStore,
                  base_fingerprint: str, loss: cf.LossSettings = cf.LossSettings(),
                  log: Callable[[str], None] = print) -> np.ndarray:
  """Actual query losses [num_seeds, M, Q] (queries in sorted name order), one stored cell per
  (subset, seed); a cell missing some queries measures only those."""
  names = sorted(queries)
  # A row's losses are keyed by the query's content, not its name alone: a name reused for
  # another image or prompt is measured again.
  key_of = {q: f"{q}|{generation.query_digest(queries[q])}" for q in names}
  index = np.sort(np.asarray(index, np.int64))
  out = np.full((len(caches), len(kept), len(names)), np.nan)
  for s, cache in enumerate(caches):
    for m, keep in enumerate(kept):
      excluded = np.setdiff1d(index, keep)
      cell_id = f"lds|subset={m}|recipe={cache.recipe_fingerprint}"
      fingerprint = cf.cell_fingerprint(base_fingerprint, cache.recipe_fingerprint, loss,
                                        excluded.tolist(), False)
      row = store.get(cell_id, fingerprint) or {
          "cell": cell_id, "fingerprint": fingerprint, "subset": m, "seed_index": s,
          "model": cache.key(excluded), "num_excluded": int(excluded.size), "losses": {}}
      missing = [q for q in names if key_of[q] not in row["losses"]]
      if missing:
        t0 = time.time()
        params = cache.params(excluded)
        for q in missing:
          row["losses"][key_of[q]] = cf.query_loss(apply_fn, params, queries[q], schedule,
                                                   loss)
        store.put(row)
        log(f"lds: subset {m + 1}/{len(kept)}, recipe {s + 1}/{len(caches)}: {len(missing)} "
            f"query losses in {time.time() - t0:.1f}s")
      out[s, m] = [row["losses"][key_of[q]] for q in names]
  return out


def lds_per_query(kept: Sequence[np.ndarray], index: np.ndarray,
                  scores: Mapping[str, Mapping[str, np.ndarray]], actual: np.ndarray,
                  query_names: Sequence[str]) -> dict[str, dict[str, float]]:
  """method -> query -> Spearman(Σ_{i∈S_m} score_i, −L_m) over subsets m.

  scores: method -> query -> scores aligned with `index` (not sorted: `arrays['index']`).
  actual: [M, Q] (or [seeds, M, Q], averaged over seeds) losses, queries in `query_names` order.
  """
  actual = np.asarray(actual, np.float64)
  if actual.ndim == 3:
    actual = actual.mean(axis=0)
  index = np.asarray(index, np.int64)
  masks = np.stack([np.isin(index, keep) for keep in kept]).astype(np.float64)  # [M, N]
  out: dict[str, dict[str, float]] = {}
  for method in sorted(scores):
    out[method] = {}
    for j, q in enumerate(query_names):
      s = np.asarray(scores[method][q], np.float64)
      if s.shape != index.shape:
        raise ValueError(f"{method} scores for {q} have shape {s.shape}, expected "
                         f"{index.shape}")
      out[method][q] = spearman(masks @ s, -actual[:, j])
  return out


def summarize(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
  """method -> {'lds', 'lds_se', 'n', 'n_undefined'}: mean ± s.e. over the queries whose
  Spearman is defined; `n_undefined` counts those whose is not (NaN: constant scores or
  losses over the subsets), so the table says how many the mean left out."""
  out = {}
  for method, values in sorted(per_query.items()):
    defined = [v for v in values.values() if not math.isnan(v)]
    mean, se, n = cf.mean_and_se(defined)
    out[method] = {"lds": mean, "lds_se": se, "n": n, "n_undefined": len(values) - n}
  return out


def run_lds(index: np.ndarray, queries: Mapping[str, Query],
            scores: Mapping[str, Mapping[str, np.ndarray]], caches: Sequence[cf.ModelCache], *,
            settings: LDSSettings, apply_fn: Callable, schedule: NoiseSchedule,
            store: cf.ResultStore, base_fingerprint: str,
            loss: cf.LossSettings = cf.LossSettings(),
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Subsets -> models -> losses -> per-query Spearman -> summary."""
  kept = subsets(index, settings)
  names = sorted(queries)
  actual = subset_losses(kept, index, queries, caches, apply_fn=apply_fn, schedule=schedule,
                         store=store, base_fingerprint=base_fingerprint, loss=loss, log=log)
  per_query = lds_per_query(kept, index, scores, actual, names)
  return {"per_query": per_query, "summary": summarize(per_query),
          "losses": actual.tolist(), "queries": names,
          "settings": dataclasses.asdict(settings),
          "subsets_digest": scores_lib.settings_digest([k.tolist() for k in kept])}
