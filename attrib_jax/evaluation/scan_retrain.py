"""Leave-K-out retraining with the whole run as one compiled program (`training.scan_train`).

Contract: `scan_train_fn(config, data_workdir)` is a `model_cache.TrainFn`, like
`model_cache.recipe_train_fn`: it links the base run's dataset and precomputed arrays into the
model's workdir, trains the recipe of `config` without the excluded items and writes the model
exactly where and as `recipe.run` does (workdir/model/unet, DONE.json with `recipe.run`'s
fingerprint, so `recipe.run` and `recipe_train_fn` load it as finished). The network, schedule
and compiled run are built once per train function and reused by every model it trains.

Invariant: same recipe as `recipe.run` (same batches, step, randomness), other execution, so
its models carry `model_cache.recipe_fingerprint(..., scan=True)` and are cached apart.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from attrib_jax import io_utils
from attrib_jax.data import precompute
from attrib_jax.evaluation import grouped_retrain
from attrib_jax.evaluation import model_cache as cache_lib
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.models import unet as unet_lib
from attrib_jax.training import loop
from attrib_jax.training import recipe
from attrib_jax.training import scan_train


def scan_train_fn(config: ml_collections.ConfigDict, data_workdir: str, *,
                  log: Callable[[str], None] = print) -> cache_lib.TrainFn:
  c = cache_lib.training_config(config)
  setup: dict[str, Any] = {}

  def train(excluded: np.ndarray, workdir: str) -> Any:
    cache_lib.link_shared_data(data_workdir, workdir)
    model_dir = os.path.join(workdir, "model")
    done = os.path.join(model_dir, "DONE.json")
    record = grouped_retrain.done_record(c, excluded)
    if os.path.exists(done):
      with open(done) as f:
        if json.load(f)["fingerprint"] == record["fingerprint"]:
          return unet_lib.load_unet(os.path.join(model_dir, "unet"))[1]
    recipe.prepare(c, workdir, log=lambda _: None)   # scheduler, model index (all linked)
    if not setup:
      unet_config = dict(c.unet.to_dict())
      unet, init_params = unet_lib.init_unet(unet_config, jax.random.key(c.seed))
      setup.update(
          arrays=precompute.load(os.path.join(data_workdir, "precomputed")),
          apply_fn=lambda p, x, ts, cc: unet.apply({"params": p}, x, ts, cc),
          init_params=init_params, unet_config=unet_config,
          schedule=pipeline_lib.schedules.NoiseSchedule.from_config(c.scheduler.to_dict()),
          model_key=json.dumps({"unet": unet_config, "scheduler": c.scheduler.to_dict()},
                               sort_keys=True, default=str))
    state = scan_train.train_scan(
        arrays=setup["arrays"], apply_fn=setup["apply_fn"], init_params=setup["init_params"],
        schedule=setup["schedule"], settings=loop.TrainSettings.from_config(c),
        excluded=excluded, model_key=setup["model_key"], log=log)
    params = jax.device_get(state.ema_params if state.ema_params is not None else state.params)
    pipeline_lib.save_unet(os.path.join(model_dir, "unet"), params, setup["unet_config"])
    io_utils.atomic_write_json(done, dict(record, execution="scan"))
    return params

  return train
