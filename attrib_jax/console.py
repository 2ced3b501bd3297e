"""What a run's console shows of third-party libraries: the one place that decides it.

Entry points (the launchers' `launch.common.start`, the retraining workers) call `quiet()` once.
It drops only messages known to carry nothing for a user of this project, each by name, so a
new or real warning from the same libraries still shows:

- TFDS's "Using custom data configuration: <the whole config repr>": every builder here is
  custom-configured (the config *is* the world), so it fires on every run, 600 characters long.
- TFDS's "OpenCV is not installed ... Defaulting to PIL": PIL is the decoder we choose.
- Orbax's "Waiting for previous save to complete took N seconds": a checkpoint save waited for
  the one before it (a busy machine, or the smoke configs' checkpoint every few steps); the
  training goes on and its own progress line says how fast.
- TFDS's progress bars while a dataset is written: the build is short and the launchers print
  their own progress (the builders' own one-line announcement replaces TFDS's bold "Downloading
  and preparing dataset", see `attrib_jax.data._common.ArrayRecordBuilder`).
"""
import logging

# (logger name, package the record must come from, start of its format string) that `quiet`
# drops. absl's logging functions log to the "absl" logger whichever library calls them, so
# the package is read from the record's source file.
KNOWN_NOISE = (
    ("absl", "tensorflow_datasets", "Using custom data configuration"),
    ("absl", "tensorflow_datasets", "OpenCV is not installed"),
    ("absl", "orbax", "Waiting for previous save to complete"),
)


class _DropKnown(logging.Filter):
  """Drops the records of `KNOWN_NOISE` (package, message prefix) pairs."""

  def __init__(self, known: tuple[tuple[str, str], ...]):
    super().__init__()
    self.known = known

  def filter(self, record: logging.LogRecord) -> bool:
    path, msg = record.pathname or "", str(record.msg)
    return not any(package in path and msg.startswith(prefix) for package, prefix in self.known)


_installed = False


def quiet() -> None:
  """Installs the filters and turns TFDS's progress bars off (idempotent)."""
  global _installed
  if _installed:
    return
  by_logger: dict[str, tuple[tuple[str, str], ...]] = {}
  for name, package, prefix in KNOWN_NOISE:
    by_logger[name] = by_logger.get(name, ()) + ((package, prefix),)
  for name, known in by_logger.items():
    logging.getLogger(name).addFilter(_DropKnown(known))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  _installed = True
