"""Leave-K-out counterfactual evaluation (SPEC §3): remove a method's top-K, retrain, measure.

Contract: for each query, method and K the method's K most influential training items are
removed, a model is retrained from scratch on the rest with the same recipe and seed
(`model_cache.ModelCache`, whose names are re-exported here), and `run_counterfactual` measures
ΔL = L(query, θ_without) − L(query, θ0), the query's denoising loss at timesteps 0, s, 2s, ...
(stride s = 5 by default), `num_draws` noise draws per timestep, averaged (higher = the removed
items mattered more), and ΔG, how far the query regenerated with the same prompt, seed and
sampler moved from the original image: pixel MSE (pixels in [0, 1]; higher = more influence)
and the cosine similarity of model-free features (lower = more influence). Random removal is
the floor: `random_draws` query-independent orderings of the training set (numpy PCG64 from
(random_seed, draw)), draw d removing its first K items, so it costs draws × |K| retrainings
shared by every query, a query's random ΔL being the mean over the draws. `summaries.summarize`
(re-exported here) gives each (method, K) as mean ± s.e. over queries, ΔL − random paired per
query.

Invariants: a query's slot (draw d, timestep t) uses
normal(fold_in(... fold_in(key(seed), w0), w1, w2, w3, d, t)) with w0..w3 the four words of a
digest of the query's latent and text states (`baselines.random.query_digest`), so every model
sees exactly the same noise for the same query whatever the batch layout (common random
numbers) and different queries independent noise; per-slot losses are float32 (network at
"highest" matmul precision), their mean and ΔL float64. Each finished cell is one JSON file,
written atomically (`ResultStore`); a rerun skips every cell whose file carries the same
fingerprint (θ0, recipe, loss settings, excluded set, the query's content, the ΔG features).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax import generation
from attrib_jax import parallel
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.baselines import random as random_lib
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.diffusion import sampling
from attrib_jax.diffusion.schedules import NoiseSchedule
# Re-exported: callers use cf.ModelCache, cf.recipe_train_fn, ... (the models live there).
from attrib_jax.evaluation.model_cache import (  # pylint: disable=unused-import
    JitClock, ModelCache, TrainFn, check_base_recipe, excluded_digest, jit_clock,
    link_shared_data, model_key, prepare_data_workdir, recipe_fingerprint, recipe_train_fn,
    timed_train, training_config)
# Re-exported: callers use cf.summarize, cf.mean_and_se, cf.RANDOM.
from attrib_jax.evaluation.summaries import (  # pylint: disable=unused-import
    RANDOM, mean_and_se, per_query, summarize)
from attrib_jax.generation import Query

Regenerate = Callable[[Any, Query], np.ndarray]   # (params, query) -> uint8 image [H, W, 3]
FeatureFn = Callable[[np.ndarray], np.ndarray]    # uint8 images [n, H, W, 3] -> [n, d]


# ------------------------------------------------------------------------ query loss ---

@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The query loss of ΔL: timesteps 0, stride, 2·stride, ... < T; `num_draws` noises each."""
  timestep_stride: int = 5
  num_draws: int = 1
  seed: int = 0
  batch_size: int = 100        # slots per network call (speed only)

  def __post_init__(self):
    if self.timestep_stride < 1 or self.num_draws < 1 or self.batch_size < 1:
      raise ValueError("timestep_stride, num_draws and batch_size must be positive")

  def slots(self, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, draws) of every slot, [S] int32 each."""
    t = np.arange(0, num_train_timesteps, self.timestep_stride, dtype=np.int32)
    d = np.arange(self.num_draws, dtype=np.int32)
    return np.repeat(t, d.size), np.tile(d, t.size)

  def definition(self) -> dict:
    """What the losses depend on (not the batch size)."""
    return {"timestep_stride": self.timestep_stride, "num_draws": self.num_draws,
            "seed": self.seed}


def query_slot_noise(seed: jax.Array | int, digest: jax.Array, draw: jax.Array,
                     timestep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The noise of one (query, draw, timestep) slot; `digest` = the query's 4 uint32 words."""
  key = jax.random.key(seed)
  for i in range(4):
    key = jax.random.fold_in(key, digest[i])
  key = jax.random.fold_in(jax.random.fold_in(key, draw), timestep)
  return jax.random.normal(key, shape, jnp.float32)


@functools.lru_cache(maxsize=16)
def _loss_program(apply_fn: Callable) -> Callable:
  """jit((params, schedule, x0, text, digest, seed, t, draws) -> per-slot losses [B])."""

  def losses(params, schedule, x0, text, digest, seed, t, draws):
    b = t.shape[0]
    noise = jax.vmap(lambda s, d: query_slot_noise(seed, digest, d, s, x0.shape))(t, draws)
    with jax.default_matmul_precision("highest"):
      return loss_lib.per_example_loss(
          apply_fn, params, jnp.broadcast_to(x0, (b,) + x0.shape),
          jnp.broadcast_to(text, (b,) + text.shape), t, noise, schedule=schedule)

  return jax.jit(losses)


def query_loss(apply_fn: Callable, params: Any, query: Query, schedule: NoiseSchedule,
               settings: LossSettings = LossSettings()) -> float:
  """L(query, params): the mean over the settings' slots, in float64."""
  t, draws = settings.slots(schedule.num_train_timesteps)
  program = _loss_program(apply_fn)
  digest = np.asarray(random_lib.query_digest(query), np.uint32)
  x0 = np.asarray(query.latent, np.float32)
  text = np.asarray(query.text_states, np.float32)
  seed = np.uint32(settings.seed)
  b = min(settings.batch_size, t.size)
  out = []
  for start in range(0, t.size, b):
    ts, ds = t[start:start + b], draws[start:start + b]
    m = ts.size
    if m < b:  # pad with the last slot: one compiled shape
      ts, ds = np.pad(ts, (0, b - m), mode="edge"), np.pad(ds, (0, b - m), mode="edge")
    out.append(np.asarray(program(params, schedule, x0, text, digest, seed, ts, ds))[:m])
  return float(np.mean(np.concatenate(out).astype(np.float64)))


# --------------------------------------------------------------------- regeneration ---

def make_regenerator(apply_fn: Callable, schedule: NoiseSchedule,
                     null_text_states: np.ndarray, latent_shape: tuple[int, ...],
                     latents_to_images: Callable[[jax.Array], np.ndarray]) -> Regenerate:
  """(params, query) -> the query regenerated under `params`: its prompt's states, its seed,
  its sampler settings (query.info), sampled exactly as `generation.generate` does (per-query
  key `jax.random.key(seed)`, vmapped), but compiled once with the weights as an argument so
  every retrained model reuses the program.

  null_text_states: [1, L, D] states of the empty prompt (the guidance's negative).
  latents_to_images: final latents [B, ...] -> uint8 images (`pipeline.latents_to_images`).
  """
  null = jnp.asarray(null_text_states, jnp.float32).reshape((1,) + null_text_states.shape[-2:])
  programs: dict[tuple, Callable] = {}

  def program(sampler: str, num_steps: int, guidance_scale: float, eta: float) -> Callable:
    key = (sampler, num_steps, guidance_scale, eta)
    if key not in programs:
      settings = dict(latent_shape=tuple(latent_shape), num_steps=num_steps,
                      guidance_scale=guidance_scale)

      def one(params, text_states, seed):
        rng = jax.random.key(seed)
        if sampler == "ddim":
          x = sampling.ddim_sample(schedule, apply_fn, params, text_states[None], null, rng,
                                   eta=eta, **settings)
        elif sampler == "ddpm":
          x = sampling.ddpm_sample(schedule, apply_fn, params, text_states[None], null, rng,
                                   **settings)
        else:
          raise ValueError(f"query sampler {sampler!r}: expected 'ddim' or 'ddpm'")
        return x[0]

      programs[key] = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
    return programs[key]

  def regenerate(params: Any, query: Query) -> np.ndarray:
    info = query.info
    missing = [k for k in ("seed", "sampler", "num_steps", "guidance_scale") if k not in info]
    if missing:
      raise ValueError(f"query {info.get('prompt')!r} lacks {missing} in query.json: only "
                       "generated queries can be regenerated")
    run = program(info["sampler"], int(info["num_steps"]), float(info["guidance_scale"]),
                  float(info.get("eta", 0.0)))
    latent = run(params, jnp.asarray(query.text_states, jnp.float32)[None],
                 jnp.asarray([info["seed"]], jnp.uint32))
    return np.asarray(latents_to_images(latent))[0]

  return regenerate


def pixel_mse(a: np.ndarray, b: np.ndarray) -> float:
  """Mean squared difference of two uint8 images with pixels scaled to [0, 1]."""
  a, b = np.asarray(a, np.float64) / 255.0, np.asarray(b, np.float64) / 255.0
  if a.shape != b.shape:
    raise ValueError(f"images {a.shape} and {b.shape} differ in shape")
  return float(np.mean(np.square(a - b)))


def feature_cosine(feature_fn: FeatureFn, a: np.ndarray, b: np.ndarray) -> float:
  f = np.asarray(feature_fn(np.stack([a, b])), np.float64)
  na, nb = np.linalg.norm(f[0]), np.linalg.norm(f[1])
  if not (na > 0 and nb > 0 and np.isfinite(f).all()):
    # A cosine is undefined there; 0.0 would read as "completely changed".
    raise ValueError(f"feature cosine undefined: feature norms {na:g} (regenerated) and "
                     f"{nb:g} (query), finite: {bool(np.isfinite(f).all())}; the feature "
                     "extractor gives zero or non-finite features for these images")
  return float(f[0] @ f[1] / (na * nb))


# ----------------------------------------------------------------------------- cells ---

@dataclasses.dataclass(frozen=True)
class Cell:
  """One measurement: a query's model without `excluded` (method's top-K, or a random draw)."""
  query: str
  method: str
  k: int
  draw: int | None
  excluded: tuple[int, ...]

  @property
  def id(self) -> str:
    return f"{self.query}|{self.method}|K={self.k}" + (
        f"|draw={self.draw}" if self.draw is not None else "")


def random_order(index: np.ndarray, seed: int, draw: int) -> np.ndarray:
  """Draw `draw`'s random ordering of the dataset indices (its top-K is a random K-subset)."""
  return np.random.default_rng([seed, draw]).permutation(np.sort(np.asarray(index, np.int64)))


def make_cells(rankings: Mapping[str, Mapping[str, np.ndarray]], query_names: Sequence[str],
               ks: Sequence[int], *, index: np.ndarray, random_draws: int = 0,
               random_seed: int = 0) -> list[Cell]:
  """Every (query, method, K) cell, plus (query, random, K, draw) for the floor.

  rankings: method -> query name -> dataset indices, most influential first. A method named
    `RANDOM` here is an error: the floor is built from `random_draws`.
  """
  if RANDOM in rankings:
    raise ValueError(f"'{RANDOM}' is the random-removal floor (random_draws), not a ranking")
  n = np.asarray(index).size
  for k in ks:
    if not 0 < k < n:
      raise ValueError(f"K={k} must lie in (0, {n})")
  cells = []
  for q in query_names:
    for method in sorted(rankings):
      ranking = np.asarray(rankings[method][q], np.int64)
      for k in ks:
        cells.append(Cell(q, method, int(k), None, tuple(sorted(ranking[:k].tolist()))))
    for d in range(random_draws):
      order = random_order(index, random_seed, d)
      for k in ks:
        cells.append(Cell(q, RANDOM, int(k), d, tuple(sorted(order[:k].tolist()))))
  return cells


def safe_name(text: str) -> str:
  """A file name for an id: readable, plus a digest so distinct ids never collide."""
  return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)[:120] + "-" + scores_lib.settings_digest(
      text)[:8]


class ResultStore:
  """Finished cells, one JSON file each under `directory`, written atomically.

  A cell counts as done only with the expected fingerprint, so changing θ0, the recipe or the
  loss settings recomputes instead of mixing results.
  """

  def __init__(self, directory: str):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)

  def path(self, cell_id: str) -> str:
    return os.path.join(self.directory, safe_name(cell_id) + ".json")

  def get(self, cell_id: str, fingerprint: str) -> dict | None:
    path = self.path(cell_id)
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        row = json.load(f)
    except (OSError, ValueError):
      return None
    return row if row.get("fingerprint") == fingerprint and row.get("cell") == cell_id else None

  def put(self, row: dict) -> None:
    """Process 0 writes (every process computed the same row)."""
    if parallel.is_main_process():
      scores_lib.atomic_write_json(self.path(row["cell"]), row)


def cell_fingerprint(base_fingerprint: str, recipe_fp: str, loss: LossSettings,
                     excluded: Sequence[int], regenerate: bool, *, query: str = "",
                     features: Any = None) -> str:
  """What a stored cell's numbers depend on. `query` is the query's content digest
  (`generation.query_digest`): a query name reused for another image or prompt is measured
  again. `features` describes the ΔG feature extractor (its settings), None without one."""
  return scores_lib.settings_digest({"base": base_fingerprint, "recipe": recipe_fp,
                                     "loss": loss.definition(),
                                     "excluded": excluded_digest(excluded),
                                     "regenerate": regenerate, "query": query,
                                     "features": features})


def run_counterfactual(cells: Sequence[Cell], queries: Mapping[str, Query], *,
                       cache: ModelCache, base_params: Any, base_fingerprint: str,
                       apply_fn: Callable, schedule: NoiseSchedule, store: ResultStore,
                       loss: LossSettings = LossSettings(), regenerate: Regenerate | None = None,
                       feature_fn: FeatureFn | None = None, feature_key: Any = None,
                       log: Callable[[str], None] = print) -> list[dict]:
  """Measures every cell not yet in `store`; returns all rows, in `cells` order.

  Work is grouped by model (cells with the same excluded set share one retraining), models
  in order of their first cell. `feature_key`: the settings of `feature_fn` (JSON-able), part
  of each ΔG cell's fingerprint, so cells of another extractor are measured again.
  """
  digests = {q: generation.query_digest(query) for q, query in queries.items()}
  features = feature_key if (regenerate is not None and feature_fn is not None) else None
  fingerprints = {c.id: cell_fingerprint(base_fingerprint, cache.recipe_fingerprint, loss,
                                         c.excluded, regenerate is not None,
                                         query=digests[c.query], features=features)
                  for c in cells}
  todo = [c for c in cells if store.get(c.id, fingerprints[c.id]) is None]
  groups: dict[str, list[Cell]] = {}
  for c in todo:
    groups.setdefault(cache.key(c.excluded), []).append(c)
  log(f"counterfactual: {len(cells) - len(todo)}/{len(cells)} cells done; {len(todo)} to "
      f"measure with {len(groups)} models")
  base_loss: dict[str, float] = {}
  for g, (key, group) in enumerate(groups.items()):
    t0 = time.time()
    params = cache.params(group[0].excluded)
    t_train = time.time() - t0
    for c in group:
      t1 = time.time()
      query = queries[c.query]
      if c.query not in base_loss:
        base_loss[c.query] = query_loss(apply_fn, base_params, query, schedule, loss)
      without = query_loss(apply_fn, params, query, schedule, loss)
      row = {"cell": c.id, "fingerprint": fingerprints[c.id], "query": c.query,
             "method": c.method, "k": c.k, "draw": c.draw, "model": key,
             "excluded_digest": excluded_digest(c.excluded), "num_excluded": len(c.excluded),
             "loss_base": base_loss[c.query], "loss_without": without,
             "delta_loss": without - base_loss[c.query]}
      if regenerate is not None:
        image = regenerate(params, query)
        row["delta_g_mse"] = pixel_mse(image, query.image)
        if feature_fn is not None:
          row["delta_g_feature_cos"] = feature_cosine(feature_fn, image, query.image)
      row["seconds"] = {"train": t_train, "measure": time.time() - t1}
      store.put(row)
      t_train = 0.0
    log(f"counterfactual: model {g + 1}/{len(groups)} ({len(group)} cells: "
        f"{', '.join(c.id for c in group[:3])}{' ...' if len(group) > 3 else ''}) in "
        f"{time.time() - t0:.1f}s")
  return [store.get(c.id, fingerprints[c.id]) for c in cells]
