r"""Trains a text-to-image model from a config: dataset -> text side -> precompute -> training.

  python -m launch.train --config=configs/tiny.py --workdir=runs/tiny
  python -m launch.train --config=configs/tiny.py --workdir=runs/tiny_wo \
      --excluded=runs/excluded.txt          # leave-K-out retraining, same recipe and seed
  python -m launch.train --config=configs/mscoco.py --workdir=gs://... --multihost

Overrides: --config.train.num_steps=500. Rerunning with the same workdir resumes an interrupted
run, or reuses the finished model.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from attrib_jax.training import input_pipeline
from attrib_jax.training import recipe
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where everything of this run is written.")
_EXCLUDED = flags.DEFINE_string("excluded", None,
                                "File of dataset indices (one per line) never to train on.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.start()
  excluded = input_pipeline.read_excluded_file(_EXCLUDED.value) if _EXCLUDED.value else ()
  model_dir = recipe.run(_CONFIG.value, _WORKDIR.value, excluded=excluded, log=common.log)
  print(f"model: {model_dir}")


if __name__ == "__main__":
  app.run(main)
