"""The loss sweep: every training item's loss before (θ0) and after (θ') unlearning (SPEC §2.3).

Slots. An item's loss is evaluated at every (flip, caption, timestep) slot: flips (0, 1), its
first K real captions, timesteps {0, 50, ..., 950} by default. The noise of a slot is

    normal(fold_in(fold_in(fold_in(fold_in(key(seed), index), flip), caption), timestep))

with `index` the item's stable dataset index: the two passes, any batch size, device count or
subset of items see identical noise, so pre losses computed once serve every query and subset.
`noise="shared"` keys by 0 instead of the index (every item sees the same noise at a slot).
A timestep listed again is another noise draw there (its d-th repeat keyed by one more
`fold_in(..., d)`; the first keeps the key above). Draws of a timestep are averaged, then the
distinct timesteps (each weighing the same, or by the training's Min-SNR-γ weight when
`min_snr_gamma` is set), then the item's real captions (fewer than K are masked), in float64
on the host.

Numerics. The change is never formed from two averaged losses:
  "paired" (default): θ0 and θ' in one call on the same slots; per slot, with d = ε' − ε and
    r = ε − target, L' − L = mean(d · (d + 2r)) in float32 (error relative to d, not to L).
  "cached": pre losses from `compute_pre_losses` (same keyed noise); only θ' runs; L' − L per
    slot in float32.
  "jvp": d = ∂ε/∂θ · Δθ by `jax.jvp` (the network linearised at θ0), then mean(d · (d + 2r)).
A network that multiplies in bf16/f16 (read from its jaxpr) is refused by "paired" and
"cached", and they trace the network under `jax.default_matmul_precision("highest")`; only
"jvp" may take `matmul_precision="default"`, and only "jvp" may opt in to
`compute_dtype="bfloat16"`: every matmul and convolution of a float32 network then takes bf16
operands and accumulates in float32 (`precision.bf16_matmuls`), the rest stays float32; d and r
and the per-slot means are float32 as always. Default "float32": the network as given.

Invariants: every slot is computed by the same shapes (`items_per_forward` items per network
call) whatever the device count, `items_per_device`, subset or resume point, so results are
bitwise identical across them (tested); only `items_per_forward` may change float32 rounding.
With `checkpoint_path`, results are written atomically every `checkpoint_every` batches and a
rerun resumes from the items done. Why it is built this way, with measurements:
docs/design/sweep.md.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.attribution import precision
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import selection
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.diffusion.schedules import NoiseSchedule, add_noise, velocity

METHODS = ("paired", "cached", "jvp")
NOISE_MODES = ("per_item", "shared")
_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class SweepSettings:
  """What defines the losses (timesteps, captions, flips, seed) and how batches are laid out
  (items_per_device, items_per_forward: speed and memory only)."""
  timesteps: tuple[int, ...] = tuple(range(0, 1000, 50))  # a repeat: another noise draw there
  num_captions: int = 5
  flips: tuple[int, ...] = (0, 1)
  seed: int = 0
  method: str = "paired"
  items_per_device: int = 4     # items per device per jitted call
  items_per_forward: int = 1    # items per network call (0: all of a device's items)
  matmul_precision: str = "highest"   # jax.default_matmul_precision while tracing the network
  # "per_item": the slot's noise is keyed by the item's index too (above). "shared": every item
  # sees the same noise at a given (flip, caption, timestep), i.e. common random numbers
  # *across items*: a ranking compares items, and with shared noise two near-identical items
  # get near-identical τ instead of differing by their own noise draws.
  noise: str = "per_item"
  # How τ weighs the timesteps. None: every distinct timestep the same (SPEC). γ: timestep t by
  # min(SNR(t), γ) in units of the model's target (`diffusion.loss.min_snr_weights`), the
  # weights of a Min-SNR-γ training loss, so τ is the rise of the loss the model was trained on.
  # It only changes how the slot losses are averaged (cached pre losses stay valid).
  min_snr_gamma: float | None = None
  # "bfloat16": matmuls/convolutions in bf16 with float32 accumulation (module doc); "jvp"
  # only, since its change is computed directly, with the compute dtype's relative precision.
  compute_dtype: str = "float32"

  def __post_init__(self):
    loss_lib.check_min_snr_gamma(self.min_snr_gamma)
    precision.check_compute_dtype("SweepSettings", self.compute_dtype)
    scores_lib.require_at_least("SweepSettings", 1, num_captions=self.num_captions,
                                items_per_device=self.items_per_device)
    scores_lib.require_at_least("SweepSettings", 0, items_per_forward=self.items_per_forward)
    if self.noise not in NOISE_MODES:
      raise ValueError(f"noise must be one of {NOISE_MODES}, got {self.noise!r}")
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
    if not self.timesteps or not self.flips or self.num_captions < 1:
      raise ValueError("need at least one timestep, flip and caption")
    if tuple(self.flips) not in ((0,), (1,), (0, 1)):
      raise ValueError(f"flips must be (0,), (1,) or (0, 1), got {self.flips}")
    if self.method != "jvp" and self.matmul_precision not in ("highest", "float32"):
      raise ValueError(
          f"method {self.method!r} forms loss differences ~1e-3 of the loss and needs full "
          f"float32 matmuls; matmul_precision={self.matmul_precision!r} allows TF32 / bf16 "
          "passes on GPU / TPU. Use 'highest', or method='jvp'.")
    if self.method != "jvp" and self.compute_dtype != "float32":
      raise ValueError(
          f"method {self.method!r} forms loss differences ~1e-3 of the loss from two passes; "
          f"compute_dtype={self.compute_dtype!r} rounds every matmul operand to ~4e-3 relative, "
          "so the difference would be rounding noise. Use compute_dtype='float32', or "
          "method='jvp' (the change is computed directly, with relative precision).")
    forward = self.items_per_forward or self.items_per_device
    if self.items_per_device < 1 or self.items_per_device % forward:
      raise ValueError("items_per_device must be a positive multiple of items_per_forward")

  def loss_definition(self) -> dict:
    """The fields the losses depend on (not the batch layout or method)."""
    definition = {"timesteps": list(self.timesteps), "num_captions": self.num_captions,
                  "flips": list(self.flips), "seed": self.seed}
    if self.noise != "per_item":  # the default stays out: caches written before still match
      definition["noise"] = self.noise
    return definition


MSCOCO = SweepSettings()


@dataclasses.dataclass
class SweepResult:
  """Per (item, flip) losses; `delta` = post − pre formed per slot (see module doc)."""
  index: np.ndarray               # [n] dataset indices
  pre: np.ndarray                 # [n, F] float64
  delta: np.ndarray | None        # [n, F] float64 (None for a pre-only sweep)
  slot_pre: np.ndarray | None     # [n, F, K, T] float32 when kept (the pre-loss cache)
  settings: dict

  @property
  def post(self) -> np.ndarray:
    return self.pre + self.delta


# ---------------------------------------------------------------------------- noise ---

def slot_noise(seed: jax.Array | int, index: jax.Array, flip: jax.Array, caption: jax.Array,
               timestep: jax.Array, shape: tuple[int, ...],
               draw: jax.Array | int = 0) -> jax.Array:
  """The noise of one (item, flip, caption, timestep) slot; `draw` ≥ 1 for a repeated timestep."""
  key = jax.random.key(seed)
  for value in (index, flip, caption, timestep):
    key = jax.random.fold_in(key, value)
  # Draw 0 keeps the key without a draw (the keys of settings without repeats are unchanged).
  data = jnp.where(jnp.asarray(draw) > 0,
                   jax.random.key_data(jax.random.fold_in(key, draw)), jax.random.key_data(key))
  return jax.random.normal(jax.random.wrap_key_data(data), shape, jnp.float32)


def timestep_draws(timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(draw number of each listed timestep, its weight in τ): a timestep listed r times has draws
  0..r-1 of weight 1 / (r × number of distinct timesteps)."""
  timesteps = [int(t) for t in timesteps]
  seen: dict[int, int] = {}
  draws = []
  for t in timesteps:
    draws.append(seen.get(t, 0))
    seen[t] = seen.get(t, 0) + 1
  weights = np.asarray([1.0 / (seen[t] * len(seen)) for t in timesteps], np.float64)
  return np.asarray(draws, np.int32), weights


def timestep_weights(settings: SweepSettings, schedule: NoiseSchedule) -> np.ndarray:
  """Each listed timestep's weight in τ (summing to 1): `timestep_draws`' weights, times the
  Min-SNR-γ loss weight of the timestep when `settings.min_snr_gamma` is set."""
  weights = timestep_draws(settings.timesteps)[1]
  if settings.min_snr_gamma is None:
    return weights
  t = np.asarray(settings.timesteps, np.int32)
  weights = weights * np.asarray(
      loss_lib.min_snr_weights(schedule, t, settings.min_snr_gamma), np.float64)
  return weights / weights.sum()


def cache_key(model_fingerprint: str, settings: SweepSettings, schedule: NoiseSchedule,
              data_fingerprint: str = "") -> str:
  """Key of a pre-loss cache: the model, the loss definition, the schedule and the data."""
  return scores_lib.settings_digest({
      "model": model_fingerprint, "losses": settings.loss_definition(),
      "schedule": scores_lib.params_fingerprint({"a": schedule.alphas_cumprod}),
      "prediction_type": schedule.prediction_type, "data": data_fingerprint})


def save_pre_cache(path: str, key: str, result: SweepResult) -> None:
  """Stores a pre-only sweep's slot losses, by dataset index, under `key`."""
  if result.slot_pre is None:
    raise ValueError("the sweep did not keep its slot losses (keep_slot_losses=True)")
  scores_lib.atomic_savez(path, key=np.asarray(key), index=result.index,
                          slot_pre=result.slot_pre)


def cached_key(path: str) -> str:
  """The key a pre-loss cache was stored under."""
  with io_utils.open_npz(path) as data:
    return str(data["key"])


def load_pre_cache(path: str, key: str, index: np.ndarray) -> np.ndarray:
  """The cached slot losses [n, F, K, T] of the dataset indices `index` (any subset, order)."""
  with io_utils.open_npz(path) as data:
    if str(data["key"]) != key:
      raise ValueError(f"{path} caches pre losses for other settings or another model")
    cached_index, slot_pre = data["index"], data["slot_pre"]
  position = {int(v): i for i, v in enumerate(cached_index)}
  missing = [int(i) for i in index if int(i) not in position]
  if missing:
    raise ValueError(f"{len(missing)} items are not in the cache {path} (e.g. {missing[:5]})")
  return slot_pre[[position[int(i)] for i in index]]


# ------------------------------------------------------------------------- precision ---

def _matmul_dtypes(jaxpr: Any) -> set:
  """Operand dtypes of every dot/conv in a jaxpr, nested jaxprs included."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      found.update(np.dtype(v.aval.dtype) for v in eqn.invars)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):
          found |= _matmul_dtypes(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          found |= _matmul_dtypes(sub.jaxpr)
  return found


def low_precision_dtypes(apply_fn: Callable, params: Any, x: np.ndarray, t: np.ndarray,
                         text: np.ndarray) -> list[str]:
  """The bf16/f16 dtypes the network multiplies in (empty for a float32 network)."""
  jaxpr = jax.make_jaxpr(apply_fn)(params, x, t, text).jaxpr
  return sorted(str(d) for d in _matmul_dtypes(jaxpr) if d in map(np.dtype, _LOW_PRECISION))


# --------------------------------------------------------------------------- kernel ---

def _prediction_and_target(apply_fn, params, schedule, x0, text, t, noise):
  """As `diffusion.loss.per_example_loss`, but returning the two terms of the error."""
  x_t = add_noise(schedule, x0, noise, t)
  prediction = apply_fn(params, x_t, t, text).astype(jnp.float32)
  if schedule.prediction_type == "epsilon":
    return prediction, noise.astype(jnp.float32)
  if schedule.prediction_type == "v_prediction":
    return prediction, velocity(schedule, x0, noise, t)
  if schedule.prediction_type == "sample":
    return prediction, x0.astype(jnp.float32)
  raise ValueError(f"prediction_type {schedule.prediction_type!r} is not supported")


def _mean_per_slot(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


@functools.lru_cache(maxsize=32)
def _sweep_program(apply_fn: Callable, mesh, timesteps: tuple[int, ...],
                   flips: tuple[int, ...], num_captions: int, mode: str,
                   items_per_forward: int, matmul_precision: str,
                   noise_per_item: bool = True, compute_dtype: str = "float32") -> Callable:
  """jit(program(params, changed, schedule, seed, batch) -> {'pre', 'delta'} [b, F, K, T]).

  mode: "pre" (θ0 only), "paired" / "jvp" (changed = θ' on the changed leaves / Δθ there),
  "post" (θ' only; the caller subtracts cached pre losses). `compute_dtype` is applied to the
  network whatever the mode (SweepSettings refuses the unsafe pairs; measurements need them).
  """
  num_f, num_k, num_t = len(flips), num_captions, len(timesteps)
  network = precision.with_compute_dtype(apply_fn, compute_dtype)

  def chunk(params, changed, schedule, seed, items):
    with jax.default_matmul_precision(matmul_precision):
      return _chunk(params, changed, schedule, seed, items)

  def _chunk(params, changed, schedule, seed, items):
    latents, text, index = items["latents"], items["text"], items["index"]
    c = latents.shape[0]
    shape = latents.shape[2:]
    grid = lambda a: jnp.broadcast_to(a, (c, num_f, num_k, num_t)).reshape(-1)
    idx = grid((index if noise_per_item else jnp.zeros_like(index))[:, None, None, None])
    flip = grid(jnp.asarray(flips, jnp.int32)[None, :, None, None])
    cap = grid(jnp.arange(num_k, dtype=jnp.int32)[None, None, :, None])
    t = grid(jnp.asarray(timesteps, jnp.int32)[None, None, None, :])
    draw = grid(jnp.asarray(timestep_draws(timesteps)[0])[None, None, None, :])
    noise = jax.vmap(lambda i, f, k, s, d: slot_noise(seed, i, f, k, s, shape, d))(
        idx, flip, cap, t, draw)
    x0 = jnp.broadcast_to(latents[:, :, None, None], (c, num_f, num_k, num_t) + shape)
    x0 = x0.reshape((-1,) + shape)
    states = jnp.broadcast_to(text[:, None, :, None], (c, num_f, num_k, num_t) + text.shape[2:])
    states = states.reshape((-1,) + text.shape[2:])

    flat = traverse_util.flatten_dict(params)
    rest = {p: v for p, v in flat.items() if p not in changed}
    before = {p: flat[p] for p in changed}
    run = lambda sel: _prediction_and_target(network, selection.merge(sel, rest), schedule, x0,
                                             states, t, noise)
    zeros = jnp.zeros(x0.shape[0], jnp.float32)
    if mode == "pre":
      eps, target = run(before)
      out = (_mean_per_slot(jnp.square(eps - target)), zeros)
    elif mode == "post":
      eps, target = run(changed)
      out = (zeros, _mean_per_slot(jnp.square(eps - target)))
    elif mode == "paired":
      eps, target = run(before)
      eps_after, _ = run(changed)
      d, r = eps_after - eps, eps - target
      out = (_mean_per_slot(jnp.square(r)), _mean_per_slot(d * (d + 2.0 * r)))
    elif mode == "jvp":
      (eps, target), (d, _) = jax.jvp(run, (before,), (changed,))
      d = d.astype(jnp.float32)
      r = eps - target
      out = (_mean_per_slot(jnp.square(r)), _mean_per_slot(d * (d + 2.0 * r)))
    else:
      raise ValueError(mode)
    return tuple(o.reshape(c, num_f, num_k, num_t) for o in out)

  def local(params, changed, schedule, seed, batch):
    b = batch["index"].shape[0]
    chunks = jax.tree.map(lambda a: a.reshape((b // items_per_forward, items_per_forward)
                                              + a.shape[1:]), batch)
    pre, delta = jax.lax.map(lambda items: chunk(params, changed, schedule, seed, items), chunks)
    return {"pre": pre.reshape((b,) + pre.shape[2:]),
            "delta": delta.reshape((b,) + delta.shape[2:])}

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P(), P(parallel.DATA)),
                          out_specs=P(parallel.DATA))
  rep = parallel.replicated(mesh)
  return jax.jit(sharded, in_shardings=(rep, rep, rep, rep, parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


# --------------------------------------------------------------------------- driver ---

@jax.jit
def _leaves_differ(before: dict, after: dict) -> dict:
  return jax.tree.map(lambda a, b: jnp.any(a != b), before, after)


def _changed_leaves(before: Mapping[str, Any], after: Mapping[str, Any]) -> list:
  """Paths whose values differ (θ' differs from θ0 on the unlearned selection only).

  Compared where the weights live, one program for the whole tree: only a flag per leaf
  comes back (fetching both trees cost ~0.5 s per query for the MSCOCO UNet on a GPU)."""
  fb, fa = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
  if set(fb) != set(fa):
    raise ValueError("params_before and params_after have different paths")
  for p in fb:
    if np.shape(fa[p]) != np.shape(fb[p]):
      raise ValueError(f"shape mismatch at {selection.path_name(p)}")
  names = {selection.path_name(p): p for p in fb}
  # θ0 joins θ' on its devices (a no-op when both already share them).
  same_place = lambda b, a: jax.device_put(b, a.sharding) if isinstance(a, jax.Array) else b
  differ = jax.device_get(_leaves_differ({k: same_place(fb[p], fa[p]) for k, p in names.items()},
                                         {k: fa[p] for k, p in names.items()}))
  changed = [p for k, p in names.items() if differ[k]]
  if not changed:
    raise ValueError("params_after equals params_before: nothing was unlearned")
  return changed


def _gather(array: Any, rows: np.ndarray, second: slice) -> np.ndarray:
  """array[rows, second], reading memmaps in sorted row order and only the needed slice."""
  order = np.argsort(rows, kind="stable")
  out = np.asarray(array[rows[order], second])
  inverse = np.empty_like(order)
  inverse[order] = np.arange(order.size)
  return out[inverse]


def sweep(apply_fn: Callable, params_before: Mapping[str, Any],
          params_after: Mapping[str, Any] | None, arrays: Mapping[str, Any],
          schedule: NoiseSchedule, *, settings: SweepSettings = MSCOCO, mesh=None,
          rows: np.ndarray | None = None, pre_slot_losses: np.ndarray | None = None,
          keep_slot_losses: bool = False, checkpoint_path: str | None = None,
          checkpoint_every: int = 100,
          progress: Callable[[scores_lib.Progress], None] | None = None,
          progress_every: int = 10) -> SweepResult:
  """Losses of the items `rows` of `arrays` before and after unlearning.

  Args:
    apply_fn: `apply_fn(params, x_t, t, text_states) -> prediction`.
    params_before: θ0. params_after: θ' (None: a pre-only sweep, e.g. to fill a cache).
    arrays: `latents` [N,2,h,w,c], `text_states` [N,K',L,D], `num_captions` [N], `index` [N].
    settings: see `SweepSettings`; settings.method "cached" needs `pre_slot_losses`.
    rows: the rows to score (default all); results follow this order.
    pre_slot_losses: [n, F, K, T] cached pre losses of `rows` (see `load_pre_cache`).
    keep_slot_losses: also return the per-slot pre losses (to build a cache).
    checkpoint_path: npz of partial results, rewritten atomically every `checkpoint_every`
      batches; an existing one with the same fingerprint is resumed.
    progress: receives a `Progress` (items, items/s, ETA) every `progress_every` batches.
  """
  mesh = mesh or parallel.make_mesh()
  rows = np.arange(len(arrays["index"])) if rows is None else np.asarray(rows)
  index = np.asarray(arrays["index"])[rows].astype(np.int64)
  n = rows.size
  if n == 0:
    raise ValueError("sweep needs at least one item")
  if index.min() < 0 or index.max() >= 2**32:
    raise ValueError("dataset indices must fit in uint32 (they key the noise)")
  stored_k = arrays["text_states"].shape[1]
  num_k = settings.num_captions
  if num_k > stored_k:
    raise ValueError(f"settings ask for {num_k} captions; only {stored_k} are stored")
  num_f, num_t = len(settings.flips), len(settings.timesteps)
  if max(settings.timesteps) >= schedule.num_train_timesteps or min(settings.timesteps) < 0:
    raise ValueError(f"timesteps must lie in [0, {schedule.num_train_timesteps})")
  real = np.minimum(np.asarray(arrays["num_captions"])[rows], num_k)
  if (real < 1).any():
    raise ValueError("every item needs at least one real caption")
  caption_mask = np.arange(num_k)[None, :] < real[:, None]   # [n, K]

  method = settings.method
  rep = parallel.replicated(mesh)
  # θ0 on the mesh once: the change detection compares there, the programs read it there.
  params_d = jax.device_put(params_before, rep)
  if params_after is None:
    if method == "cached":
      raise ValueError("a pre-only sweep (params_after=None) computes, not reuses, pre losses")
    mode, changed = "pre", {}
  else:
    paths = _changed_leaves(params_d, params_after)
    flat_after = traverse_util.flatten_dict(params_after)
    if method == "jvp":
      # θ0 as it lies on the mesh: under several processes it must meet θ' (a global array)
      # as a global array too.
      flat_before = traverse_util.flatten_dict(params_d)
      # θ' − θ0 is exact in floating point for a small step (Sterbenz), so the tangent is the
      # update that was actually applied.
      changed = {p: (jnp.asarray(flat_after[p]) - jnp.asarray(flat_before[p])).astype(
          jnp.asarray(flat_before[p]).dtype) for p in paths}
    else:
      changed = {p: flat_after[p] for p in paths}
    mode = {"paired": "paired", "jvp": "jvp", "cached": "post"}[method]
  if method == "cached":
    if pre_slot_losses is None:
      raise ValueError("method 'cached' needs pre_slot_losses (see load_pre_cache)")
    pre_slot_losses = np.asarray(pre_slot_losses, np.float32)
    if pre_slot_losses.shape != (n, num_f, num_k, num_t):
      raise ValueError(f"pre_slot_losses has shape {pre_slot_losses.shape}, expected "
                       f"{(n, num_f, num_k, num_t)}")
  elif pre_slot_losses is not None:
    raise ValueError("pre_slot_losses are used only by method 'cached'")

  latent_shape = arrays["latents"].shape[2:]
  probe = (np.zeros((1,) + latent_shape, np.float32), np.zeros((1,), np.int32),
           np.zeros((1,) + arrays["text_states"].shape[2:], np.float32))
  low = low_precision_dtypes(apply_fn, params_before, *probe)
  if low and mode in ("paired", "post"):
    raise ValueError(
        f"The network multiplies in {', '.join(low)}: loss differences after unlearning are "
        "~1e-3 of the loss and below, under that precision's resolution, so a difference of "
        "two passes would be rounding noise. Use a float32 network, or method='jvp' (the "
        "change is computed directly, with relative precision).")

  per_device = settings.items_per_device
  batch = per_device * mesh.size
  forward = settings.items_per_forward or per_device
  # What a checkpoint must match to be resumed; hashing both weight trees costs ~0.5 s for
  # the MSCOCO UNet, so only a checkpointed sweep pays it.
  fingerprint = checkpoint_path and scores_lib.settings_digest({
      "losses": settings.loss_definition(), "method": method,
      # The checkpointed sums are already weighted over timesteps, and the losses depend on
      # the schedule: both must match for a resume to add like to like.
      "timestep_weights": timestep_weights(settings, schedule).tolist(),
      "schedule": scores_lib.params_fingerprint({"a": schedule.alphas_cumprod}),
      "prediction_type": schedule.prediction_type,
      "before": scores_lib.params_fingerprint(params_before),
      "after": scores_lib.params_fingerprint(params_after) if params_after is not None else "",
      "index": scores_lib.settings_digest(index.tolist()), "keep_slots": keep_slot_losses,
      "cache": (hashlib.sha256(pre_slot_losses.tobytes()).hexdigest()[:16]
                if pre_slot_losses is not None else ""),
      # Only when set: checkpoints of float32 sweeps written before keep their fingerprint.
      **({"compute_dtype": settings.compute_dtype}
         if settings.compute_dtype != "float32" else {})})

  pre = np.zeros((n, num_f), np.float64)
  delta = np.zeros((n, num_f), np.float64) if mode != "pre" else None
  slot_pre = np.zeros((n, num_f, num_k, num_t), np.float32) if keep_slot_losses else None
  done = 0
  if checkpoint_path and os.path.exists(checkpoint_path):
    with io_utils.open_npz(checkpoint_path) as ckpt:
      if str(ckpt["fingerprint"]) != fingerprint:
        raise ValueError(f"{checkpoint_path} is a checkpoint of another sweep (other model, "
                         "items or settings); delete it or use another path")
      done = int(ckpt["items_done"])
      pre = ckpt["pre"].copy()
      if delta is not None:
        delta = ckpt["delta"].copy()
      if slot_pre is not None:
        slot_pre = ckpt["slot_pre"].copy()

  program = _sweep_program(apply_fn, mesh, tuple(settings.timesteps), tuple(settings.flips),
                           num_k, mode, forward, settings.matmul_precision,
                           settings.noise == "per_item", settings.compute_dtype)
  changed_d, schedule_d = jax.device_put((changed, schedule), rep)
  seed = jax.device_put(np.uint32(settings.seed), rep)
  flips = slice(settings.flips[0], settings.flips[-1] + 1)
  meter = scores_lib.ProgressMeter("sweep", n, "items", start=done)
  weights_t = timestep_weights(settings, schedule)

  mine = parallel.process_rows(mesh, batch)  # this process's slots of each global batch

  def launch(start: int):
    stop = min(start + batch, n)
    take = np.arange(start, stop)
    take = np.concatenate([take, np.full(batch - take.size, take[0])])  # pad: masked below
    take = take[mine]  # only this process's rows are read
    host = {"latents": _gather(arrays["latents"], rows[take], flips).astype(np.float32),
            "text": _gather(arrays["text_states"], rows[take], slice(0, num_k)).astype(
                np.float32),
            "index": index[take].astype(np.uint32)}
    return start, stop, program(params_d, changed_d, schedule_d, seed,
                                parallel.shard_batch(host, mesh, batch))

  def finish(start: int, stop: int, out: dict, batches_done: int):
    nonlocal done
    out = parallel.to_host(out)  # every process gets the whole batch's losses
    m = stop - start
    slot_pre_b = out["pre"][:m]
    if mode == "post":
      slot_pre_b = pre_slot_losses[start:stop]
      slot_delta = out["delta"][:m] - slot_pre_b   # float32, per slot
    else:
      slot_delta = out["delta"][:m]
    w = caption_mask[start:stop].astype(np.float64)            # [m, K]
    # Mean over timesteps (over a repeated timestep's draws first: see the module doc).
    per_caption = lambda x: x.astype(np.float64) @ weights_t
    average = lambda x: np.einsum("mfk,mk->mf", per_caption(x), w) / w.sum(1)[:, None]
    pre[start:stop] = average(slot_pre_b)
    if delta is not None:
      delta[start:stop] = average(slot_delta)
    if slot_pre is not None:
      slot_pre[start:stop] = slot_pre_b
    done = stop
    if (checkpoint_path and parallel.is_main_process()
        and (batches_done % checkpoint_every == 0 or done == n)):
      extra = {"delta": delta} if delta is not None else {}
      if slot_pre is not None:
        extra["slot_pre"] = slot_pre
      scores_lib.atomic_savez(checkpoint_path, fingerprint=np.asarray(fingerprint),
                              items_done=np.asarray(done), pre=pre, **extra)
    if progress and (batches_done % progress_every == 0 or done == n):
      progress(meter(done))

  # One batch in flight: the next batch is gathered and dispatched before the last is read.
  pending, batches_done = None, 0
  for start in range(done, n, batch):
    launched = launch(start)
    if pending is not None:
      batches_done += 1
      finish(*pending, batches_done)
    pending = launched
  if pending is not None:
    finish(*pending, batches_done + 1)

  return SweepResult(index=index, pre=pre, delta=delta, slot_pre=slot_pre,
                     settings={**settings.loss_definition(), "method": method,
                               "min_snr_gamma": settings.min_snr_gamma,
                               "items_per_forward": forward,
                               "matmul_precision": settings.matmul_precision,
                               **({"compute_dtype": settings.compute_dtype}
                                  if settings.compute_dtype != "float32" else {})})


def compute_pre_losses(apply_fn: Callable, params: Mapping[str, Any], arrays: Mapping[str, Any],
                       schedule: NoiseSchedule, *, settings: SweepSettings = MSCOCO,
                       **kwargs) -> SweepResult:
  """The θ0 pass alone, keeping slot losses: what `save_pre_cache` stores once per model."""
  settings = dataclasses.replace(settings, method="paired")
  return sweep(apply_fn, params, None, arrays, schedule, settings=settings,
               keep_slot_losses=True, **kwargs)
