"""The one sharding vocabulary of attrib_jax: a 1-D data mesh, batches split over it.

Every device-parallel program here (training, Fisher, unlearning, the loss sweep) is `jit` with
`NamedSharding`s over this mesh, or `jax.shard_map` where per-device work is explicit. Parameters
are replicated (our models are at most a few hundred MB); examples are split over `DATA`.
Multi-host: call `jax.distributed.initialize()` first (see `launch/`), then every host builds the
same mesh over `jax.devices()` and feeds its own slice of each batch: it reads the rows
`process_rows` names and passes them to `shard_batch`; `to_host` brings results back (gathering
what other processes hold), and only `is_main_process()` writes files. tests/test_multihost.py
checks 2 processes × 2 CPU devices against 1 × 4.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(num_devices: int | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D mesh named `DATA` over the first `num_devices` devices (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"Asked for {num_devices} devices, only {len(devices)} exist")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over the data axis; the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def pad_to_multiple(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def is_main_process() -> bool:
  """True on process 0, the one process that writes files (always True on one host)."""
  return jax.process_index() == 0


def process_rows(mesh: Mesh, global_size: int) -> np.ndarray:
  """Positions, ascending, of the rows of a global batch of `global_size` that this process
  feeds under `batch_sharding`: the rows its own devices hold. One process: all of them.

  Drivers read only these rows from disk and pass them to `shard_batch`; the order is the
  one `make_array_from_process_local_data` expects (its shards' global order).
  """
  if global_size % mesh.size:
    raise ValueError(f"a global batch of {global_size} rows does not split over "
                     f"{mesh.size} devices")
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_size,))
  if not index_map:
    raise ValueError(f"process {jax.process_index()} owns no device of the mesh: every "
                     "process must hold some of the mesh's devices to feed its rows")
  starts = sorted({idx[0].indices(global_size) for idx in index_map.values()})
  return np.concatenate([np.arange(start, stop) for start, stop, _ in starts])


def shard_batch(batch: Any, mesh: Mesh, global_size: int | None = None) -> Any:
  """This process's rows of a batch (host numpy) -> global arrays split over `DATA`.

  `batch` holds the rows `process_rows(mesh, global_size)` of the global batch; with one
  process that is the whole batch, and this is a plain `device_put`. With several,
  `make_array_from_process_local_data` assembles the global array from every process's rows
  (`global_size` defaults to the local row count times the share of the mesh held here).
  """
  sharding = batch_sharding(mesh)
  local_rows = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
  if len(local_rows) != 1:
    raise ValueError(f"batch leaves disagree on their row count: {sorted(local_rows)}")
  (local_rows,) = local_rows
  if global_size is None:
    num_local = len(sharding.addressable_devices)
    if not num_local or local_rows * mesh.size % num_local:
      raise ValueError(f"{local_rows} local rows do not split over this process's "
                       f"{num_local} devices of the mesh")
    global_size = local_rows * mesh.size // num_local
  expected = process_rows(mesh, global_size).size
  if local_rows != expected:
    raise ValueError(f"process {jax.process_index()} passed {local_rows} rows of a global "
                     f"batch of {global_size}; its devices hold {expected} (see process_rows)")
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (global_size,) + np.shape(x)[1:]), batch)


def shard_global_batch(batch: Any, mesh: Mesh) -> Any:
  """A whole global batch, identical on every process -> global arrays: each process keeps
  its own rows. For batches that are cheap to build everywhere; drivers that read from disk
  should read only `process_rows` and call `shard_batch`."""
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"batch leaves disagree on their row count: {sorted(sizes)}")
  (size,) = sizes
  mine = process_rows(mesh, size)
  return shard_batch(jax.tree.map(lambda x: np.asarray(x)[mine], batch), mesh, size)


def same_on_every_process(tree: Any) -> Any:
  """Process 0's value of a tree of host arrays, on every process (a no-op on one).

  For host results that later become replicated device arrays but need not be bit-identical
  across hosts (LAPACK's eigh may take other code paths on other CPUs): a replicated array
  whose processes hold different bits is silently inconsistent. Sent as raw bytes, so float64
  stays float64 (jax's x64 flag is off). A collective: every process must call it.
  """
  if jax.process_count() == 1:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [np.asarray(x) for x in leaves]
  sent = multihost_utils.broadcast_one_to_all(
      [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in leaves])
  return jax.tree.unflatten(treedef, [np.asarray(r).view(x.dtype).reshape(x.shape)
                                      for r, x in zip(sent, leaves)])


_barriers_passed = 0


def barrier(name: str, timeout_s: float | None = None) -> None:
  """Waits until every process reaches `name` (e.g. after process 0 wrote a file the others
  read next). A no-op on one process.

  `timeout_s` (for waits on long host work, e.g. process 0 building a dataset): the wait is the
  coordination service's barrier with that deadline, not a device collective (whose transport
  may give up sooner). Every process must pass the same barriers in the same order.
  """
  global _barriers_passed
  if jax.process_count() == 1:
    return
  if timeout_s is None:
    multihost_utils.sync_global_devices(name)
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  _barriers_passed += 1   # a barrier id is used once: `name` may be met again (e.g. per seed)
  distributed.global_state.client.wait_at_barrier(f"{name}#{_barriers_passed}",
                                                  int(timeout_s * 1000))


def to_host(tree: Any) -> Any:
  """Device arrays -> numpy, the global value on every process.

  Fully addressable or replicated arrays are read locally; an array split over other
  processes' devices (a batch-sharded output) is all-gathered, which is a collective: every
  process must call this in the same order.
  """
  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(fetch, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
