"""Leave-K-out retrainings in parallel worker processes, each pinned to one CPU core.

Why. The evaluation's retrainings are independent, and a small model's train step is hundreds
of tiny kernels: XLA:CPU spreads each over the cores with little gain. Measured on the 2-core
machine (`configs/tiny_eval.py`, batch 16): one process using both cores runs a step in ~36 ms,
one process pinned to one core in ~42 ms, and two pinned processes side by side in ~45 ms each,
so two models train in the time of ~1.25 models: 1.6x the retraining throughput.

Numerics. A one-core process runs every kernel single-threaded, so a retraining's weights do
not depend on how many workers there are, which worker took the job, or the machine's core
count. They do differ in the last bits from a multi-threaded in-process training (and training
amplifies that), so the pool's models are cached under a recipe fingerprint of their own
(`model_cache.recipe_fingerprint(..., one_core=True)`).

Workers are started with the "spawn" method (a forked JAX runtime is unsafe) and each trains the
jobs it is handed through `model_cache.recipe_train_fn`, reusing its compiled train step
across jobs. A failed job raises here with the worker's error; finished models stay on disk.
On accelerators there is nothing to gain: `default_num_workers` is 0 there (train in-process).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

_WORKER: dict[str, Any] = {}


def usable_cores() -> list[int]:
  """The CPU cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def default_num_workers() -> int:
  """One worker per usable core when JAX computes on the CPU; 0 (in-process) otherwise."""
  return len(usable_cores()) if jax.default_backend() == "cpu" else 0


def _die_with_parent(parent_pid: int) -> None:
  """A worker must not outlive the evaluation (killed, it would go on training queued jobs)."""
  if sys.platform.startswith("linux"):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG: SIGTERM when the parent exits
  if os.getppid() != parent_pid:    # the parent died before that took effect
    os._exit(1)


def _start_worker(config: ml_collections.ConfigDict, data_workdir: str, keep_checkpoints: bool,
                  compilation_cache: str | None, counter, cores: Sequence[int],
                  parent_pid: int) -> None:
  _die_with_parent(parent_pid)
  with counter.get_lock():
    number = counter.value
    counter.value += 1
  if hasattr(os, "sched_setaffinity"):
    # Before JAX creates its CPU client, which sizes its thread pool from the affinity.
    os.sched_setaffinity(0, {cores[number % len(cores)]})
  # One core is one device: fake host devices (the tests' XLA_FLAGS) would split each batch
  # across "devices" on the same core, and change the numbers.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags)
  if compilation_cache:
    jax.config.update("jax_compilation_cache_dir", compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from attrib_jax import console  # pylint: disable=g-import-not-at-top
  from attrib_jax.evaluation import model_cache as cache_lib  # pylint: disable=g-import-not-at-top
  console.quiet()   # a worker is an entry point of its own: the launcher's filters are not here

  def log(line: str) -> None:
    print(f"[retrain worker {number}] {line}", file=sys.stderr, flush=True)

  _WORKER.update(number=number, train=cache_lib.recipe_train_fn(
      config, data_workdir, keep_checkpoints=keep_checkpoints, log=log))


def _train_job(excluded: list[int], workdir: str) -> dict[str, float]:
  from attrib_jax.evaluation import model_cache as cache_lib  # pylint: disable=g-import-not-at-top
  _, timing = cache_lib.timed_train(_WORKER["train"], np.asarray(excluded, np.int64), workdir)
  return dict(timing, worker=_WORKER["number"])


class RetrainPool:
  """Trains (excluded set, workdir) jobs with the recipe of `config` in `num_workers` processes.

  `config` is the full experiment config (as for `model_cache.recipe_train_fn`) and
  `data_workdir` the run whose dataset and precomputed arrays the retrainings link to.
  """

  def __init__(self, config: ml_collections.ConfigDict, data_workdir: str, *, num_workers: int,
               keep_checkpoints: bool = False, compilation_cache: str | None = None):
    if num_workers < 1:
      raise ValueError(f"RetrainPool needs at least one worker, got {num_workers}")
    self.config, self.data_workdir = config, data_workdir
    self.num_workers, self.keep_checkpoints = num_workers, keep_checkpoints
    self.compilation_cache = compilation_cache

  def train(self, jobs: Sequence[tuple[Sequence[int], str]],
            on_done: Callable[[int, dict[str, float]], None] | None = None
            ) -> list[dict[str, float]]:
    """Runs every job; returns their timings (seconds, JAX compile share, worker) in job order.

    `on_done(job number, timing)` is called as each finishes (in completion order).
    """
    if not jobs:
      return []
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    timings: list[dict[str, float] | None] = [None] * len(jobs)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(self.num_workers, len(jobs)), mp_context=context,
        initializer=_start_worker,
        initargs=(self.config, self.data_workdir, self.keep_checkpoints,
                  self.compilation_cache, counter, usable_cores(), os.getpid())) as executor:
      futures = {executor.submit(_train_job, [int(i) for i in excluded], workdir): n
                 for n, (excluded, workdir) in enumerate(jobs)}
      try:
        for future in concurrent.futures.as_completed(futures):
          n = futures[future]
          timings[n] = future.result()
          if on_done is not None:
            on_done(n, timings[n])
      except BaseException:
        for future in futures:
          future.cancel()
        raise
    return timings
