"""Retrained models for the counterfactual evaluation: a cache of models trained without a set
of items, the recipe they are retrained with, and what each retraining costs.

Contract: `ModelCache.params(excluded)` is the model trained from scratch without `excluded`
with the base run's recipe and seed (θ0 for an empty set); the first time it is asked for, a
`TrainFn(excluded, workdir) -> params` trains it (`recipe_train_fn`, the real one, runs
`training.recipe.run` in a workdir whose dataset and precomputed arrays are links to the base
run's, `link_shared_data`; tests inject a fake), or `prefetch` trains many at once in a pool.
`timed_train` and `JitClock` record each retraining's wall seconds and JAX compile share.

Invariants: a model's workdir is named by a digest of (sorted excluded set, recipe fingerprint)
(`model_key`), so methods that agree on a top-K, a rerun and the LDS share one model; whatever
changes the trained weights (the recipe, one-core or vmapped-group execution:
`recipe_fingerprint`) trains anew, and blocks that do not (generation, attribution, evaluation:
dropped by `training_config`) keep the cache valid. `check_base_recipe` refuses a θ0 trained
with another recipe or with exclusions.
"""
from __future__ import annotations

import collections
import copy
import functools
import json
import os
import shutil
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_collections
import numpy as np

from attrib_jax.attribution import scores as scores_lib
from attrib_jax.training import recipe

TrainFn = Callable[[np.ndarray, str], Any]        # (sorted excluded indices, workdir) -> params


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
  a data workdir of its own: see `prepare_data_workdir`). No training checkpoints are written
  (and the run's train/ folder is deleted once the model is) unless `keep_checkpoints`.
  """
  from attrib_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  train_config = training_config(config)

  def train(excluded: np.ndarray, workdir: str) -> Any:
    link_shared_data(data_workdir, workdir)
    model_dir = recipe.run(train_config, workdir, excluded=excluded, log=log,
                           checkpoints=keep_checkpoints)
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
