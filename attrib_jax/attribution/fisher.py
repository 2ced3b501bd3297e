"""The diagonal Fisher information of the training loss over the selected weights (SPEC §2.1).

F = mean over examples of (∇_θsel L(example))², one example per (epoch, item, flip): it draws a
uniform timestep, one of the item's real captions and fresh noise. Reference: 5 epochs over the
flipped and unflipped training set (2N examples an epoch, 1,182,870 on MSCOCO: the code's count,
not the paper's 591,435), and that is what `num_examples` in the result records.

Randomness: every draw comes from `fold_in(fold_in(fold_in(key(seed), epoch), index), flip)`
with `index` the item's stable dataset index, so F does not depend on the batch size, the device
count or the order of the rows.

Accumulation: per-example gradients are squared and summed in float32 on each device over a
micro-batch (at most `batch_size` terms), `psum`med over the mesh, and added into a *compensated*
(Kahan) float32 pair on device; every `flush_every` micro-batches the pair is folded into a
float64 accumulator on the host (sum − compensation, in float64). The float32 error is therefore
O(ε32) relative per flush window rather than growing with the number of batches, and the total
is float64. jax's global x64 flag is left alone.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import selection
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.diffusion.schedules import NoiseSchedule

Flat = selection.Flat
FISHER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FisherSettings:
  """How the Fisher is estimated. `batch_size` and `flush_every` change speed and memory, not
  the result (beyond float32 rounding)."""
  selection: str = selection.DEFAULT
  num_epochs: int = 5
  batch_size: int = 32        # examples per global micro-batch (rounded up to the device count)
  seed: int = 0
  flush_every: int = 64       # micro-batches between float64 folds on the host
  # The loss whose Fisher this is: None the plain per-example loss (SPEC); γ the Min-SNR-γ
  # training loss, each example's gradient scaled by √w(t) so that F = E[w(t) (∇L)²], the
  # Gauss-Newton curvature of the weighted loss (w at mean 1, `diffusion.loss.loss_weights`).
  min_snr_gamma: float | None = None

  def __post_init__(self):
    loss_lib.check_min_snr_gamma(self.min_snr_gamma)
    scores_lib.require_at_least("FisherSettings", 1, num_epochs=self.num_epochs,
                                batch_size=self.batch_size, flush_every=self.flush_every)


def loss_weight_digest(min_snr_gamma: float | None) -> dict:
  """The fingerprint entry of a loss weighting: none for the plain loss, so the fingerprints
  of caches made before weighting existed stay valid."""
  return {} if min_snr_gamma is None else {"min_snr_gamma": float(min_snr_gamma)}


@dataclasses.dataclass
class Fisher:
  """values: {path: float64 array shaped like the weight}; meta: what it was computed from."""
  values: Flat
  num_examples: int
  meta: dict

  def fingerprint(self) -> str:
    return self.meta["fingerprint"]


# ---------------------------------------------------------------------------- draws ---

def example_key(seed: jax.Array | int, epoch: jax.Array, index: jax.Array,
                flip: jax.Array) -> jax.Array:
  """The key of one Fisher example; its three splits draw (timestep, caption, noise)."""
  key = jax.random.key(seed)
  for value in (epoch, index, flip):
    key = jax.random.fold_in(key, value)
  return key


def draw_caption(key: jax.Array, num_captions: jax.Array) -> jax.Array:
  """Uniform among the item's real captions (0 .. num_captions-1)."""
  return jax.random.randint(jax.random.split(key, 3)[1], (), 0, jnp.maximum(num_captions, 1))


def draw_timestep_and_noise(key: jax.Array, shape: tuple[int, ...],
                            num_timesteps: int) -> tuple[jax.Array, jax.Array]:
  k_t, _, k_noise = jax.random.split(key, 3)
  return (jax.random.randint(k_t, (), 0, num_timesteps),
          jax.random.normal(k_noise, shape, jnp.float32))


@functools.lru_cache(maxsize=None)
def _caption_fn() -> Callable:
  def f(seed, epoch, index, flip, num_captions):
    keys = jax.vmap(example_key, in_axes=(None, 0, 0, 0))(seed, epoch, index, flip)
    return jax.vmap(draw_caption)(keys, num_captions)
  return jax.jit(f)


def draw_captions(seed: int, epoch: np.ndarray, index: np.ndarray, flip: np.ndarray,
                  num_captions: np.ndarray) -> np.ndarray:
  """Caption choices of a batch of examples, computed on the host CPU (no device round trip,
  so the next batch can be gathered while the accelerator works)."""
  # A *local* CPU device: under several processes jax.devices() lists other processes' too.
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    return np.asarray(_caption_fn()(np.uint32(seed), epoch.astype(np.int32),
                                    index.astype(np.uint32), flip.astype(np.int32),
                                    num_captions.astype(np.int32)))


# --------------------------------------------------------------------------- kernel ---

@functools.lru_cache(maxsize=32)
def _fisher_step(apply_fn: Callable, mesh, min_snr_gamma: float | None = None) -> Callable:
  """jit(step(acc, comp, selected, rest, schedule, seed, batch) -> (acc, comp))."""

  def local_sum(selected, rest, schedule, seed, batch):
    # A per-device copy: differentiating the replicated value itself would make shard_map
    # psum every example's gradient over the devices (the transpose of replication).
    selected = jax.lax.pcast(selected, parallel.DATA, to="varying")
    def example_grad(x0, text, index, flip, epoch):
      key = example_key(seed, epoch, index, flip)
      t, noise = draw_timestep_and_noise(key, x0.shape, schedule.num_train_timesteps)

      root_weight = jnp.sqrt(loss_lib.loss_weights(schedule, t, min_snr_gamma))

      def loss(sel):
        params = selection.merge(sel, rest)
        return root_weight * loss_lib.per_example_loss(
            apply_fn, params, x0[None], text[None], t[None], noise[None], schedule=schedule)[0]
      return jax.grad(loss)(selected)

    grads = jax.vmap(example_grad)(batch["x0"], batch["text"], batch["index"], batch["flip"],
                                   batch["epoch"])
    valid = batch["valid"]
    local = jax.tree.map(
        lambda g: jnp.einsum("b,b...->...", valid, jnp.square(g.astype(jnp.float32))), grads)
    return jax.lax.psum(local, parallel.DATA)

  sharded_sum = jax.shard_map(local_sum, mesh=mesh, in_specs=(P(), P(), P(), P(),
                                                              P(parallel.DATA)), out_specs=P())

  def step(acc, comp, selected, rest, schedule, seed, batch):
    total = sharded_sum(selected, rest, schedule, seed, batch)

    def kahan(s, c, x):  # (s, c) <- s + x, with c the running rounding error of s
      y = x - c
      t = s + y
      return t, (t - s) - y
    pairs = jax.tree.map(kahan, acc, comp, total)
    is_pair = lambda x: isinstance(x, tuple)
    return (jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair),
            jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair))

  rep = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, rep, rep, rep, rep, rep,
                                     parallel.batch_sharding(mesh)),
                 out_shardings=(rep, rep), donate_argnums=(0, 1))


# ---------------------------------------------------------------------------- driver ---

def _gather_rows(array: np.ndarray, rows: np.ndarray, second: np.ndarray) -> np.ndarray:
  """array[rows, second], reading memmaps in sorted row order."""
  order = np.argsort(rows, kind="stable")
  out = np.asarray(array[rows[order], second[order]])
  inverse = np.empty_like(order)
  inverse[order] = np.arange(order.size)
  return out[inverse]


def _fingerprint(params_fp: str, settings: FisherSettings, index: np.ndarray,
                 schedule: NoiseSchedule, num_examples: int) -> str:
  return scores_lib.settings_digest({
      "model": params_fp, "selection": settings.selection, "epochs": settings.num_epochs,
      "seed": settings.seed, "num_examples": num_examples,
      "items": scores_lib.settings_digest(np.asarray(index).tolist()),
      "schedule": scores_lib.params_fingerprint(
          {"alphas_cumprod": schedule.alphas_cumprod}) + schedule.prediction_type,
      **loss_weight_digest(settings.min_snr_gamma)})


def checked_items(arrays: Mapping[str, Any], rows: np.ndarray | None, who: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(rows, dataset indices, caption counts) of the items a per-example pass draws over,
  refusing what would break its keyed draws: no items, indices beyond uint32, no caption."""
  rows = np.arange(len(arrays["index"])) if rows is None else np.asarray(rows)
  index = np.asarray(arrays["index"])[rows].astype(np.int64)
  if index.size == 0:
    raise ValueError(f"{who} needs at least one item")
  if index.min() < 0 or index.max() >= 2**32:
    raise ValueError("dataset indices must fit in uint32 (they key the random draws)")
  num_captions = np.asarray(arrays["num_captions"])[rows]
  if (num_captions < 1).any():
    raise ValueError("every item needs at least one real caption")
  return rows, index, num_captions


def compute_fisher(apply_fn: Callable, params: Mapping[str, Any], arrays: Mapping[str, Any],
                   schedule: NoiseSchedule, *, settings: FisherSettings = FisherSettings(),
                   mesh=None, rows: np.ndarray | None = None,
                   checkpoint_path: str | None = None,
                   progress: Callable[[scores_lib.Progress], None] | None = None,
                   progress_every: int = 50) -> Fisher:
  """Estimates the diagonal Fisher of the selected weights over `arrays` (see module doc).

  Args:
    apply_fn: `apply_fn(params, x_t, t, text_states) -> prediction`.
    params: the trained weights θ0.
    arrays: precomputed arrays (`latents` [N,2,h,w,c], `text_states` [N,K,L,D],
      `num_captions` [N], `index` [N]); numpy or memmaps.
    rows: which rows to use (default all).
    checkpoint_path: an npz written atomically at every flush; a rerun with the same
      settings resumes from it (the result equals an uninterrupted run's).
    progress: called with a `Progress` every `progress_every` micro-batches and at the end.
  """
  mesh = mesh or parallel.make_mesh()
  rows, index, num_captions = checked_items(arrays, rows, "compute_fisher")
  mask = selection.select(params, settings.selection)
  selected, rest = selection.split(params, mask)
  batch = parallel.pad_to_multiple(settings.batch_size, mesh.size)
  per_epoch = 2 * rows.size
  total = settings.num_epochs * per_epoch
  num_batches = -(-total // batch)
  fingerprint = _fingerprint(scores_lib.params_fingerprint(params), settings, index, schedule,
                             total)

  host = {p: np.zeros(v.shape, np.float64) for p, v in selected.items()}
  start = 0
  if checkpoint_path and os.path.exists(checkpoint_path):
    with io_utils.open_npz(checkpoint_path) as ckpt:
      if str(ckpt["fingerprint"]) != fingerprint:
        raise ValueError(f"{checkpoint_path} is a Fisher checkpoint of other settings or model;"
                         " delete it or use another path")
      if "examples_done" not in ckpt:
        raise ValueError(f"{checkpoint_path} counts batches, not examples (an older format): "
                         "it cannot be resumed under another batch size; delete it")
      # Examples, not batches: a resume with another batch size or device count continues
      # at the first example not yet summed (the draws are keyed per example).
      start = int(ckpt["examples_done"])
      host = {p: ckpt["sum/" + selection.path_name(p)] for p in selected}
  num_batches = -(-(total - start) // batch)   # of this run

  step = _fisher_step(apply_fn, mesh, settings.min_snr_gamma)
  rep = parallel.replicated(mesh)
  selected, rest = jax.device_put((selected, rest), rep)
  schedule_d = jax.device_put(schedule, rep)
  seed = jax.device_put(np.uint32(settings.seed), rep)
  zeros = lambda: jax.device_put({p: np.zeros(v.shape, np.float32) for p, v in host.items()},
                                 rep)
  acc, comp = zeros(), zeros()
  meter = scores_lib.ProgressMeter("fisher", total, "examples", start=start)

  def flush(examples_done: int):
    nonlocal acc, comp
    a, c = jax.device_get((acc, comp))
    for p in host:
      host[p] += a[p].astype(np.float64) - c[p].astype(np.float64)
    acc, comp = zeros(), zeros()
    if checkpoint_path and parallel.is_main_process():  # every process holds the same sums
      scores_lib.atomic_savez(checkpoint_path, fingerprint=np.asarray(fingerprint),
                              examples_done=np.asarray(examples_done),
                              **{"sum/" + selection.path_name(p): v for p, v in host.items()})

  mine = parallel.process_rows(mesh, batch)  # this process's slots of each global batch
  for b in range(num_batches):
    ids = np.arange(start + b * batch, min(start + (b + 1) * batch, total))
    epoch, within = np.divmod(ids, per_epoch)
    pos, flip = np.divmod(within, 2)
    valid = np.ones(batch, np.float32)
    if ids.size < batch:  # pad with copies of the first example, masked out
      pad = batch - ids.size
      valid[ids.size:] = 0
      epoch, pos, flip = (np.concatenate([a, np.repeat(a[:1], pad)]) for a in (epoch, pos, flip))
    # The plan of the global batch is cheap; only this process's rows are drawn and read.
    epoch, pos, flip, valid = epoch[mine], pos[mine], flip[mine], valid[mine]
    item_rows = rows[pos]
    caption = draw_captions(settings.seed, epoch, index[pos], flip, num_captions[pos])
    host_batch = {
        "x0": _gather_rows(arrays["latents"], item_rows, flip).astype(np.float32),
        "text": _gather_rows(arrays["text_states"], item_rows, caption).astype(np.float32),
        "index": index[pos].astype(np.uint32), "flip": flip.astype(np.int32),
        "epoch": epoch.astype(np.int32), "valid": valid}
    acc, comp = step(acc, comp, selected, rest, schedule_d, seed,
                     parallel.shard_batch(host_batch, mesh, batch))
    done = b + 1
    if done % settings.flush_every == 0 or done == num_batches:
      flush(min(start + done * batch, total))
    if progress and (done % progress_every == 0 or done == num_batches):
      progress(meter(min(start + done * batch, total)))

  values = {p: v / total for p, v in host.items()}
  meta = {"version": FISHER_VERSION, "fingerprint": fingerprint, "num_examples": total,
          "settings": dataclasses.asdict(settings), "num_items": int(rows.size),
          "accumulation": "float32 Kahan pairs on device, folded into float64 on the host"}
  return Fisher(values=values, num_examples=total, meta=meta)


def save_fisher(path: str, fisher: Fisher) -> None:
  """One npz: each weight's Fisher under its path name, plus the metadata as json."""
  scores_lib.atomic_savez(path, __meta__=np.asarray(json.dumps(fisher.meta, sort_keys=True)),
                          **{selection.path_name(p): v for p, v in fisher.values.items()})


def load_fisher(path: str, expected_fingerprint: str | None = None) -> Fisher:
  """Reads `save_fisher`'s file; a different fingerprint than expected is an error."""
  with io_utils.open_npz(path) as data:
    meta = json.loads(str(data["__meta__"]))
    scores_lib.check_version(path, meta, FISHER_VERSION, "Fisher")
    values = {tuple(k.split("/")): data[k] for k in data.files if k != "__meta__"}
  if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
    raise ValueError(f"{path} holds a Fisher for other settings or another model "
                     f"({meta['fingerprint']} != {expected_fingerprint})")
  return Fisher(values=values, num_examples=int(meta["num_examples"]), meta=meta)


def expected_fingerprint(params: Mapping[str, Any], index: np.ndarray, schedule: NoiseSchedule,
                         settings: FisherSettings = FisherSettings()) -> str:
  """The fingerprint `compute_fisher` would give, to check a saved Fisher before reusing it."""
  index = np.asarray(index).astype(np.int64)
  return _fingerprint(scores_lib.params_fingerprint(params), settings, index, schedule,
                      settings.num_epochs * 2 * index.size)
