"""Every ```python block of README.md runs, as written, on the smoke world.

The blocks run in order in one namespace (a reader follows the page top to bottom), in a fresh
process with one CPU device, from a folder holding `runs/tiny-demo` built by the launchers on
`configs/tiny.py:smoke`. The one change made to a block: a Stable Diffusion directory the user
would have (`/data/stable-diffusion-2-base`) is replaced by the smoke model's directory, a
model of the same layout; no block is skipped.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD_DIR = "/data/stable-diffusion-2-base"


def python_blocks(text: str) -> list[tuple[int, str]]:
  """(first line number, source) of each ```python block."""
  blocks = []
  for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
    blocks.append((text[:match.start()].count("\n") + 2, match.group(1)))
  return blocks


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
  """A folder whose runs/tiny-demo is what `make demo` leaves, on the smoke variant."""
  folder = tmp_path_factory.mktemp("reader")
  workdir = folder / "runs" / "tiny-demo"
  env = dict(os.environ, XLA_FLAGS="")
  for module in ("launch.train", "launch.generate"):
    out = subprocess.run([sys.executable, "-m", module, "--config=configs/tiny.py:smoke",
                          f"--workdir={workdir}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return folder


def test_readme_has_the_blocks_it_promises():
  blocks = python_blocks(open(os.path.join(ROOT, "README.md")).read())
  sources = "\n".join(source for _, source in blocks)
  assert len(blocks) >= 4, blocks
  for name in ("compute_fisher", "run_unlearn", "run_sweep", "ekfac_unlearn", "abu.AbU(",
               "load_pipeline", SD_DIR):
    assert name in sources, name


def test_every_readme_python_block_runs(demo_folder):
  blocks = python_blocks(open(os.path.join(ROOT, "README.md")).read())
  model_dir = str(demo_folder / "runs" / "tiny-demo" / "model")
  script = ["ns = {}"]
  for line, source in blocks:
    source = source.replace(SD_DIR, model_dir)
    script.append(f"print('README.md block at line {line}', flush=True)")
    script.append(f"exec(compile({source!r}, 'README.md:{line}', 'exec'), ns)")
  script.append("print('all blocks ran', flush=True)")
  out = subprocess.run([sys.executable, "-c", "\n".join(script)], cwd=demo_folder,
                       env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  assert "all blocks ran" in out.stdout
  assert out.stdout.count("README.md block at line") == len(blocks)
