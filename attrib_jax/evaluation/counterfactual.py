"""Leave-K-out counterfactual evaluation (SPEC §3): remove a method's top-K, retrain, measure.

For each query, method and K the method's K most influential training items are removed and a
model is retrained from scratch on the rest with the same recipe and seed. Then

  ΔL = L(query, θ_without) − L(query, θ0)   the query's denoising loss at timesteps
       0, s, 2s, ... (stride s = 5 by default), `num_draws` noise draws per timestep, averaged;
       higher = the removed items mattered more;
  ΔG = how far the regenerated image (same prompt, same seed, same sampler) moved from the
       original query image: pixel MSE (pixels in [0, 1]; higher = more influence) and the
       cosine similarity of model-free features (lower = more influence).

Noise. The query's slot (draw d, timestep t) uses
    normal(fold_in(... fold_in(key(seed), w0), w1, w2, w3, d, t))
with w0..w3 the four words of a digest of the query's latent and text states
(`baselines.random.query_digest`): every model sees exactly the same noise for the same query
(common random numbers), whatever the batch layout, and different queries independent noise.
Per-slot losses are float32 (network at "highest" matmul precision); their mean and ΔL are
formed in float64.

Random removal is the floor: `random_draws` query-independent random orderings of the training
set (numpy PCG64 from (random_seed, draw)); draw d removes its first K items. Removal that does
not look at the query needs no per-query model, so the floor costs draws × |K| retrainings,
shared by every query; a query's random ΔL is the mean over the draws.

Retrained models are cached by a digest of (sorted excluded set, recipe fingerprint)
(`ModelCache`): methods that agree on a top-K, a rerun, and the LDS share them. The retraining
itself is a `TrainFn(excluded, workdir) -> params`; `recipe_train_fn` is the real one
(`training.recipe.run` in a workdir whose dataset and precomputed arrays are links to the base
run's), tests inject a fake.

Results are one JSON file per finished cell, written atomically (`ResultStore`); a rerun skips
every cell whose file carries the same fingerprint (θ0, recipe, loss settings, excluded set).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attrib_jax import generation
from attrib_jax import parallel
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.baselines import random as random_lib
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.diffusion import sampling
from attrib_jax.diffusion.schedules import NoiseSchedule
from attrib_jax.generation import Query
from attrib_jax.training import recipe

TrainFn = Callable[[np.ndarray, str], Any]        # (sorted excluded indices, workdir) -> params
Regenerate = Callable[[Any, Query], np.ndarray]   # (params, query) -> uint8 image [H, W, 3]
FeatureFn = Callable[[np.ndarray], np.ndarray]    # uint8 images [n, H, W, 3] -> [n, d]
RANDOM = "random"                                  # the method name of the random-removal floor


# ------------------------------------------------------------------- retrained models ---

def excluded_digest(excluded: Iterable[int]) -> str:
  return scores_lib.settings_digest(sorted(int(i) for i in excluded))


def model_key(excluded: Iterable[int], recipe_fingerprint: str) -> str:
  """The cache key of a retrained model: its excluded set and its training recipe."""
  return scores_lib.settings_digest({"excluded": sorted(int(i) for i in excluded),
                                     "recipe": recipe_fingerprint})


class JitClock:
  """Seconds JAX spent tracing, lowering and compiling (or loading from the persistent XLA
  cache), and the persistent cache's hits and misses, summed over the process.

  Every retraining builds its training step anew, so whether it recompiles or hits the cache
  decides a large part of its cost; `ModelCache` logs this per model. Fed by `jax.monitoring`
  events (listeners cannot be removed, so there is one clock per process: `jit_clock()`).
  """
  EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
            "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
            # Wraps the persistent-cache lookup too: on a hit, this is the load time.
            "/jax/core/compile/backend_compile_duration": "compile"}

  def __init__(self):
    self.totals = {name: 0.0 for name in self.EVENTS.values()}
    self.totals.update(cache_hits=0, cache_misses=0)

  def on_duration(self, event: str, seconds: float, **_) -> None:
    if event in self.EVENTS:
      self.totals[self.EVENTS[event]] += seconds

  def on_event(self, event: str, **_) -> None:
    if event.startswith("/jax/compilation_cache/cache_"):
      name = event.rsplit("/", 1)[-1]
      if name in self.totals:
        self.totals[name] += 1

  def snapshot(self) -> dict[str, float]:
    return dict(self.totals)

  @staticmethod
  def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}

  @staticmethod
  def describe(d: Mapping[str, float]) -> str:
    return (f"jit {d['trace'] + d['lower'] + d['compile']:.1f}s: trace {d['trace']:.1f}s, "
            f"lower {d['lower']:.1f}s, compile or cache load {d['compile']:.1f}s; persistent "
            f"cache {int(d['cache_hits'])} hits, {int(d['cache_misses'])} misses")


@functools.lru_cache(maxsize=1)
def jit_clock() -> JitClock:
  clock = JitClock()
  jax.monitoring.register_event_duration_secs_listener(clock.on_duration)
  jax.monitoring.register_event_listener(clock.on_event)
  return clock


def timed_train(train_fn: TrainFn, excluded: np.ndarray, workdir: str) -> tuple[Any, dict]:
  """`train_fn(excluded, workdir)` and what it cost: wall seconds and the JAX compile share
  (`JitClock.delta`'s fields)."""
  t0, jit0 = time.time(), jit_clock().snapshot()
  params = train_fn(excluded, workdir)
  return params, dict(JitClock.delta(jit0, jit_clock().snapshot()), seconds=time.time() - t0)


class ModelCache:
  """Models retrained without a set of items, one workdir per (excluded set, recipe).

  `params(excluded)` returns θ0 (`base_params`) for an empty set, else calls
  `train_fn(excluded, workdir)` (which reuses a finished model there) and keeps the last
  `keep_in_memory` parameter trees. With a `pool` (`retrain_pool.RetrainPool`), `prefetch`
  trains many models at once in its worker processes, and `params` only loads them.
  `trained` lists the keys of the models trained; `timings` has, per trained model, its wall
  seconds and its share of JAX compilation (`JitClock`), so a run's log and summary say what a
  retraining costs.
  """

  def __init__(self, root: str, recipe_fingerprint: str, train_fn: TrainFn, *,
               base_params: Any = None, keep_in_memory: int = 2, pool: Any = None,
               log: Callable[[str], None] = print):
    self.root, self.recipe_fingerprint, self.train_fn = root, recipe_fingerprint, train_fn
    self.base_params, self.keep, self.log = base_params, keep_in_memory, log
    self.pool = pool   # a `retrain_pool.RetrainPool` for `prefetch`, or None
    self._memory: collections.OrderedDict[str, Any] = collections.OrderedDict()
    self.trained: list[str] = []
    self.timings: list[dict[str, float]] = []

  def key(self, excluded: Iterable[int]) -> str:
    return model_key(excluded, self.recipe_fingerprint)

  def workdir(self, excluded: Iterable[int]) -> str:
    return os.path.join(self.root, self.key(excluded))

  def _new_workdir(self, excluded: np.ndarray) -> str:
    workdir = self.workdir(excluded)
    os.makedirs(workdir, exist_ok=True)
    scores_lib.atomic_write_json(os.path.join(workdir, "excluded.json"), {
        "recipe": self.recipe_fingerprint, "num_excluded": int(excluded.size),
        "excluded": excluded.tolist()})
    return workdir

  def prefetch(self, excluded_sets: Iterable[Iterable[int]]) -> None:
    """Trains, with the pool, every model of `excluded_sets` not yet on disk (no pool: nothing
    happens here and `params` trains each model when it is first asked for)."""
    if self.pool is None:
      return
    jobs = {}
    for excluded in excluded_sets:
      excluded = np.asarray(sorted(int(i) for i in excluded), np.int64)
      key = self.key(excluded)
      if excluded.size and key not in jobs and not os.path.exists(
          os.path.join(self.workdir(excluded), "model", "DONE.json")):
        jobs[key] = excluded
    if not jobs:
      return
    keys = list(jobs)
    how = (self.pool.describe(len(keys)) if hasattr(self.pool, "describe") else
           f"{min(self.pool.num_workers, len(keys))} worker processes")
    self.log(f"models: training {len(keys)} models in {how}")
    t0, finished = time.time(), []

    def done(n: int, timing: dict[str, float]) -> None:
      finished.append(n)
      self.trained.append(keys[n])
      self.timings.append({k: v for k, v in timing.items() if k != "worker"})
      self.log(f"models: {keys[n]} ({jobs[keys[n]].size} excluded) ready in "
               f"{timing['seconds']:.1f}s on worker {timing['worker']} "
               f"({JitClock.describe(timing)}); {len(finished)}/{len(keys)} in "
               f"{time.time() - t0:.0f}s")

    self.pool.train([(jobs[k], self._new_workdir(jobs[k])) for k in keys], on_done=done)

  def params(self, excluded: Iterable[int]) -> Any:
    excluded = np.asarray(sorted(int(i) for i in excluded), np.int64)
    if excluded.size == 0 and self.base_params is not None:
      return self.base_params
    key = self.key(excluded)
    if key in self._memory:
      self._memory.move_to_end(key)
      return self._memory[key]
    if self.pool is not None:
      # A pool's model must come from the pool (see `retrain_pool` on numerics); `train_fn`
      # then only loads it.
      self.prefetch([excluded])
      params = self.train_fn(excluded, self.workdir(excluded))
    else:
      params, timing = timed_train(self.train_fn, excluded, self._new_workdir(excluded))
      self.trained.append(key)
      self.timings.append(timing)
      self.log(f"models: {key} ({excluded.size} excluded) ready in {timing['seconds']:.1f}s "
               f"({JitClock.describe(timing)})")
    self._memory[key] = params
    while len(self._memory) > max(self.keep, 1):
      self._memory.popitem(last=False)
    return params


TRAINING_FREE_KEYS = tuple(sorted(recipe.NOT_TRAINING_KEYS))


def training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a retraining is run with: the recipe only.

  Blocks that do not change the trained weights (generation, attribution, evaluation, the name)
  are dropped, so changing them keeps the cached models valid, and sample grids are off (they
  cost time and do not change the weights).
  """
  out = copy.deepcopy(config)
  with out.unlocked():
    for key in TRAINING_FREE_KEYS:
      if key in out:
        del out[key]
    out.train.sample_every = 0
  return out


def recipe_fingerprint(config: ml_collections.ConfigDict, *, one_core: bool = False,
                       group_size: int = 0) -> str:
  """What a retrained model depends on: the recipe and, with `one_core`, that it was trained
  single-threaded (`retrain_pool`), or with `group_size`, in a vmapped group of that many
  models (`grouped_retrain`): either changes the weights' last bits."""
  if group_size:
    return recipe.fingerprint({"recipe": training_config(config).to_dict(),
                               "execution": f"vmapped group of {int(group_size)}"})
  if one_core:
    return recipe.fingerprint({"recipe": training_config(config).to_dict(),
                               "execution": "one core"})
  return recipe.fingerprint(training_config(config).to_dict())


# Settings that change speed or logging but not the trained weights.
_NUMERICALLY_IRRELEVANT = {("train", "sample_every"), ("train", "log_every"),
                           ("train", "checkpoint_every")}


def check_base_recipe(config: ml_collections.ConfigDict, base_workdir: str) -> None:
  """Refuses to compare against a θ0 trained with another recipe (or with exclusions)."""
  path = os.path.join(base_workdir, "model", "DONE.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No trained model in {base_workdir}/model: run launch.train first")
  with open(path) as f:
    settings = json.load(f)["settings"]
  if settings["excluded"]:
    raise ValueError(f"the base model in {base_workdir} was trained with "
                     f"{len(settings['excluded'])} items excluded; θ0 must be trained on "
                     "everything")
  ours = training_config(config).to_dict()
  base = {k: v for k, v in settings["config"].items() if k not in TRAINING_FREE_KEYS}
  def flat(tree, prefix=()):
    if not isinstance(tree, dict):
      return {prefix: tree}
    return {p: v for k, sub in tree.items() for p, v in flat(sub, prefix + (k,)).items()}

  # Through JSON, so tuples and lists (as DONE.json stores them) compare equal.
  a, b = flat(json.loads(json.dumps(ours))), flat(json.loads(json.dumps(base)))
  differ = sorted(".".join(p) for p in set(a) | set(b)
                  if p not in _NUMERICALLY_IRRELEVANT and a.get(p) != b.get(p))
  if differ:
    raise ValueError(f"the base model in {base_workdir} was trained with other settings: "
                     f"{differ}; evaluate with the config it was trained with")


def _link(target: str, link: str) -> None:
  """A relative link, so a workdir that is moved or copied whole still reads its own data."""
  if os.path.lexists(link):
    if os.path.islink(link) and os.path.realpath(link) == os.path.realpath(target):
      return
    raise FileExistsError(f"{link} exists and is not a link to {target}")
  os.symlink(os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(link))),
             link)


def link_shared_data(data_workdir: str, workdir: str) -> None:
  """Makes `workdir` read the dataset, precomputed arrays and frozen text side (and VAE) of
  `data_workdir`, so `recipe.run` there skips every stage but training.

  `recipe.prepare` finds tfds/ already built, the text encoder present and the precomputed
  arrays complete with a matching fingerprint, and writes nothing into the linked directories.
  """
  _link_dataset_and_text_side(data_workdir, workdir)
  _link(os.path.join(data_workdir, "precomputed"), os.path.join(workdir, "precomputed"))


def _link_dataset_and_text_side(source_workdir: str, workdir: str) -> None:
  """Links tfds/ and the frozen model components (text encoder, tokenizer, VAE) of
  `source_workdir` into `workdir`, and copies its pixel codec."""
  os.makedirs(os.path.join(workdir, "model"), exist_ok=True)
  _link(os.path.join(source_workdir, "tfds"), os.path.join(workdir, "tfds"))
  for name in ("text_encoder", "tokenizer", "vae"):
    source = os.path.join(source_workdir, "model", name)
    if os.path.isdir(source):
      _link(source, os.path.join(workdir, "model", name))
  codec = os.path.join(source_workdir, "model", "pixel_codec.json")
  if os.path.exists(codec):
    shutil.copyfile(codec, os.path.join(workdir, "model", "pixel_codec.json"))


def recipe_train_fn(config: ml_collections.ConfigDict, data_workdir: str, *,
                    keep_checkpoints: bool = False,
                    log: Callable[[str], None] = print) -> TrainFn:
  """The real `TrainFn`: `recipe.run(training_config(config), workdir, excluded=...)`.

  The workdir's dataset and precomputed arrays are links to `data_workdir`'s (the base run,
  whose precompute fingerprint includes `config.seed`, so a retraining with another seed needs
  a data workdir of its own: see `prepare_data_workdir`). Training checkpoints are deleted once
  the model is written unless `keep_checkpoints`.
  """
  from attrib_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  train_config = training_config(config)

  def train(excluded: np.ndarray, workdir: str) -> Any:
    link_shared_data(data_workdir, workdir)
    model_dir = recipe.run(train_config, workdir, excluded=excluded, log=log)
    if not keep_checkpoints:
      shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
    _, params, _ = unet_lib.load_unet(os.path.join(model_dir, "unet"))
    return params

  return train


def prepare_data_workdir(config: ml_collections.ConfigDict, base_workdir: str, directory: str,
                         log: Callable[[str], None] = print) -> str:
  """A data workdir for `config` (e.g. another training seed) sharing the base's dataset and
  text side; its arrays are precomputed once, here, and linked by every model of that seed."""
  _link_dataset_and_text_side(base_workdir, directory)
  recipe.prepare(training_config(config), directory, log=log)
  return directory


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


# --------------------------------------------------------------------------- summary ---

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
