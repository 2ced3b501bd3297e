"""AbC metrics, calibrator and tuned features against brute-force references and synthetic worlds."""
import itertools
import math

import numpy as np
import pytest

from attrib_jax.abc import calibration
from attrib_jax.abc import metrics
from attrib_jax.abc import tuning


# ------------------------------------------------------------------------------ metrics ---

def _pessimistic_order(s, pos):
  """Pure python: candidates by score descending, a negative before a tied positive."""
  return sorted(range(len(s)), key=lambda j: (-s[j], bool(pos[j])))


def _ref_ap(s, pos):
  order = _pessimistic_order(s, pos)
  hits, total = 0, 0.0
  for rank, j in enumerate(order, start=1):
    if pos[j]:
      hits += 1
      total += hits / rank
  return total / hits


def _ref_recall(s, pos, k):
  order = _pessimistic_order(s, pos)
  return sum(bool(pos[j]) for j in order[:k]) / sum(bool(p) for p in pos)


def test_metrics_match_brute_force_with_ties():
  rng = np.random.default_rng(0)
  # Scores on a coarse grid: many ties, including positives tied with negatives.
  scores = rng.integers(0, 6, (40, 30)).astype(float)
  positives = rng.random((40, 30)) < 0.15
  positives[np.arange(40), rng.integers(0, 30, 40)] = True
  ap = metrics.average_precision(scores, positives)
  for q in range(40):
    assert ap[q] == pytest.approx(_ref_ap(scores[q], positives[q]), abs=1e-12)
  for k in (1, 5, 10, 29, 30, 100):
    r = metrics.recall_at_k(scores, positives, k)
    assert r == pytest.approx([_ref_recall(scores[q], positives[q], k) for q in range(40)],
                              abs=1e-12)
  both = metrics.retrieval_metrics(scores, positives, (5, 10))
  np.testing.assert_array_equal(both["ap"], ap)
  np.testing.assert_array_equal(both["recall@10"], metrics.recall_at_k(scores, positives, 10))


def test_metrics_hand_made_cases():
  s = np.array([[5., 4, 3, 2, 1]])
  perfect = np.array([[True, True, False, False, False]])
  assert metrics.average_precision(s, perfect)[0] == 1.0
  at_2_and_4 = np.array([[False, True, False, True, False]])
  assert metrics.average_precision(s, at_2_and_4)[0] == pytest.approx((1 / 2 + 2 / 4) / 2)
  assert metrics.recall_at_k(s, at_2_and_4, 2)[0] == 0.5
  assert metrics.recall_at_k(s, at_2_and_4, 4)[0] == 1.0
  # Ties: a positive tied with two negatives ranks after both (pessimistic): rank 3 of 3.
  tied = np.array([[1., 1, 1]])
  one = np.array([[True, False, False]])
  assert metrics.average_precision(tied, one)[0] == pytest.approx(1 / 3)
  assert metrics.recall_at_k(tied, one, 2)[0] == 0.0
  # All tied, all positive: ranks 1..m whatever the order.
  assert metrics.average_precision(tied, np.ones((1, 3), bool))[0] == 1.0
  assert metrics.recall_ks(600) == (5, 10, 60)
  assert metrics.recall_ks(7) == (1, 5, 7)


def test_metrics_refuse_bad_input():
  with pytest.raises(ValueError, match="no positive"):
    metrics.average_precision(np.zeros((2, 3)), np.array([[1, 0, 0], [0, 0, 0]], bool))
  with pytest.raises(ValueError, match="not finite"):
    metrics.recall_at_k(np.array([[np.nan, 1.0]]), np.array([[True, False]]), 1)
  with pytest.raises(ValueError, match="must both be"):
    metrics.average_precision(np.zeros((2, 3)), np.ones((2, 4), bool))


def test_mean_se_and_splits():
  vals = [0.2, 0.4, 0.9, 0.1, 0.5]
  mean, se = metrics.mean_and_se(vals)
  assert mean == pytest.approx(np.mean(vals))
  assert se == pytest.approx(np.std(vals, ddof=1) / math.sqrt(5))
  splits = ["a", "a", "a", "b", "b"]
  by = metrics.summarize_by_split(vals, splits)
  assert by["a"][0] == pytest.approx(0.5) and by["a"][2] == 3
  assert math.isnan(metrics.summarize_by_split([1.0], ["x"])["x"][1])
  # Clustered: average within each set first, then over sets.
  by_set = metrics.summarize_by_split(vals, splits, clusters=["s1", "s1", "s2", "s3", "s3"])
  assert by_set["a"][0] == pytest.approx((0.3 + 0.9) / 2) and by_set["a"][2] == 2
  assert by_set["b"][2] == 1


# -------------------------------------------------------------------------- calibration ---

def _ref_probs(scores, inv_tau, bias):
  """Pure-python float64 truncated softmax, one row at a time."""
  out = []
  for row in scores:
    top = max(row)
    w = [max(math.exp(inv_tau * (x - top)) + bias, 0.0) for x in row]
    out.append([v / sum(w) for v in w])
  return np.array(out)


def _synthetic(seed, q, c, margin=0.3):
  rng = np.random.default_rng(seed)
  s = rng.normal(0, 0.05, (q, c))
  pos = np.zeros((q, c), bool)
  for i in range(q):
    idx = rng.choice(c, 1 if i % 2 else 3, replace=False)
    pos[i, idx] = True
    s[i, idx] += margin + rng.normal(0, 0.05, idx.size)
  return s, pos


def test_probabilities_and_nll_match_reference():
  rng = np.random.default_rng(1)
  scores = rng.normal(0, 0.2, (6, 9))
  pos = np.zeros((6, 9), bool)
  pos[np.arange(6), rng.integers(0, 9, 6)] = True
  pos[0, :3] = True
  for inv_tau, bias in [(1.0, 0.0), (7.5, -0.3), (20.0, 0.05)]:
    p = calibration.probabilities(calibration.Calibrator(inv_tau, bias), scores)
    ref = _ref_probs(scores.tolist(), inv_tau, bias)
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    nll = calibration.negative_log_likelihood(p, pos)
    for q in range(6):
      idx = np.flatnonzero(pos[q])
      want = sum(-math.log(max(ref[q, j], calibration.EPS)) for j in idx) / len(idx)
      assert nll[q] == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(calibration.true_mass(p, pos), (ref * pos).sum(1), rtol=1e-12)
  # Strong truncation zeroes weak candidates: exactly 0, and the NLL floor is eps.
  p = calibration.probabilities(calibration.Calibrator(30.0, -0.5), scores)
  assert (p == 0).any()
  soft = calibration.softmax_probabilities(scores)
  np.testing.assert_allclose(soft, _ref_probs(scores.tolist(), 1.0, 0.0), rtol=1e-12)


def test_fit_loss_matches_float64_reference():
  s, pos = _synthetic(2, 5, 12)
  shifted = s - s.max(axis=1, keepdims=True)
  w = pos / pos.sum(axis=1, keepdims=True)
  inv_tau, bias, beta = 9.0, -0.2, calibration.SHARPNESS
  params = {"log_inv_tau": np.float32(math.log(inv_tau)),
            "bias_raw": np.float32(math.log(math.expm1(bias + 1.0)))}
  got = float(calibration.fit_loss(params, shifted.astype(np.float32), w.astype(np.float32)))
  soft = np.logaddexp(0, beta * (np.exp(inv_tau * shifted) + bias)) / beta
  p = soft / soft.sum(axis=1, keepdims=True)
  want = np.mean(np.sum(-w * np.log(p), axis=1))
  assert got == pytest.approx(want, rel=1e-4)


def test_fit_beats_softmax_and_is_scale_free():
  s, pos = _synthetic(3, 160, 200)
  train, test = slice(0, 80), slice(80, None)
  fits = calibration.fit_candidates(s[train], pos[train], steps=400)
  assert set(fits) == {"temperature"} | {name for name, _, _ in calibration.BIASED_FITS}
  cal = calibration.fit_calibrator(s[train], pos[train], steps=400)
  assert cal == min(fits.values(), key=lambda f: f[1])[0]      # lowest relu NLL on the fit set
  assert fits["abc_softplus100"][0].bias != 0.0
  nll_cal = calibration.negative_log_likelihood(calibration.probabilities(cal, s[test]),
                                                pos[test]).mean()
  nll_soft = calibration.negative_log_likelihood(calibration.softmax_probabilities(s[test]),
                                                 pos[test]).mean()
  assert nll_cal < nll_soft - 1.0, (cal, nll_cal, nll_soft)
  assert cal.inv_tau > 5       # the plain softmax of 0.05-spread scores is near uniform
  # The same scores times 1e4 fit the same calibrators (inv_tau learnt in log space from the
  # scores' own spread). Checked on the smooth fits: the sharp floored one (softplus 1e4) is
  # rough enough that float32 rounding moves where Adam stops.
  big = calibration.fit_candidates(s[train] * 1e4, pos[train], steps=400)
  for name in ("temperature", "abc_softplus100"):
    assert big[name][0].inv_tau * 1e4 == pytest.approx(fits[name][0].inv_tau, rel=1e-3)
    assert big[name][0].bias == pytest.approx(fits[name][0].bias, abs=1e-4)
    assert big[name][1] == pytest.approx(fits[name][1], rel=1e-4)
  assert calibration.fit_calibrator(s[train], pos[train], steps=400) == cal


def test_reliability_of_calibrated_and_overconfident_data():
  rng = np.random.default_rng(4)
  q, c = 3000, 8
  logits = rng.normal(0, 2.0, (q, c))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  # One exemplar per query drawn from p itself: perfectly calibrated by construction.
  draw = np.array([rng.choice(c, p=row) for row in p])
  pos = np.zeros((q, c), bool)
  pos[np.arange(q), draw] = True
  rel = calibration.reliability(p, pos, num_bins=10)
  assert rel["ece"] < 0.01
  assert rel["count"].sum() == q * c
  np.testing.assert_allclose(rel["bin_edges"], np.linspace(0, 1, 11))
  # Brute-force ECE from the returned bins equals the reported one.
  ok = rel["count"] > 0
  brute = np.sum(rel["count"][ok] / (q * c) * np.abs(rel["accuracy"][ok] - rel["confidence"][ok]))
  assert rel["ece"] == pytest.approx(brute, rel=1e-12)
  # The same exemplars judged by an overconfident (sharpened) distribution: a clear ECE.
  sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)
  assert calibration.reliability(sharp, pos)["ece"] > 5 * rel["ece"] + 0.02


def test_top1_reliability_of_calibrated_and_overconfident_data():
  rng = np.random.default_rng(5)
  q, c = 4000, 8
  logits = rng.normal(0, 2.0, (q, c))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  draw = np.array([rng.choice(c, p=row) for row in p])   # calibrated by construction
  pos = np.zeros((q, c), bool)
  pos[np.arange(q), draw] = True
  rel = calibration.top1_reliability(p, pos, num_bins=10)
  assert rel["count"].sum() == q
  # Brute force: one point per query, its top candidate's p against whether it is the exemplar.
  top = p.argmax(1)
  conf, hit = p[np.arange(q), top], (top == draw).astype(float)
  which = np.minimum((conf * 10).astype(int), 9)
  brute = sum(abs(hit[which == b].sum() - conf[which == b].sum()) for b in range(10)) / q
  assert rel["ece"] == pytest.approx(brute, rel=1e-9)
  assert rel["ece"] < 0.03
  sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)
  assert calibration.top1_reliability(sharp, pos)["ece"] > rel["ece"] + 0.1
  # m exemplars: the top candidate's target is 1/m when it is one of them.
  two = pos.copy()
  two[np.arange(q), (draw + 1) % c] = True
  uniform = np.full((q, c), 1.0 / c)
  got = calibration.top1_reliability(uniform, two)
  hits = two[:, 0].mean() / 2   # argmax of a tie is candidate 0
  assert got["ece"] == pytest.approx(abs(hits - 1.0 / c), abs=1e-12)


def test_calibrator_refuses_bad_values():
  with pytest.raises(ValueError, match="inv_tau"):
    calibration.Calibrator(0.0, 0.0)
  with pytest.raises(ValueError, match="bias"):
    calibration.Calibrator(1.0, -1.0)


# ------------------------------------------------------------------------------- tuning ---

def _confounded_world(seed=0, d=16, n_tune=12, n_test=8, per=6, n_distractors=150):
  """Generated features = a rotation of their set's exemplar + noise + a large shared offset:
  the raw cosine sees mostly the offset; a linear map can undo both."""
  rng = np.random.default_rng(seed)
  rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
  offset = rng.normal(size=d)
  offset *= 3 * math.sqrt(d) / np.linalg.norm(offset)
  sets = n_tune + n_test
  exemplars = rng.normal(size=(sets, d))
  real = np.concatenate([exemplars, rng.normal(size=(n_distractors, d))]).astype(np.float32)
  set_of = np.repeat(np.arange(sets), per)
  gen = (exemplars[set_of] @ rotation.T + 0.3 * rng.normal(size=(sets * per, d)) + offset)
  pos = np.zeros((sets * per, len(real)), bool)
  pos[np.arange(sets * per), set_of] = True
  return real, gen.astype(np.float32), pos, set_of < n_tune


def test_tuned_scores_at_init_are_plain_cosine():
  rng = np.random.default_rng(5)
  gen, real = rng.normal(size=(7, 12)) * 30, rng.normal(size=(11, 12)) * 0.01
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  got = tuning.tuned_scores(tuning.init_maps(12), gen, real)
  np.testing.assert_allclose(got, unit(gen) @ unit(real).T, atol=1e-6)


_SETTINGS = dict(steps=60, learning_rate=3e-2, batch_size=32, num_negatives=64,
                 temperature=0.1, weight_decay=1e-4, seed=0)


def test_tuning_raises_unseen_map_and_is_deterministic():
  real, gen, pos, tune = _confounded_world()
  settings = tuning.TuningSettings(**_SETTINGS)
  seen = []
  params = tuning.train_maps(real, gen[tune], pos[tune], settings,
                             progress=lambda i, loss, t: seen.append((i, loss)))
  assert [i for i, _ in seen] == list(range(1, settings.steps + 1))
  assert np.mean([l for _, l in seen[-10:]]) < np.mean([l for _, l in seen[:10]])
  untuned = metrics.average_precision(
      tuning.tuned_scores(tuning.init_maps(real.shape[1]), gen[~tune], real), pos[~tune])
  tuned = metrics.average_precision(tuning.tuned_scores(params, gen[~tune], real), pos[~tune])
  assert tuned.mean() > untuned.mean() + 0.1, (tuned.mean(), untuned.mean())
  again = tuning.train_maps(real, gen[tune], pos[tune], settings)
  for a, b in zip(jax_leaves(params), jax_leaves(again)):
    np.testing.assert_array_equal(a, b)
  other = tuning.train_maps(real, gen[tune], pos[tune],
                            tuning.TuningSettings(**{**_SETTINGS, "seed": 1, "steps": 5}))
  assert not np.array_equal(np.asarray(other["generated"]["kernel"]),
                            np.asarray(params["generated"]["kernel"]))


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_tuning_settings_and_input_checks():
  s = tuning.TuningSettings.from_config({"steps": 3, "temperature": 0.2})
  assert s.steps == 3 and s.temperature == 0.2
  with pytest.raises(ValueError, match="unknown tuning settings.*'tempreature'"):
    tuning.TuningSettings.from_config({"tempreature": 0.2})
  with pytest.raises(ValueError, match="steps"):
    tuning.TuningSettings(steps=0)
  real, gen, pos, _ = _confounded_world(n_tune=2, n_test=1, per=2, n_distractors=5)
  with pytest.raises(ValueError, match="no positive"):
    tuning.train_maps(real, gen, np.zeros_like(pos), tuning.TuningSettings(steps=1))
  with pytest.raises(ValueError, match="same D"):
    tuning.train_maps(real[:, :4], gen, pos, tuning.TuningSettings(steps=1))
  with pytest.raises(ValueError, match="kind"):
    tuning.embed(tuning.init_maps(16), gen, "fake")
