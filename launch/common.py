"""What every launcher does first: multi-host start-up and quiet library logs."""
import os

from absl import flags
from absl import logging

from attrib_jax import console
from attrib_jax.models import pipeline

_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() first (TPU pods, Slurm, MPI).")


def start() -> None:
  """jax.distributed when asked; libraries (Orbax) log at WARNING and known third-party noise
  is dropped (attrib_jax.console), so the console holds the launchers' own lines."""
  logging.set_verbosity(logging.WARNING)
  console.quiet()
  if _MULTIHOST.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()


def log(message: str) -> None:
  """Progress lines go to stdout, unbuffered."""
  print(message, flush=True)


def load_trained_pipeline(workdir: str):
  """The model `launch.train` finished in workdir (a clear error if it has not)."""
  model_dir = os.path.join(workdir, "model")
  if not os.path.exists(os.path.join(model_dir, "DONE.json")):
    raise FileNotFoundError(f"No trained model in {model_dir}: run launch.train first")
  return pipeline.load_pipeline(model_dir)
