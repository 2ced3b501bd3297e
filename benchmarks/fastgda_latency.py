r"""FastGDA end to end: one query's latency (features + student MLP + index search) on this CPU,
against the same with exact search and against one full AbU+ query, same machine, one run.

One query = what launch.serve does with an uploaded image and its prompt: the image to the
model's input (pixel codec or VAE) and the prompt through the text tower, the student's input
features (UNet bottleneck ⊕ token-averaged text states, teacher.Featurizer), the student MLP,
the index search for the top k. Timed one query at a time, median (and p90) over --queries after
--warmup queries, for
  serve path     service.Service.search_image as launch.serve runs it (generation.query_from_image,
                 Featurizer.queries, student.embed, index.search; each stage timed);
  fused path     service.QueryEncoder: the image, prompt tokens -> retrieval vector in one jitted
                 program, then the same index (what Service.search_image uses when given one);
  exact          the fused path with exact (brute-force) search instead of ScaNN.
AbU+ is one full query as launch.attribute runs it (runner.AbU.score: the EK-FAC unlearning step
and the loss sweep over every training item), timed --abu_repeats times after one warm-up query;
its preconditioner (EK-FAC) is computed once per model beforehand and not counted.

The student: workdir/distill/student.npz and its index when launch.distill has made them;
otherwise the config's student with its random initial weights (latency does not depend on the
weights) and an index over its embeddings of every training item (the output says which).

  PYTHONPATH=. .venv/bin/python benchmarks/fastgda_latency.py --workdir=runs/tiny-demo \
      --run_dir=/tmp/fastgda_latency
  PYTHONPATH=. .venv/bin/python benchmarks/fastgda_latency.py ... --abu_repeats=0   # no AbU+
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import time

import jax
import numpy as np

from attrib_jax.attribution import runner
from attrib_jax.data import precompute
from attrib_jax.distill import index as index_lib
from attrib_jax.distill import service as service_lib
from attrib_jax.distill import student as student_lib
from attrib_jax.distill import teacher as teacher_lib
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.training import recipe


def load_config(path: str):
  """'configs/x.py' or 'configs/x.py:variant', as --config takes it in the launchers."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, variant = path.partition(":")
  spec = importlib.util.spec_from_file_location("distill_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def timed(fn, inputs, warmup: int) -> tuple[list[float], list]:
  """Seconds per call of fn(*x) over inputs (after `warmup` untimed calls), and the results."""
  for x in inputs[:warmup]:
    fn(*x)
  times, out = [], []
  for x in inputs[warmup:]:
    t0 = time.perf_counter()
    out.append(fn(*x))
    times.append(time.perf_counter() - t0)
  return times, out


def ms(times: list[float]) -> str:
  return (f"{1e3 * statistics.median(times):.2f} (p90 "
          f"{1e3 * float(np.percentile(times, 90)):.2f})")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/tiny-demo")
  ap.add_argument("--config", default="configs/distill_tiny.py")
  ap.add_argument("--run_dir", default="/tmp/fastgda_latency",
                  help="AbU+'s result and cache folders (the workdir is only read)")
  ap.add_argument("--queries", type=int, default=100)
  ap.add_argument("--warmup", type=int, default=10, help="at least 1")
  ap.add_argument("--k", type=int, default=10)
  ap.add_argument("--abu_repeats", type=int, default=1)
  ap.add_argument("--serve_queries", type=int, default=5,
                  help="queries for the unfused serve path (it compiles its text encoder on "
                  "every call: seconds each), after 1 warm-up")
  a = ap.parse_args()
  a.warmup = max(a.warmup, 1)

  print(f"load average at start {'/'.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min, "
        f"{os.cpu_count()} CPUs); jax {jax.__version__} on {jax.default_backend()}, "
        f"{jax.device_count()} device(s)", flush=True)
  config = load_config(a.config)
  t0 = time.perf_counter()
  pipe = pipeline_lib.load_pipeline(os.path.join(a.workdir, "model"))
  arrays = precompute.load(os.path.join(a.workdir, "precomputed"))
  feature_settings = teacher_lib.FeatureSettings(**dict(config.distill.features))
  featurizer = teacher_lib.Featurizer(pipe, arrays, feature_settings)
  item_features = featurizer.items()
  n = item_features.shape[0]
  distill_dir = os.path.join(a.workdir, "distill")
  if os.path.exists(os.path.join(distill_dir, "student.npz")):
    settings, params, _ = student_lib.load(os.path.join(distill_dir, "student.npz"))
    scann = index_lib.load_index(os.path.join(distill_dir, "index"))
    embeddings = np.load(os.path.join(distill_dir, "embeddings.npy"))
    which = f"the trained student and index of {distill_dir}"
  else:
    d = config.distill
    settings = student_lib.StudentSettings(**dict(d.student, hidden=tuple(d.student.hidden)))
    params = student_lib.init_params(settings, item_features.shape[1])
    embeddings = student_lib.embed(settings, params, item_features)
    index_settings = index_lib.IndexSettings(**dict(d.index))
    scann = index_lib.build_index(embeddings, dataclasses.replace(
        index_settings, k=min(index_settings.k, n)))
    which = ("the config's student at its RANDOM initial weights (no trained student in "
             f"{distill_dir}; latency does not depend on the weights) and a fresh index")
  exact = index_lib.ExactIndex(embeddings)
  print(f"model {a.workdir}: {n} items; student {settings.hidden} -> {settings.out_dim} over "
        f"{item_features.shape[1]}-d features: {which}; index {scann.kind} "
        f"({getattr(scann, 'settings', '')}); set up in {time.perf_counter() - t0:.0f}s",
        flush=True)

  # Queries: uploads of training images with one of their captions (content does not change
  # the work done), cycled to warm-up + timed.
  source = recipe.open_dataset(config, os.path.join(a.workdir, "tfds"))
  dataset_index = np.asarray(arrays["index"])
  rows = np.arange(a.warmup + a.queries) % n
  images, captions, _ = source.get_items(dataset_index[rows])
  inputs = [(np.asarray(im), caps[0], a.k) for im, caps in zip(images, captions)]

  service = service_lib.Service(
      settings, params, scann,
      make_query=lambda image, prompt: service_lib.generation.query_from_image(pipe, image,
                                                                             prompt),
      query_features=featurizer.queries, images=lambda r: None, captions=[[""]] * n,
      dataset_index=dataset_index, image_size=tuple(images[0].shape[:2]))
  encoder = service_lib.QueryEncoder(pipe, arrays["null_text_states"], feature_settings,
                                     settings, params)
  fused = dataclasses.replace(service, encoder=encoder)
  fused_exact = dataclasses.replace(fused, index=exact)

  results = {}
  # Every path's timed queries are inputs[warmup:]; the unfused one warms up on one query.
  for name, svc, first, count in (
      ("serve path (as launch.serve ran it)", service, a.warmup - 1, a.serve_queries),
      ("fused", fused, 0, a.queries), ("fused, exact search", fused_exact, 0, a.queries)):
    times, out = timed(svc.search_image, inputs[first:a.warmup + count], a.warmup - first)
    results[name] = (times, out)
    stage = {s: [o["ms"][s] / 1e3 for o in out] for s in out[0]["ms"]}
    print(f"{name}: total {ms(times)} ms; stages (median ms) "
          + ", ".join(f"{s} {1e3 * statistics.median(v):.3f}" for s, v in stage.items()),
          flush=True)
  same = np.mean([[i["row"] for i in x["items"]] == [i["row"] for i in y["items"]]
                  for x, y in zip(results["serve path (as launch.serve ran it)"][1],
                                  results["fused"][1])])
  recall = np.mean([len({i["row"] for i in x["items"]} & {i["row"] for i in y["items"]}) / a.k
                    for x, y in zip(results["fused"][1], results["fused, exact search"][1])])
  print(f"fused == serve path top-{a.k} on {100 * same:.0f} % of queries; ScaNN recall@{a.k} "
        f"against exact {recall:.3f}", flush=True)

  abu_times = []
  if a.abu_repeats:
    abu_settings = runner.AbUSettings.from_config(config.attribution)
    out_dir = os.path.join(a.run_dir, runner.out_dir_name(abu_settings))
    cache_dir = os.path.join(a.run_dir, "attribution")
    os.makedirs(cache_dir, exist_ok=True)
    for name in ("ekfac.npz", "fisher.npz", "pre_losses.npz"):   # the workdir's, if made
      held = os.path.join(a.workdir, "attribution", name)
      if os.path.exists(held) and not os.path.exists(os.path.join(cache_dir, name)):
        shutil.copy(held, cache_dir)
    abu = runner.AbU(pipe.apply_unet, pipe.unet_params, arrays, pipe.schedule, abu_settings,
                     out_dir, cache_dir=cache_dir, log=lambda s: None)
    t0 = time.perf_counter()
    abu.ekfac if abu_settings.preconditioner == "ekfac" else abu.fisher  # pylint: disable=pointless-statement
    print(f"AbU+ preconditioner ({abu_settings.preconditioner}) ready in "
          f"{time.perf_counter() - t0:.0f}s (once per model; not counted)", flush=True)
    for r in range(a.abu_repeats + 1):    # the first includes compilation: a warm-up
      query = service_lib.generation.query_from_image(pipe, *inputs[r][:2])
      shutil.rmtree(out_dir, ignore_errors=True)   # never a kept result
      t0 = time.perf_counter()
      abu.score(query, f"latency_{r}")
      seconds = time.perf_counter() - t0
      print(f"AbU+ query {r}{' (warm-up, compiles)' if r == 0 else ''}: {seconds:.1f}s "
            f"over {n} items", flush=True)
      if r:
        abu_times.append(seconds)

  fast = statistics.median(results["fused"][0])
  print()
  print(f"one FastGDA query end to end on this CPU (image + prompt -> top-{a.k} of {n}); "
        f"median (p90) over {a.queries} single queries after {a.warmup} warm-up")
  print("| path | queries timed | ms per query, median (p90) | vs fused ScaNN |")
  print("|---|---|---|---|")
  for name, (times, _) in results.items():
    print(f"| {name} | {len(times)} | {ms(times)} | {statistics.median(times) / fast:.2f}x |")
  if abu_times:
    abu_s = statistics.median(abu_times)
    print(f"| full AbU+ query (unlearn + sweep over {n} items) | {len(abu_times)} | "
          f"{1e3 * abu_s:.0f} | {abu_s / fast:,.0f}x |")
    print(f"\nFastGDA is {abu_s / fast:,.0f}x faster than one AbU+ query here (the paper's "
          "framing: 2,500x-400,000x)")
  print(f"bar (<= 5 ms end to end, median): {'MET' if fast <= 5e-3 else 'NOT met'} "
        f"({1e3 * fast:.2f} ms)")
  print(f"load average at end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
