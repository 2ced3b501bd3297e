"""The whole evaluation (leave-K-out and LDS) as one resumable run, and its report.

Contract: `evaluate` takes everything model-specific as arguments (score functions, the model
caches, the denoiser, a regenerator), so the same driver runs the real world
(`launch/evaluate.py`) and the tests' micro model; its settings are the config's `evaluation`
block (`EvalSettings.from_config`, unknown keys are errors). Under `out_dir`:
  scores/<method>/<query>.npz   each method's score vector per query (reused on rerun)
  cells/                        one JSON per finished leave-K-out cell (counterfactual.ResultStore)
  lds_cells/                    one JSON per LDS (subset, seed) model's query losses
  results.jsonl                 every cell's row, sorted (rewritten at the end of each run)
  table.csv, table.md           method × K: ΔL, ΔL − random, ΔG, LDS (mean ± s.e., queries)
  pairwise.csv, pairwise.md     every pair of methods at every K: the paired per-query ΔL
                                difference, mean ± s.e., bootstrap interval, sign test (`stats`)
  paired.png                    each method's paired difference from each reference baseline
  delta_loss.png, lds.png       ΔL against K per method; LDS per method
  report.html, summary.json     all of the above on one page
(the table, plots and page are drawn by `report_page`).

Invariants: a stored score vector or cell is reused only under the key of everything it
depends on, so a rerun computes only what is missing or stale; the printed table depends only
on the cells' numbers, which depend only on the seeds: same seeds, same table text.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.evaluation import counterfactual as cf
from attrib_jax.evaluation import lds as lds_lib
from attrib_jax.evaluation import stats
# The report's files; re-exported (eval_report.build_table, ...) for callers of the old path.
from attrib_jax.evaluation.report_page import (  # pylint: disable=unused-import
    COLUMNS, _write_jsonl, _write_text, build_table, format_markdown, plot_bars, plot_lines,
    plot_paired, table_cells, topk_section, write_csv, write_html)
from attrib_jax.generation import Query

# The floors the bar compares the best method against (those present in the run).
REFERENCES = (cf.RANDOM, "pixel", "caption", "caption-words")

DEFAULT_METHODS = ("abu", "abu+", "pixel", "features", "trak", "d-trak", "caption", "caption-words",
                   cf.RANDOM)


# -------------------------------------------------------------------------- settings ---

@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The `config.evaluation` block. See launch/evaluate.py for every key with its default."""
  methods: tuple[str, ...] = DEFAULT_METHODS
  method_configs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  ks: tuple[int, ...] = ()                      # () -> round(f · N) for f in k_fractions
  k_fractions: tuple[float, ...] = (0.01, 0.04)
  random_draws: int = 3
  random_seed: int = 0
  loss: cf.LossSettings = cf.LossSettings()
  regenerate: bool = True
  feature_extractor: Mapping[str, Any] = dataclasses.field(
      default_factory=lambda: {"seed": 0, "widths": (32, 64), "grid": 4})
  lds: lds_lib.LDSSettings | None = lds_lib.LDSSettings()
  lds_train_seeds: tuple[int, ...] = ()         # () -> (config.seed,)
  queries: tuple[str, ...] = ()                 # () -> every query of the workdir
  keep_train_checkpoints: bool = False
  # Retrainings run in this many worker processes of one CPU core each (`retrain_pool`);
  # -1: one per usable core when JAX runs on the CPU, else 0; 0: in this process.
  retrain_workers: int = -1
  # > 0: retrainings run this many at a time in one vmapped program in this process
  # (`grouped_retrain`), instead of the worker processes; their models are cached apart.
  retrain_group_size: int = 0

  def __post_init__(self):
    # The random-removal floor needs draws whenever it is a method (vs_random pairs with it).
    if cf.RANDOM in self.methods:
      scores_lib.require_at_least("evaluation", 1, random_draws=self.random_draws)
    scores_lib.require_at_least("evaluation", 1, **{f"ks[{i}]": k for i, k in enumerate(self.ks)})
    scores_lib.require_at_least("evaluation", -1, retrain_workers=self.retrain_workers)
    scores_lib.require_at_least("evaluation", 0, retrain_group_size=self.retrain_group_size)
    for i, f in enumerate(self.k_fractions):
      if not 0 < f < 1:
        raise ValueError(f"evaluation.k_fractions[{i}] must lie in (0, 1), got {f!r}")

  @classmethod
  def from_config(cls, block: Mapping[str, Any] | None) -> "EvalSettings":
    """From a config's `evaluation` block (a dict or ConfigDict; None: all defaults)."""
    c = dict(block.to_dict() if hasattr(block, "to_dict") else (block or {}))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(c) - known - {"lds"})
    if unknown:
      raise ValueError(f"config.evaluation: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key in ("methods", "ks", "k_fractions", "lds_train_seeds", "queries"):
      if key in c:
        kwargs[key] = tuple(c.pop(key))
    if "loss" in c:
      kwargs["loss"] = cf.LossSettings(**dict(c.pop("loss")))
    if "lds" in c:
      block = dict(c.pop("lds"))
      if "train_seeds" in block:
        kwargs["lds_train_seeds"] = tuple(block.pop("train_seeds"))
      kwargs["lds"] = (lds_lib.LDSSettings(**block) if block.get("num_subsets", 1) else None)
    for key in ("method_configs", "feature_extractor"):
      if key in c:
        kwargs[key] = {k: dict(v) if isinstance(v, Mapping) else v
                       for k, v in dict(c.pop(key)).items()}
    kwargs.update(c)
    return cls(**kwargs)

  def resolve_ks(self, num_items: int) -> tuple[int, ...]:
    ks = self.ks or tuple(max(1, int(round(f * num_items))) for f in self.k_fractions)
    return tuple(sorted(set(int(k) for k in ks)))

  @property
  def ranked_methods(self) -> tuple[str, ...]:
    """The methods whose rankings are removed (all but the random floor)."""
    return tuple(m for m in self.methods if m != cf.RANDOM)


# -------------------------------------------------------------------------- scoring ---

@dataclasses.dataclass(frozen=True)
class Scorer:
  """A method's scores for one query, aligned with the training arrays' `index`.

  key: JSON-able description of everything the scores depend on besides the query (method
    settings, model, data); the cached vector is reused only under the same key.
  """
  fn: Callable[[str, Query], np.ndarray]
  key: Any


class ScoreStore:
  """Score vectors per (method, query), saved atomically; reused when the key matches."""

  def __init__(self, directory: str, index: np.ndarray):
    self.directory, self.index = directory, np.asarray(index, np.int64)
    self.seconds: dict[str, float] = {}

  def get(self, method: str, query_name: str, query: Query, scorer: Scorer) -> np.ndarray:
    # The query's content, not only its name: a name reused for another image or prompt is
    # scored again.
    key = scores_lib.settings_digest({"scorer": scorer.key, "query": query_name,
                                      "query_digest": generation.query_digest(query),
                                      "index": scores_lib.params_fingerprint({"i": self.index})})
    path = os.path.join(self.directory, method, cf.safe_name(query_name) + ".npz")
    if os.path.exists(path):
      with io_utils.open_npz(path) as data:
        if str(data["key"]) == key:
          self.seconds[method] = self.seconds.get(method, 0.0) + float(data["seconds"])
          return data["scores"]
    t0 = time.time()
    scores = np.asarray(scorer.fn(query_name, query), np.float64)
    seconds = time.time() - t0
    if scores.shape != self.index.shape or not np.isfinite(scores).all():
      raise ValueError(f"{method} gave scores {scores.shape} (finite: "
                       f"{np.isfinite(scores).all()}) for {query_name}; expected "
                       f"{self.index.shape}")
    if parallel.is_main_process():   # every process computed the same scores
      scores_lib.atomic_savez(path, key=np.asarray(key), scores=scores,
                              seconds=np.asarray(seconds))
    self.seconds[method] = self.seconds.get(method, 0.0) + seconds
    return scores


# ---------------------------------------------------------------------------- driver ---

def evaluate(*, out_dir: str, queries: Mapping[str, Query], index: np.ndarray,
             scorers: Mapping[str, Scorer], settings: EvalSettings,
             make_cache: Callable[[int | None], cf.ModelCache], base_params: Any,
             base_fingerprint: str, apply_fn: Callable, schedule: Any,
             regenerate: cf.Regenerate | None = None, feature_fn: cf.FeatureFn | None = None,
             get_images: Callable[[np.ndarray], np.ndarray] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Scores -> leave-K-out cells -> LDS -> table, plots and report. Resumable.

  Args:
    queries: name -> query (the evaluation's queries).
    index: the training arrays' dataset indices (the order scores are aligned with).
    scorers: method -> `Scorer`, for every method in `settings.methods` (the random method's
      scores serve the LDS; its leave-K-out row is the random-removal floor).
    make_cache: training seed (None: the recipe's own) -> the `ModelCache` retraining with it.
    base_params, base_fingerprint: θ0 and its `params_fingerprint`.
    regenerate, feature_fn: for ΔG (None: ΔG is skipped / only the pixel MSE is reported).
    get_images: dataset indices -> uint8 training images; with it the report shows each
      method's top-K per query side by side, ground truth marked.
  Returns:
    summary.json's content, plus 'markdown' (the table text).
  """
  t_start = time.time()
  index = np.asarray(index, np.int64)
  names = sorted(queries)
  missing = [m for m in settings.methods if m not in scorers]
  if missing:
    raise ValueError(f"no scorer for method(s) {missing}")
  ks = settings.resolve_ks(index.size)
  store = ScoreStore(os.path.join(out_dir, "scores"), index)
  scores = {m: {q: store.get(m, q, queries[q], scorers[m]) for q in names}
            for m in settings.methods}
  log(f"evaluate: scores of {len(settings.methods)} methods for {len(names)} queries "
      f"({', '.join(f'{m} {s:.1f}s' for m, s in store.seconds.items())})")
  rankings = {m: {q: scores_lib.rank(scores[m][q], index) for q in names}
              for m in settings.ranked_methods}
  draws = settings.random_draws if cf.RANDOM in settings.methods else 0
  cells = cf.make_cells(rankings, names, ks, index=index, random_draws=draws,
                        random_seed=settings.random_seed)
  cache = make_cache(None)
  lds_seeds = (settings.lds_train_seeds or (None,)) if settings.lds is not None else ()
  by_seed = {None: cache}
  for s in lds_seeds:
    if s not in by_seed:
      by_seed[s] = make_cache(s)
  # Every model this run needs, trained up front (in parallel when the caches have a pool).
  lds_excluded = ([np.setdiff1d(index, keep) for keep in lds_lib.subsets(index, settings.lds)]
                  if settings.lds is not None else [])
  for s, seed_cache in by_seed.items():
    seed_cache.prefetch(([c.excluded for c in cells] if s is None else [])
                        + (lds_excluded if s in lds_seeds else []))
  rows = cf.run_counterfactual(
      cells, queries, cache=cache, base_params=base_params, base_fingerprint=base_fingerprint,
      apply_fn=apply_fn, schedule=schedule, store=cf.ResultStore(os.path.join(out_dir, "cells")),
      loss=settings.loss, regenerate=regenerate, feature_fn=feature_fn,
      feature_key=json.loads(json.dumps(settings.feature_extractor, default=str)), log=log)
  drift = _theta0_drift(queries, base_params, base_fingerprint, regenerate, out_dir)

  lds_result = None
  if settings.lds is not None:
    lds_result = lds_lib.run_lds(
        index, queries, scores, [by_seed[s] for s in lds_seeds], settings=settings.lds,
        apply_fn=apply_fn, schedule=schedule,
        store=cf.ResultStore(os.path.join(out_dir, "lds_cells")),
        base_fingerprint=base_fingerprint, loss=settings.loss, log=log)

  table = build_table(cf.summarize(rows), lds_result["summary"] if lds_result else {},
                      settings.methods, ks, index.size)
  markdown = format_markdown(table)
  # Seeded by the random floor's seed: same seeds, same intervals.
  pairs = stats.pairwise_table(rows, settings.methods, ks, seed=settings.random_seed)
  pair_markdown = stats.format_pairwise_markdown(pairs)
  references = [r for r in REFERENCES if r in settings.methods]
  bar = stats.best_against(pairs, references, settings.methods, ks)
  if not parallel.is_main_process():   # the files below are process 0's
    parallel.barrier("evaluate: report written")
    return {"table": table, "lds": lds_result, "markdown": markdown}
  _write_jsonl(os.path.join(out_dir, "results.jsonl"), rows)
  write_csv(os.path.join(out_dir, "table.csv"), table)
  _write_text(os.path.join(out_dir, "table.md"), markdown)
  _write_text(os.path.join(out_dir, "pairwise.csv"), stats.pairwise_csv(pairs))
  _write_text(os.path.join(out_dir, "pairwise.md"), pair_markdown)
  plot_paired(os.path.join(out_dir, "paired.png"), pairs, references,
              [m for m in settings.methods if m not in references], ks)
  plot_lines(os.path.join(out_dir, "delta_loss.png"),
             {m: [(e["k"], e["dl"], e["dl_se"]) for e in table if e["method"] == m]
              for m in settings.methods}, title="Leave-K-out: query loss change",
             xlabel="K (items removed)", ylabel="dL (mean +- s.e.)")
  if lds_result:
    plot_bars(os.path.join(out_dir, "lds.png"),
              {m: (lds_result["summary"][m]["lds"], lds_result["summary"][m]["lds_se"])
               for m in settings.methods if m in lds_result["summary"]},
              title="Linear datamodeling score", ylabel="Spearman (mean +- s.e.)")
  retraining = retraining_timing([t for c in by_seed.values() for t in c.timings])
  if retraining["models"]:
    log(f"evaluate: {retraining['models']} models retrained, {retraining['seconds_mean']:.1f}s "
        f"each on average (of which jit {retraining['jit_seconds_mean']:.1f}s; persistent XLA "
        f"cache {retraining['cache_hits']} hits, {retraining['cache_misses']} misses); "
        f"{time.time() - t_start:.0f}s in all")
  summary = {
      "num_items": int(index.size), "queries": names, "ks": list(ks),
      "retraining": retraining,
      "methods": list(settings.methods), "table": table, "theta0_regeneration": drift,
      "pairwise": pairs, "best_against_references": bar,
      "random_draws_per_query": {str(k): list(v) for k, v in
                                 stats.random_draws_per_query(rows).items()},
      "lds": lds_result,
      "models_trained_this_run": sum(len(c.trained) for c in by_seed.values()),
      "scoring_seconds": store.seconds, "seconds_this_run": time.time() - t_start,
      "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str))}
  scores_lib.atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
  topk = (topk_section(queries, rankings, min(max(ks), 20), get_images)
          if get_images is not None and ks else "")
  write_html(os.path.join(out_dir, "report.html"), summary, markdown,
             plots=["delta_loss.png", "paired.png"] + (["lds.png"] if lds_result else []),
             topk_html=topk, pairwise_markdown=pair_markdown)
  parallel.barrier("evaluate: report written")
  log(f"evaluate: {len(rows)} cells, table:\n{markdown}\npaired differences:\n{pair_markdown}")
  for b in bar:
    log(f"evaluate: K={b['k']}: best against {', '.join(references)} is {b['method']} (smallest"
        f" z {b['min_z']:.2f}: {'beats' if b['beats_all'] else 'does not beat'} all by 2 s.e.)")
  return dict(summary, markdown=markdown, pairwise_markdown=pair_markdown)


def retraining_timing(timings: Sequence[Mapping[str, float]]) -> dict[str, Any]:
  """What this run's retrainings cost (`ModelCache.timings`): count, mean wall seconds, mean
  seconds of JAX tracing + lowering + compiling or cache loading, persistent-cache hits."""
  n = len(timings)
  mean = lambda f: float(np.mean([f(t) for t in timings])) if n else float("nan")
  return {"models": n, "seconds_total": float(sum(t["seconds"] for t in timings)),
          "seconds_mean": mean(lambda t: t["seconds"]),
          "jit_seconds_mean": mean(lambda t: t["trace"] + t["lower"] + t["compile"]),
          "cache_hits": int(sum(t["cache_hits"] for t in timings)),
          "cache_misses": int(sum(t["cache_misses"] for t in timings))}


def _theta0_drift(queries, base_params, base_fingerprint, regenerate, out_dir) -> dict | None:
  """How far regenerating each query under θ0 itself lands from the saved image: ΔG's floor
  from the sampler's own numerics (batching, platform). Stored per query, reused."""
  if regenerate is None:
    return None
  store = cf.ResultStore(os.path.join(out_dir, "cells"))
  values = []
  for name in sorted(queries):
    cell = f"{name}|theta0"
    # θ0 and the query's content (a name reused for another query is measured again).
    fingerprint = scores_lib.settings_digest(
        {"base": base_fingerprint, "query": generation.query_digest(queries[name])})
    row = store.get(cell, fingerprint)
    if row is None:
      image = regenerate(base_params, queries[name])
      row = {"cell": cell, "fingerprint": fingerprint,
             "mse": cf.pixel_mse(image, queries[name].image)}
      store.put(row)
    values.append(row["mse"])
  return {"mean_mse": float(np.mean(values)), "max_mse": float(np.max(values))}
