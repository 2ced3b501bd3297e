"""A launcher under 2 processes × 2 CPU devices (`--multihost`, localhost) == 1 process × 4.

`launch.train --config=configs/tiny.py:smoke` from an empty workdir: process 0 builds the
dataset, text side and precomputed arrays while process 1 waits (recipe.prepare), both train
on a mesh of 4 devices feeding their own rows, both sample the grid, and process 0 alone writes
the model, DONE.json, RUN.json and the grid. The saved weights must equal the one-process run's
to float32 rounding, and every file is there once and whole. (tests/test_multihost.py checks
the kernels themselves: Fisher, EK-FAC, unlearning, sweep.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import param_checks
import worker_procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600   # all three processes; a hung collective fails the test instead of CI
# Short but with everything a run writes: a checkpoint and a sample grid mid-run.
OVERRIDES = ("--config.train.num_steps=4", "--config.train.checkpoint_every=2",
             "--config.train.sample_every=2", "--config.train.log_every=2",
             "--config.generate.num_steps=2")


def _start(module: str, workdir: str, log: str, devices: int, *extra: str) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  with open(log, "w") as f:
    return subprocess.Popen(
        [sys.executable, "-m", module, "--config=configs/tiny.py:smoke",
         f"--workdir={workdir}", *OVERRIDES, *extra], env=env, cwd=ROOT, stdout=f,
        stderr=subprocess.STDOUT)


def _files(workdir: str) -> dict[str, int]:
  """Relative path -> size of every file, Orbax's checkpoints left out (written by both)."""
  out = {}
  for top, _, names in os.walk(workdir):
    rel_top = os.path.relpath(top, workdir)
    if rel_top.split(os.sep)[:2] == ["train", "checkpoints"]:
      continue
    for name in names:
      out[os.path.normpath(os.path.join(rel_top, name))] = os.path.getsize(
          os.path.join(top, name))
  return out


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("multihost_launch"))
  one, two = os.path.join(root, "one"), os.path.join(root, "two")
  logs = [os.path.join(root, n) for n in ("one.log", "two_0.log", "two_1.log")]
  port = worker_procs.free_port()
  peer = ("--multihost", f"--coordinator_address=localhost:{port}", "--num_processes=2")
  start = time.monotonic()
  procs = [_start("launch.train", one, logs[0], 4),
           _start("launch.train", two, logs[1], 2, *peer, "--process_id=0"),
           _start("launch.train", two, logs[2], 2, *peer, "--process_id=1")]
  worker_procs.wait_all(procs, logs, TIMEOUT_S, "launcher")
  print(f"launch.train 1x4 and 2x2: {time.monotonic() - start:.0f} s")
  return one, two, [open(log).read() for log in logs]


def test_the_processes_say_who_they_are(train_runs):
  _, _, (one_log, log0, log1) = train_runs
  assert "multihost:" not in one_log
  assert "multihost: process 0 of 2, 2 local device(s) of 4" in log0
  assert "multihost: process 1 of 2, 2 local device(s) of 4" in log1


def test_saved_weights_agree(train_runs):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from attrib_jax.models import pipeline  # pylint: disable=g-import-not-at-top
  one, two, _ = train_runs
  a = traverse_util.flatten_dict(pipeline.load_pipeline(os.path.join(one, "model")).unet_params)
  b = traverse_util.flatten_dict(pipeline.load_pipeline(os.path.join(two, "model")).unet_params)
  assert a.keys() == b.keys()
  # Float32 rounding of the gradient all-reduce in another order, through Adam. The tolerance is
  # absolute at the weights' scale: some parameters have a gradient that is rounding noise
  # alone (a key bias, which softmax ignores), and Adam turns any noise into steps of the
  # learning rate, so their values agree only to that scale, not to their own ~1e-6 size.
  # A key projection's bias has a zero gradient in exact arithmetic (it adds q·b to every key's
  # logit alike), so both runs' values are Adam-amplified rounding noise (~1e-5): they get a 10x
  # looser bound (a loaded CI run measured 1.17e-5 apart on add_embedding/pool/k_proj/bias).
  scale = param_checks.weights_scale(a)
  worst = 0.0
  for k in a:
    x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
    np.testing.assert_allclose(y, x, rtol=1e-5,
                               atol=(1e-4 if param_checks.noise_only(k) else 1e-5) * scale,
                               err_msg="/".join(k))
    worst = max(worst, float(np.abs(y - x).max()))
  print(f"unet weights: max |2x2 - 1x4| {worst:.2e}, weights' max {scale:.2f}")


def test_files_exist_once_and_whole(train_runs):
  one, two, _ = train_runs
  files_one, files_two = _files(one), _files(two)
  assert sorted(files_two) == sorted(files_one)
  assert not [f for f in files_two if ".tmp" in f or "partial" in f]
  assert {"model/DONE.json", "train/RUN.json", "train/samples_000002.png",
          "train/samples_000004.png", "precomputed/manifest.json", "dataset_metadata.json",
          "model/unet/diffusion_pytorch_model.safetensors"} <= set(files_two)
  assert ({f: n for f, n in files_two.items() if not f.endswith(".png")}
          == {f: n for f, n in files_one.items() if not f.endswith(".png")})   # same sizes
  for name in ("model/DONE.json", "train/RUN.json"):   # the same settings, whole JSON
    with open(os.path.join(one, name)) as f1, open(os.path.join(two, name)) as f2:
      held_one, held_two = json.load(f1), json.load(f2)
    assert held_one == held_two, name
  # The grids: sampled from weights equal to float32 rounding, so at most a level apart.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name in ("train/samples_000002.png", "train/samples_000004.png"):
    x = np.asarray(Image.open(os.path.join(one, name)), np.int16)
    y = np.asarray(Image.open(os.path.join(two, name)), np.int16)
    assert x.shape == y.shape and np.abs(x - y).max() <= 1, name
  # The precomputed arrays the two runs trained on (process 0's alone in the 2-process run).
  from attrib_jax.data import precompute  # pylint: disable=g-import-not-at-top
  p1 = precompute.load(os.path.join(one, "precomputed"))
  p2 = precompute.load(os.path.join(two, "precomputed"))
  for k in p1:
    np.testing.assert_array_equal(np.asarray(p2[k]), np.asarray(p1[k]), err_msg=k)


def test_process_flags_need_multihost():
  out = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/tiny.py:smoke",
                        "--workdir=/nonexistent", "--process_id=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0 and "--process_id without --multihost" in out.stderr
