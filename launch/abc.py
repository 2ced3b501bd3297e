r"""AbC (attribution by customization): builds the benchmark and evaluates every method on it.

  python -m launch.abc --config=configs/abc_tiny.py --workdir=W \
      --config.base_workdir=runs/tiny-demo
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
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from attrib_jax.abc import build
from attrib_jax.abc import concepts
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


def stage_towers(config, workdir, pipe) -> None:
  if config.kind == "sd":
    common.log("towers: a real model's benchmark names its DINO / CLIP weights "
               "(config.evaluation.towers); nothing to train")
    return
  from attrib_jax.abc import world_towers  # pylint: disable=g-import-not-at-top
  from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
  from attrib_jax.data import precompute  # pylint: disable=g-import-not-at-top
  base = build.base_dir_of(config, workdir)
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
  model_dir = build.prepare_base(config, workdir, log=common.log)
  pipe = pipeline_lib.load_pipeline(model_dir)
  resolution = build.resolution_of(pipe)
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
      build.run_customize(config, workdir, pipe, sets, resolution, log=common.log)
    elif stage == "generate":
      build.run_generate(config, workdir, pipe, sets, log=common.log)
    elif stage == "check":
      build.run_check(config, workdir, pipe, sets, log=common.log)
    elif stage in ("tune", "evaluate"):
      if "tune" in stages and stage == "evaluate":
        continue   # one call does both
      from attrib_jax.abc import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.run_evaluation(config, workdir, progress=common.log)
    both = stage == "tune" and "evaluate" in stages
    timings["tune+evaluate" if both else stage] = round(time.time() - t0, 1)
  common.log(f"abc: done in {time.time() - t_all:.0f}s ({timings})")


if __name__ == "__main__":
  app.run(main)
