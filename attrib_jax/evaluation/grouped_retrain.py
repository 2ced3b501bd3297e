"""Leave-K-out retrainings M at a time in one program (`training.grouped`), for `ModelCache`.

`GroupedRetrainer` has the retrain pool's interface (`train(jobs, on_done)`), so
`model_cache.ModelCache.prefetch` hands it the models it needs; each finished model is
written exactly as `recipe.run` writes one (workdir/model/unet, DONE.json with the same
fingerprint, the shared data linked), so `recipe_train_fn` later just loads it and everything
downstream is unchanged. Checkpoints are not written: a group is retrained whole if stopped.

Numerics. A grouped model is the same recipe as a single-model retraining (same batches, same
random draws, same update), but vmapped kernels sum in their own order, so its last bits
differ; grouped models are cached under their own fingerprint
(`model_cache.recipe_fingerprint(..., group_size=M)`). Every group has exactly M models (a
short last group is padded with copies of its last job, whose results are dropped), so every
model comes out of the same compiled program whatever the number of jobs.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.evaluation import model_cache as cache_lib
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.models import unet as unet_lib
from attrib_jax.training import grouped
from attrib_jax.training import recipe
from attrib_jax.training import trainer


def done_record(config: ml_collections.ConfigDict, excluded: Sequence[int]) -> dict:
  """The DONE.json `recipe.run(config, ..., excluded=excluded)` writes (`recipe.run` reuses a
  model whose record carries this fingerprint; tests check the two agree)."""
  settings = {"config": config.to_dict(), "excluded": sorted(int(i) for i in excluded)}
  trained_with = {"config": {k: v for k, v in settings["config"].items()
                             if k not in recipe.NOT_TRAINING_KEYS},
                  "excluded": settings["excluded"], "data_version": recipe.dataset_version(config)}
  return {"fingerprint": recipe.fingerprint(trained_with), "settings": settings}


class GroupedRetrainer:
  """Trains (excluded set, workdir) jobs with the recipe of `config`, `group_size` at a time.

  `config` is the full experiment config and `data_workdir` the run whose dataset and
  precomputed arrays the retrainings link to (as for `model_cache.recipe_train_fn`). On
  several devices the models axis is split over them when `group_size` is a multiple of
  their number; otherwise the group runs on one device.
  """

  def __init__(self, config: ml_collections.ConfigDict, data_workdir: str, *, group_size: int,
               log: Callable[[str], None] = print):
    if group_size < 1:
      raise ValueError(f"GroupedRetrainer needs a group of at least one model, got {group_size}")
    self.config, self.data_workdir, self.group_size, self.log = (
        cache_lib.training_config(config), data_workdir, group_size, log)
    self._program = None

  def describe(self, num_models: int) -> str:
    return (f"{-(-num_models // self.group_size)} groups of {self.group_size} models in one "
            "vmapped program")

  def _setup(self, workdir: str) -> dict:
    """Arrays, model and the compiled group step, built once for every group."""
    c, t = self.config, self.config.train
    _, arrays, _ = recipe.prepare(c, workdir, log=self.log)
    unet_config = dict(c.unet.to_dict())
    unet, init_params = unet_lib.init_unet(unet_config, jax.random.key(c.seed))
    apply_fn = lambda p, x, ts, cc: unet.apply({"params": p}, x, ts, cc)
    schedule = pipeline_lib.schedules.NoiseSchedule.from_config(c.scheduler.to_dict())
    # As recipe.run builds the single-model step.
    optimizer = trainer.make_optimizer(t.learning_rate, t.warmup_steps, t.weight_decay,
                                       t.grad_clip_norm, lr_schedule=t.get("lr_schedule",
                                                                           "constant"),
                                       num_steps=t.num_steps)
    options = dict(random_flip=t.random_flip, caption_dropout=t.caption_dropout,
                   ema_decay=t.ema_decay, min_snr_gamma=t.get("min_snr_gamma") or None)
    # Several devices: each trains whole models (no cross-device reduction), when the group
    # splits evenly over them; otherwise the group stays on one device.
    devices = len(jax.devices())
    mesh = (parallel.make_mesh(devices) if devices > 1 and self.group_size % devices == 0
            else None)
    step_fn = grouped.make_group_step(apply_fn, schedule, optimizer, mesh=mesh, **options)
    return dict(arrays=arrays, apply_fn=apply_fn, init_params=init_params, schedule=schedule,
                optimizer=optimizer, options=options, mesh=mesh, step_fn=step_fn,
                unet_config=unet_config)

  def _write(self, workdir: str, excluded: Sequence[int], params: Any, unet_config: dict) -> None:
    model_dir = os.path.join(workdir, "model")
    pipeline_lib.save_unet(os.path.join(model_dir, "unet"), params, unet_config)
    record = dict(done_record(self.config, excluded),
                  execution={"grouped": self.group_size})   # provenance only; not read back
    io_utils.atomic_write_json(os.path.join(model_dir, "DONE.json"), record)

  def train(self, jobs: Sequence[tuple[Sequence[int], str]],
            on_done: Callable[[int, dict[str, float]], None] | None = None
            ) -> list[dict[str, float]]:
    """Runs every job; returns their timings in job order (a group's wall seconds and JAX
    compile share, split evenly over its models; `worker` is the group's number).

    `on_done(job number, timing)` is called as each group finishes, in job order.
    """
    timings: list[dict[str, float]] = []
    t = self.config.train
    for g, start in enumerate(range(0, len(jobs), self.group_size)):
      chunk = list(jobs[start:start + self.group_size])
      t0, jit0 = time.time(), cache_lib.jit_clock().snapshot()
      for excluded, workdir in chunk:
        cache_lib.link_shared_data(self.data_workdir, workdir)
        recipe.prepare(self.config, workdir, log=lambda _: None)  # scheduler, model index
      if self._program is None:
        self._program = self._setup(chunk[0][1])
      p = self._program
      sets = [list(e) for e, _ in chunk]
      sets += [sets[-1]] * (self.group_size - len(sets))
      states = grouped.train_group(
          arrays=p["arrays"], apply_fn=p["apply_fn"], init_params=p["init_params"],
          schedule=p["schedule"], excluded_sets=sets, optimizer=p["optimizer"],
          num_steps=t.num_steps, batch_size=t.batch_size, seed=self.config.seed,
          use_ema=t.ema_decay is not None, step_fn=p["step_fn"], mesh=p["mesh"],
          log_every=t.log_every, log=self.log, **p["options"])
      states = jax.device_get(states)
      for m, (excluded, workdir) in enumerate(chunk):
        state = grouped.model_state(states, m)
        params = state.ema_params if state.ema_params is not None else state.params
        self._write(workdir, excluded, params, p["unet_config"])
      cost = cache_lib.JitClock.delta(jit0, cache_lib.jit_clock().snapshot())
      cost["seconds"] = time.time() - t0
      for m in range(len(chunk)):
        timing = {k: v / len(chunk) for k, v in cost.items()}
        timing["worker"] = g
        timings.append(timing)
        if on_done is not None:
          on_done(start + m, timing)
    return timings
