"""What a run's console shows of third-party libraries: the one place that decides it.

Entry points (the launchers' `launch.common.start`, the retraining workers) call `quiet()` once.
It drops only messages known to carry nothing for a user of this project, each by name, so a
new or real warning from the same libraries still shows:

- TFDS's "Using custom data configuration: <the whole config repr>": every builder here is
  custom-configured (the config *is* the world), so it fires on every run, 600 characters long.
- TFDS's "OpenCV is not installed ... Defaulting to PIL": PIL is the decoder we choose.
- TFDS's progress bars while a dataset is written: the build is short and the launchers print
  their own progress (the builders' own one-line announcement replaces TFDS's bold "Downloading
  and preparing dataset", see `attrib_jax.data._common.ArrayRecordBuilder`).
"""
import logging

# (logger name, start of the message's format string) pairs that `quiet` drops.
KNOWN_NOISE = (
    ("absl", "Using custom data configuration"),
    ("absl", "OpenCV is not installed"),
)


class _DropKnown(logging.Filter):
  """Drops the records of `KNOWN_NOISE` raised from inside tensorflow_datasets."""

  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    if "tensorflow_datasets" not in (record.pathname or ""):
      return True
    return not str(record.msg).startswith(self.prefixes)


_installed = False


def quiet() -> None:
  """Installs the filters and turns TFDS's progress bars off (idempotent)."""
  global _installed
  if _installed:
    return
  by_logger: dict[str, tuple[str, ...]] = {}
  for name, prefix in KNOWN_NOISE:
    by_logger[name] = by_logger.get(name, ()) + (prefix,)
  for name, prefixes in by_logger.items():
    logging.getLogger(name).addFilter(_DropKnown(prefixes))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  _installed = True
