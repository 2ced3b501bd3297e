"""The retraining pool: models trained in one-core worker processes (configs/tiny_eval.py:smoke).

What it must guarantee: every job ends as a finished model directory; a model depends only on
its excluded set (not on which worker trained it, or alongside what); a worker's error reaches
the caller with its message; `ModelCache` trains through the pool and only loads afterwards.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from attrib_jax.evaluation import counterfactual as cf
from attrib_jax.evaluation import retrain_pool
from attrib_jax.models import unet as unet_lib
from attrib_jax.training import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  spec = importlib.util.spec_from_file_location(
      "tiny_eval", os.path.join(ROOT, "configs", "tiny_eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("smoke")


def _params(workdir):
  _, params, _ = unet_lib.load_unet(os.path.join(workdir, "model", "unet"))
  return params


@pytest.fixture(scope="module")
def data_workdir(tmp_path_factory):
  config = _config()
  directory = str(tmp_path_factory.mktemp("pool_data"))
  recipe.prepare(cf.training_config(config), directory, log=lambda s: None)
  return config, directory, str(tmp_path_factory.mktemp("pool_xla_cache"))


def test_pool_models_depend_only_on_their_excluded_set(data_workdir, tmp_path):
  config, data_dir, xla_cache = data_workdir
  pool = retrain_pool.RetrainPool(config, data_dir, num_workers=2,
                                  compilation_cache=xla_cache)
  a, b = [0, 5, 9], [1, 2, 3]
  jobs = [(a, str(tmp_path / "a1")), (b, str(tmp_path / "b")), (a, str(tmp_path / "a2"))]
  timings = pool.train(jobs)
  assert [sorted(t) for t in timings] == [sorted(timings[0])] * 3
  assert {t["worker"] for t in timings} <= {0, 1}
  for _, workdir in jobs:
    assert os.path.exists(os.path.join(workdir, "model", "DONE.json")), workdir
  a1, a2, bb = (_params(str(tmp_path / n)) for n in ("a1", "a2", "b"))
  flat = lambda p: np.concatenate([np.ravel(x) for x in __import__("jax").tree.leaves(p)])
  np.testing.assert_array_equal(flat(a1), flat(a2))   # bit for bit, whichever worker
  assert not np.array_equal(flat(a1), flat(bb))


def test_a_worker_error_reaches_the_caller(data_workdir, tmp_path):
  config, data_dir, xla_cache = data_workdir
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  pool = retrain_pool.RetrainPool(config, data_dir, num_workers=1)
  with pytest.raises(Exception, match="a_file"):
    pool.train([([0], str(blocker / "workdir"))])


def test_model_cache_trains_through_the_pool(data_workdir, tmp_path):
  config, data_dir, xla_cache = data_workdir
  calls = []

  def load_only(excluded, workdir):
    calls.append(list(excluded))
    assert os.path.exists(os.path.join(workdir, "model", "DONE.json")), "not trained yet"
    return _params(workdir)

  cache = cf.ModelCache(str(tmp_path / "models"), cf.recipe_fingerprint(config, one_core=True),
                        load_only, pool=retrain_pool.RetrainPool(
                            config, data_dir, num_workers=2, compilation_cache=xla_cache),
                        log=lambda s: None)
  cache.prefetch([[4, 2], [7], [2, 4], []])      # [2, 4] is [4, 2]; [] is θ0, never trained
  assert len(cache.trained) == 2 and len(cache.timings) == 2
  cache.prefetch([[7]])                          # on disk already: nothing to do
  assert len(cache.trained) == 2
  cache.params([8])                              # not prefetched: the pool trains it first
  assert len(cache.trained) == 3 and calls == [[8]]
  assert cf.recipe_fingerprint(config, one_core=True) != cf.recipe_fingerprint(config)
