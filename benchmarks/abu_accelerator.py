r"""AbU and AbU+ on an accelerator: do they give the CPU's answers, and what does a query cost?

Three parts, all on JAX's default backend (a GPU or TPU when there is one):

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

2. Cost model (--mscoco_items). configs/mscoco.py's UNet (57.4M parameters, random weights,
   random 16x16x4 latents and 77x1024 text states). For the unlearning step's program and the
   sweep's program of each method (paired, cached, jvp, jvp at compute_dtype bfloat16, and the
   pre pass that fills "cached"'s cache once per model): FLOPs per draw / per slot from XLA's
   cost analysis of the compiled program, its time per call on this device after a warm-up
   (median of --repeats), the achieved FLOP/s, the fraction of the device's dense peak
   (--peak_tflops FP32,BF16; H100/H200 known) and SPEC §2's full query (50,000 draws;
   2 x 118,287 items x 100 slots = 23.7M slots) projected per method: a projection from the
   measured rates, printed as such. (`--cost_config tiny`: the same in seconds, a smoke test.)

3. Reduced precision (--precision_items). The MSCOCO UNet, a gradient step of the query's loss
   (|Δθ| = --precision_step x |θ0| on the selection), swept by "jvp" at compute_dtype float32
   and bfloat16 (sweep.py): Spearman, AP of the float32 top 100 and the largest difference.

  python benchmarks/abu_accelerator.py --workdir runs/tiny --mscoco_items 2048
  python benchmarks/abu_accelerator.py --mscoco_items 16 --draws 16 --micro_batch 8 \
      --items_per_device 2 --repeats 2 --peak_tflops 1,2     # a CPU, minutes
  python benchmarks/abu_accelerator.py --precision_items 200 --precision_timesteps 250,750

Reads only the workdir's model/, precomputed/*.npy, queries/ and the CPU results; needs neither
the dataset builder nor ml_collections for part 1 (parts 2 and 3 load configs/mscoco.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util as flax_traverse

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


# ---------------------------------------------------------------------- cost model ---

# Dense peaks in TFLOP/s, (float32, bf16), per device kind (NVIDIA's SXM data sheets; float32
# is the CUDA-core rate: "highest" precision does not use the tensor cores).
PEAKS = {"H100": (67.0, 989.0), "H200": (67.0, 989.0)}
# The sweep variants costed: (name, program mode, compute dtype). "cached" also needs the pre
# losses once per model ("pre": one forward per slot), costed separately.
VARIANTS = (("paired", "paired", "float32"), ("cached", "post", "float32"),
            ("jvp", "jvp", "float32"), ("jvp-bf16", "jvp", "bfloat16"),
            ("pre (cache, once per model)", "pre", "float32"))


def default_peaks(device) -> tuple[float, float] | None:
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAKS.items() if k in kind), None)


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


def _time_calls(call: Callable[[], Any], repeats: int) -> float:
  """Median seconds of `repeats` calls after one warm-up call."""
  jax.block_until_ready(call())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def cost_model(num_items: int, draws: int, micro_batch: int, items_per_device: int,
               repeats: int, peaks: tuple[float, float] | None, config: str = "mscoco") -> dict:
  """FLOPs per unlearning draw and per sweep slot from XLA's cost analysis of the very programs
  unlearn.py and sweep.py run, timed on this device (the compiled executables called
  directly), and SPEC's full query projected from both.

  The UNet is built with attention_impl="xla" (what "auto" picks on an accelerator): XLA's cost
  analysis counts a loop body once whatever its trip count, and the "cpu" impl runs attention
  in a scan. The sweep program's own `lax.map` runs once (items_per_forward = all of a device's
  items), so nothing is undercounted.
  """
  abu_query, bench = _bench(num_items, (250, 750), (0, 1), items_per_device, draws,
                            micro_batch, config)
  from attrib_jax.models import unet  # pylint: disable=g-import-not-at-top
  world = abu_query.make_world(bench)
  module = unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(bench.unet_config),
                                     attention_impl="xla")
  apply_fn = lambda p, x, t, c: module.apply({"params": p}, x, t, c)
  mesh = parallel.make_mesh()
  rep = parallel.replicated(mesh)
  out = {"devices": mesh.size, "slots_per_item": bench.slots}

  # Unlearning: one micro-batch of draws on every device, forward + backward + psum.
  settings = bench.unlearn_settings()
  selected, rest = selection.split(world.params, selection.select(world.params))
  micro, _ = unlearn_lib._layout(settings.num_draws, micro_batch, mesh.size)  # pylint: disable=protected-access
  program = unlearn_lib._chunk_program(  # pylint: disable=protected-access
      apply_fn, mesh, settings.num_draws, settings.micro_batch,
      unlearn_lib._stratified_draws, settings.draws_per_batch, None, False)  # pylint: disable=protected-access
  table = unlearn_lib.draw_timesteps(0, 0, num_draws=settings.num_draws,
                                     draws_per_batch=settings.draws_per_batch,
                                     num_timesteps=world.schedule.num_train_timesteps)
  fixed = jax.device_put((selected, rest, world.schedule, world.query_latent, world.query_text,
                          np.uint32(0), np.int32(0), table, np.int32(0),
                          np.zeros((0,), np.float32)), rep)
  zeros = lambda: jax.device_put(jax.tree.map(lambda v: np.zeros(v.shape, np.float32),
                                              selected), rep)
  t0 = time.time()
  compiled = program.lower(zeros(), *fixed).compile()
  draws_per_call = micro * mesh.size
  row = {"flops": _flops(compiled) / draws_per_call, "compile_s": time.time() - t0}
  row["s"] = _time_calls(lambda: compiled(zeros(), *fixed), repeats) / draws_per_call
  out["unlearn"] = row
  print(f"   unlearning: {row['flops'] / 1e9:8.3f} GFLOP/draw, {1 / row['s']:9.1f} draws/s, "
        f"{row['flops'] / row['s'] / 1e12:8.3f} TFLOP/s (compile {row['compile_s']:.0f}s)",
        flush=True)

  # The sweep: one call = items_per_device items on every device, all their slots.
  batch = items_per_device * mesh.size
  rows = np.arange(batch) % num_items
  host = {"latents": world.arrays["latents"][rows], "text": world.arrays["text_states"][rows],
          "index": world.arrays["index"][rows].astype(np.uint32)}
  batch_d = parallel.shard_batch(host, mesh, batch)
  flat = flax_traverse.flatten_dict(world.params)
  paths = sorted(p for p, m in flax_traverse.flatten_dict(selection.select(world.params)).items()
                 if m)
  after = {p: flat[p] * np.float32(1.001) for p in paths}
  params_d, seed = jax.device_put((world.params, np.uint32(0)), rep)
  out["sweep"] = {}
  for name, mode, dtype in VARIANTS:
    changed = ({} if mode == "pre" else
               {p: after[p] - flat[p] for p in paths} if mode == "jvp" else after)
    program = sweep_lib._sweep_program(  # pylint: disable=protected-access
        apply_fn, mesh, bench.timesteps, bench.flips, 1, mode, items_per_device, "highest",
        True, dtype)
    args = (params_d, jax.device_put(changed, rep), jax.device_put(world.schedule, rep), seed,
            batch_d)
    t0 = time.time()
    compiled = program.lower(*args).compile()
    slots_per_call = batch * bench.slots
    row = {"flops": _flops(compiled) / slots_per_call, "compile_s": time.time() - t0,
           "dtype": dtype}
    row["s"] = _time_calls(lambda: compiled(*args), repeats) / slots_per_call
    out["sweep"][name] = row
    print(f"   sweep {name:28s}: {row['flops'] / 1e9:8.3f} GFLOP/slot, {1 / row['s']:9.1f} "
          f"slots/s, {row['flops'] / row['s'] / 1e12:8.3f} TFLOP/s (compile "
          f"{row['compile_s']:.0f}s)", flush=True)

  # SPEC's full query per sweep method: measured rates, and the floor at the device's peak.
  u = out["unlearn"]
  pre = out["sweep"]["pre (cache, once per model)"]
  print(f"\n   projected SPEC query ({REFERENCE_DRAWS:,} draws + {REFERENCE_SLOTS / 1e6:.1f}M "
        f"slots) on this device{'' if peaks else ' (no --peak_tflops: peak columns n/a)'}:")
  print(f"   {'method':10s} {'PFLOP':>8s} {'measured':>11s} {'achieved':>10s} "
        f"{'% of peak':>9s} {'at peak':>9s}")
  out["projection"] = {}
  for name, row in out["sweep"].items():
    if name.startswith("pre"):
      continue
    flops = REFERENCE_DRAWS * u["flops"] + REFERENCE_SLOTS * row["flops"]
    seconds = REFERENCE_DRAWS * u["s"] + REFERENCE_SLOTS * row["s"]
    achieved = flops / seconds
    proj = {"pflop": flops / 1e15, "seconds": seconds, "tflops": achieved / 1e12}
    line = (f"   {name:10s} {flops / 1e15:8.1f} {seconds / 3600:10.2f}h "
            f"{achieved / 1e12:9.3f}T")
    if peaks:
      peak = 1e12 * (peaks[1] if row["dtype"] == "bfloat16" else peaks[0])
      # The unlearning step stays float32 whatever the sweep's dtype.
      floor = REFERENCE_DRAWS * u["flops"] / (1e12 * peaks[0]) + REFERENCE_SLOTS * row[
          "flops"] / peak
      proj.update(fraction_of_peak=floor / seconds, at_peak_s=floor)
      line += f" {100 * floor / seconds:8.2f}% {floor / 60:8.1f}m"
    out["projection"][name] = proj
    print(line + ("   (+ pre losses once per model: "
                  f"{REFERENCE_SLOTS * pre['s'] / 3600:.2f}h)" if name == "cached" else ""))
  return out


# ---------------------------------------------------------------------- precision ---

def _bench(num_items: int, timesteps: tuple[int, ...], flips: tuple[int, ...],
           items_per_device: int, draws: int = 16, micro_batch: int = 8, name: str = "mscoco"):
  """abu_query's world of configs/<name>.py's UNet (random weights, latents, text states)."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import abu_query  # pylint: disable=g-import-not-at-top
  config = abu_query.load_config(name)
  unet_config = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in config.unet.to_dict().items()}
  return abu_query, abu_query.Bench(
      name=name, unet_config=unet_config, text_length=abu_query.TEXT_LENGTH[name],
      items=num_items, draws=draws,
      micro_batch=micro_batch, timesteps=timesteps, captions=1,
      items_per_forward=items_per_device, items_per_device=items_per_device, alpha=0.01,
      fisher_items=0, num_train=abu_query.NUM_TRAIN[name], repeats=1, flips=flips)


def gradient_step(world, mesh, settings: unlearn_lib.UnlearnSettings, relative: float) -> dict:
  """θ' = θ0 + c·ḡ on the selection, c making |Δθ| = `relative`·|θ0| there: an unlearning
  direction of the query (random weights have no meaningful Fisher, so no preconditioner)."""
  grad = unlearn_lib.query_gradient(world.apply_fn, world.params, world.query_latent,
                                    world.query_text, world.schedule, settings=settings,
                                    mesh=mesh)
  flat = flax_traverse.flatten_dict(jax.device_get(world.params))
  norm = lambda tree: np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64)))
                                  for v in tree.values()))
  c = relative * norm({p: flat[p] for p in grad}) / norm(grad)
  for p, g in grad.items():
    flat[p] = (flat[p] + np.float32(c) * g).astype(np.float32)
  return flax_traverse.unflatten_dict(flat)


def ranking_figures(ours: np.ndarray, reference: np.ndarray, k: int = 100) -> dict:
  """Spearman, AP of the reference's top k in our ranking, largest |difference| / max|ref|."""
  index = np.arange(len(reference))
  positives = scores_lib.top_k(reference, k, index)
  return {"spearman": spearman(ours, reference),
          f"ap{k}": scores_lib.average_precision(scores_lib.rank(ours, index), positives),
          "max_rel_diff": float(np.abs(ours - reference).max() / np.abs(reference).max())}


def precision_check(num_items: int, timesteps: tuple[int, ...], flips: tuple[int, ...],
                    items_per_device: int, relative_step: float) -> dict:
  """The MSCOCO UNet (random weights): "jvp" at compute_dtype bfloat16 against float32."""
  abu_query, bench = _bench(num_items, timesteps, flips, items_per_device)
  world = abu_query.make_world(bench)
  mesh = parallel.make_mesh()
  t0 = time.time()
  after = gradient_step(world, mesh, bench.unlearn_settings(), relative_step)
  print(f"   query gradient ({bench.draws} draws) and step |Δθ| = {relative_step:g}·|θ0| on "
        f"the selection: {time.time() - t0:.0f}s", flush=True)
  out = {"items": num_items, "slots_per_item": bench.slots, "relative_step": relative_step}
  taus = {}
  for dtype in ("float32", "bfloat16"):
    settings = dataclasses.replace(bench.sweep_settings(), method="jvp", compute_dtype=dtype)
    t0 = time.time()
    result = sweep_lib.sweep(world.apply_fn, world.params, after, world.arrays, world.schedule,
                             settings=settings, mesh=mesh,
                             progress=lambda p: print(f"   {dtype} {p}", flush=True),
                             progress_every=5)
    out[f"{dtype}_s"] = time.time() - t0
    taus[dtype] = scores_lib.image_scores(result.delta)
    print(f"   jvp {dtype}: {out[f'{dtype}_s']:.0f}s (with compilation)", flush=True)
  out["bf16_vs_f32"] = ranking_figures(taus["bfloat16"], taus["float32"])
  out["tau_f32_mean_abs"] = float(np.abs(taus["float32"]).mean())
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="", help="a tiny-world run with CPU results")
  parser.add_argument("--queries", type=int, default=3, help="queries compared per method")
  parser.add_argument("--mscoco_items", type=int, default=0,
                      help="items of the MSCOCO world of the cost model (0: skip it)")
  parser.add_argument("--cost_config", default="mscoco",
                      help="configs/<name>.py's UNet for the cost model (tiny: a smoke test)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per program")
  parser.add_argument("--peak_tflops", default="",
                      help="the device's dense peak as 'FP32,BF16' TFLOP/s; default per device "
                           "kind: H100 (SXM) and H200 67,989 (CUDA-core fp32, tensor-core bf16 "
                           "dense); none for others (a CPU: give it)")
  parser.add_argument("--draws", type=int, default=1600)
  parser.add_argument("--micro_batch", type=int, default=80)
  parser.add_argument("--items_per_device", type=int, default=64)
  parser.add_argument("--precision_items", type=int, default=0,
                      help="items of the bf16-vs-float32 ranking check (0: skip)")
  parser.add_argument("--precision_timesteps", default="250,750")
  parser.add_argument("--precision_flips", default="0")
  parser.add_argument("--precision_step", type=float, default=1e-3,
                      help="|Δθ| / |θ0| of the check's gradient step on the selection")
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
    peaks = (tuple(float(v) for v in args.peak_tflops.split(",")) if args.peak_tflops
             else default_peaks(device))
    print(f"\n== cost model: {args.cost_config} UNet (random weights), {args.items_per_device} items x 4 "
          f"slots per device per sweep call, {args.micro_batch} draws per unlearning call, "
          f"{args.repeats} timed calls each; peak TFLOP/s (fp32, bf16): {peaks or 'n/a'}",
          flush=True)
    figures["cost_model"] = cost_model(args.mscoco_items, args.draws, args.micro_batch,
                                       args.items_per_device, args.repeats, peaks,
                                       args.cost_config)
  if args.precision_items:
    ints = lambda text: tuple(int(v) for v in text.split(","))
    print(f"\n== bf16 compute (float32 accumulation) against float32, sweep method jvp: MSCOCO "
          f"UNet, random weights, {args.precision_items} items, timesteps "
          f"{args.precision_timesteps}, flips {args.precision_flips}", flush=True)
    p = precision_check(args.precision_items, ints(args.precision_timesteps),
                        ints(args.precision_flips), 8, args.precision_step)
    figures["precision"] = p
    f = p["bf16_vs_f32"]
    print(f"   bf16 vs float32 ranking: Spearman {f['spearman']:.6f}, AP@100 {f['ap100']:.4f}, "
          f"max |Δτ| / max|τ| {f['max_rel_diff']:.2e} (mean |τ| {p['tau_f32_mean_abs']:.3g})")
  if args.out:
    scores_lib.atomic_write_json(args.out, figures)


if __name__ == "__main__":
  main()
