"""ScaNN at scale: recall@k against exact search, per-query latency on
ONE core, build time and memory, beside brute force in the same run.

Data: n unit vectors in d dimensions with nested cluster structure, as image embeddings have:
`super_clusters` topics, `clusters` sub-clusters around them (sizes drawn from a Dirichlet, so
some are large and some rare), points around their cluster, all unit-normalised. Queries are
data points moved by a little noise (generated images resemble, but are not, training images).
A query's top-1,000 then spans its own cluster and its topic's neighbouring clusters, not a
cloud of near-orthogonal strangers.

One core: BLAS threads are pinned to 1 before numpy loads, the whole process is pinned to one
CPU (sched_setaffinity) after the index is built (building may use every core), and ScaNN's
`search` / `search_batched` run on the calling thread. Latency = median over the queries of
one query at a time. The machine is shared, so both sides run interleaved in the same run.

  .venv/bin/python benchmarks/scann_scale.py                    # 1M x 768, 200 queries
  .venv/bin/python benchmarks/scann_scale.py --n=100000 --queries=100   # a quick look
  .venv/bin/python benchmarks/scann_scale.py --smoke            # seconds: the test's run
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ[_var] = "1"   # before numpy: exact search on one thread

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from attrib_jax import io_utils  # noqa: E402
from attrib_jax.distill import index as index_lib  # noqa: E402


def peak_gib() -> float:
  """Peak resident memory of this process so far (getrusage; Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib(field: str = "VmRSS") -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def make_data(n: int, d: int, num_super: int, num_clusters: int, num_queries: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """float32 [n, d] unit rows, generated in chunks (no float64 copy of the whole set)."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  tops = unit(rng.standard_normal((num_super, d), dtype=np.float32))
  parent = rng.integers(0, num_super, num_clusters)
  # Sub-clusters at cosine ~0.6 to their topic; points at cosine ~0.6 to their cluster.
  centres = unit(tops[parent] + 1.3 * unit(rng.standard_normal((num_clusters, d),
                                                              dtype=np.float32)))
  sizes = rng.dirichlet(np.full(num_clusters, 2.0))
  label = rng.choice(num_clusters, size=n, p=sizes)
  db = np.empty((n, d), np.float32)
  for start in range(0, n, 50_000):
    stop = min(start + 50_000, n)
    noise = unit(rng.standard_normal((stop - start, d), dtype=np.float32))
    db[start:stop] = unit(centres[label[start:stop]] + 1.3 * noise)
  picks = rng.integers(0, n, num_queries)
  queries = unit(db[picks] + 0.5 * unit(rng.standard_normal((num_queries, d),
                                                           dtype=np.float32)))
  return db, np.ascontiguousarray(queries, np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
  return float(np.mean([np.intersect1d(f, t).size / t.size for f, t in zip(found, truth)]))


def one_at_a_time(fn, queries: np.ndarray) -> tuple[list[float], np.ndarray]:
  times, out = [], []
  for q in queries:
    t0 = time.perf_counter()
    out.append(fn(q[None]))
    times.append(time.perf_counter() - t0)
  return times, np.concatenate(out)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=1_000_000)
  ap.add_argument("--d", type=int, default=768)
  ap.add_argument("--k", type=int, default=1000)
  ap.add_argument("--queries", type=int, default=200)
  ap.add_argument("--exact_queries", type=int, default=100,
                  help="queries timed one at a time by brute force (each reads all n rows)")
  ap.add_argument("--super_clusters", type=int, default=200)
  ap.add_argument("--clusters", type=int, default=4000)
  ap.add_argument("--num_leaves", type=int, default=1000)
  ap.add_argument("--leaves_to_search", type=str, default="30,60,120")
  ap.add_argument("--reorder", type=str, default="2000,4000")
  ap.add_argument("--training_sample_size", type=int, default=100_000)
  ap.add_argument("--dims_per_block", type=int, default=2)
  ap.add_argument("--anisotropic_threshold", type=float, default=0.2)
  ap.add_argument("--spherical", type=int, default=0,
                  help="1: spherical k-means for the tree (unit data, inner product)")
  ap.add_argument("--index_dir", default="",
                  help="keep the built index here and reuse it on a rerun with the same data "
                  "and build settings (to try other leaves_to_search / reorder without a "
                  "rebuild; the build's time and memory are those recorded when it was built)")
  ap.add_argument("--core", type=int, default=None,
                  help="the CPU every timing runs on (default: the lowest one this process may "
                  "use, so `taskset -c 1` keeps it on core 1)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--smoke", action="store_true",
                  help="seconds-long sizes for tests (5,000 x 32, k = 50); not a measurement")
  a = ap.parse_args()
  if a.smoke:
    a.n, a.d, a.k, a.queries, a.exact_queries = 5000, 32, 50, 20, 5
    a.super_clusters, a.clusters, a.num_leaves = 10, 100, 50
    a.leaves_to_search, a.reorder, a.training_sample_size = "5,50", "200", 5000

  if a.core is None:
    a.core = min(os.sched_getaffinity(0))
  started = time.perf_counter()
  print(f"load average at start {'/'.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"(1/5/15 min, {os.cpu_count()} CPUs); allowed CPUs {sorted(os.sched_getaffinity(0))}",
        flush=True)
  t0 = time.perf_counter()
  db, queries = make_data(a.n, a.d, a.super_clusters, a.clusters, a.queries, a.seed)
  print(f"data: {a.n:,} x {a.d} float32 ({db.nbytes / 2**30:.2f} GiB), {a.clusters} clusters "
        f"in {a.super_clusters} topics, {a.queries} queries, made in "
        f"{time.perf_counter() - t0:.0f}s; RSS {rss_gib():.2f} GiB", flush=True)

  rss0, peak0 = rss_gib(), peak_gib()
  settings = index_lib.IndexSettings(
      kind="scann", num_leaves=a.num_leaves,
      leaves_to_search=int(a.leaves_to_search.split(",")[0]),
      training_sample_size=a.training_sample_size, dims_per_block=a.dims_per_block,
      anisotropic_threshold=a.anisotropic_threshold, spherical=bool(a.spherical),
      reorder=int(a.reorder.split(",")[0]), k=a.k)
  key = {"data": [a.n, a.d, a.super_clusters, a.clusters, a.queries, a.seed],
         "build": {f: v for f, v in dataclasses.asdict(settings).items()
                   if f not in ("leaves_to_search", "reorder")}}
  record = os.path.join(a.index_dir, "benchmark.json") if a.index_dir else ""
  held = json.load(open(record)) if record and os.path.exists(record) else None
  if held and held["key"] == json.loads(json.dumps(key)):
    scann_index = index_lib.load_index(a.index_dir)
    build = held["build"]
    print(f"scann: REUSED {a.index_dir} (built earlier: {build['seconds']:.1f}s on "
          f"{build['cores']} core(s), RSS +{build['rss_gib']:.2f} GiB, peak "
          f"+{build['peak_gib']:.2f} GiB)", flush=True)
  else:
    scann_index = index_lib.build_index(db, settings)
    gc.collect()
    build = {"seconds": scann_index.build_seconds, "cores": len(os.sched_getaffinity(0)),
             "rss_gib": rss_gib() - rss0, "peak_gib": peak_gib() - peak0}
    print(f"scann: built in {build['seconds']:.1f}s on {build['cores']} core(s); RSS "
          f"+{build['rss_gib']:.2f} GiB, peak +{build['peak_gib']:.2f} GiB during the build "
          f"(peak so far {peak_gib():.2f} GiB); settings {scann_index.settings}", flush=True)
    if a.index_dir:
      scann_index.save(a.index_dir)
      io_utils.atomic_write_json(record, {"key": key, "build": build})

  os.sched_setaffinity(0, {a.core})   # every timing below runs on one core
  exact = index_lib.ExactIndex(db, chunk=64)
  t0 = time.perf_counter()
  truth, _ = exact.search(queries, a.k)
  truth_s = time.perf_counter() - t0
  print(f"exact: top-{a.k} of {a.queries} queries in batches of 64: {truth_s:.1f}s "
        f"({1e3 * truth_s / a.queries:.1f} ms per query batched), one core", flush=True)

  # Brute force one query at a time (what a server answering one request does), warmed up.
  exact.search(queries[-1:], a.k)
  exact_times, exact_found = one_at_a_time(lambda q: exact.search(q, a.k)[0],
                                           queries[:a.exact_queries])
  assert recall(exact_found, truth[:a.exact_queries]) == 1.0
  exact_ms = 1e3 * statistics.median(exact_times)

  rows = []
  for leaves in [int(x) for x in a.leaves_to_search.split(",")]:
    for reorder in [int(x) for x in a.reorder.split(",")]:
      fn = lambda q: scann_index.search(q, a.k, leaves_to_search=leaves, reorder=reorder)[0]
      fn(queries[:1])   # warm-up
      times, found = one_at_a_time(fn, queries)
      t0 = time.perf_counter()
      scann_index.search(queries, a.k, leaves_to_search=leaves, reorder=reorder)
      batched = (time.perf_counter() - t0) / a.queries
      ms = 1e3 * statistics.median(times)
      rows.append((leaves, reorder, recall(found, truth), ms, 1e3 * batched, exact_ms / ms))

  print()
  print(f"recall@{a.k} against exact search and latency per query on one core "
        f"(median of {a.queries} single queries; exact: median of {a.exact_queries})")
  print("| method | leaves searched / of | reorder | recall@%d | ms / query | ms / query "
        "(batched) | speed-up vs exact |" % a.k)
  print("|---|---|---|---|---|---|---|")
  print(f"| exact (numpy, 1 thread) | – | – | 1.000 | {exact_ms:.1f} | "
        f"{1e3 * truth_s / a.queries:.1f} | 1.0x |")
  for leaves, reorder, rec, ms, bms, speed in rows:
    print(f"| ScaNN tree+AH+reorder | {leaves} / {a.num_leaves} | {reorder} | {rec:.3f} | "
          f"{ms:.2f} | {bms:.2f} | {speed:.0f}x |")
  print(f"load average at end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; whole run "
        f"{time.perf_counter() - started:.0f}s")
  ok = [r for r in rows if r[2] >= 0.95 and r[3] <= 10 and r[5] >= 10]
  print()
  print(f"build {build['seconds']:.1f}s on {build['cores']} core(s), RSS +{build['rss_gib']:.2f} "
        f"GiB for the index beyond the data (exact search: no build, nothing beyond the data); "
        f"this process's peak RSS {rss_gib('VmHWM'):.2f} GiB "
        f"(getrusage ru_maxrss {peak_gib():.2f} GiB; data {db.nbytes / 2**30:.2f} GiB, held "
        "once by numpy and once by ScaNN for reorder)")
  if ok:
    best = min(ok, key=lambda r: r[3])
    print(f"bar (recall@{a.k} >= 0.95, <= 10 ms, >= 10x exact): MET at leaves_to_search="
          f"{best[0]}, reorder={best[1]}: recall {best[2]:.3f}, {best[3]:.2f} ms, "
          f"{best[5]:.0f}x; index {scann_index.settings}")
  else:
    print(f"bar (recall@{a.k} >= 0.95, <= 10 ms, >= 10x exact): NOT met by any setting above")


if __name__ == "__main__":
  main()
