"""FastGDA: the student's loss and training, mAP(L) against a brute-force reference, and (at
the end) launch.distill on the smoke world."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from attrib_jax.distill import index as index_lib
from attrib_jax.distill import metrics
from attrib_jax.distill import student as student_lib


# ----------------------------------------------------------------------------- mAP(L) ---

def _ap_reference(student_ranking, teacher_ranking, top_l):
  """Precision at each positive's rank, by explicit counting (sklearn's definition)."""
  positives = set(int(i) for i in teacher_ranking[:top_l])
  precisions, hits = [], 0
  for position, item in enumerate(student_ranking, start=1):
    if int(item) in positives:
      hits += 1
      precisions.append(hits / position)
  return sum(precisions) / len(positives)


def test_average_precision_matches_brute_force():
  rng = np.random.default_rng(0)
  for n, top_l in ((7, 1), (50, 5), (200, 37), (200, 200)):
    teacher, student = rng.permutation(n), rng.permutation(n)
    assert metrics.average_precision_at(student, teacher, top_l) == pytest.approx(
        _ap_reference(student, teacher, top_l), rel=1e-12)
  ranking = rng.permutation(30)
  assert metrics.average_precision_at(ranking, ranking, 10) == 1.0
  # Positives at ranks 2 and 4: (1/2 + 2/4) / 2.
  assert metrics.average_precision_at(np.array([9, 0, 8, 1, 7]), np.array([0, 1, 2]), 2) == 0.5


def test_map_mean_and_standard_error():
  rng = np.random.default_rng(1)
  students = [rng.permutation(40) for _ in range(5)]
  teachers = [rng.permutation(40) for _ in range(5)]
  ap = np.array([_ap_reference(s, t, 4) for s, t in zip(students, teachers)])
  mean, se = metrics.map_at(students, teachers, 4)
  assert mean == pytest.approx(ap.mean())
  assert se == pytest.approx(ap.std(ddof=1) / np.sqrt(5))


def test_map_refuses_partial_rankings_and_bad_l():
  with pytest.raises(ValueError, match="misses"):
    metrics.average_precision_at(np.array([3, 4]), np.arange(5), 3)
  with pytest.raises(ValueError, match="L = 6"):
    metrics.average_precision_at(np.arange(5), np.arange(5), 6)
  with pytest.raises(ValueError, match="repeats"):
    metrics.average_precision_at(np.array([0, 0, 1]), np.arange(3), 1)


def test_scaled_l():
  assert metrics.scaled_l((500, 1000, 4000), 118_287) == [500, 1000, 4000]
  assert metrics.scaled_l((500, 1000, 4000), 1000) == [4, 8, 34]


# ----------------------------------------------------------------------------- student ---

def _synthetic_world(num_items=300, num_queries=60, dim=8, candidates=40, seed=0):
  """Influence = cosine in a hidden projection of the first 3 of 8 features (the other 5 are
  louder distractors, so raw cosine is a poor ranking); candidates = a random subset per query,
  ranked by the hidden similarity."""
  rng = np.random.default_rng(seed)
  scale = np.array([1.0] * 3 + [2.0] * (dim - 3), np.float32)
  items = (rng.normal(size=(num_items, dim)) * scale).astype(np.float32)
  queries = (rng.normal(size=(num_queries, dim)) * scale).astype(np.float32)
  mix = rng.normal(size=(3, 16))
  hidden = lambda x: np.tanh(x[:, :3] @ mix)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  truth = unit(hidden(queries)) @ unit(hidden(items)).T
  near = np.stack([rng.choice(num_items, candidates, replace=False) for _ in queries])
  order = np.argsort(-np.take_along_axis(truth, near, 1), axis=1)
  ranked = np.take_along_axis(near, order, 1)
  tau = np.take_along_axis(truth, ranked, 1)
  return items, queries, ranked, tau, truth


def test_candidate_rows_by_image_or_by_image_and_text():
  from attrib_jax.distill import teacher  # pylint: disable=g-import-not-at-top
  # Items 0-3: the query's image, unrelated caption; items 4-7: unrelated image, its caption.
  image = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
  text = np.array([[0.0, 1.0]] * 4 + [[1.0, 0.0]] * 4)
  text[4:] += np.linspace(0, 0.1, 4)[:, None] * [0, 1]    # distinct, still nearest by text
  items = np.concatenate([image, text / np.linalg.norm(text, axis=1, keepdims=True)], axis=1)
  query = np.array([0.9, np.sqrt(1 - 0.81), 1.0, 0.0])
  np.testing.assert_array_equal(teacher.candidate_rows(query, items, 4, 2), [0, 1, 2, 3])
  np.testing.assert_array_equal(teacher.candidate_rows(query, items, 4, 2, by="image_text"),
                                [4, 5, 6, 7])
  # By caption words: the top of the given scores whatever the features say, ties by row.
  words = np.array([0.0, 3.0, 0.0, 1.0, 3.0, 0.0, 2.0, 0.0])
  np.testing.assert_array_equal(
      teacher.candidate_rows(query, items, 3, 2, by="caption-words", word_scores=words),
      [1, 4, 6])
  with pytest.raises(ValueError, match="caption-words score of each of the 8 rows"):
    teacher.candidate_rows(query, items, 3, 2, by="caption-words")
  with pytest.raises(ValueError, match="candidates_by"):
    teacher.candidate_rows(query, items, 4, 2, by="text")
  with pytest.raises(ValueError, match="num_candidates"):
    teacher.candidate_rows(query, items, 9, 2)


def test_outlier_swaps_stay_outside_candidates():
  items, queries, ranked, tau, _ = _synthetic_world()
  data = student_lib.TeacherData(queries, ranked, tau)
  t, c = ranked.shape
  qids, rows = np.repeat(np.arange(t), c), ranked.ravel()
  labels = student_lib.pair_labels(data, "rank").ravel()
  assert labels[0] == 0 and labels[c - 1] == pytest.approx((c - 1) / c)   # j / K, 0 = top
  new_rows, new_labels = student_lib.swap_outliers(np.random.default_rng(0), qids, rows,
                                                   labels, data, len(items), 0.1)
  swapped = new_rows != rows
  assert 0.07 < swapped.mean() < 0.13
  assert np.all(new_labels[swapped] == np.float32((c - 1) / c))
  for q, r in zip(qids[swapped], new_rows[swapped]):
    assert r not in ranked[q]


def test_student_learns_a_ranking_and_beats_raw_features():
  items, queries, ranked, tau, truth = _synthetic_world(num_queries=550)
  train_q, test_q = slice(0, 500), slice(500, 550)
  settings = student_lib.StudentSettings(hidden=(64, 64), out_dim=32, batch_size=256,
                                         num_epochs=8, dropout=0.0)
  data = student_lib.TeacherData(queries[train_q], ranked[train_q], tau[train_q])
  params, losses = student_lib.train(settings, data, items, log=lambda _: None)
  assert losses[-1] < losses[0]
  emb_q = student_lib.embed(settings, params, queries[test_q])
  emb_z = student_lib.embed(settings, params, items)
  teacher = [np.argsort(-row) for row in truth[test_q]]           # held-out queries, all items
  student = list(student_lib.rank_items(params, emb_q, emb_z))
  raw = [np.argsort(-row) for row in queries[test_q] @ items.T]
  learnt, _ = metrics.map_at(student, teacher, 20)
  baseline, _ = metrics.map_at(raw, teacher, 20)
  assert learnt > baseline + 0.15, (learnt, baseline)
  # Index retrieval with the signed query reproduces the score order.
  exact = index_lib.ExactIndex(emb_z)
  got, _ = exact.search(student_lib.retrieval_query(params, emb_q), 10)
  np.testing.assert_array_equal(got, np.stack(student)[:, :10])


def test_regression_student_and_settings_errors(tmp_path):
  items, queries, ranked, tau, _ = _synthetic_world(num_queries=10)
  settings = student_lib.StudentSettings(hidden=(16,), out_dim=8, batch_size=64, num_epochs=1,
                                         loss="regression")
  data = student_lib.TeacherData(queries, ranked, tau)
  params, losses = student_lib.train(settings, data, items, log=lambda _: None)
  assert np.isfinite(losses).all()
  labels = student_lib.pair_labels(data, "regression")
  assert np.all(np.diff(labels, axis=1) >= -1e-6)   # most influential gets the lowest target
  path = str(tmp_path / "student.npz")
  student_lib.save(path, settings, params, {"note": 1})
  loaded_settings, loaded, meta = student_lib.load(path)
  assert loaded_settings == settings and meta["note"] == 1
  np.testing.assert_array_equal(student_lib.embed(settings, params, items),
                                student_lib.embed(loaded_settings, loaded, items))
  with pytest.raises(ValueError, match="student.loss"):
    student_lib.StudentSettings(loss="listwise")
  with pytest.raises(ValueError, match="needs the teacher's scores"):
    student_lib.train(settings, student_lib.TeacherData(queries, ranked), items)
  with pytest.raises(ValueError, match="one network"):
    student_lib.train(settings, data, items[:, :4])
  with pytest.raises(FileNotFoundError, match="train stage"):
    student_lib.load(str(tmp_path / "none.npz"))


# ------------------------------------------------------------------ launch.distill smoke ---

def _launch(module, workdir, *extra):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-m", module, "--config=configs/distill_tiny.py:smoke",
                        f"--workdir={workdir}", *extra], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
  """The smoke world trained and its test queries generated, once for this module."""
  workdir = str(tmp_path_factory.mktemp("distill") / "run")
  _launch("launch.train", workdir)
  _launch("launch.generate", workdir)
  return workdir


def test_launch_distill_smoke(smoke_workdir):
  import json
  import os
  workdir = smoke_workdir
  log = _launch("launch.distill", workdir)
  out = os.path.join(workdir, "distill")
  for stage in ("queries: 6/6", "teacher: 6/6", "test: ", "student: epoch 2/2", "index: scann",
                "eval: "):
    assert stage in log, (stage, log[-3000:])
  assert "ETA" in log
  teacher = np.load(os.path.join(out, "teacher", "train_00000.npz"))
  assert teacher["ranked_rows"].shape == (16,) and np.all(np.diff(teacher["tau"]) <= 0)
  # Training prompts never repeat a test query's.
  test_prompts = {json.load(open(os.path.join(workdir, "queries", q, "query.json")))["prompt"]
                  for q in os.listdir(os.path.join(workdir, "queries")) if q != "overview.png"}
  train_prompts = {json.load(open(os.path.join(out, "train_queries", q, "query.json")))["prompt"]
                   for q in os.listdir(os.path.join(out, "train_queries"))}
  assert len(train_prompts) == 6 and not train_prompts & test_prompts
  result = json.load(open(os.path.join(out, "eval.json")))
  assert result["L"] == [1, 2] and set(result["map"]) >= {
      "student", "student_regression", "features (untuned input)", "caption", "caption-words"}
  index = index_lib.load_index(os.path.join(out, "index"))
  embeddings = np.load(os.path.join(out, "embeddings.npy"))
  assert index.size == 64 and index.dim == 16
  found, _ = index.search(embeddings[:3], 5)
  assert found.shape == (3, 5)
  # A rerun keeps every stage: nothing is generated, scored or trained again.
  log = _launch("launch.distill", workdir)
  assert "queries: 6 of 6 training queries kept, 0 to generate" in log, log[-2000:]
  assert "reusing" in log and "student: epoch" not in log and "unlearn" not in log, log[-3000:]


def test_launch_distill_candidates_by_caption_words(smoke_workdir):
  """The teacher's candidates from the caption-words baseline: each training query's teacher
  file holds exactly the top `num_candidates` rows by that baseline's scores."""
  import os
  from attrib_jax import baselines  # pylint: disable=g-import-not-at-top
  from attrib_jax import generation  # pylint: disable=g-import-not-at-top
  from attrib_jax.data import precompute  # pylint: disable=g-import-not-at-top
  from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
  from configs import distill_tiny  # pylint: disable=g-import-not-at-top
  workdir = smoke_workdir
  _launch("launch.distill", workdir, "--config.distill.candidates_by=caption-words",
          "--config.distill.stages=('queries','teacher')")
  config = distill_tiny.get_config("smoke")
  arrays = precompute.load(os.path.join(workdir, "precomputed"))
  source = recipe.open_dataset(config, os.path.join(workdir, "tfds"))
  context = baselines.Context(arrays=arrays,
                              captions=source.get_items(np.asarray(arrays["index"]))[1])
  words = baselines.make_method("caption-words")
  out = os.path.join(workdir, "distill")
  for name in ("train_00000", "train_00003"):
    query = generation.load_query(os.path.join(out, "train_queries", name))
    want = np.sort(np.argsort(-words.score(query, context), kind="stable")[:16])
    got = np.load(os.path.join(out, "teacher", name + ".npz"))["ranked_rows"]
    np.testing.assert_array_equal(np.sort(got), want)
