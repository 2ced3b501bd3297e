"""Results are never silently wrong: cache keys and resume points cover everything a result
depends on, stored results are checked on load, writes are atomic, non-finite values are
errors, and settings refuse impossible values at construction.

Built on the micro denoiser of test_attribution (same arrays, same settings), so each check
costs a compile of a tiny network.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import test_attribution as ta
from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.attribution import ekfac as ekfac_lib
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import runner
from attrib_jax.attribution import scores
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.attribution import unlearn as unlearn_lib
from attrib_jax.evaluation import counterfactual as cf
from attrib_jax.evaluation import eval_report
from attrib_jax.evaluation import lds as lds_lib


@pytest.fixture(scope="module")
def micro():
  arrays = ta.make_arrays(ta.N)
  params = jax.device_get(jax.jit(ta.MicroDenoiser().init)(
      jax.random.key(0), np.zeros((1,) + ta.LATENT), np.zeros((1,), np.int32),
      np.zeros((1, ta.L, ta.D)))["params"])
  return {"arrays": arrays, "params": params}


class Interrupt(Exception):
  pass


def interrupt_after(examples: int):
  def progress(p):
    if p.done >= examples:
      raise Interrupt
  return progress


# ------------------------------------------------------------------- resume points ---

def test_fisher_resumed_with_another_batch_size_and_device_count_counts_each_example_once(
    micro, tmp_path):
  settings = dataclasses.replace(ta.FISHER, batch_size=8, flush_every=1)
  reference = fisher_lib.compute_fisher(ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE,
                                        settings=settings, mesh=parallel.make_mesh(8))
  path = str(tmp_path / "fisher_partial.npz")
  with pytest.raises(Interrupt):   # 3 batches of 8 = 24 examples summed and checkpointed
    fisher_lib.compute_fisher(ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE,
                              settings=settings, mesh=parallel.make_mesh(8),
                              checkpoint_path=path, progress=interrupt_after(24),
                              progress_every=1)
  # Resumed with batches of 20 on 4 devices: 24 is not a multiple of 20.
  resumed = fisher_lib.compute_fisher(
      ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE,
      settings=dataclasses.replace(settings, batch_size=20), mesh=parallel.make_mesh(4),
      checkpoint_path=path)
  for p, ref in reference.values.items():
    np.testing.assert_allclose(resumed.values[p], ref, rtol=1e-5, atol=1e-7 * ref.max())


def test_sweep_checkpoint_is_not_resumed_under_other_timestep_weights(micro, tmp_path):
  after = jax.tree.map(lambda p: p * 1.01, micro["params"])
  path = str(tmp_path / "sweep_partial.npz")
  run = lambda settings, **kw: sweep_lib.sweep(
      ta.APPLY, micro["params"], after, micro["arrays"], ta.SCHEDULE, settings=settings,
      mesh=parallel.make_mesh(8), checkpoint_path=path, checkpoint_every=1, **kw)
  with pytest.raises(Interrupt):
    run(ta.SWEEP, progress=interrupt_after(8), progress_every=1)
  weighted = dataclasses.replace(ta.SWEEP, min_snr_gamma=5.0)
  with pytest.raises(ValueError, match="another sweep"):
    run(weighted)


def test_sweep_checkpoint_is_not_resumed_under_another_schedule(micro, tmp_path):
  after = jax.tree.map(lambda p: p * 1.01, micro["params"])
  path = str(tmp_path / "sweep_partial.npz")
  with pytest.raises(Interrupt):
    sweep_lib.sweep(ta.APPLY, micro["params"], after, micro["arrays"], ta.SCHEDULE,
                    settings=ta.SWEEP, mesh=parallel.make_mesh(8), checkpoint_path=path,
                    checkpoint_every=1, progress=interrupt_after(8), progress_every=1)
  other = ta.NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2",
                                        "num_train_timesteps": 1000})
  with pytest.raises(ValueError, match="another sweep"):
    sweep_lib.sweep(ta.APPLY, micro["params"], after, micro["arrays"], other,
                    settings=ta.SWEEP, mesh=parallel.make_mesh(8), checkpoint_path=path)
