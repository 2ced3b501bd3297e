"""The training step of a text-to-image diffusion model: pure, jitted, data-parallel.

A batch is a dict of precomputed arrays (see `attrib_jax.data.precompute`):
  latents      [B, 2, H, W, C]  the item's latent and its horizontally flipped twin
  text_states  [B, K, L, D]     encoder states of the item's first K captions
  num_captions [B]              how many of the K are real (the rest is padding)
All randomness of a step (flip, caption choice, caption dropout, timestep, noise) comes from
`fold_in(state.rng, state.step)`, drawn over the *global* batch: with threefry partitionable
random numbers the sharded and unsharded steps see identical draws, and a resumed run replays
exactly the steps an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from attrib_jax import parallel
from attrib_jax.diffusion import loss as loss_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar; an array, since Orbax cannot restore a Python int
  params: Any
  opt_state: Any
  ema_params: Any            # None when EMA is off
  rng: jax.Array             # raw uint32 key data, so that checkpoints hold plain arrays


LR_SCHEDULES = ("constant", "cosine")


def make_optimizer(learning_rate: float, warmup_steps: int, weight_decay: float,
                   grad_clip_norm: float | None = 1.0, b1: float = 0.9,
                   b2: float = 0.999, lr_schedule: str = "constant",
                   num_steps: int | None = None) -> optax.GradientTransformation:
  """AdamW after a linear warm-up.

  lr_schedule "constant" keeps the rate (the recipe of the MSCOCO model); "cosine" decays it to
  zero at `num_steps`: for a run of a few thousand steps the annealed end reaches a clearly
  lower loss, and the small late steps avoid the loss spikes a constant 1e-3 showed.
  """
  warmup = max(warmup_steps, 1)
  if lr_schedule == "constant":
    after = optax.constant_schedule(learning_rate)
  elif lr_schedule == "cosine":
    if not num_steps or num_steps <= warmup:
      raise ValueError(f"lr_schedule 'cosine' needs num_steps > warmup_steps ({warmup}), got "
                       f"{num_steps}")
    after = optax.cosine_decay_schedule(learning_rate, num_steps - warmup)
  else:
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup), after], [warmup])
  chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
  chain.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*chain)


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int,
               use_ema: bool) -> TrainState:
  # A copy: the jitted step donates the state, which must not delete the caller's arrays.
  params = jax.tree.map(jnp.copy, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
                    rng=jax.random.key_data(jax.random.key(seed)))


def choose_inputs(rng: jax.Array, batch: dict, null_text_states: jax.Array, *,
                  random_flip: bool, caption_dropout: float):
  """Per-example flip, caption and classifier-free-guidance dropout."""
  k_flip, k_caption, k_drop = jax.random.split(rng, 3)
  latents, text = batch["latents"], batch["text_states"]
  b = latents.shape[0]
  flip = (jax.random.bernoulli(k_flip, 0.5, (b,)) if random_flip
          else jnp.zeros((b,), bool))
  x0 = jnp.where(flip[:, None, None, None], latents[:, 1], latents[:, 0])
  # A uniform choice among the item's real captions.
  u = jax.random.uniform(k_caption, (b,))
  caption = jnp.minimum((u * batch["num_captions"]).astype(jnp.int32),
                        batch["num_captions"] - 1)
  states = jnp.take_along_axis(text, caption[:, None, None, None], axis=1)[:, 0]
  drop = jax.random.bernoulli(k_drop, caption_dropout, (b,))
  states = jnp.where(drop[:, None, None], null_text_states[None].astype(states.dtype), states)
  return x0.astype(jnp.float32), states


def make_train_step(apply_fn: Callable, schedule: Any, optimizer: optax.GradientTransformation,
                    *, random_flip: bool = True, caption_dropout: float = 0.1,
                    ema_decay: float | None = None, min_snr_gamma: float | None = None,
                    mesh=None, jit: bool = True) -> Callable:
  """Returns `step(state, batch, null_text_states) -> (state, metrics)`, jitted.

  `apply_fn(params, x_t, t, text_states) -> eps`. With a mesh, the batch is split over its data
  axis and the state replicated; XLA inserts the gradient all-reduce. `min_snr_gamma` weights
  the loss by `loss.min_snr_weights` (None: the plain mean, the MSCOCO recipe). `jit=False`
  returns the pure step itself, for callers that compile it inside a larger program
  (`scan_train`, a `lax.scan` over every step).
  """
  num_train_timesteps = schedule.num_train_timesteps

  def step(state: TrainState, batch: dict, null_text_states: jax.Array):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_inputs, k_t, k_noise = jax.random.split(rng, 3)
    x0, text = choose_inputs(k_inputs, batch, null_text_states, random_flip=random_flip,
                             caption_dropout=caption_dropout)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)

    weights = (jnp.ones((b,), jnp.float32) if min_snr_gamma is None
               else loss_lib.min_snr_weights(schedule, t, min_snr_gamma))

    def mean_loss(params):
      return jnp.mean(weights * loss_lib.per_example_loss(apply_fn, params, x0, text, t, noise,
                                                          schedule=schedule))

    loss, grads = jax.value_and_grad(mean_loss)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay is not None and ema is not None:
      # Warm-up: early on the average would be mostly the random init; (1+n)/(10+n) lets it
      # follow the weights until `ema_decay` takes over.
      n = state.step.astype(jnp.float32)
      decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
      ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  if not jit:
    return step
  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                 donate_argnums=0)
