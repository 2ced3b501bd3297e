"""A whole training run as one compiled program: `lax.scan` of the train step over every step.

Same recipe as `loop.train`: the batches are `input_pipeline.batch_rows` for steps 0..S−1 (the
full run's order with the excluded items skipped and the rest slid up), computed on the host
before the run; the step is `trainer.make_train_step`'s own function; its randomness is
`fold_in(state.rng, state.step)`. What changes is execution only: one device call for the
whole run instead of one per step (no per-step batch assembly, transfer or dispatch), and the
program is compiled once per (network, recipe, N) and reused by every retraining of the
process, whatever it excludes. XLA fuses a step inside a loop differently from a step on its
own, so the weights differ from `loop.train`'s in the last bits (training amplifies that):
models trained here are cached under their own recipe fingerprint.

Exclusion: only the allowed rows are copied to the device; the excluded rows' slots of the
on-device table are zeros and no batch index points at them, so an excluded item's data never
leaves the host arrays, let alone reaches a gradient. The table keeps all N slots so that every
excluded set (any K) has the same shapes and shares one compiled program.

No checkpoints: a run is seconds to minutes of work, and an interrupted one is run again.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax.training import input_pipeline
from attrib_jax.training import loop
from attrib_jax.training import trainer

BATCH_KEYS = ("latents", "text_states", "num_captions")

# Compiled runs kept for reuse, keyed by the caller's model key and the recipe.
_PROGRAMS: dict[tuple, Callable] = {}


def run_rows(index: np.ndarray, excluded: Iterable[int], settings: loop.TrainSettings
             ) -> tuple[np.ndarray, np.ndarray]:
  """(allowed rows [R], every step's batch rows [S, B]): what `loop.train` would read."""
  rows = input_pipeline.allowed_rows(np.asarray(index), excluded)
  n = np.asarray(index).size
  batches = np.stack([input_pipeline.batch_rows(rows, settings.seed, step, settings.batch_size,
                                                num_rows=n)
                      for step in range(settings.num_steps)])
  return rows, batches


def device_table(arrays: dict, rows: np.ndarray) -> dict[str, np.ndarray]:
  """The batch arrays with only `rows` read from `arrays`; the other slots stay zero."""
  n = len(arrays["index"])
  read = input_pipeline.gather({k: arrays[k] for k in BATCH_KEYS}, rows)
  out = {}
  for k, v in read.items():
    table = np.zeros((n,) + v.shape[1:], v.dtype)
    table[rows] = v
    out[k] = table
  return out


def _program(apply_fn: Callable, schedule: Any, settings: loop.TrainSettings) -> tuple:
  """(optimizer, jit(run)): run(state, table, batches [S, B], null) -> (state, losses [S])."""
  optimizer = trainer.make_optimizer(settings.learning_rate, settings.warmup_steps,
                                     settings.weight_decay, settings.grad_clip_norm,
                                     lr_schedule=settings.lr_schedule,
                                     num_steps=settings.num_steps)
  step = trainer.make_train_step(apply_fn, schedule, optimizer, random_flip=settings.random_flip,
                                 caption_dropout=settings.caption_dropout,
                                 ema_decay=settings.ema_decay,
                                 min_snr_gamma=settings.min_snr_gamma, jit=False)

  def run(state, table, batches, null_text_states):
    def body(state, rows):
      batch = {k: jnp.take(v, rows, axis=0) for k, v in table.items()}
      state, metrics = step(state, batch, null_text_states)
      return state, metrics["loss"]
    return jax.lax.scan(body, state, batches)

  return optimizer, jax.jit(run, donate_argnums=0)


def train_scan(*, arrays: dict, apply_fn: Callable, init_params: Any, schedule: Any,
               settings: loop.TrainSettings, excluded: Iterable[int] = (),
               model_key: str | None = None, log: Callable[[str], None] = print
               ) -> trainer.TrainState:
  """Trains on the allowed rows of `arrays` for `settings.num_steps` steps in one program;
  returns the final state. `model_key` (as in `loop.train`) names `apply_fn` and `schedule`:
  with it, the compiled run is reused by later calls with the same recipe."""
  s = settings
  rows, batches = run_rows(np.asarray(arrays["index"]), excluded, s)
  key = (model_key, s.learning_rate, s.warmup_steps, s.weight_decay, s.grad_clip_norm,
         s.lr_schedule, s.num_steps, s.random_flip, s.caption_dropout, s.ema_decay,
         s.min_snr_gamma)
  entry = _PROGRAMS.get(key) if model_key is not None else None
  if entry is None:
    entry = _program(apply_fn, schedule, s)
    if model_key is not None:
      _PROGRAMS[key] = entry
  optimizer, program = entry
  state = trainer.init_state(init_params, optimizer, s.seed, use_ema=s.ema_decay is not None)
  table = device_table(arrays, rows)
  null = np.asarray(arrays["null_text_states"])
  log(f"train (scan): {rows.size} items ({len(arrays['index']) - rows.size} excluded), "
      f"{s.num_steps} steps of {s.batch_size} in one program")
  t0 = time.time()
  state, losses = program(state, table, batches.astype(np.int32), null)
  losses = np.asarray(jax.device_get(losses))
  log(f"train (scan): loss {losses[:max(1, s.num_steps // 10)].mean():.4f} first tenth, "
      f"{losses[-max(1, s.num_steps // 10):].mean():.4f} last tenth; "
      f"{s.num_steps / (time.time() - t0):.2f} steps/s")
  return state
