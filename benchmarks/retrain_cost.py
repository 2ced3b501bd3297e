"""Where a leave-K-out retraining's time goes, and what one compiled run saves.

  taskset -c 0 .venv/bin/python benchmarks/retrain_cost.py --workdir=$W --config=configs/tiny_eval.py

Runs, back to back in this process (pin it to one core, as the evaluation's workers are):
`model_cache.recipe_train_fn` (recipe.run: a jitted step per training step, checkpoints) and
`scan_retrain.scan_train_fn` (one lax.scan over every step), each on the same `--models`
random leave-K-out sets, and prints per model the wall seconds and JAX's compile share
(`JitClock`), then the steady-state models per minute of each. Also times the bare step: the
jitted step alone on pre-assembled batches (compute only).
"""
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from attrib_jax.data import precompute
from attrib_jax.evaluation import model_cache as cache_lib
from attrib_jax.evaluation import scan_retrain
from attrib_jax.models import unet as unet_lib
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.training import input_pipeline
from attrib_jax.training import loop
from attrib_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (its data is linked).")
_MODELS = flags.DEFINE_integer("models", 3, "Models per path.")
_K = flags.DEFINE_integer("k", 12, "Items excluded per model.")
_PATHS = flags.DEFINE_list("paths", ["recipe", "scan"], "Which paths to time.")


def bare_step_seconds(config, workdir, steps=50):
  c = cache_lib.training_config(config)
  arrays = precompute.load(os.path.join(workdir, "precomputed"))
  unet, params = unet_lib.init_unet(dict(c.unet.to_dict()), jax.random.key(c.seed))
  apply_fn = lambda p, x, ts, cc: unet.apply({"params": p}, x, ts, cc)
  schedule = pipeline_lib.schedules.NoiseSchedule.from_config(c.scheduler.to_dict())
  s = loop.TrainSettings.from_config(c)
  opt = trainer.make_optimizer(s.learning_rate, s.warmup_steps, s.weight_decay,
                               s.grad_clip_norm, lr_schedule=s.lr_schedule,
                               num_steps=s.num_steps)
  step = trainer.make_train_step(apply_fn, schedule, opt, random_flip=s.random_flip,
                                 caption_dropout=s.caption_dropout, ema_decay=s.ema_decay,
                                 min_snr_gamma=s.min_snr_gamma)
  state = trainer.init_state(params, opt, s.seed, use_ema=s.ema_decay is not None)
  rows = np.arange(len(arrays["index"]))
  keys = ("latents", "text_states", "num_captions")
  batches = [jax.device_put(input_pipeline.gather({k: arrays[k] for k in keys},
                                                  input_pipeline.batch_rows(rows, 0, i,
                                                                            s.batch_size)))
             for i in range(steps)]
  null = np.asarray(arrays["null_text_states"])
  state, m = step(state, batches[0], null)
  jax.block_until_ready(m)
  t0 = time.time()
  for b in batches:
    state, m = step(state, b, null)
  jax.block_until_ready(m)
  return (time.time() - t0) / steps


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  index = np.asarray(precompute.load(os.path.join(workdir, "precomputed"))["index"])
  rng = np.random.default_rng(0)
  sets = [np.sort(rng.choice(index, _K.value, replace=False)) for _ in range(_MODELS.value)]
  print(f"cores usable: {sorted(os.sched_getaffinity(0))}; load {os.getloadavg()}", flush=True)
  step_s = bare_step_seconds(config, workdir)
  print(f"bare jitted step (batch {config.train.batch_size}): {step_s * 1e3:.1f} ms; "
        f"x {config.train.num_steps} steps = {step_s * config.train.num_steps:.1f} s", flush=True)
  quiet = lambda _: None
  fns = {"recipe": cache_lib.recipe_train_fn(config, workdir, log=quiet),
         "scan": scan_retrain.scan_train_fn(config, workdir, log=quiet)}
  root = tempfile.mkdtemp(prefix="retrain_cost_")
  try:
    for path in _PATHS.value:
      secs = []
      for n, excluded in enumerate(sets):
        d = os.path.join(root, f"{path}{n}")
        os.makedirs(d)
        _, timing = cache_lib.timed_train(fns[path], excluded, d)
        secs.append(timing["seconds"])
        print(f"{path} model {n}: {timing['seconds']:.1f} s ({cache_lib.JitClock.describe(timing)})",
              flush=True)
      steady = np.mean(secs[1:]) if len(secs) > 1 else secs[0]
      print(f"{path}: first {secs[0]:.1f} s, then {steady:.1f} s per model = "
            f"{60 / steady:.2f} models/min on this core", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
