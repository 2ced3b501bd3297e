"""Many leave-K-out models in one program: `jax.vmap` of the train step over a models axis.

The M models of a group share the recipe (initial weights, optimizer, seed, step count) and
differ only in the items each leaves out. Each model gets the batches its own single-model
training would read (`input_pipeline.batch_rows` over its allowed rows, with `num_rows`: the
full run's order with its excluded items skipped and the rest slid up), gathered into row m of
a [M, B, ...] batch; the step is `trainer.make_train_step`'s, vmapped, so each model's update is
its own step's arithmetic on its own batch. Excluded items are skipped, not masked: a model
never sees a row of its excluded items, and its batches keep B real examples, exactly as in
`loop.train`. (Masking to weight zero would change the recipe: batches of fewer than B
effective examples and a different shuffle once an item's slot is dropped rather than refilled.)

The step's randomness is `fold_in(state.rng, state.step)` with the same seed for every model, so
model m draws the same flips, captions, timesteps and noise as it would alone.

Memory: M copies of the parameters and optimizer state, plus M batches of activations.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from attrib_jax import parallel
from attrib_jax.training import input_pipeline
from attrib_jax.training import trainer

BATCH_KEYS = ("latents", "text_states", "num_captions")


def group_batch_rows(rows_per_model: Sequence[np.ndarray], seed: int, step: int,
                     batch_size: int, num_rows: int) -> np.ndarray:
  """[M, B] rows: model m's batch `step`, exactly as its single-model training reads it."""
  return np.stack([input_pipeline.batch_rows(rows, seed, step, batch_size, num_rows=num_rows)
                   for rows in rows_per_model])


def gather_group(arrays: Mapping[str, Any], rows: np.ndarray) -> dict[str, np.ndarray]:
  """The [M, B, ...] batch of `rows` [M, B]: one read of all M·B rows (`input_pipeline.gather`),
  then split by model. A row is read only where a model's own batch holds it."""
  flat = input_pipeline.gather({k: arrays[k] for k in BATCH_KEYS}, rows.reshape(-1))
  return {k: v.reshape(rows.shape + v.shape[1:]) for k, v in flat.items()}


def stack_states(state: trainer.TrainState, num_models: int) -> trainer.TrainState:
  """M copies of one fresh state along a new leading axis."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_models,) + jnp.shape(x)), state)


def model_state(states: trainer.TrainState, m: int) -> trainer.TrainState:
  return jax.tree.map(lambda x: x[m], states)


def make_group_step(apply_fn: Callable, schedule: Any, optimizer: optax.GradientTransformation,
                    *, mesh=None, **step_options) -> Callable:
  """`step(states, batches, null_text_states) -> (states, metrics)` over a leading models axis.

  `step_options` are `trainer.make_train_step`'s (random_flip, caption_dropout, ema_decay,
  min_snr_gamma). With a mesh the models axis is split over its data axis (M must be a
  multiple of its size): each device trains whole models, with no cross-device reduction.
  """
  single = trainer.make_train_step(apply_fn, schedule, optimizer, **step_options)
  grouped = jax.vmap(single, in_axes=(0, 0, None))
  if mesh is None:
    return jax.jit(grouped, donate_argnums=0)
  models, rep = NamedSharding(mesh, P(parallel.DATA)), parallel.replicated(mesh)
  return jax.jit(grouped, in_shardings=(models, models, rep), out_shardings=(models, models),
                 donate_argnums=0)


def train_group(*, arrays: Mapping[str, Any], apply_fn: Callable, init_params: Any,
                schedule: Any, excluded_sets: Sequence[Sequence[int]],
                optimizer: optax.GradientTransformation, num_steps: int, batch_size: int,
                seed: int = 0, use_ema: bool = False, step_fn: Callable | None = None,
                mesh=None, log_every: int = 100, log: Callable[[str], None] = print,
                **step_options) -> trainer.TrainState:
  """Trains one model per excluded set, all in one vmapped program; returns the stacked final
  states (leading axis: the models, in `excluded_sets` order).

  Every model starts from `init_params` with a state from `trainer.init_state(..., seed)`, as
  `loop.train` does. `step_fn`: a `make_group_step` program to reuse (it must have been made
  with the same optimizer and options, and is compiled for one M). No checkpoints: a group is
  minutes of work, and an interrupted one is retrained whole.
  """
  index = np.asarray(arrays["index"])
  rows = [input_pipeline.allowed_rows(index, excluded) for excluded in excluded_sets]
  num_models = len(rows)
  if mesh is not None and num_models % mesh.size:
    raise ValueError(f"{num_models} models do not split over {mesh.size} devices")
  if step_fn is None:
    step_fn = make_group_step(apply_fn, schedule, optimizer, mesh=mesh, **step_options)
  states = stack_states(trainer.init_state(init_params, optimizer, seed, use_ema), num_models)
  null_states = np.asarray(arrays["null_text_states"])
  if mesh is not None:
    states = jax.device_put(states, NamedSharding(mesh, P(parallel.DATA)))
    null_states = parallel.replicate(null_states, mesh)
  t0, losses = time.time(), []
  for step in range(num_steps):
    batches = gather_group(arrays, group_batch_rows(rows, seed, step, batch_size, index.size))
    if mesh is not None:
      batches = jax.device_put(batches, NamedSharding(mesh, P(parallel.DATA)))
    states, metrics = step_fn(states, batches, null_states)
    losses.append(metrics["loss"])
    done = step + 1
    if log_every and (done % log_every == 0 or done == num_steps):
      rate = done / (time.time() - t0)
      loss = np.mean(np.asarray(jax.device_get(losses)), axis=0)
      losses = []
      log(f"train group: step {done}/{num_steps}, {num_models} models, loss "
          f"{float(loss.min()):.4f}..{float(loss.max()):.4f}, {rate:.2f} steps/s")
  return states
