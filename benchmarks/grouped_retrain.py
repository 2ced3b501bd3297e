r"""Retraining throughput: the grouped trainer (M models in one vmapped program) against the
retrain pool (one single-core worker process per core), same machine, one run.

  python benchmarks/grouped_retrain.py                       # configs/tiny_eval.py's recipe
  python benchmarks/grouped_retrain.py --group_sizes 4 8 16 --pool_jobs 4 --num_steps 500

Both train leave-K-out models (K = 6 random items each) of configs/tiny_eval.py (256 items,
batch 16, `--num_steps` steps) on its precomputed arrays (prepared once in --data_dir). Each
method is warmed up first (the pool: a job that fills the persistent XLA cache its workers load
from; the grouped trainer: one step, which compiles its program), then timed over fresh jobs:
models per minute = models / wall seconds, spawn, cache loads and model writing included.
Printed: each method's rate and its ratio to the pool's.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from attrib_jax.evaluation import counterfactual as cf  # pylint: disable=g-import-not-at-top
from attrib_jax.evaluation import grouped_retrain  # pylint: disable=g-import-not-at-top
from attrib_jax.evaluation import retrain_pool  # pylint: disable=g-import-not-at-top
from attrib_jax.training import grouped  # pylint: disable=g-import-not-at-top
from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
from configs import tiny_eval  # pylint: disable=g-import-not-at-top


def _jobs(root: str, name: str, count: int, num_items: int, rng) -> list:
  return [(sorted(rng.choice(num_items, 6, replace=False).tolist()),
           os.path.join(root, f"{name}{j}")) for j in range(count)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--group_sizes", type=int, nargs="+", default=[4, 8, 16])
  parser.add_argument("--pool_jobs", type=int, default=4, help="timed pool jobs")
  parser.add_argument("--pool_workers", type=int, default=0, help="0: one per core")
  parser.add_argument("--num_steps", type=int, default=0, help="0: the config's (500)")
  parser.add_argument("--data_dir", default="", help="default: a temporary directory")
  args = parser.parse_args()

  config = tiny_eval.get_config()
  if args.num_steps:
    config.train.num_steps = args.num_steps
  out = tempfile.mkdtemp(prefix="grouped_retrain_")
  data_dir = args.data_dir or os.path.join(out, "data")
  recipe.prepare(cf.training_config(config), data_dir, log=lambda s: None)
  num_items = config.world.num_items
  rng = np.random.default_rng(0)
  workers = args.pool_workers or len(retrain_pool.usable_cores())
  print(f"recipe: configs/tiny_eval.py, {num_items} items, {config.train.num_steps} steps of "
        f"{config.train.batch_size}; {len(retrain_pool.usable_cores())} cores, JAX backend "
        f"{jax.default_backend()}", flush=True)

  rates = {}
  pool = retrain_pool.RetrainPool(config, data_dir, num_workers=workers,
                                  compilation_cache=os.path.join(out, "xla_cache"))
  pool.train(_jobs(out, "pool_warm", 1, num_items, rng))
  jobs = _jobs(out, "pool", args.pool_jobs, num_items, rng)
  t0 = time.time()
  pool.train(jobs)
  seconds = time.time() - t0
  rates["pool"] = len(jobs) / seconds * 60
  print(f"retrain pool, {workers} workers: {len(jobs)} models in {seconds:.1f}s = "
        f"{rates['pool']:.2f} models/min", flush=True)

  for m in args.group_sizes:
    trainer = grouped_retrain.GroupedRetrainer(config, data_dir, group_size=m,
                                               log=lambda s: None)
    jobs = _jobs(out, f"group{m}_", m, num_items, rng)
    t0 = time.time()
    cf.link_shared_data(data_dir, jobs[0][1])   # the shared arrays, as `trainer.train` links them
    program = trainer._setup(jobs[0][1])   # pylint: disable=protected-access
    states = grouped.stack_states(grouped.trainer.init_state(
        program["init_params"], program["optimizer"], config.seed, False), m)
    batches = grouped.gather_group(program["arrays"], np.zeros((m, config.train.batch_size),
                                                               np.int64))
    jax.block_until_ready(program["step_fn"](states, batches,
                                             np.asarray(program["arrays"]["null_text_states"])))
    compile_s = time.time() - t0
    trainer._program = program   # pylint: disable=protected-access
    t0 = time.time()
    trainer.train(jobs)
    seconds = time.time() - t0
    rates[m] = m / seconds * 60
    print(f"grouped, M={m}: {m} models in {seconds:.1f}s (+{compile_s:.1f}s set-up and "
          f"compile) = {rates[m]:.2f} models/min, {rates[m] / rates['pool']:.2f}x the pool",
          flush=True)
  print("summary (models/min): " + ", ".join(
      f"{'pool' if k == 'pool' else f'M={k}'} {v:.2f}" for k, v in rates.items()))


if __name__ == "__main__":
  main()
