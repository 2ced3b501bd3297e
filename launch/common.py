"""What every launcher does first: multi-host start-up and quiet library logs."""
from absl import flags
from absl import logging

_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() first (TPU pods, Slurm, MPI).")


def start() -> None:
  """jax.distributed when asked; libraries (Orbax) log at WARNING so progress stays readable."""
  logging.set_verbosity(logging.WARNING)
  if _MULTIHOST.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()


def log(message: str) -> None:
  """Progress lines go to stdout, unbuffered."""
  print(message, flush=True)
