"""Multi-host for real: 2 processes × 2 CPU devices under `jax.distributed` == 1 process × 4.

Both runs execute tests/multihost_worker.py (training with an interruption and a resume, the
Fisher, the AbU step, the sweep paired and jvp, EK-FAC and the AbU+ step) on a mesh of 4
devices. In the 2-process run each process feeds only its own rows, the processes meet in
XLA's CPU collectives (gloo, jax 0.10.2's default), and only process 0 writes. The numbers
must agree to float32 rounding: the draws are keyed by example, not by device or process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import worker_procs

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT_S = 600  # the whole test; a hung collective must fail it, not hang CI


def _start(out_dir: str, log: str, devices: int, *distributed: int) -> subprocess.Popen:
  os.makedirs(out_dir, exist_ok=True)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, WORKER, out_dir, *map(str, distributed)], env=env,
                            stdout=f, stderr=subprocess.STDOUT, cwd=os.path.dirname(WORKER))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("multihost"))
  one, two = os.path.join(root, "one"), os.path.join(root, "two")
  port = worker_procs.free_port()
  start = time.monotonic()
  # All three at once: the two peers spend part of their time waiting on each other.
  logs = [os.path.join(root, name) for name in ("one.log", "two_0.log", "two_1.log")]
  procs = [_start(one, logs[0], 4), _start(two, logs[1], 2, 0, 2, port),
           _start(two, logs[2], 2, 1, 2, port)]
  worker_procs.wait_all(procs, logs, TIMEOUT_S, "worker")
  print(f"multihost runs: {time.monotonic() - start:.0f} s")
  return (dict(np.load(os.path.join(one, "results.npz"))),
          dict(np.load(os.path.join(two, "results.npz"))), two)


def _agree(one: dict, two: dict, prefix: str, rtol: float = 1e-5) -> None:
  """Equal to float32 rounding: within rtol of each value, or of the array's largest value
  (sums of float32 terms in another order differ by about that much)."""
  keys = [k for k in one if k.startswith(prefix)]
  assert keys and keys == [k for k in two if k.startswith(prefix)]
  worst_abs = worst_rel = 0.0
  for k in keys:
    scale = float(np.abs(one[k]).max())
    np.testing.assert_allclose(two[k], one[k], rtol=rtol, atol=rtol * scale, err_msg=k)
    diff = float(np.abs(two[k].astype(np.float64) - one[k]).max())
    worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / max(scale, 1e-30))
  print(f"{prefix:16s} max |2x2 - 1x4| {worst_abs:.2e}, relative to the array's max "
        f"{worst_rel:.2e}")


def test_the_runs_are_what_they_claim(runs):
  one, two, two_dir = runs
  assert int(one["process_count"]) == 1 and int(two["process_count"]) == 2
  assert int(one["mesh_size"]) == int(two["mesh_size"]) == 4
  # Each process reads its own half of a global batch of 8, not the whole batch.
  np.testing.assert_array_equal(one["rows_of_process"], [np.arange(8)])
  np.testing.assert_array_equal(two["rows_of_process"], [np.arange(4), np.arange(4, 8)])
  # Only process 0 writes the attribution checkpoints (each process got its own folder).
  assert sorted(os.listdir(os.path.join(two_dir, "process_0"))) == [
      "fisher_ckpt.npz", "sweep_jvp.npz", "sweep_paired.npz"]
  assert os.listdir(os.path.join(two_dir, "process_1")) == []


def test_training_step_and_resume_agree(runs):
  one, two, _ = runs
  assert int(two["train/step"]) == 3
  _agree(one, two, "train/")


def test_fisher_agrees(runs):
  one, two, _ = runs
  assert all((two[k] > 0).all() for k in two if k.startswith("fisher/"))
  _agree(one, two, "fisher/")


def test_unlearning_steps_agree(runs):
  one, two, _ = runs
  for prefix in ("unlearn/", "ekfac_unlearn/"):  # both steps moved the selected weights
    for kv in ("to_k", "to_v"):
      moved = np.abs(two[f"{prefix}attn2/{kv}/kernel"] - two[f"theta0/attn2/{kv}/kernel"])
      assert moved.max() > 1e-4, prefix + kv
  _agree(one, two, "unlearn/")
  _agree(one, two, "ekfac/")
  _agree(one, two, "ekfac_unlearn/")


def test_sweep_scores_agree(runs):
  one, two, _ = runs
  for method in ("paired", "jvp"):
    delta = two[f"sweep_{method}/delta"]
    assert np.abs(delta).max() > 1e-3  # the step did change the training losses
    _agree(one, two, f"sweep_{method}/")


def test_process_rows_and_shard_batch_on_one_process():
  """In-process (8 fake devices): one process feeds every row, a wrong count is an error."""
  import jax  # pylint: disable=g-import-not-at-top
  from attrib_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(4)
  np.testing.assert_array_equal(parallel.process_rows(mesh, 8), np.arange(8))
  with pytest.raises(ValueError, match="does not split over 4 devices"):
    parallel.process_rows(mesh, 6)
  batch = {"x": np.arange(16.0).reshape(8, 2), "i": np.arange(8)}
  sharded = parallel.shard_batch(batch, mesh, 8)
  assert sharded["x"].sharding.spec == parallel.batch_sharding(mesh).spec
  np.testing.assert_array_equal(parallel.to_host(sharded)["x"], batch["x"])
  np.testing.assert_array_equal(
      parallel.to_host(parallel.shard_global_batch(batch, mesh))["i"], batch["i"])
  with pytest.raises(ValueError, match="passed 4 rows of a global batch of 8"):
    parallel.shard_batch({"x": np.zeros((4, 2))}, mesh, 8)
  with pytest.raises(ValueError, match="disagree on their row count"):
    parallel.shard_batch({"x": np.zeros((8, 2)), "y": np.zeros(4)}, mesh)
  tree = {("a", "b"): np.arange(3, dtype=np.float64)}
  assert parallel.same_on_every_process(tree) is tree
  assert parallel.is_main_process() and jax.process_count() == 1
