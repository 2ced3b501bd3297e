r"""Counterfactual evaluation of every attribution method: leave-K-out retraining and LDS.

  python -m launch.evaluate --config=configs/tiny_eval.py --workdir=runs/eval  # docs/experiments.md §3
  python -m launch.evaluate --config=configs/tiny.py --workdir=runs/tiny
  python -m launch.evaluate --config=configs/tiny.py:smoke --workdir=/tmp/smoke   # seconds-long
  python -m launch.evaluate --config=configs/tiny.py --workdir=runs/tiny \
      --config.evaluation.random_draws=5          # any setting, when the config has the block

Reads workdir/model (θ0, from launch.train), workdir/precomputed, workdir/tfds,
workdir/queries (launch.generate) and reuses workdir/attribution (launch.attribute's AbU
results). Writes workdir/evaluation/ (see attrib_jax/evaluation/eval_report.py): retrained
models under models/<digest of (excluded set, recipe)>/, finished cells, results.jsonl,
table.csv, table.md, plots, report.html. Rerunning resumes: finished cells and trained models
are kept.

Settings: the config's `evaluation` block when it has one, else these defaults (every key is
optional; unknown keys are errors):
  evaluation = dict(
      methods=("abu", "abu+", "pixel", "features", "trak", "d-trak", "random"),
      method_configs={},        # method -> baselines.make_method settings, e.g.
                                #   {"d-trak": {"proj_dim": 256}, "features": {"extractor":
                                #   "random-conv"}}; flips default to (0,) when train.random_flip
                                #   is off; "random" defaults to seed=random_seed
      ks=(),                    # K values; () -> round(f·N) for f in k_fractions
      k_fractions=(0.01, 0.04),
      random_draws=3,           # random-removal floor: random K-subsets per K (shared by queries)
      random_seed=0,
      loss=dict(timestep_stride=5, num_draws=1, seed=0, batch_size=100),   # ΔL's query loss
      regenerate=True,          # ΔG (regeneration, pixel MSE, feature cosine)
      feature_extractor=dict(seed=0, widths=(32, 64), grid=4),  # random-conv features for ΔG;
                                # dict(clip="/dir"): a CLIP tower's image_embeds (also used
                                # when method_configs has clip.weights)
      lds=dict(num_subsets=8, fraction=0.5, subset_seed=0, train_seeds=()),  # num_subsets=0:
                                # no LDS; train_seeds=() -> the config's seed only
      queries=(),               # query names under workdir/queries; () -> all
      keep_train_checkpoints=False,
      retrain_workers=-1,       # retrainings in N processes of one CPU core each, in parallel
                                # (attrib_jax/evaluation/retrain_pool.py); -1: one per core on
                                # CPU, 0 on accelerators; 0: in this process. Their models are
                                # cached apart from in-process ones (other last bits).
      retrain_group_size=0)     # M > 0: retrain M models at a time in one vmapped program in
                                # this process (attrib_jax/evaluation/grouped_retrain.py),
                                # split over the devices when M is a multiple of their number,
                                # instead of the workers; cached apart too. 0: off. For
                                # accelerators: on CPU a group is slower than the workers
                                # (docs/experiments.md §3).
AbU ("abu", the diagonal Fisher) and AbU+ ("abu+", EK-FAC) use `config.attribution` (as
launch.attribute) with that preconditioner, whatever the config's own choice. A variant at other
settings is named `abu@LABEL` or `abu+@LABEL`, its `method_configs` entry holding the blocks of
`config.attribution` it changes, e.g. {"abu+@jvp": {"sweep": {"method": "jvp"}}}; its results
live in workdir/attribution@LABEL/ (attribution_plus@LABEL/), beside the plain method's.

Compilation: every retraining compiles the same training step; a persistent XLA cache
(--compilation_cache, default workdir/evaluation/xla_cache) makes the later ones cache hits.
Each retrained model's log line says what it cost: wall seconds, and the part JAX spent
tracing, lowering and compiling or loading from that cache, with the cache's hits and misses
(`counterfactual.JitClock`); summary.json's `retraining` has the run's means.
"""
import copy
import dataclasses
import os

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from attrib_jax import baselines
from attrib_jax import generation
from attrib_jax import parallel
from attrib_jax.attribution import runner
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.data import precompute
from attrib_jax.evaluation import counterfactual as cf
from attrib_jax.evaluation import eval_report
from attrib_jax.evaluation import grouped_retrain
from attrib_jax.evaluation import retrain_pool
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.training import recipe
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (θ0, queries).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default workdir/evaluation).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices for attribution (0: all).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Persistent XLA cache directory ('' disables; default "
    "OUT/xla_cache).")
flags.mark_flags_as_required(["config", "workdir"])

_FLIP_METHODS = ("pixel", "features", "dino", "clip", "trak", "d-trak")


def _scorers(config, settings, pipe, apply_fn, arrays, source, base_fp, out_dir, mesh):
  """method -> eval_report.Scorer, every method scoring against θ0."""
  index = np.asarray(arrays["index"], np.int64)
  images = lambda rows: source.get_items(index[np.asarray(rows)])[0]
  if index.size * int(np.prod(arrays["latents"].shape[2:])) * 4 < (1 << 30):
    images = images(np.arange(index.size))   # small enough: read once
  encode = lambda x: np.asarray(pipeline_lib.images_to_latents(
      x, vae=pipe.vae, vae_params=pipe.vae_params, pixel_patch=pipe.pixel_patch,
      key=jax.random.key(0)))
  captions = lambda rows: source.get_items(index[np.asarray(rows)])[1]
  context = baselines.Context(
      arrays=arrays, images=images, captions=captions, apply_fn=apply_fn, params=pipe.unet_params,
      schedule=pipe.schedule, mesh=mesh, module=pipe.unet, encode_images=encode,
      cache_dir=os.path.join(out_dir, "baseline_cache"),
      progress=lambda p: common.log(str(p)))
  out = {}
  for name in settings.methods:
    method_config = dict(settings.method_configs.get(name, {}))
    base_name, _, label = name.partition("@")
    if base_name in runner.METHOD_PRECONDITIONER:
      abu_settings = runner.variant_settings(config.attribution, name, method_config)
      abu_out, abu_cache = runner.workdir_dirs(_WORKDIR.value, abu_settings, label=label)
      abu = runner.AbU(apply_fn, pipe.unet_params, arrays, pipe.schedule, abu_settings, abu_out,
                       cache_dir=abu_cache, mesh=mesh, log=common.log)

      def abu_scores(query_name, query, abu=abu):
        result = abu.score(query, query_name)
        position = {int(i): r for r, i in enumerate(result["index"])}
        return result["scores"][[position[int(i)] for i in index]]

      out[name] = eval_report.Scorer(abu_scores, {
          "method": name, "model": base_fp, "settings": dataclasses.asdict(abu_settings)})
      continue
    if name in _FLIP_METHODS and not config.train.random_flip:
      method_config.setdefault("flips", (0,))   # flipped views were never training examples
    if name == cf.RANDOM:
      method_config.setdefault("seed", settings.random_seed)
    method = baselines.make_method(name, **method_config)
    out[name] = eval_report.Scorer(lambda query_name, query, method=method: method.score(
        query, context), {"method": method.config(), "model": base_fp})
  return out


def main(argv):
  del argv
  common.start()
  config, workdir = _CONFIG.value, _WORKDIR.value
  out_dir = _OUT.value or os.path.join(workdir, "evaluation")
  cache_dir = (os.path.join(out_dir, "xla_cache") if _COMPILATION_CACHE.value is None
               else _COMPILATION_CACHE.value)
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  settings = eval_report.EvalSettings.from_config(config.get("evaluation"))
  cf.check_base_recipe(config, workdir)
  model_dir = os.path.join(workdir, "model")
  pipe = pipeline_lib.load_pipeline(model_dir)
  arrays = precompute.load(os.path.join(workdir, "precomputed"))
  source = recipe.open_dataset(config, os.path.join(workdir, "tfds"))
  base_fp = scores_lib.params_fingerprint(pipe.unet_params)
  mesh = parallel.make_mesh(_NUM_DEVICES.value or None)
  apply_fn = pipe.apply_unet   # one object: jitted programs keyed on it are compiled once

  query_dirs = generation.list_queries(os.path.join(workdir, "queries"))
  queries = {os.path.basename(d): generation.load_query(d) for d in query_dirs}
  if settings.queries:
    unknown = sorted(set(settings.queries) - set(queries))
    if unknown:
      raise ValueError(f"config.evaluation.queries: no such queries {unknown}")
    queries = {q: queries[q] for q in settings.queries}
  if not queries:
    raise FileNotFoundError(f"No queries in {workdir}/queries: run launch.generate first")

  caches = {}
  workers = (retrain_pool.default_num_workers() if settings.retrain_workers < 0
             else settings.retrain_workers)
  if jax.process_count() > 1:
    # Several processes: each retraining is recipe.run on the global mesh (every process
    # trains it together, process 0 writes it); pools of one-process workers would train each
    # model once per process, into the same directories.
    if getattr(settings, "retrain_group_size", 0):
      raise ValueError("evaluation.retrain_group_size: grouped retraining runs in one process;"
                       " set it to 0 under --multihost")
    workers = 0

  def make_cache(seed):
    seed = config.seed if seed is None else int(seed)
    if seed not in caches:
      seeded = copy.deepcopy(config)
      seeded.seed = seed
      data_dir = workdir if seed == config.seed else cf.prepare_data_workdir(
          seeded, workdir, os.path.join(out_dir, f"data-seed{seed}"), log=common.log)
      group = settings.retrain_group_size
      if group:
        pool = grouped_retrain.GroupedRetrainer(seeded, data_dir, group_size=group, log=common.log)
      else:
        pool = retrain_pool.RetrainPool(
            seeded, data_dir, num_workers=workers, keep_checkpoints=settings.keep_train_checkpoints,
            compilation_cache=cache_dir or None) if workers else None
      caches[seed] = cf.ModelCache(
          os.path.join(out_dir, "models"),
          cf.recipe_fingerprint(seeded, one_core=bool(workers) and not group, group_size=group),
          cf.recipe_train_fn(seeded, data_dir, keep_checkpoints=settings.keep_train_checkpoints,
                             log=common.log),
          base_params=pipe.unet_params if seed == config.seed else None, pool=pool,
          log=common.log)
    return caches[seed]

  regenerate = feature_fn = None
  if settings.regenerate:
    encode = pipeline_lib.make_text_encoder_fn(pipe.text_encoder, pipe.text_params,
                                               pipe.tokenizer)
    regenerate = cf.make_regenerator(apply_fn, pipe.schedule, encode([""]),
                                     pipe.latent_shape,
                                     lambda z: pipeline_lib.latents_to_images(pipe, z))
    # A CLIP tower when one is configured (feature_extractor={"clip": dir}, or the clip
    # method's weights), else random-conv; its key goes into every ΔG cell's fingerprint.
    feature_fn, feature_key = baselines.towers.delta_g_features(
        dict(settings.feature_extractor), dict(settings.method_configs))
    settings = dataclasses.replace(settings, feature_extractor=feature_key)

  eval_report.evaluate(
      out_dir=out_dir, queries=queries, index=np.asarray(arrays["index"]),
      scorers=_scorers(config, settings, pipe, apply_fn, arrays, source, base_fp, out_dir, mesh),
      settings=settings, make_cache=make_cache, base_params=pipe.unet_params,
      base_fingerprint=base_fp, apply_fn=apply_fn, schedule=pipe.schedule,
      regenerate=regenerate, feature_fn=feature_fn,
      get_images=lambda indices: source.get_items(np.asarray(indices))[0], log=common.log)
  common.log(f"evaluate: report at {os.path.join(out_dir, 'report.html')}")


if __name__ == "__main__":
  app.run(main)
