"""Unlearning the query: one (or a few) Fisher-preconditioned gradient-ascent steps (SPEC §2.2).

Objective −L(query, θ) + (N/2)(θ − θ0)ᵀ F (θ − θ0). One Newton step from θ gives

    θ ← θ + (α / N) · F⁻¹ · ḡ,     ḡ = mean over D draws of ∇θ L(query, θ; noise, t),

applied to the selected weights only (default: cross-attention K/V). Each of S steps recomputes
ḡ at the current θ. Draws come in batches of `draws_per_batch` whose timesteps are distinct
(sampled without replacement, as the reference does with 80 of 1000); the draws of step s are a
pure function of (seed, s), so ḡ does not depend on the device count or micro-batch size.

Device parallelism: the D draws are split over the `data` mesh axis. One jitted `shard_map`
program does a micro-batch on every device and adds the `psum` of their gradients to a float32
sum; a host loop runs it over the micro-batches (see `_gradient_sum` for why not a scan), and a
last jitted program applies the update.

Zero Fisher entries. The reference divides by F with no damping. A weight whose gradient is zero
on every Fisher example has F = 0 and an infinite step. We add `damping` (default 0, as the
reference) and then apply `zero_fisher`:
  "min_positive" (default): such entries use the smallest positive F of the selection, i.e. the
      largest step any measured weight gets (finite, and such weights barely move the training
      losses anyway, since their training gradients are zero);
  "freeze": such entries are not updated;
  "error": raise.
The scale (α/N)/F is formed in float64 and must be finite in float32 (else: use damping).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from attrib_jax import parallel
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import selection
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.diffusion.schedules import NoiseSchedule

Flat = selection.Flat
ZERO_FISHER_RULES = ("min_positive", "freeze", "error")


@dataclasses.dataclass(frozen=True)
class UnlearnSettings:
  """Defaults: the MSCOCO recipe (α 0.01, one step, 625 × 80 = 50,000 draws)."""
  alpha: float = 0.01
  num_steps: int = 1
  num_draws: int = 50_000        # (noise, timestep) draws per step
  draws_per_batch: int = 80      # timesteps are distinct within each batch of draws
  micro_batch: int = 80          # draws per forward/backward on one device (memory knob)
  damping: float = 0.0
  zero_fisher: str = "min_positive"
  seed: int = 0
  selection: str = selection.DEFAULT
  # The query loss ascended: None the plain mean over timesteps (SPEC); γ weighs each draw by
  # the Min-SNR-γ training weight of its timestep (`diffusion.loss.loss_weights`, mean 1).
  min_snr_gamma: float | None = None

  def __post_init__(self):
    loss_lib.check_min_snr_gamma(self.min_snr_gamma)
    scores_lib.require_at_least("UnlearnSettings", 1, num_steps=self.num_steps,
                                num_draws=self.num_draws, draws_per_batch=self.draws_per_batch,
                                micro_batch=self.micro_batch)
    if self.num_draws % self.draws_per_batch:
      raise ValueError(f"num_draws {self.num_draws} must be a multiple of draws_per_batch "
                       f"{self.draws_per_batch}")
    if self.zero_fisher not in ZERO_FISHER_RULES:
      raise ValueError(f"zero_fisher must be one of {ZERO_FISHER_RULES}")
    if self.damping < 0 or self.num_steps < 1 or self.micro_batch < 1:
      raise ValueError("damping must be >= 0, num_steps and micro_batch >= 1")


MSCOCO = UnlearnSettings()


# ---------------------------------------------------------------------------- draws ---

def _step_key(seed: jax.Array | int, step: jax.Array | int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), step)


def draw_timesteps(seed, step, *, num_draws: int, draws_per_batch: int,
                   num_timesteps: int) -> jax.Array:
  """[num_draws] int32: per batch of draws, a random subset of distinct timesteps."""
  if draws_per_batch > num_timesteps:
    raise ValueError(f"draws_per_batch {draws_per_batch} > {num_timesteps} timesteps: cannot "
                     "draw them without replacement")
  root = _step_key(seed, step)

  def batch(b):
    key = jax.random.fold_in(jax.random.fold_in(root, b), 0)
    return jax.random.permutation(key, num_timesteps)[:draws_per_batch]
  return jax.vmap(batch)(jnp.arange(num_draws // draws_per_batch)).reshape(-1).astype(jnp.int32)


def draw_noise(seed, step, draw_id: jax.Array, shape: tuple[int, ...], *,
               draws_per_batch: int) -> jax.Array:
  """The noise of draw `draw_id` of step `step` (keyed by batch and position in it)."""
  b, j = jnp.divmod(draw_id, draws_per_batch)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(_step_key(seed, step), b), 1),
                           j)
  return jax.random.normal(key, shape, jnp.float32)


def query_draws(seed: int, step: int, settings: UnlearnSettings, shape: tuple[int, ...],
                num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
  """All (timesteps [D], noise [D, *shape]) of one step, materialised (for tests/inspection)."""
  t = draw_timesteps(seed, step, num_draws=settings.num_draws,
                     draws_per_batch=settings.draws_per_batch, num_timesteps=num_timesteps)
  noise = jax.vmap(lambda i: draw_noise(seed, step, i, shape,
                                        draws_per_batch=settings.draws_per_batch))(
                                            jnp.arange(settings.num_draws))
  return np.asarray(t), np.asarray(noise)


# --------------------------------------------------------------------------- kernels ---

def _layout(num_draws: int, micro_batch: int, num_devices: int) -> tuple[int, int]:
  """(micro, draws per device): every device runs the same number of whole micro-batches."""
  per_device = -(-num_draws // num_devices)
  micro = min(micro_batch, per_device)
  return micro, parallel.pad_to_multiple(per_device, micro)


def _stratified_draws(seed, step, ids, shape, schedule, timesteps, *, num_draws: int,
                      draws_per_batch: int):
  """AbU's draws: timesteps from the step's precomputed table (distinct within each batch of
  draws), noise keyed by draw id."""
  del schedule
  t = timesteps[jnp.minimum(ids, num_draws - 1)]  # padding draws (masked) reuse a valid t
  noise = jax.vmap(lambda i: draw_noise(seed, step, i, shape,
                                        draws_per_batch=draws_per_batch))(ids)
  return t, noise


@functools.lru_cache(maxsize=32)
def _chunk_program(apply_fn: Callable, mesh, num_draws: int, micro_batch: int,
                   draws: Callable, draws_per_batch: int,
                   min_snr_gamma: float | None, masked: bool = False) -> Callable:
  """acc + Σ w(t)·∇L over one chunk: micro-batch `chunk` of every device, one `psum` (jitted);
  w = `loss.loss_weights(·, min_snr_gamma)` (ones for None). `masked`: L is the mean over the
  query region's latent cells (the `mask` argument, [h, w]); else the argument is ignored and
  L the plain mean, as without regions.

  `draws(seed, step, ids, shape, schedule, table, num_draws=, draws_per_batch=)` returns the
  (timesteps, noise) of the given draw ids; `table` is whatever array it precomputes per step
  (AbU's stratified timesteps). A module-level function, so this cache keys on it.
  """
  micro, per_device = _layout(num_draws, micro_batch, mesh.size)

  def local(acc, selected, rest, schedule, x0, text, seed, step, table, chunk, mask):
    # Per-device gradients, summed by the one explicit psum below (differentiating the
    # replicated value would insert a psum of its own).
    selected = jax.lax.pcast(selected, parallel.DATA, to="varying")
    ids = (jax.lax.axis_index(parallel.DATA) * per_device + chunk * micro
           + jnp.arange(micro, dtype=jnp.int32))
    t, noise = draws(seed, step, ids, x0.shape, schedule, table, num_draws=num_draws,
                     draws_per_batch=draws_per_batch)
    valid = (ids < num_draws).astype(jnp.float32)
    weights = valid * loss_lib.loss_weights(schedule, t, min_snr_gamma)

    def loss_sum(sel):
      params = selection.merge(sel, rest)
      losses = loss_lib.per_example_loss(
          apply_fn, params, jnp.broadcast_to(x0, (micro,) + x0.shape),
          jnp.broadcast_to(text, (micro,) + text.shape), t, noise, schedule=schedule,
          mask=mask if masked else None)
      return jnp.sum(weights * losses)
    grads = jax.lax.psum(jax.grad(loss_sum)(selected), parallel.DATA)
    return jax.tree.map(jnp.add, acc, grads)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(),) * 11, out_specs=P())
  rep = parallel.replicated(mesh)
  return jax.jit(sharded, in_shardings=(rep,) * 11, out_shardings=rep, donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _timestep_program(num_draws: int, draws_per_batch: int, num_timesteps: int) -> Callable:
  return jax.jit(functools.partial(draw_timesteps, num_draws=num_draws,
                                   draws_per_batch=draws_per_batch,
                                   num_timesteps=num_timesteps))


def gradient_sum(apply_fn: Callable, mesh, selected: Flat, rest, schedule: NoiseSchedule, x0,
                 text, *, seed: int, step: int, num_draws: int, micro_batch: int,
                 draws: Callable, draws_per_batch: int = 1, table=None,
                 min_snr_gamma: float | None = None, region_mask=None) -> Flat:
  """Σ over the step's draws of w(t)·∇L w.r.t. the selected weights (replicated over the
  mesh); w the Min-SNR-γ training weights at mean 1, or ones for None. `region_mask` ([h, w]
  latent cells, `region.query_mask`): L is the loss over those cells only; None: all cells.

  Shared by AbU and AbU+ (ekfac.py), which differ only in `draws` (see `_chunk_program`).
  Why a host loop over jitted chunks rather than one `lax.scan`: XLA:CPU runs the rolled
  scan of micro-batch gradients about 3.5x slower than the same work as separate executions
  (measured on the tiny config), and on accelerators the per-chunk dispatch is negligible
  against a micro-batch of forward/backward passes. The draws of a chunk are a pure function
  of (seed, step, draw id), so the sum does not depend on how it is chunked.
  """
  micro, per_device = _layout(num_draws, micro_batch, mesh.size)
  program = _chunk_program(apply_fn, mesh, num_draws, micro_batch, draws, draws_per_batch,
                           min_snr_gamma, region_mask is not None)
  rep = parallel.replicated(mesh)
  table = jax.device_put(np.zeros((0,), np.int32) if table is None else table, rep)
  mask = jax.device_put(np.zeros((0,), np.float32) if region_mask is None
                        else np.asarray(region_mask, np.float32), rep)
  acc = jax.device_put(jax.tree.map(lambda v: np.zeros(v.shape, np.float32), selected), rep)
  seed, step_index = np.uint32(seed), np.int32(step)
  for chunk in range(per_device // micro):
    acc = program(acc, selected, rest, schedule, x0, text, seed, step_index, table,
                  np.int32(chunk), mask)
  return acc


def _gradient_sum(apply_fn: Callable, mesh, settings: UnlearnSettings, selected: Flat, rest,
                  schedule: NoiseSchedule, x0, text, step: int, region_mask=None) -> Flat:
  """AbU's Σ∇L of one step: stratified timesteps, drawn once per step."""
  timesteps = _timestep_program(settings.num_draws, settings.draws_per_batch,
                                schedule.num_train_timesteps)(np.uint32(settings.seed),
                                                              np.int32(step))
  return gradient_sum(apply_fn, mesh, selected, rest, schedule, x0, text, seed=settings.seed,
                      step=step, num_draws=settings.num_draws,
                      micro_batch=settings.micro_batch, draws=_stratified_draws,
                      draws_per_batch=settings.draws_per_batch, table=timesteps,
                      min_snr_gamma=settings.min_snr_gamma, region_mask=region_mask)


@functools.lru_cache(maxsize=32)
def _update_program(mesh, num_draws: int) -> Callable:
  """θ_sel + scale · (Σ∇L / D), applied in float32."""
  def update(selected, scale, grad_sum):
    return jax.tree.map(lambda p, c, g: (p.astype(jnp.float32) + c * (g / num_draws)).astype(
        p.dtype), selected, scale, grad_sum)
  rep = parallel.replicated(mesh)
  return jax.jit(update, in_shardings=(rep,) * 3, out_shardings=rep)


# --------------------------------------------------------------------------- public ---

def preconditioner(fisher_values: Mapping[selection.Path, np.ndarray], *, alpha: float,
                   num_train: int, damping: float = 0.0,
                   zero_fisher: str = "min_positive") -> Flat:
  """(α/N) / (F + damping) per selected weight, float32, with the zero rule of the module doc."""
  if zero_fisher not in ZERO_FISHER_RULES:
    raise ValueError(f"zero_fisher must be one of {ZERO_FISHER_RULES}")
  if num_train < 1:
    raise ValueError("num_train (N) must be >= 1")
  damped = {p: np.asarray(v, np.float64) + damping for p, v in fisher_values.items()}
  if any((v < 0).any() or not np.isfinite(v).all() for v in damped.values()):
    raise ValueError("Fisher values must be finite and non-negative")
  positives = [v[v > 0].min() for v in damped.values() if (v > 0).any()]
  if not positives:
    raise ValueError("The Fisher is zero everywhere: the selected weights never affect the loss")
  floor = min(positives)
  num_zero = sum(int((v == 0).sum()) for v in damped.values())
  if num_zero and zero_fisher == "error":
    raise ValueError(f"{num_zero} Fisher entries are zero; add damping or choose another "
                     "zero_fisher rule")
  out = {}
  for p, v in damped.items():
    if zero_fisher == "min_positive":
      scale = (alpha / num_train) / np.where(v > 0, v, floor)
    else:  # "freeze" (or no zeros at all)
      scale = np.where(v > 0, (alpha / num_train) / np.where(v > 0, v, 1.0), 0.0)
    with np.errstate(over="ignore"):
      finite = np.isfinite(scale.astype(np.float32)).all()
    if not finite:
      raise ValueError(f"(α/N)/F overflows float32 at {selection.path_name(p)} "
                       f"(min F {v.min():.3g}); add damping")
    out[p] = scale.astype(np.float32)
  return out


def query_gradient(apply_fn: Callable, params: Mapping[str, Any], query_latent: np.ndarray,
                   query_text: np.ndarray, schedule: NoiseSchedule, *,
                   settings: UnlearnSettings = MSCOCO, step: int = 0, mesh=None,
                   region_mask: np.ndarray | None = None) -> Flat:
  """ḡ: the query loss's gradient w.r.t. the selected weights, mean over the step's draws;
  with `region_mask` ([h, w]) the loss of the region's latent cells only."""
  mesh = mesh or parallel.make_mesh()
  selected, rest = selection.split(params, selection.select(params, settings.selection))
  rep = parallel.replicated(mesh)
  selected, rest, schedule_d, x0, text = jax.device_put(
      (selected, rest, schedule, jnp.asarray(query_latent, jnp.float32),
       jnp.asarray(query_text, jnp.float32)), rep)
  total = _gradient_sum(apply_fn, mesh, settings, selected, rest, schedule_d, x0, text, step,
                        region_mask)
  return {p: np.asarray(v) / settings.num_draws for p, v in total.items()}


def unlearn(apply_fn: Callable, params: Mapping[str, Any],
            fisher: fisher_lib.Fisher | Mapping[selection.Path, np.ndarray],
            query_latent: np.ndarray, query_text: np.ndarray, schedule: NoiseSchedule, *,
            num_train: int, settings: UnlearnSettings = MSCOCO, mesh=None,
            progress: Callable[[scores_lib.Progress], None] | None = None,
            region_mask: np.ndarray | None = None) -> dict:
  """θ' after `settings.num_steps` preconditioned ascent steps on the query's loss.

  Args:
    apply_fn: `apply_fn(params, x_t, t, text_states) -> prediction`.
    params: θ0 (nested dict). Only the selected leaves change.
    fisher: a `Fisher` (or its `values`) over exactly the selected weights.
    query_latent: [h, w, c] the query's (scaled) latent.
    query_text: [L, D] text-encoder states of the query's prompt.
    num_train: N, the number of training images.
    region_mask: [h, w] latent cells of a query region (`region.query_mask`): the ascended
      loss is the region's only (local attribution); None: the whole image.
  Returns:
    θ' as a nested dict of device arrays (replicated over the mesh).
  """
  mesh = mesh or parallel.make_mesh()
  values = fisher.values if isinstance(fisher, fisher_lib.Fisher) else fisher
  selected, rest = selection.split(params, selection.select(params, settings.selection))
  if set(values) != set(selected):
    missing = sorted(map(selection.path_name, set(selected) - set(values)))[:3]
    extra = sorted(map(selection.path_name, set(values) - set(selected)))[:3]
    raise ValueError(f"The Fisher does not cover the selection {settings.selection!r} "
                     f"(missing {missing}, unexpected {extra})")
  for p, v in selected.items():
    if values[p].shape != v.shape:
      raise ValueError(f"Fisher shape {values[p].shape} != weight shape {v.shape} at "
                       f"{selection.path_name(p)}")
  scale = preconditioner(values, alpha=settings.alpha, num_train=num_train,
                         damping=settings.damping, zero_fisher=settings.zero_fisher)
  x0 = np.asarray(query_latent, np.float32)
  text = np.asarray(query_text, np.float32)
  if x0.ndim != 3 or text.ndim != 2:
    raise ValueError(f"query latent must be [h, w, c] and text [L, D]; got {x0.shape}, "
                     f"{text.shape}")
  update = _update_program(mesh, settings.num_draws)
  rep = parallel.replicated(mesh)
  selected, rest, scale, schedule_d, x0, text = jax.device_put(
      (selected, rest, scale, schedule, x0, text), rep)
  meter = scores_lib.ProgressMeter("unlearn", settings.num_steps * settings.num_draws, "draws")
  for s in range(settings.num_steps):
    grad_sum = _gradient_sum(apply_fn, mesh, settings, selected, rest, schedule_d, x0, text, s,
                             region_mask)
    selected = update(selected, scale, grad_sum)
    if progress:
      jax.block_until_ready(selected)
      progress(meter((s + 1) * settings.num_draws))
  return selection.merge(selected, rest)
