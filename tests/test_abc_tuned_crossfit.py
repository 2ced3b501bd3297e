"""evaluate.run_tuned's protocol on a stub benchmark (no towers, cached features stubbed):
the maps never see a test set's exemplar row, and a tune query is scored by maps trained
without its own set's queries (cross-fitting), test queries by maps trained on every tune set."""
import types

import numpy as np
import pytest

from attrib_jax.abc import evaluate
from attrib_jax.abc import tuning

D, DISTRACTORS, PER_SET = 8, 20, 3
SPLITS = ["tune", "tune", "tune", "tune", "test_seen", "test_unseen"]


def _bench():
  sets = [{"name": f"s{i}", "split": sp, "exemplar_rows": [i]} for i, sp in enumerate(SPLITS)]
  e = len(sets)
  c = e + DISTRACTORS

  def positives(name):
    out = np.zeros(c, bool)
    out[[s for s in sets if s["name"] == name][0]["exemplar_rows"]] = True
    return out

  queries = {s["name"]: [(f"q{j}", None) for j in range(PER_SET)] for s in sets}
  return types.SimpleNamespace(sets=sets, queries=queries, num_exemplars=e, num_candidates=c,
                               positives=positives)


@pytest.mark.parametrize("folds", [1, 2, 4])
def test_run_tuned_protocol(tmp_path, monkeypatch, folds):
  bench = _bench()
  rng = np.random.default_rng(0)
  real = rng.normal(size=(bench.num_candidates, D)).astype(np.float32)
  names = [(s, q) for s, items in bench.queries.items() for q, _ in items]
  gen = dict(zip(names, rng.normal(size=(len(names), D)).astype(np.float32)))
  monkeypatch.setattr(evaluate, "tower_features", lambda *a: (real, gen))
  monkeypatch.setattr(evaluate, "method_key", lambda *a: "key")
  # Record what every training saw. The j-th training returns maps whose generated embedding is
  # the unit vector e_j whatever the input (zero kernel, bias e_j) and whose real map is the
  # identity: a score row is then column j of the unit real features, naming the maps that made it.
  calls = []

  def fake_train(real_feats, gen_feats, positives, settings, progress=None):
    del settings, progress
    calls.append({"real": np.asarray(real_feats), "gen": np.asarray(gen_feats),
                  "positives": np.asarray(positives)})
    params = tuning.init_maps(D)
    params["generated"]["kernel"] = params["generated"]["kernel"] * 0
    params["generated"]["bias"] = params["generated"]["bias"].at[len(calls) - 1].set(1.0)
    return params

  monkeypatch.setattr(tuning, "train_maps", fake_train)
  settings = evaluate.settings_from_config(None)
  settings["methods"] = ("tuned-dino",)
  settings["tuning_folds"] = folds
  store = evaluate.ScoreStore(str(tmp_path / "scores"))
  evaluate.run_tuned(bench, settings, store, str(tmp_path), lambda msg: None)

  tune_names = [s["name"] for s in bench.sets if s["split"] == "tune"]
  expected_calls = 1 + (folds if folds >= 2 else 0)
  assert len(calls) == expected_calls
  test_rows = [r for s in bench.sets if s["split"] != "tune" for r in s["exemplar_rows"]]
  for call in calls:
    # Training rows: tune exemplars + distractors, never a test exemplar.
    assert len(call["real"]) == bench.num_candidates - len(test_rows)
    for r in test_rows:
      assert not np.any(np.all(call["real"] == real[r], axis=1))
  # The first call trains on every tune query.
  assert len(calls[0]["gen"]) == PER_SET * len(tune_names)
  unit_real = real / np.linalg.norm(real, axis=1, keepdims=True)
  fold_of = {n: i % folds for i, n in enumerate(tune_names)}
  for s, items in bench.queries.items():
    for q, _ in items:
      row = store.get("tuned-dino", s, q, "key")
      assert row is not None and row.shape == (bench.num_candidates,)
      # Test queries (and tune queries when nothing can be held out): the maps trained on every
      # tune set (call 0). A tune query otherwise: its fold's maps (call 1 + fold).
      made_by = 1 + fold_of[s] if (s in fold_of and folds >= 2) else 0
      np.testing.assert_allclose(row, unit_real[:, made_by], atol=1e-5)
  if folds >= 2:
    # Each fold's training saw the queries of every tune set but that fold's.
    for k, call in enumerate(calls[1:]):
      seen = {tuple(v) for v in call["gen"]}
      for n in tune_names:
        for q, _ in bench.queries[n]:
          assert (tuple(gen[(n, q)]) in seen) == (fold_of[n] != k)
      assert call["positives"].any(axis=1).all()
