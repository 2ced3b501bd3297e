"""The whole run as one lax.scan: the same recipe as loop.train, excluded rows never read."""
import jax
import numpy as np

from attrib_jax import parallel
from attrib_jax.training import loop
from attrib_jax.training import scan_train
from test_training import SCHEDULE, _Spy, _arrays, model  # noqa: F401  (fixture)

SETTINGS = loop.TrainSettings(num_steps=8, batch_size=8, learning_rate=1e-3, seed=3)


def _rel(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
            for x, y in zip(la, lb))
  den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
  return (num / den) ** 0.5


def test_scan_equals_step_loop_and_never_reads_excluded(model, tmp_path):  # noqa: F811
  apply_fn, params = model
  arrays = _arrays()
  excluded = [100, 105, 117, 123]          # rows 0, 5, 17, 23
  spies = {k: _Spy(arrays[k]) for k in scan_train.BATCH_KEYS}
  state = scan_train.train_scan(arrays=dict(arrays, **spies), apply_fn=apply_fn,
                                init_params=params, schedule=SCHEDULE, settings=SETTINGS,
                                excluded=excluded, log=lambda _: None)
  for spy in spies.values():
    assert spy.rows == set(range(24)) - {0, 5, 17, 23}
  reference = loop.train(arrays=arrays, apply_fn=apply_fn, init_params=params,
                         schedule=SCHEDULE, workdir=str(tmp_path), settings=SETTINGS,
                         excluded=excluded, log=lambda _: None, mesh=parallel.make_mesh(1))
  assert int(state.step) == 8
  # Same batches, step and randomness; only XLA's fusion differs (last bits).
  assert _rel(state.params, reference.params) < 1e-5
  moved = _rel(reference.params, params)
  assert moved > 1e-4   # the tolerance is far below what training moved
  # The batch order is loop.train's.
  rows, batches = scan_train.run_rows(arrays["index"], excluded, SETTINGS)
  assert not np.isin(batches, [0, 5, 17, 23]).any() and batches.shape == (8, 8)
