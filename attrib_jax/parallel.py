"""The one sharding vocabulary of attrib_jax: a 1-D data mesh, batches split over it.

Every device-parallel program here (training, Fisher, unlearning, the loss sweep) is `jit` with
`NamedSharding`s over this mesh, or `jax.shard_map` where per-device work is explicit. Parameters
are replicated (our models are at most a few hundred MB); examples are split over `DATA`.
Multi-host: call `jax.distributed.initialize()` first (see `launch/`), then every host builds the
same mesh over `jax.devices()` and feeds its own slice of each batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
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


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Host numpy batch -> global arrays split over `DATA`.

  Single host: a plain `device_put`. Multi-host: each process passes its own rows and
  `make_array_from_process_local_data` assembles the global array.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
