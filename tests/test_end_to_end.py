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

import test_console  # the known third-party noise

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
  # The default is AbU+ (configs/tiny.py) with the "jvp" sweep (no pre losses): results in
  # attribution_plus/, the preconditioner in attribution/.
  log = _run("launch.attribute", workdir)
  assert "ekfac: " in log and "pre losses:" not in log, log
  summary = json.load(open(os.path.join(workdir, "attribution_plus", "summary.json")))
  assert summary["summary"]["num_queries"] == len(queries) - 1
  assert set(summary["summary"]["mean_recall@10"]) == {"abu+", "pixel", "caption", "caption-words"}
  assert os.path.exists(os.path.join(workdir, "attribution_plus", "report.html"))
  assert os.path.exists(os.path.join(workdir, "attribution", "ekfac.npz"))
  # AbU with the "cached" sweep: its own results and the pre losses, which AbU+ then reuses
  # (its results recomputed: they used other sweep settings).
  cached = "--config.attribution.sweep.method=cached"
  log = _run("launch.attribute", workdir, "--config.attribution.preconditioner=fisher", cached)
  assert "fisher: " in log and "pre losses:" in log, log
  summary = json.load(open(os.path.join(workdir, "attribution", "summary.json")))
  assert summary["summary"]["num_queries"] == len(queries) - 1
  assert set(summary["summary"]["mean_recall@10"]) == {"abu", "pixel", "caption", "caption-words"}
  log = _run("launch.attribute", workdir, cached)
  assert "reusing" in log and "pre losses:" not in log, log
  assert "used other AbU settings" in log, log
  # Other sweep settings: the shared pre losses cannot serve, so they are recomputed (not an
  # error asking the user to delete a file), and so are the results.
  log = _run("launch.attribute", workdir, "--config.attribution.preconditioner=fisher", cached,
             "--config.attribution.sweep.timesteps=(0, 400, 800, 800)")
  assert "holds other settings; recomputing" in log and "pre losses:" in log, log
  assert "used other AbU settings" in log, log
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


def test_smoke_evaluation_with_abu_and_abu_plus(tmp_path):
  """launch.evaluate's own wiring (the method registry, AbU and AbU+ through the runner, the
  table), reduced to one query, one K and no LDS or regeneration to stay short."""
  workdir = str(tmp_path / "eval")
  config = "--config=configs/tiny_eval.py:smoke"

  def run(module, *extra):
    env = dict(os.environ, XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-m", module, config, f"--workdir={workdir}", *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The evaluation's retraining workers print to this stderr too: no third-party noise.
    noise = test_console.noise_lines(out.stdout + out.stderr)
    assert not noise, noise
    return out.stdout

  run("launch.train")
  run("launch.generate")
  run("launch.evaluate", "--config.evaluation.queries=('rare_moon_0',)",
      "--config.evaluation.lds.num_subsets=0", "--config.evaluation.random_draws=1",
      "--config.evaluation.methods=('abu', 'abu+', 'random')", "--config.evaluation.ks=(2,)",
      "--config.evaluation.regenerate=False")
  rows = open(os.path.join(workdir, "evaluation", "table.csv")).read().splitlines()
  assert [r.split(",")[0] for r in rows[1:]] == ["abu", "abu+", "random"], rows
  for name in ("attribution", "attribution_plus"):
    assert os.path.exists(os.path.join(workdir, name, "rare_moon_0", "result.json")), name
  assert os.path.exists(os.path.join(workdir, "attribution", "ekfac.npz"))
