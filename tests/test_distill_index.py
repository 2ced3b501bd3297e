"""Retrieval: exact search against numpy, ScaNN's recall against exact on clustered data,
save/load round trips, and the errors a user meets."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from attrib_jax.distill import index as index_lib


def _clustered(n=20_000, d=64, clusters=200, queries=200, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, d))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  db = centres[rng.integers(0, clusters, n)] + 0.08 * rng.normal(size=(n, d))
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  q = db[rng.integers(0, n, queries)] + 0.05 * rng.normal(size=(queries, d))
  return db.astype(np.float32), q.astype(np.float32)


def _recall(found, truth):
  return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


def test_exact_search_matches_numpy():
  db, q = _clustered(n=500, d=16, clusters=10, queries=7)
  got_i, got_s = index_lib.ExactIndex(db, chunk=3).search(q, 12)
  full = q @ db.T
  np.testing.assert_array_equal(got_i, np.argsort(-full, axis=1, kind="stable")[:, :12])
  np.testing.assert_allclose(got_s, -np.sort(-full, axis=1)[:, :12], rtol=1e-6)
  all_i, _ = index_lib.ExactIndex(db).search(q[:1], 500)   # k = n
  assert sorted(all_i[0].tolist()) == list(range(500))


def test_scann_recall_against_exact_and_round_trip(tmp_path):
  db, q = _clustered()
  k = 100
  truth, _ = index_lib.ExactIndex(db).search(q, k)
  settings = index_lib.IndexSettings(num_leaves=100, leaves_to_search=15, reorder=400, k=k)
  index = index_lib.build_index(db, settings)
  found, scores = index.search(q, k)
  recall = _recall(found, truth)
  assert recall >= 0.95, recall
  # Searching fewer leaves costs recall: the setting reaches ScaNN.
  assert _recall(index.search(q, k, leaves_to_search=1)[0], truth) < recall
  np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, found, 1), atol=1e-4)
  index.save(str(tmp_path / "scann"))
  # Moved after saving (ScaNN writes absolute asset paths; load reads them from the folder).
  os.rename(tmp_path / "scann", tmp_path / "moved")
  loaded = index_lib.load_index(str(tmp_path / "moved"))
  assert isinstance(loaded, index_lib.ScannIndex) and loaded.settings == index.settings
  again_i, again_s = loaded.search(q, k)
  np.testing.assert_array_equal(again_i, found)
  np.testing.assert_array_equal(again_s, scores)
  exact = index_lib.ExactIndex(db)
  exact.save(str(tmp_path / "exact"))
  np.testing.assert_array_equal(index_lib.load_index(str(tmp_path / "exact")).search(q, 5)[0],
                                truth[:, :5])


def test_scann_on_a_tiny_database():
  db, q = _clustered(n=30, d=8, clusters=3, queries=4)
  index = index_lib.build_index(db, index_lib.IndexSettings(k=10))
  found, _ = index.search(q, 10)
  truth, _ = index_lib.ExactIndex(db).search(q, 10)
  assert _recall(found, truth) >= 0.9


def test_index_errors(tmp_path):
  db, q = _clustered(n=300, d=16, clusters=5, queries=3)
  for kind in index_lib.KINDS:
    index = index_lib.build_index(db, index_lib.IndexSettings(kind=kind, k=10))
    with pytest.raises(ValueError, match="dimension 16"):
      index.search(q[:, :8], 5)
    with pytest.raises(ValueError, match="k = 301"):
      index.search(q, 301)
    with pytest.raises(ValueError, match="empty database"):
      index_lib.build_index(db[:0], index_lib.IndexSettings(kind=kind))
  with pytest.raises(FileNotFoundError, match="no index in"):
    index_lib.load_index(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="index.kind"):
    index_lib.IndexSettings(kind="faiss")


def test_spherical_tree_and_older_index_json(tmp_path):
  db, q = _clustered(n=5000, d=32, clusters=50, queries=50)
  k = 50
  truth, _ = index_lib.ExactIndex(db).search(q, k)
  settings = index_lib.IndexSettings(num_leaves=50, leaves_to_search=10, reorder=200, k=k,
                                     spherical=True)
  index = index_lib.build_index(db, settings)
  assert _recall(index.search(q, k)[0], truth) >= 0.95
  index.save(str(tmp_path / "s"))
  assert index_lib.load_index(str(tmp_path / "s")).settings.spherical
  # An index saved before the setting existed loads with the default (False).
  meta_path = tmp_path / "s" / "index.json"
  meta = json.loads(meta_path.read_text())
  del meta["settings"]["spherical"]
  meta_path.write_text(json.dumps(meta))
  loaded = index_lib.load_index(str(tmp_path / "s"))
  assert not loaded.settings.spherical
  np.testing.assert_array_equal(loaded.search(q, k)[0], index.search(q, k)[0])
