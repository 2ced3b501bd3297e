"""Paired statistics over queries: is method A's ΔL above method B's by more than noise?

Contract: `paired_difference(a, b)` takes two methods' per-query values (query -> ΔL, the
random floor's value being the mean over its draws: `summaries.per_query`) and gives, over the
queries both have, the mean ± s.e. of a − b, a seeded bootstrap percentile interval of that
mean and a two-sided exact sign-test p-value; `pairwise_table(rows, methods, ks)` does it for
every unordered pair of methods at every K, `format_pairwise_markdown` / `write_pairwise_csv`
render it. `method_rows` adds, per (method, K), the number of random draws behind the floor.

Invariants: pure numpy/float64 and deterministic: the bootstrap generator is seeded by
(seed, K, a digest of the two method names), so a pair's interval depends neither on the
order the pairs are visited nor on which other methods are in the table; same seeds and
same cells, same table text. Ties (a − b == 0 exactly) count for neither side of the sign
test, as in its textbook form; NaN or inf values are errors (`summaries.mean_and_se`).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import math
from typing import Mapping, Sequence

import numpy as np

from attrib_jax.evaluation import summaries

NUM_BOOTSTRAP = 10_000
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """a − b over the queries both methods were measured on."""
  n: int
  mean: float
  se: float
  ci_low: float              # bootstrap percentile interval of the mean (CONFIDENCE)
  ci_high: float
  wins: int                  # queries with a > b
  losses: int                # queries with a < b
  sign_p: float              # two-sided exact sign test (ties dropped); NaN with no untied query

  @property
  def z(self) -> float:
    """mean / s.e. ("more than two standard errors" is z > 2)."""
    return self.mean / self.se if self.se > 0 and math.isfinite(self.se) else float("nan")


def sign_test_p(wins: int, losses: int) -> float:
  """Two-sided exact binomial sign test: P(|X − n/2| >= |wins − n/2|), X ~ Bin(n, 1/2)."""
  n = wins + losses
  if n == 0:
    return float("nan")
  low = min(wins, losses)
  # Exact integer arithmetic: the tail of Bin(n, 1/2) below `low`, doubled (symmetric).
  tail = sum(math.comb(n, i) for i in range(low + 1))
  return min(1.0, 2.0 * tail / 2.0 ** n)


def _pair_seed(seed: int, k: int, a: str, b: str) -> list[int]:
  words = hashlib.sha256(f"{a}\x00{b}".encode()).digest()[:8]
  return [int(seed), int(k), int.from_bytes(words[:4], "little"),
          int.from_bytes(words[4:], "little")]


def bootstrap_interval(d: np.ndarray, rng: np.random.Generator,
                       num_bootstrap: int = NUM_BOOTSTRAP,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
  """Percentile interval of the mean of `d` over `num_bootstrap` resamples of its entries."""
  d = np.asarray(d, np.float64)
  if d.size < 2:
    return float("nan"), float("nan")
  picks = rng.integers(0, d.size, size=(num_bootstrap, d.size))
  means = d[picks].mean(axis=1)
  alpha = (1.0 - confidence) / 2.0
  low, high = np.quantile(means, [alpha, 1.0 - alpha])
  return float(low), float(high)


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], *,
                      rng: np.random.Generator | None = None,
                      num_bootstrap: int = NUM_BOOTSTRAP) -> PairedDifference:
  """a − b per query (the queries both have, in sorted order), then the statistics."""
  common = sorted(set(a) & set(b))
  d = np.asarray([a[q] - b[q] for q in common], np.float64)
  mean, se, n = summaries.mean_and_se(d.tolist())
  rng = rng if rng is not None else np.random.default_rng(0)
  low, high = bootstrap_interval(d, rng, num_bootstrap)
  wins, losses = int((d > 0).sum()), int((d < 0).sum())
  return PairedDifference(n=n, mean=mean, se=se, ci_low=low, ci_high=high, wins=wins,
                          losses=losses, sign_p=sign_test_p(wins, losses))


def pairwise_table(rows: Sequence[dict], methods: Sequence[str], ks: Sequence[int], *,
                   field: str = "delta_loss", seed: int = 0,
                   num_bootstrap: int = NUM_BOOTSTRAP) -> list[dict]:
  """Every unordered pair (a, b) of `methods` (a before b in the given order) at every K:
  a − b of `field` paired per query. Pairs with no common query are left out."""
  table = summaries.per_query(rows, field)
  out = []
  for k in ks:
    for a, b in itertools.combinations(methods, 2):
      va, vb = table.get((a, k)), table.get((b, k))
      if not va or not vb or not set(va) & set(vb):
        continue
      rng = np.random.default_rng(_pair_seed(seed, k, a, b))
      diff = paired_difference(va, vb, rng=rng, num_bootstrap=num_bootstrap)
      out.append(dict(dataclasses.asdict(diff), k=int(k), a=a, b=b, z=diff.z))
  return out


def random_draws_per_query(rows: Sequence[dict]) -> dict[int, tuple[int, int]]:
  """K -> (fewest, most) random draws a query's floor averages (the floor's power)."""
  draws: dict[tuple[int, str], int] = {}
  for r in rows:
    if r is not None and r["method"] == summaries.RANDOM and r.get("delta_loss") is not None:
      draws[(r["k"], r["query"])] = draws.get((r["k"], r["query"]), 0) + 1
  out: dict[int, list[int]] = {}
  for (k, _), n in draws.items():
    out.setdefault(k, []).append(n)
  return {k: (min(v), max(v)) for k, v in sorted(out.items())}


PAIR_COLUMNS = ("K", "A", "B", "n", "A − B ΔL ×1e-3", "95 % bootstrap ×1e-3", "z", "A > B",
                "sign p", "> 2 s.e.")


def _f(x: float, scale: float = 1e3, digits: int = 3) -> str:
  return f"{x * scale:.{digits}f}" if math.isfinite(x) else "n/a"


def pair_cells(e: Mapping) -> list[str]:
  beats = ("yes" if e["z"] > 2 else "no") if math.isfinite(e["z"]) else "–"
  return [str(e["k"]), e["a"], e["b"], str(e["n"]),
          f"{_f(e['mean'])} ± {_f(e['se'])}", f"[{_f(e['ci_low'])}, {_f(e['ci_high'])}]",
          _f(e["z"], 1.0, 2), f"{e['wins']}/{e['wins'] + e['losses']}",
          f"{e['sign_p']:.2g}" if math.isfinite(e["sign_p"]) else "n/a", beats]


def format_pairwise_markdown(pairs: Sequence[Mapping]) -> str:
  lines = ["| " + " | ".join(PAIR_COLUMNS) + " |", "|" + "---|" * len(PAIR_COLUMNS)]
  lines += ["| " + " | ".join(pair_cells(e)) + " |" for e in pairs]
  return "\n".join(lines) + "\n"


PAIR_FIELDS = ("k", "a", "b", "n", "mean", "se", "ci_low", "ci_high", "z", "wins", "losses",
               "sign_p")


def pairwise_csv(pairs: Sequence[Mapping]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(PAIR_FIELDS)
  for e in pairs:
    writer.writerow([f"{e[f]:.9g}" if isinstance(e[f], float) else e[f] for f in PAIR_FIELDS])
  return buffer.getvalue()


def best_against(pairs: Sequence[Mapping], references: Sequence[str], methods: Sequence[str],
                 ks: Sequence[int]) -> list[dict]:
  """The bar's check: per K, the method (not a reference) with the largest smallest z against
  every reference present, with that z and whether it exceeds 2 against all of them."""
  by = {(e["k"], e["a"], e["b"]): e for e in pairs}

  def z(k, a, b):
    if (k, a, b) in by:
      return by[(k, a, b)]["z"]
    if (k, b, a) in by:
      return -by[(k, b, a)]["z"]
    return float("nan")

  out = []
  for k in ks:
    best = None
    for m in methods:
      if m in references:
        continue
      zs = {r: z(k, m, r) for r in references if r in methods}
      if not zs or not all(math.isfinite(v) for v in zs.values()):
        continue
      worst = min(zs.values())
      if best is None or worst > best["min_z"]:
        best = {"k": int(k), "method": m, "min_z": worst, "z": zs, "beats_all": worst > 2}
    if best is not None:
      out.append(best)
  return out
