"""The evaluation's paired statistics against brute-force float64 references (no models)."""
import itertools
import math
import statistics
from fractions import Fraction

import numpy as np
import pytest

from attrib_jax.evaluation import stats
from attrib_jax.evaluation import summaries


def _rows(values):
  """values: (method, k, query, draw) -> ΔL, as counterfactual rows."""
  return [{"method": m, "k": k, "query": q, "draw": d, "delta_loss": v}
          for (m, k, q, d), v in values.items()]


def test_sign_test_matches_binomial_sum():
  for wins, losses in [(0, 1), (3, 3), (9, 1), (1, 9), (40, 20), (60, 0), (17, 23)]:
    n = wins + losses
    low = min(wins, losses)
    exact = min(Fraction(1), 2 * sum(Fraction(math.comb(n, i), 2 ** n) for i in range(low + 1)))
    assert stats.sign_test_p(wins, losses) == pytest.approx(float(exact), rel=1e-12)
  assert stats.sign_test_p(9, 1) == pytest.approx(22 / 1024)
  assert math.isnan(stats.sign_test_p(0, 0))


def test_paired_difference_against_reference():
  rng = np.random.default_rng(3)
  a = {f"q{i}": float(v) for i, v in enumerate(rng.normal(1e-3, 2e-3, 60))}
  b = {f"q{i}": float(v) for i, v in enumerate(rng.normal(0.0, 2e-3, 70))}   # 10 extra
  d = [a[q] - b[q] for q in sorted(set(a) & set(b))]
  got = stats.paired_difference(a, b, rng=np.random.default_rng(7), num_bootstrap=2000)
  assert got.n == 60
  assert got.mean == pytest.approx(statistics.fmean(d), rel=1e-12)
  assert got.se == pytest.approx(statistics.stdev(d) / math.sqrt(60), rel=1e-12)
  assert (got.wins, got.losses) == (sum(x > 0 for x in d), sum(x < 0 for x in d))
  # Bootstrap: the same resamples drawn one at a time, percentiles by sorting.
  r = np.random.default_rng(7)
  picks = r.integers(0, 60, size=(2000, 60))
  means = sorted(statistics.fmean(d[j] for j in row) for row in picks)
  assert got.ci_low == pytest.approx(np.quantile(means, 0.025), rel=1e-9)
  assert got.ci_high == pytest.approx(np.quantile(means, 0.975), rel=1e-9)
  assert got.ci_low < got.mean < got.ci_high
  # For 60 roughly normal differences the percentile interval is close to mean ± 1.96 s.e.
  assert (got.ci_high - got.ci_low) == pytest.approx(2 * 1.96 * got.se, rel=0.15)
  assert got.z == pytest.approx(got.mean / got.se)


def test_nan_is_an_error():
  with pytest.raises(ValueError, match="not finite"):
    stats.paired_difference({"q": float("nan"), "r": 1.0}, {"q": 0.0, "r": 0.0})


def test_pairwise_table_uses_mean_of_random_draws_and_is_deterministic():
  rng = np.random.default_rng(0)
  values = {}
  queries = [f"q{i:02d}" for i in range(12)]
  for q in queries:
    for k in (2, 4):
      values[("abu", k, q, None)] = float(rng.normal(2e-3, 1e-3))
      values[("pixel", k, q, None)] = float(rng.normal(1e-3, 1e-3))
      for d in range(5):
        values[("random", k, q, d)] = float(rng.normal(0.0, 1e-3))
  rows = _rows(values)
  methods = ("abu", "pixel", "random")
  pairs = stats.pairwise_table(rows, methods, (2, 4), seed=1, num_bootstrap=500)
  assert [(e["k"], e["a"], e["b"]) for e in pairs] == [
      (k, a, b) for k in (2, 4) for a, b in itertools.combinations(methods, 2)]
  e = next(e for e in pairs if (e["k"], e["a"], e["b"]) == (4, "abu", "random"))
  d = [values[("abu", 4, q, None)] - statistics.fmean(values[("random", 4, q, i)]
                                                      for i in range(5)) for q in queries]
  assert e["mean"] == pytest.approx(statistics.fmean(d), rel=1e-12)
  assert e["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(12), rel=1e-12)
  assert stats.random_draws_per_query(rows) == {2: (5, 5), 4: (5, 5)}
  # Same seeds -> the same text; another seed moves only the bootstrap interval.
  text = stats.format_pairwise_markdown(pairs)
  again = stats.pairwise_table(list(reversed(rows)), methods, (2, 4), seed=1, num_bootstrap=500)
  assert stats.format_pairwise_markdown(again) == text
  assert stats.pairwise_csv(again) == stats.pairwise_csv(pairs)
  other = stats.pairwise_table(rows, methods, (2, 4), seed=2, num_bootstrap=500)
  assert stats.format_pairwise_markdown(other) != text
  assert [e["mean"] for e in other] == [e["mean"] for e in pairs]
  # A pair's interval does not depend on which other methods are in the table.
  alone = stats.pairwise_table(rows, ("abu", "random"), (4,), seed=1, num_bootstrap=500)
  assert alone[0]["ci_low"] == e["ci_low"] and alone[0]["ci_high"] == e["ci_high"]
  best = stats.best_against(pairs, ("random", "pixel"), methods, (2, 4))
  assert [b["method"] for b in best] == ["abu", "abu"]
  assert all(b["min_z"] == min(b["z"].values()) for b in best)
  assert "| 4 | abu | random | 12 |" in text


def test_summaries_random_floor_is_mean_over_draws():
  values = {("random", 3, "q", d): float(d) for d in range(5)}
  assert summaries.per_query(_rows(values), "delta_loss") == {("random", 3): {"q": 2.0}}
