"""benchmarks/scann_scale.py --smoke runs end to end and prints its table (a run of seconds;
the 1M x 768 measurement itself is in docs/fastgda.md)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*extra):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
  out = subprocess.run([sys.executable, "benchmarks/scann_scale.py", "--smoke", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  return out.stdout


def _recalls(log):
  rows = re.findall(r"\| ScaNN tree\+AH\+reorder \| (\d+) / 50 \| 200 \| ([\d.]+) \|", log)
  return {int(leaves): float(r) for leaves, r in rows}


def test_scann_scale_smoke_prints_recall_and_latency(tmp_path):
  log = _run("--index_dir", str(tmp_path / "index"))
  assert "load average at start" in log and "load average at end" in log
  assert "| exact (numpy, 1 thread) | – | – | 1.000 |" in log, log
  recall = _recalls(log)
  assert sorted(recall) == [5, 50], log
  # Every leaf searched with a reorder of 4k finds (nearly) the exact top k; 5 leaves fewer.
  assert recall[50] >= 0.95 and recall[5] < recall[50], recall
  assert re.search(r"bar \(recall@50 >= 0.95, <= 10 ms, >= 10x exact\): (MET|NOT met)", log)
  assert "scann: built in" in log
  # A rerun with the same data and build settings reuses the saved index: same answers.
  again = _run("--index_dir", str(tmp_path / "index"))
  assert "scann: REUSED" in again and _recalls(again) == recall, again
  # Another build setting is another index: built again.
  assert "scann: built in" in _run("--index_dir", str(tmp_path / "index"), "--dims_per_block=4")
