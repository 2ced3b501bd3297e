r"""Checks that the tiny-world model follows its prompts (colour and shape), with a detector
validated on real dataset images first.

  python -m launch.check_prompts --config=configs/tiny.py --workdir=runs/tiny

Writes workdir/prompt_check.json and workdir/prompt_check.png (generations, each labelled with
what the detector read; a wrong colour or shape is marked with "x").
"""
import json
import os

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from attrib_jax import io_utils
from attrib_jax import visualize
from attrib_jax.data import tiny_world_detector
from attrib_jax.evaluation import prompt_following
from attrib_jax.training import recipe
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_NUM = flags.DEFINE_integer("num_prompts", 100, "Generated images to score.")
_NUM_REAL = flags.DEFINE_integer("num_real", 500, "Dataset images to validate the detector on.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.start()
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config.world.kind != "tiny_world":
    raise ValueError("the prompt check needs the tiny world's detector (config.world.kind)")
  from attrib_jax.data import tiny_world  # pylint: disable=g-import-not-at-top
  w = config.world
  world = tiny_world.generate_world(seed=w.seed, num_items=min(_NUM_REAL.value, w.num_items),
                                    resolution=w.resolution, rare_count=0,
                                    **({"patterns": tuple(w.patterns)} if "patterns" in w else {}))
  real = prompt_following.validate_detector(world.images, world.attributes)
  common.log(f"detector on {len(world.images)} real images: colour+shape {real['joint']:.3f}")

  pipe = common.load_trained_pipeline(workdir, config)
  scenes = prompt_following.fresh_scenes(config.generate.seed, _NUM.value,
                                         tuple(w.patterns) if "patterns" in w else None)
  g = config.generate
  generated, queries = prompt_following.check(pipe, scenes, seed=g.seed + 10_000,
                                              sampler=g.sampler, num_steps=g.num_steps,
                                              guidance_scale=g.guidance_scale)
  common.log(f"generations of {len(scenes)} fresh prompts: colour+shape "
             f"{generated['joint']:.3f} (colour {generated['colour']:.3f}, shape "
             f"{generated['shape']:.3f}, position {generated['position']:.3f})")
  labels = []
  for q, scene in zip(queries, scenes):
    found = tiny_world_detector.detect_attributes(q.image)
    want = scene["objects"][0]
    ok = found.get("colour") == want["colour"] and found.get("shape") == want["shape"]
    labels.append(f"{'' if ok else 'x '}{found.get('colour')} {found.get('shape')}")
  visualize.save_image_grid(os.path.join(workdir, "prompt_check.png"),
                            np.stack([q.image for q in queries]), labels, columns=10, scale=4)
  result = {"detector_on_real": real, "generated": generated, "num_prompts": len(scenes),
            "prompts": [q.info["prompt"] for q in queries], "read": labels}
  io_utils.atomic_write_json(os.path.join(workdir, "prompt_check.json"), result,
                             sort_keys=False)
  common.log(f"check_prompts: {os.path.join(workdir, 'prompt_check.png')}")


if __name__ == "__main__":
  app.run(main)
