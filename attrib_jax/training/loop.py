"""The training loop: one readable run from arrays to a checkpointed model.

mesh -> allowed rows -> state (fresh or restored) -> jitted sharded step -> progress, periodic
sample grids, Orbax checkpoints. Interrupting and rerunning continues from the last checkpoint
and ends with the same parameters as an uninterrupted run: batches are a pure function of the
step (`input_pipeline`), the step's randomness a pure function of (seed, step).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp

from attrib_jax import parallel
from attrib_jax.training import input_pipeline
from attrib_jax.training import trainer


# Jitted steps kept for reuse, keyed by `model_key` and the step's settings (see `train`).
_STEP_FNS: dict[tuple, Callable] = {}


def _checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep))


class CheckpointError(ValueError):
  """A training checkpoint that cannot be restored: names its folder."""


def _restore(manager: ocp.CheckpointManager, abstract: Any) -> trainer.TrainState:
  """The latest checkpoint, or a CheckpointError naming it and what to do.

  Orbax commits a checkpoint by renaming its folder, so a killed save leaves no half-written
  step behind; a step that fails to read was damaged afterwards (a truncated copy, a full disk)
  or was written by another model or optimizer. Orbax then raises whatever its storage layer hit
  (a JSON, tensorstore or tree-structure error, naming neither the step nor the folder).
  Nothing is deleted here: the user decides whether to fall back to an earlier step.
  """
  step = manager.latest_step()
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-except
    folder = os.path.join(str(manager.directory), str(step))
    earlier = [s for s in manager.all_steps() if s != step]
    fallback = (f"delete {folder} to resume from step {max(earlier)}" if earlier else
                f"delete {manager.directory} to train from the start")
    raise CheckpointError(
        f"cannot restore the training checkpoint {folder} (step {step}): it is damaged or "
        f"truncated, or holds another model's or optimizer's state ({type(e).__name__}: "
        f"{str(e)[:300]}); {fallback}") from e


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The training recipe: the optimiser, the step's randomness and the loss, and how often
  `train` logs, samples and checkpoints. `from_config` reads a config's `train` block."""
  num_steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int = 0
  lr_schedule: str = "constant"
  weight_decay: float = 0.0
  grad_clip_norm: float | None = 1.0
  seed: int = 0
  random_flip: bool = True
  caption_dropout: float = 0.1
  ema_decay: float | None = None
  min_snr_gamma: float | None = None
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  log_every: int = 50
  sample_every: int = 0

  @classmethod
  def from_config(cls, config) -> "TrainSettings":
    """From a whole config: its `train` block and its `seed`."""
    t = config.train
    return cls(num_steps=t.num_steps, batch_size=t.batch_size, learning_rate=t.learning_rate,
               warmup_steps=t.warmup_steps, lr_schedule=t.get("lr_schedule", "constant"),
               weight_decay=t.weight_decay, grad_clip_norm=t.grad_clip_norm, seed=config.seed,
               random_flip=t.random_flip, caption_dropout=t.caption_dropout,
               ema_decay=t.ema_decay,
               min_snr_gamma=t.get("min_snr_gamma") or None,  # 0 or absent: off
               checkpoint_every=t.checkpoint_every, log_every=t.log_every,
               sample_every=t.sample_every)


def train(*, arrays: dict, apply_fn: Callable, init_params: Any, schedule: Any,
          workdir: str, settings: TrainSettings, excluded: Iterable[int] = (),
          sample_fn: Callable[[Any, int], None] | None = None, mesh=None,
          stop_after: int | None = None, model_key: str | None = None,
          log: Callable[[str], None] = print) -> trainer.TrainState:
  """Trains on the allowed rows of `arrays` (see `attrib_jax.data.precompute`).

  Args:
    arrays: latents, text_states, num_captions, index, null_text_states.
    apply_fn: `apply_fn(params, x_t, t, text_states) -> eps`.
    init_params: parameters to start from (ignored when a checkpoint exists).
    excluded: dataset indices never to read (leave-K-out retraining).
    settings: the recipe (`TrainSettings`).
    sample_fn: called as `sample_fn(params, step)` every `settings.sample_every` steps.
    stop_after: stop (with a checkpoint) after this many steps of *this* call: used by tests to
      simulate an interruption.
    model_key: a string that identifies `apply_fn` and `schedule` (e.g. their configs as
      JSON). With it, the jitted step is built once per (model_key, step settings, devices)
      and reused by later calls in the process: leave-K-out evaluation retrains the same recipe
      a hundred times, and each fresh step costs seconds of tracing even when XLA's persistent
      cache spares the compile. None: a fresh step every call.
  Returns:
    The final state (parameters at `settings.num_steps`).
  """
  s = settings
  num_steps, batch_size, seed = s.num_steps, s.batch_size, s.seed
  mesh = mesh or parallel.make_mesh()
  if batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} is not divisible by {mesh.size} devices")
  rows = input_pipeline.allowed_rows(np.asarray(arrays["index"]), excluded)
  optimizer = trainer.make_optimizer(s.learning_rate, s.warmup_steps, s.weight_decay,
                                     s.grad_clip_norm, lr_schedule=s.lr_schedule,
                                     num_steps=num_steps)
  step_settings = (s.learning_rate, s.warmup_steps, s.weight_decay, s.grad_clip_norm,
                   s.lr_schedule, num_steps, s.random_flip, s.caption_dropout, s.ema_decay,
                   s.min_snr_gamma,
                   tuple(d.id for d in mesh.devices.flat), mesh.axis_names)
  step_fn = _STEP_FNS.get((model_key, step_settings)) if model_key is not None else None
  if step_fn is None:
    step_fn = trainer.make_train_step(apply_fn, schedule, optimizer,
                                      random_flip=s.random_flip,
                                      caption_dropout=s.caption_dropout,
                                      ema_decay=s.ema_decay, min_snr_gamma=s.min_snr_gamma,
                                      mesh=mesh)
    if model_key is not None:
      _STEP_FNS[(model_key, step_settings)] = step_fn
  state = trainer.init_state(init_params, optimizer, seed, use_ema=s.ema_decay is not None)
  # Replicated over the mesh before a restore, so that Orbax restores onto the mesh: with
  # several processes, a state on one local device would be each process's own.
  state = parallel.replicate(jax.device_get(state), mesh)
  # checkpoint_every=0: no checkpoints at all (leave-K-out retrainings of seconds, where the
  # final save would cost more than rerunning an interrupted one).
  manager = (_checkpoint_manager(os.path.join(workdir, "checkpoints"), s.keep_checkpoints)
             if s.checkpoint_every else None)
  if manager is not None and manager.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = _restore(manager, abstract)
    log(f"train: resumed from step {int(state.step)} in {workdir}")
  null_states = parallel.replicate(np.asarray(arrays["null_text_states"]), mesh)
  batch_arrays = {k: arrays[k] for k in ("latents", "text_states", "num_captions")}

  first = int(state.step)
  last = num_steps if stop_after is None else min(num_steps, first + stop_after)
  log(f"train: {rows.size} items ({len(arrays['index']) - rows.size} excluded), steps "
      f"{first}..{num_steps}, batch {batch_size}, {mesh.size} device(s)")
  t0, losses = time.time(), []
  mine = parallel.process_rows(mesh, batch_size)  # this process's slots of each global batch
  for step in range(first, last):
    global_rows = input_pipeline.batch_rows(rows, seed, step, batch_size,
                                            num_rows=len(arrays["index"]))
    batch = input_pipeline.gather(batch_arrays, global_rows[mine])  # only this process's rows
    state, metrics = step_fn(state, parallel.shard_batch(batch, mesh, batch_size), null_states)
    losses.append(metrics["loss"])
    done = step + 1
    if done % s.log_every == 0 or done == last:
      rate = (done - first) / (time.time() - t0)
      loss = float(np.mean(jax.device_get(losses)))
      losses = []
      log(f"train: step {done}/{num_steps} loss {loss:.4f} {rate:.2f} steps/s "
          f"ETA {(num_steps - done) / rate:.0f}s")
    if sample_fn is not None and s.sample_every and (done % s.sample_every == 0
                                                      or done == num_steps):
      sample_fn(state.ema_params if state.ema_params is not None else state.params, done)
    if manager is not None and (done % s.checkpoint_every == 0 or done == last):
      manager.save(done, args=ocp.args.StandardSave(state))
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return state
