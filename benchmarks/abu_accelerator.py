r"""AbU and AbU+ on an accelerator: do they give the CPU's answers, and what does a query cost?

Two parts, both on JAX's default backend (a GPU or TPU when there is one):

1. Agreement (--workdir). A finished tiny-world run whose AbU and AbU+ results were computed on
   CPU (`launch.attribute`, with and without `--config.attribution.preconditioner=ekfac`) is
   scored again here from scratch (Fisher, EK-FAC, pre losses, unlearning, sweep) into a
   temporary directory, with the settings stored in those results. Printed per query and
   method: the Spearman correlation of the scores with the CPU's, the overlap of the top 10,
   and the largest score difference relative to the largest score. Then the sweep again with
   `method="jvp"` (the first-order change) at `matmul_precision` "highest" and "default" (TF32
   on recent NVIDIA GPUs, one bf16 pass on TPUs; sweep.py allows it for "jvp" alone): the
   first shows what the first-order truncation costs, the second what that precision adds.
   Times per stage are printed (the first query includes compilation).

2. Throughput (--mscoco_items). configs/mscoco.py's UNet (57.4M parameters, random weights,
   random 16x16x4 latents and 77x1024 text states): unlearning draws per second (forward +
   backward) and sweep slots per second ("cached": one forward per slot), after a warm-up
   call. From these, the cost of one query at SPEC §2's reference settings (50,000 draws;
   2 x 118,287 items x 100 slots = 23.7M forwards) is *estimated* and printed as such.

  python benchmarks/abu_accelerator.py --workdir runs/tiny --mscoco_items 2048

Reads only the workdir's model/, precomputed/*.npy, queries/ and the CPU results; needs neither
the dataset builder nor ml_collections for part 1 (part 2 loads configs/mscoco.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from attrib_jax import generation  # pylint: disable=g-import-not-at-top,wrong-import-position
from attrib_jax import parallel
from attrib_jax.attribution import runner
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import selection
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.attribution import unlearn as unlearn_lib
from attrib_jax.models import pipeline

# SPEC §2's reference query on MSCOCO: 625 x 80 draws; 2N items x 20 timesteps x 5 captions.
REFERENCE_DRAWS = 50_000
REFERENCE_SLOTS = 2 * 118_287 * 100


def _ranks(x: np.ndarray) -> np.ndarray:
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x))
  return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def compare(ours: np.ndarray, reference: np.ndarray) -> dict:
  top = lambda s: set(np.argsort(-s, kind="stable")[:10].tolist())
  return {"spearman": spearman(ours, reference),
          "top10_overlap": len(top(ours) & top(reference)) / 10,
          "max_rel_diff": float(np.abs(ours - reference).max() / np.abs(reference).max())}


def _load_arrays(workdir: str) -> dict:
  folder = os.path.join(workdir, "precomputed")
  return {name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
          for name in ("latents", "text_states", "num_captions", "index")}


def _settings_of(result: dict) -> runner.AbUSettings:
  """The settings a stored result was computed with (results from before AbU+ get its
  defaults: they were AbU's)."""
  return runner.AbUSettings.from_config(result["meta"]["settings"]["abu"])


def agreement(workdir: str, num_queries: int) -> list[dict]:
  pipe = pipeline.load_pipeline(os.path.join(workdir, "model"))
  arrays = _load_arrays(workdir)
  mesh = parallel.make_mesh()
  queries = generation.list_queries(os.path.join(workdir, "queries"))[:num_queries]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for cpu_dir in ("attribution", "attribution_plus"):
      names = [os.path.basename(q) for q in queries
               if os.path.exists(os.path.join(workdir, cpu_dir, os.path.basename(q),
                                              "result.json"))]
      if not names:
        print(f"   (no CPU results in {workdir}/{cpu_dir}: skipped)")
        continue
      first = scores_lib.load_result(os.path.join(workdir, cpu_dir, names[0], "result"))
      settings = _settings_of(first)
      t0 = time.time()
      abu = runner.AbU(pipe.apply_unet, pipe.unet_params, arrays, pipe.schedule, settings,
                       os.path.join(tmp, cpu_dir), cache_dir=os.path.join(tmp, "cache"),
                       mesh=mesh, log=lambda m: None)
      _ = abu.ekfac if settings.preconditioner == "ekfac" else abu.fisher
      t_factors = time.time() - t0
      t0 = time.time()
      _ = abu.pre_slot_losses
      t_pre = time.time() - t0
      print(f"   {settings.method}: {settings.preconditioner} factors {t_factors:.1f}s, "
            f"pre losses {t_pre:.1f}s (first calls include compilation)")
      jvp = {precision: dataclasses.replace(settings.sweep, method="jvp",
                                            matmul_precision=precision)
             for precision in ("highest", "default")}
      for name in names:
        cpu = scores_lib.load_result(os.path.join(workdir, cpu_dir, name, "result"))
        query = generation.load_query(os.path.join(workdir, "queries", name))
        t0 = time.time()
        after = abu.unlearn(query)
        jax.block_until_ready(after)
        t1 = time.time()
        result = sweep_lib.sweep(pipe.apply_unet, pipe.unet_params, after, arrays,
                                 pipe.schedule, settings=settings.sweep, mesh=mesh,
                                 pre_slot_losses=abu.pre_slot_losses)
        t2 = time.time()
        first_order = {p: sweep_lib.sweep(pipe.apply_unet, pipe.unet_params, after, arrays,
                                          pipe.schedule, settings=s, mesh=mesh)
                       for p, s in jvp.items()}
        t3 = time.time()
        reference = cpu["scores"]
        assert np.array_equal(result.index, cpu["index"]), "item order differs"
        row = {"method": settings.method, "query": name, "unlearn_s": t1 - t0,
               "sweep_s": t2 - t1, "jvp_both_s": t3 - t2,
               **compare(scores_lib.image_scores(result.delta), reference),
               **{f"jvp_{p}": compare(scores_lib.image_scores(r.delta), reference)
                  for p, r in first_order.items()}}
        rows.append(row)
        print(f"   {settings.method:5s} {name:18s} unlearn {row['unlearn_s']:5.1f}s "
              f"sweep {row['sweep_s']:5.1f}s  vs CPU: spearman {row['spearman']:.6f} "
              f"top-10 {row['top10_overlap']:.1f} max rel {row['max_rel_diff']:.1e} | jvp "
              + " ".join(f"@{p} spearman {row[f'jvp_{p}']['spearman']:.6f} top-10 "
                         f"{row[f'jvp_{p}']['top10_overlap']:.1f}" for p in jvp), flush=True)
  return rows


def throughput(num_items: int, draws: int, micro_batch: int, items_per_device: int) -> dict:
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import abu_query  # pylint: disable=g-import-not-at-top
  config = abu_query.load_config("mscoco")
  unet_config = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in config.unet.to_dict().items()}
  bench = abu_query.Bench(
      name="mscoco", unet_config=unet_config, text_length=77, items=num_items, draws=draws,
      micro_batch=micro_batch, timesteps=(250, 750), captions=1, items_per_forward=0,
      items_per_device=items_per_device, alpha=0.01, fisher_items=0, num_train=118_287,
      repeats=1)
  world = abu_query.make_world(bench)
  mesh = parallel.make_mesh()
  settings = bench.unlearn_settings()
  run_gradient = lambda: jax.block_until_ready(unlearn_lib.query_gradient(
      world.apply_fn, world.params, world.query_latent, world.query_text, world.schedule,
      settings=settings, mesh=mesh))
  first_unlearn, _ = abu_query._timed(run_gradient)  # pylint: disable=protected-access
  unlearn_s, _ = abu_query._timed(run_gradient)      # pylint: disable=protected-access
  sweep_settings = dataclasses.replace(bench.sweep_settings(), method="cached",
                                       items_per_forward=0)
  mask = selection.select(world.params)
  after = jax.tree.map(lambda v, m: v * 1.001 if m else v, world.params, mask)
  slots = sweep_lib.compute_pre_losses(world.apply_fn, world.params, world.arrays,
                                       world.schedule, settings=sweep_settings,
                                       mesh=mesh).slot_pre
  run_sweep = lambda: sweep_lib.sweep(world.apply_fn, world.params, after, world.arrays,
                                      world.schedule, settings=sweep_settings, mesh=mesh,
                                      pre_slot_losses=slots)
  first_sweep, _ = abu_query._timed(run_sweep)  # pylint: disable=protected-access
  sweep_s, _ = abu_query._timed(run_sweep)      # pylint: disable=protected-access
  num_slots = num_items * bench.slots
  out = {"draws_per_s": draws / unlearn_s, "slots_per_s": num_slots / sweep_s,
         "first_unlearn_s": first_unlearn, "first_sweep_s": first_sweep}
  out["estimated_reference_query_h"] = (REFERENCE_DRAWS / out["draws_per_s"]
                                        + REFERENCE_SLOTS / out["slots_per_s"]) / 3600
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="", help="a tiny-world run with CPU results")
  parser.add_argument("--queries", type=int, default=3, help="queries compared per method")
  parser.add_argument("--mscoco_items", type=int, default=0, help="0: skip the throughput part")
  parser.add_argument("--draws", type=int, default=1600)
  parser.add_argument("--micro_batch", type=int, default=80)
  parser.add_argument("--items_per_device", type=int, default=64)
  parser.add_argument("--out", default="", help="write the figures here as JSON")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"== backend {jax.default_backend()}: {len(jax.devices())} x "
        f"{getattr(device, 'device_kind', device.platform)}; jax {jax.__version__}")
  figures = {"backend": jax.default_backend(), "device": str(device), "jax": jax.__version__}
  if args.workdir:
    print(f"\n== agreement with the CPU results of {args.workdir}")
    figures["agreement"] = agreement(args.workdir, args.queries)
  if args.mscoco_items:
    print(f"\n== MSCOCO UNet throughput ({args.mscoco_items} items x 4 slots, "
          f"{args.draws} draws in micro-batches of {args.micro_batch})", flush=True)
    t = throughput(args.mscoco_items, args.draws, args.micro_batch, args.items_per_device)
    figures["mscoco"] = t
    print(f"   unlearning {t['draws_per_s']:.0f} draws/s (first call {t['first_unlearn_s']:.1f}s);"
          f" sweep {t['slots_per_s']:.0f} slots/s (first call {t['first_sweep_s']:.1f}s)")
    print(f"   estimated reference query (SPEC §2: {REFERENCE_DRAWS:,} draws + "
          f"{REFERENCE_SLOTS / 1e6:.1f}M sweep forwards): {t['estimated_reference_query_h']:.2f} h"
          " on this device (the paper: 2.28 h on an A100)")
  if args.out:
    scores_lib.atomic_write_json(args.out, figures)


if __name__ == "__main__":
  main()
