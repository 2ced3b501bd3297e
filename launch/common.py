"""What every launcher does first: multi-host start-up and quiet library logs."""
import json
import os
import time

from absl import flags
from absl import logging

from attrib_jax import console
from attrib_jax.models import pipeline

_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first: with no other flag it "
    "detects the cluster (TPU pods, Slurm, Open MPI); elsewhere (e.g. processes on one "
    "machine) pass --coordinator_address, --num_processes and --process_id.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "--multihost: host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "--multihost: how many processes take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "--multihost: this process's index (0 writes the files).")


def start() -> None:
  """jax.distributed when asked; libraries (Orbax) log at WARNING and known third-party noise
  is dropped (attrib_jax.console), so the console holds the launchers' own lines."""
  logging.set_verbosity(logging.WARNING)
  console.quiet()
  explicit = {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
              "process_id": _PROCESS_ID.value}
  given = {k: v for k, v in explicit.items() if v is not None}
  if given and not _MULTIHOST.value:
    raise ValueError(f"--{', --'.join(given)} without --multihost: pass --multihost as well")
  if _MULTIHOST.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(**given)   # none given: auto-detected (TPU, Slurm, MPI)
    log(f"multihost: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local device(s) of {jax.device_count()}")


def log(message: str) -> None:
  """Progress lines go to stdout, unbuffered."""
  print(message, flush=True)


def load_trained_pipeline(workdir: str, config=None):
  """The model `launch.train` finished in workdir (a clear error if it has not). With `config`,
  a model trained with another recipe is an error naming the settings that differ: the
  launchers read the workdir's dataset and arrays through the config, and would otherwise
  build another dataset beside them and pair one world's pictures with another's scores."""
  model_dir = os.path.join(workdir, "model")
  done_path = os.path.join(model_dir, "DONE.json")
  if not os.path.exists(done_path):
    raise FileNotFoundError(f"No trained model in {model_dir}: run launch.train first")
  if config is not None:
    from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
    with open(done_path) as f:
      differ = recipe.trained_with_differences(config, json.load(f))
    if differ:
      shown = ", ".join(differ[:8]) + (f", ... ({len(differ) - 8} more)" if len(differ) > 8
                                       else "")
      raise ValueError(f"{workdir} holds a model trained with another config ({shown} "
                       f"differ; see {done_path}): pass the config it was trained with, or "
                       "another --workdir")
  return pipeline.load_pipeline(model_dir)


class Eta:
  """'i/n, ETA s' lines for a loop over n units. The rate is units per second of the units
  computed here: a call may report several units (a batch of queries), and a unit that was
  only reused from an earlier run (`reused=True`) costs no time and must not speed the rate."""

  def __init__(self, stage: str, total: int, clock=time.time):
    self.stage, self.total, self.clock = stage, total, clock
    self.t0 = self.last_t = clock()
    self.last_i, self.units, self.seconds = 0, 0, 0.0

  def __call__(self, i: int, what: str, reused: bool = False) -> None:
    """i: units done so far (of `total`), this call's included."""
    now = self.clock()
    if not reused:
      self.units += i - self.last_i
      self.seconds += now - self.last_t
    self.last_i, self.last_t = i, now
    if self.units and self.seconds > 0:
      eta = f"ETA {(self.total - i) * self.seconds / self.units:.0f}s"
    else:
      eta = "ETA unknown (nothing computed yet)" if i < self.total else "ETA 0s"
    log(f"{self.stage}: {i}/{self.total} {what}, {now - self.t0:.0f}s, {eta}")
