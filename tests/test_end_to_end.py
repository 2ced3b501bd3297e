"""The main job on the smoke variant of the embedded default, through the real launchers:
train -> (rerun reuses) -> generate -> attribute -> report."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax.models import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, workdir, *extra):
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's run
  out = subprocess.run([sys.executable, "-m", module, "--config=configs/tiny.py:smoke",
                        f"--workdir={workdir}", *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def test_smoke_main_job(tmp_path):
  workdir = str(tmp_path / "run")
  log = _run("launch.train", workdir)
  assert "train: step 6/6" in log
  assert "reusing the trained model" in _run("launch.train", workdir)
  _run("launch.generate", workdir)
  queries = sorted(os.listdir(os.path.join(workdir, "queries")))
  assert "overview.png" in queries and any(q.startswith("rare_") for q in queries)
  log = _run("launch.attribute", workdir)
  summary = json.load(open(os.path.join(workdir, "attribution", "summary.json")))
  assert summary["summary"]["num_queries"] == len(queries) - 1
  assert set(summary["summary"]["mean_recall@10"]) == {"abu", "pixel"}
  assert os.path.exists(os.path.join(workdir, "attribution", "report.html"))
  # The trained UNet is a diffusers-format directory.
  pipe = pipeline.load_pipeline(os.path.join(workdir, "model"))
  assert pipe.pixel_patch == 2 and pipe.latent_shape == (8, 8, 12)


def test_pixel_codec_round_trip():
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  folded = pipeline.space_to_depth(x, 2)
  assert folded.shape == (2, 4, 3, 12)
  np.testing.assert_array_equal(folded[0, 1, 2, :3], x[0, 2, 4])   # patch origin pixel
  np.testing.assert_array_equal(folded[0, 1, 2, 3:6], x[0, 2, 5])  # its right neighbour
  np.testing.assert_array_equal(pipeline.depth_to_space(folded, 2), x)
