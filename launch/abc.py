r"""AbC (attribution by customization): builds the benchmark and evaluates every method on it.

  python -m launch.abc --config=configs/abc_tiny.py --workdir=W \
      --config.base_workdir=/work/runs/demo
  python -m launch.abc --config=configs/abc_tiny.py --workdir=W --stages=customize,generate
  python -m launch.abc --config=configs/abc_sd.py --workdir=W     # SD 1.x + your folders

Stages (--stages, comma-separated, run in this order; default all):
  towers     in-world DINO / CLIP towers on the base world (attrib_jax.abc.world_towers),
             W/towers/{clip,clip_text,dino}; tiny world only (real models name theirs)
  customize  per set, Custom Diffusion on the base -> W/sets/<name>/delta
  generate   per set, images_per_set queries from base + delta -> W/sets/<name>/queries/
  check      per set, the concept check: its queries against the base model's images for the
             same prompts without the token, same seeds -> W/check/<name>.json, summary.json
  tune, evaluate   attrib_jax.abc.evaluate.run_evaluation (tuned features, every method's
             scores, metrics, the calibrator, report) -> W/evaluation/
W/exemplars/ and W/sets.json are (re)written first by every run (attrib_jax/abc/build.py has
the layout). The base model: config.base_workdir (a launch.train workdir), or, empty, the
config's `base` recipe trained into W/base here. Every stage resumes: finished sets, queries
and checks are kept, an interrupted one is redone.
"""
import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from attrib_jax import io_utils
from attrib_jax.abc import build
from attrib_jax.abc import concepts
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.models import pipeline as pipeline_lib
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The benchmark's workdir.")
_STAGES = flags.DEFINE_string("stages", "towers,customize,generate,check,tune,evaluate",
                              "Comma-separated stages to run (in the fixed order).")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = ("towers", "customize", "generate", "check", "tune", "evaluate")


def parse_stages(text: str) -> list[str]:
  asked = [s.strip() for s in text.split(",") if s.strip()]
  unknown = [s for s in asked if s not in STAGES]
  if unknown or not asked:
    raise ValueError(f"--stages: unknown stage(s) {unknown or asked}; known: {list(STAGES)}")
  return [s for s in STAGES if s in asked]


def _import_stage(module: str, stage: str, owner: str):
  """A stage's module from another part of AbC, or an error naming what is missing."""
  import importlib  # pylint: disable=g-import-not-at-top
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name == module:
      raise RuntimeError(f"stage {stage!r} needs {module} ({owner}), which is not in this "
                         "checkout yet; run the other stages with --stages") from e
    raise


def base_dir_of(config, workdir: str) -> str:
  return config.get("base_workdir", "") or os.path.join(workdir, "base")


def prepare_base(config, workdir: str) -> str:
  """The base model's directory (a diffusers-layout model dir). Trains the tiny recipe into
  W/base when no base_workdir is given; a named base that is missing is an error."""
  if config.kind == "sd":
    model_dir = config.base_model_dir
    if not model_dir or not os.path.exists(os.path.join(model_dir, "model_index.json")):
      raise FileNotFoundError(f"config.base_model_dir {model_dir!r} is not a diffusers "
                              "snapshot (no model_index.json)")
    return model_dir
  base = base_dir_of(config, workdir)
  done = os.path.join(base, "model", "DONE.json")
  if config.get("base_workdir", ""):
    if not os.path.exists(done) or not os.path.isdir(os.path.join(base, "precomputed")):
      raise FileNotFoundError(f"config.base_workdir {base!r} holds no finished launch.train run "
                              f"(model/DONE.json and precomputed/ needed)")
    return os.path.join(base, "model")
  if not os.path.exists(done):
    from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
    common.log(f"abc: training the base model ({config.base.name}) into {base}")
    recipe.run(config.base, base, log=common.log)
  return os.path.join(base, "model")


def resolution_of(pipe: pipeline_lib.Pipeline) -> int:
  scale = (pipe.pixel_patch if pipe.vae is None
           else 2 ** (len(pipe.configs["vae"]["block_out_channels"]) - 1))
  return pipe.latent_shape[0] * scale


def regularization(config, workdir: str, pipe, settings, resolution: int):
  if config.kind == "sd":
    return build.regularization_from_folder(pipe, config.regularization_dir, resolution,
                                            settings)
  return build.regularization_from_precomputed(
      pipe, os.path.join(base_dir_of(config, workdir), "precomputed"), settings)


def _eta_line(meter, done: int, what: str) -> str:
  p = meter(done)
  return (f"{p.stage}: {p.done}/{p.total} {p.unit} {what}, "
          f"ETA {p.eta_s:.0f}s" if np.isfinite(p.eta_s) else f"{p.stage}: {p.done}/{p.total} "
          f"{p.unit} {what}")


def stage_customize(config, workdir, pipe, sets, resolution) -> None:
  settings = build.settings_from_config(config)
  todo = [s for s in sets if not build.is_customized(
      os.path.join(workdir, "sets", s.name),
      build._record(pipe, s, settings, config.get("pad_exemplars", 4)))]  # pylint: disable=protected-access
  common.log(f"customize: {len(todo)} of {len(sets)} sets to customize, {settings.num_steps} "
             f"steps each (lr {settings.learning_rate}, batch {settings.batch_size}+"
             f"{settings.batch_size})")
  if not todo:
    return
  reg = regularization(config, workdir, pipe, settings, resolution)
  steps_total = len(todo) * settings.num_steps
  meter = scores_lib.ProgressMeter("customize", steps_total, "steps")
  every = max(1, settings.num_steps // 4)
  t0 = time.time()
  for k, s in enumerate(todo):
    began = time.time()

    def progress(i, loss, _sec, k=k, s=s):
      if i % every == 0 or i == settings.num_steps:
        common.log(_eta_line(meter, k * settings.num_steps + i,
                             f"(set {k + 1}/{len(todo)} {s.name} step {i}, loss {loss:.4f})"))

    build.customize_set(pipe, s, reg, settings, os.path.join(workdir, "sets", s.name),
                        pad_to=config.get("pad_exemplars", 4), progress=progress)
    common.log(f"customize: {s.name} done in {time.time() - began:.1f}s")
  common.log(f"customize: {len(todo)} sets in {time.time() - t0:.1f}s")


def stage_generate(config, workdir, pipe, sets) -> None:
  gen = config.generate.to_dict()
  plan = []
  for s in sets:
    set_dir = os.path.join(workdir, "sets", s.name)
    if not os.path.exists(os.path.join(set_dir, "delta", "delta.json")):
      raise FileNotFoundError(f"generate: set {s.name!r} has no delta in {set_dir}/delta: run "
                              "the customize stage first")
    plan.append((s, len(build.pending_queries(s, set_dir, gen))))
  total = sum(n for _, n in plan)
  common.log(f"generate: {total} queries to make over {sum(n > 0 for _, n in plan)} sets "
             f"({gen['sampler']}, {gen['num_steps']} steps, guidance {gen['guidance_scale']})")
  meter = scores_lib.ProgressMeter("generate", total, "queries")
  done, t0 = 0, time.time()
  for s, n in plan:
    if n:
      done += build.generate_set(pipe, s, os.path.join(workdir, "sets", s.name), gen)
      common.log(_eta_line(meter, done, f"(set {s.name})"))
  common.log(f"generate: {done} queries in {time.time() - t0:.1f}s")


def stage_check(config, workdir, pipe, sets) -> dict:
  gen = config.generate.to_dict()
  token = config.customization.modifier_token
  renders = config.get("check", {}).get("validation_renders", 40)
  out_dir = os.path.join(workdir, "check")
  os.makedirs(out_dir, exist_ok=True)
  meter = scores_lib.ProgressMeter("check", len(sets), "sets")
  results = []
  for k, s in enumerate(sets):
    set_dir = os.path.join(workdir, "sets", s.name)
    path = os.path.join(out_dir, s.name + ".json")
    digest = build.delta_digest(os.path.join(set_dir, "delta"))
    result = None
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      if result.get("delta") != digest or result.get("queries") != len(s.prompts):
        result = None
    if result is None:
      if build.pending_queries(s, set_dir, gen):
        raise FileNotFoundError(f"check: set {s.name!r} has queries still to generate: run the "
                                "generate stage first")
      result = dict(build.concept_check(pipe, s, set_dir, gen, token, renders), delta=digest)
      io_utils.atomic_write_json(path, result)
    results.append(result)
    common.log(_eta_line(meter, k + 1, f"({s.name}: {_check_line(result)})"))
  summary = summarize_check(results)
  io_utils.atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
  common.log(f"check: {json.dumps(summary['overall'])}")
  return summary


def _check_line(r: dict) -> str:
  d = r.get("detector")
  px = r["pixel_distance"]
  line = (f"pixel distance customized {px['customized'][0]:.1f} vs base {px['base'][0]:.1f}")
  if d:
    line += (f"; detector customized {d['customized_detected']:.2f} vs base "
             f"{d['base_detected']:.2f} (validated {d['validation_accuracy']:.3f})")
  return line


def summarize_check(results: list[dict]) -> dict:
  """Per split and overall: detection rates, closer fractions, the detectors' validation."""
  def agg(rows):
    det = [r["detector"] for r in rows if "detector" in r]
    out = {"sets": len(rows), "queries": int(sum(r["queries"] for r in rows)),
           "pixel_closer_fraction": float(np.mean([r["pixel_distance"]["closer_fraction"]
                                                   for r in rows]))}
    if det:
      out.update(
          customized_detected=float(np.mean([d["customized_detected"] for d in det])),
          base_detected=float(np.mean([d["base_detected"] for d in det])),
          closer_fraction=float(np.mean([d["closer_fraction"] for d in det])),
          validation_accuracy_min=float(min(d["validation_accuracy"] for d in det)),
          sets_detected_more=int(sum(d["customized_detected"] > d["base_detected"]
                                     for d in det)))
    return out
  splits = sorted({r["split"] for r in results})
  return {"overall": agg(results),
          "per_split": {sp: agg([r for r in results if r["split"] == sp]) for sp in splits},
          "per_set": {r["set"]: r for r in results}}


def stage_towers(config, workdir, pipe) -> None:
  if config.kind == "sd":
    common.log("towers: a real model's benchmark names its DINO / CLIP weights "
               "(config.evaluation.towers); nothing to train")
    return
  world_towers = _import_stage("attrib_jax.abc.world_towers", "towers", "H-towers")
  from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
  from attrib_jax.data import precompute  # pylint: disable=g-import-not-at-top
  base = base_dir_of(config, workdir)
  arrays = precompute.load(os.path.join(base, "precomputed"))
  source = recipe.open_dataset(config.base, os.path.join(base, "tfds"))
  images, captions, _ = source.get_items(np.asarray(arrays["index"]))
  settings = world_towers.WorldTowerSettings.from_config(config.towers)
  last = [0.0]

  def progress(p):
    if time.time() - last[0] > 15 or p.done == p.total:
      last[0] = time.time()
      common.log(f"towers: {p}")

  t0 = time.time()
  dirs = world_towers.build_world_towers(os.path.join(workdir, "towers"), np.asarray(images),
                                         [list(c) for c in captions], pipe.tokenizer, settings,
                                         progress=progress)
  common.log(f"towers: {sorted(dirs)} in {os.path.join(workdir, 'towers')} "
             f"({time.time() - t0:.0f}s)")


def main(argv):
  del argv
  common.start()
  config, workdir = _CONFIG.value, _WORKDIR.value
  stages = parse_stages(_STAGES.value)
  os.makedirs(workdir, exist_ok=True)
  cache = config.get("compilation_cache", "") or os.path.join(workdir, "xla_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  t_all = time.time()
  model_dir = prepare_base(config, workdir)
  pipe = pipeline_lib.load_pipeline(model_dir)
  resolution = resolution_of(pipe)
  sets = build.sets_from_config(config, resolution)
  records = build.write_layout(workdir, sets)
  counts = {sp: sum(r["split"] == sp for r in records) for sp in concepts.SPLITS}
  common.log(f"abc: {len(sets)} sets ({counts}), {sum(len(s.images) for s in sets)} exemplars, "
             f"{config.images_per_set} queries per set; stages {stages}")
  timings = {}
  for stage in stages:
    t0 = time.time()
    if stage == "towers":
      stage_towers(config, workdir, pipe)
    elif stage == "customize":
      stage_customize(config, workdir, pipe, sets, resolution)
    elif stage == "generate":
      stage_generate(config, workdir, pipe, sets)
    elif stage == "check":
      stage_check(config, workdir, pipe, sets)
    elif stage in ("tune", "evaluate"):
      if "tune" in stages and stage == "evaluate":
        continue   # one call does both
      evaluate = _import_stage("attrib_jax.abc.evaluate", stage, "H-eval")
      evaluate.run_evaluation(config, workdir, progress=common.log)
    timings[stage] = round(time.time() - t0, 1)
  common.log(f"abc: done in {time.time() - t_all:.0f}s ({timings})")


if __name__ == "__main__":
  app.run(main)
