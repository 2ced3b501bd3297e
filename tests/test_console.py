"""A run's console holds the launchers' own lines: no third-party warnings or progress bars.

The noise seen before `attrib_jax.console` existed, each by the text that gave it away; a new
library message that matches one of these fails here rather than reaching users.
"""
import logging
import os
import re
import subprocess
import sys

from attrib_jax import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

THIRD_PARTY_NOISE = [
    r"Using custom data configuration",          # TFDS, the whole builder config repr
    r"OpenCV is not installed",                  # TFDS's image decoder notice
    r"Waiting for previous save to complete",    # Orbax, when saves queue up
    r"Downloading and preparing dataset",        # TFDS's bold build announcement
    r"downloaded and prepared to",               # ... and its end
    r"Generating splits|Generating train examples|Shuffling ",   # TFDS's tqdm bars
    # absl-formatted log lines of any library, Python or C++. Not XLA's "Very slow compile?"
    # alarm: it fires only on an overloaded machine, from C++, where only a switch silencing
    # all of XLA's logging would reach it.
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d\S*\s+\d+ (?!slow_operation_alarm)",
    r"^WARNING:(absl|jax|orbax)",                # the same through Python's last-resort handler
    r"(Deprecation|Future|User|Runtime)Warning",  # Python warnings printed by any library
]


def noise_lines(text: str) -> list[str]:
  """The lines of `text` that match a known third-party message."""
  return [line for line in text.splitlines()
          if any(re.search(p, line) for p in THIRD_PARTY_NOISE)]


def test_smoke_launchers_print_only_their_own_lines(tmp_path):
  env = dict(os.environ, XLA_FLAGS="")
  logs = {}
  for module in ("launch.train", "launch.generate"):
    out = subprocess.run([sys.executable, "-m", module, "--config=configs/tiny.py:smoke",
                          f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    logs[module] = out.stdout + out.stderr
    assert not noise_lines(logs[module]), noise_lines(logs[module])
  # A fresh workdir: the dataset was built (the TFDS messages had their chance), and the
  # launchers' progress is there, with an ETA.
  assert "dataset: writing tiny_world" in logs["launch.train"]
  assert re.search(r"train: step 6/6 .* ETA", logs["launch.train"]), logs["launch.train"]
  assert "generate: " in logs["launch.generate"]


def test_filters_drop_only_the_named_messages():
  console.quiet()
  seen = []

  class Keep(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  absl_logger = logging.getLogger("absl")
  handler = Keep()
  absl_logger.addHandler(handler)
  try:
    tfds_file = os.path.join("site-packages", "tensorflow_datasets", "core", "x.py")
    for pathname, msg in [(tfds_file, "Using custom data configuration: %s"),
                          (tfds_file, "Some real TFDS warning: %s"),
                          ("ours.py", "Using custom data configuration: %s")]:
      record = absl_logger.makeRecord("absl", logging.WARNING, pathname, 1, msg, ("x",), None)
      absl_logger.handle(record)
  finally:
    absl_logger.removeHandler(handler)
  assert seen == ["Some real TFDS warning: x", "Using custom data configuration: x"]
