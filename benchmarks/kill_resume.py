r"""Kill-and-resume trials: SIGKILL each launcher at random points, rerun it, compare the results.

  python benchmarks/kill_resume.py --trials=5 --out=/tmp/kill_resume

For each launcher (launch.train, launch.attribute, launch.evaluate) it first makes an
uninterrupted reference run on the smoke configs (configs/tiny.py:smoke; the evaluation on
configs/tiny_eval.py:smoke, reduced as in tests/test_end_to_end.py), then per trial: copies the
workdir as it stood before the launcher ran, starts the launcher, SIGKILLs it after a random
fraction of the reference's wall time (stratified over the trials, so the kills cover the run
from start-up to the last file), reruns it to completion and compares what it wrote with the
reference:
  train      sha256 of the UNet and text-encoder weights, the precomputed arrays, DONE.json's
             fingerprint (bitwise)
  attribute  every query's result.npz (scores, ranking, index, τ), the EK-FAC factors and the
             summary's recall (bitwise)
  evaluate   table.csv (to the digits stored), results.jsonl without timing fields, and every
             cached score vector (bitwise)
and prints one row per trial: launcher, trial, kill time, outcome. Exit status 1 when any
trial's results differ from the reference or its rerun fails.

All runs share a persistent XLA cache (--compilation_cache; '' disables): the trials then spend
their time in the launchers' own work, not in compiling the same programs again. A cached
program computes what a fresh compile does, so the comparison is unaffected. One CPU device,
as a user's run (XLA_FLAGS cleared).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = "--config=configs/tiny.py:smoke"
TINY_EVAL = "--config=configs/tiny_eval.py:smoke"
# launch.evaluate reduced to one query, one K and no LDS (as tests/test_end_to_end.py), with a
# ranked method of each kind: AbU (Fisher, unlearning, sweep), a cheap baseline, the random
# floor; each needs its retrained model (two retraining worker processes on 2 cores).
EVAL_ARGS = ("--config.evaluation.queries=('rare_moon_0',)",
             "--config.evaluation.lds.num_subsets=0", "--config.evaluation.random_draws=1",
             "--config.evaluation.methods=('abu', 'pixel', 'random')",
             "--config.evaluation.ks=(2,)", "--config.evaluation.regenerate=False")
# Fields that measure time, not results (results.jsonl rows, summary.json): any key naming
# seconds, and these.
TIMING_KEYS = ("timing",)


@dataclasses.dataclass
class Launcher:
  name: str              # launch.<name>
  config: str
  args: tuple[str, ...]
  base: str              # the workdir as it stands before this launcher runs (copied per trial)


def _env(compilation_cache: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")
  if compilation_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=compilation_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _command(launcher: Launcher, workdir: str, compilation_cache: str) -> list[str]:
  cmd = [sys.executable, "-m", f"launch.{launcher.name}", launcher.config,
         f"--workdir={workdir}", *launcher.args]
  if launcher.name == "evaluate":   # evaluate sets its own cache dir unless told
    cmd.append(f"--compilation_cache={compilation_cache}")
  return cmd


def _run(cmd: list[str], env: dict, log_path: str, timeout: float) -> float:
  """Runs to completion; returns wall seconds. A failure raises with the log's tail."""
  t0 = time.time()
  with open(log_path, "w") as log:
    out = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                         timeout=timeout)
  if out.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}); log {log_path}:\n"
                       + open(log_path).read()[-3000:])
  return time.time() - t0


def _group_alive(pgid: int) -> bool:
  try:
    os.killpg(pgid, 0)
    return True
  except ProcessLookupError:
    return False


def _run_and_kill(cmd: list[str], env: dict, log_path: str,
                  after: float) -> tuple[str, str, float]:
  """Starts cmd, SIGKILLs its main process after `after` seconds. Returns (what happened, what
  was left: '' or a note on child processes that outlived their parent, wall seconds)."""
  t0 = time.time()
  with open(log_path, "w") as log:
    # Its own process group: after the kill we can tell whether children (retraining workers)
    # died with it, and end exactly those we started if they did not.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      proc.wait(timeout=after)
      return f"finished before the kill (rc {proc.returncode})", "", time.time() - t0
    except subprocess.TimeoutExpired:
      pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  # Retraining workers watch their parent and exit when it is gone (retrain_pool).
  deadline = time.time() + 30
  while _group_alive(proc.pid) and time.time() < deadline:
    time.sleep(0.5)
  left = ""
  if _group_alive(proc.pid):
    left = "children outlived the kill by 30 s (killed)"
    os.killpg(proc.pid, signal.SIGKILL)
  return "killed", left, after


# ------------------------------------------------------------------------- comparison ---

def _sha(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def _npz_digest(path: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
  with np.load(path) as data:
    return {k: hashlib.sha256(np.ascontiguousarray(data[k]).tobytes()).hexdigest()[:16]
            for k in sorted(data.files) if k not in skip}


def train_outputs(workdir: str) -> dict[str, str]:
  out = {}
  for pattern in ("model/unet/*.safetensors", "model/unet/config.json",
                  "model/text_encoder/*.safetensors", "model/tokenizer/*", "precomputed/*.npy"):
    for path in sorted(glob.glob(os.path.join(workdir, pattern))):
      out[os.path.relpath(path, workdir)] = _sha(path)
  with open(os.path.join(workdir, "model", "DONE.json")) as f:
    out["DONE.json fingerprint"] = json.load(f)["fingerprint"]
  return out


def attribute_outputs(workdir: str) -> dict[str, str]:
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "attribution_plus", "*", "result.npz"))):
    for key, digest in _npz_digest(path).items():
      out[f"{os.path.relpath(path, workdir)}:{key}"] = digest
  ekfac = os.path.join(workdir, "attribution", "ekfac.npz")
  for key, digest in _npz_digest(ekfac, skip=("__meta__",)).items():
    out[f"attribution/ekfac.npz:{key}"] = digest
  with open(os.path.join(workdir, "attribution_plus", "summary.json")) as f:
    out["summary.json:summary"] = json.dumps(_strip_timing(json.load(f)["summary"]),
                                             sort_keys=True)
  return out


def _strip_timing(obj):
  if isinstance(obj, dict):
    return {k: _strip_timing(v) for k, v in obj.items()
            if k not in TIMING_KEYS and "seconds" not in k}
  if isinstance(obj, list):
    return [_strip_timing(v) for v in obj]
  return obj


def evaluate_outputs(workdir: str) -> dict[str, str]:
  out_dir = os.path.join(workdir, "evaluation")
  with open(os.path.join(out_dir, "table.csv")) as f:
    out = {"table.csv": f.read()}
  with open(os.path.join(out_dir, "results.jsonl")) as f:
    for i, line in enumerate(f):
      out[f"results.jsonl:{i}"] = json.dumps(_strip_timing(json.loads(line)), sort_keys=True)
  for path in sorted(glob.glob(os.path.join(out_dir, "scores", "*", "*.npz"))):
    out[os.path.relpath(path, workdir)] = _npz_digest(path, skip=("seconds",))["scores"]
  return out


OUTPUTS = {"train": train_outputs, "attribute": attribute_outputs, "evaluate": evaluate_outputs}


def compare(reference: dict[str, str], got: dict[str, str]) -> str:
  """'equal', or what differs (named)."""
  differs = sorted(k for k in set(reference) | set(got) if reference.get(k) != got.get(k))
  if not differs:
    return "equal"
  return f"DIFFERENT: {', '.join(differs[:4])}" + (f" (+{len(differs) - 4})"
                                                   if len(differs) > 4 else "")


# ------------------------------------------------------------------------------- main ---

def prepare(out: str, env: dict, cache: str, timeout: float,
            wanted: set[str]) -> tuple[list[Launcher], dict, dict, dict]:
  """The reference runs. Returns the launchers (each with its base workdir) and per launcher
  its reference outputs, wall seconds and whether it compiled programs the XLA cache lacked (a
  cache kept from an earlier run, --compilation_cache outside OUT, spares those compiles)."""
  cached = lambda: len(os.listdir(cache)) if cache and os.path.isdir(cache) else -1
  compiled = {}
  def step(module, config, workdir, *args):
    launcher = Launcher(module, config, tuple(args), "")
    name = f"{os.path.basename(workdir)}-{module}"
    before = cached()
    seconds = _run(_command(launcher, workdir, cache), env,
                   os.path.join(out, f"{name}.log"), timeout)
    compiled[name] = before < 0 or cached() > before
    print(f"reference: {name} {seconds:.1f}s"
          f"{' (compiled programs the cache lacked)' if compiled[name] else ''}", flush=True)
    return seconds

  def snapshot(workdir, name):
    base = os.path.join(out, "base", name)
    shutil.copytree(workdir, base, symlinks=True)
    return base

  launchers, refs, seconds = [], {}, {}
  if wanted & {"train", "attribute"}:
    ref = os.path.join(out, "ref")
    empty = os.path.join(out, "base", "empty")
    os.makedirs(empty)
    launchers.append(Launcher("train", TINY, (), empty))
    seconds["train"] = step("train", TINY, ref)
    refs["train"] = train_outputs(ref)
    if "attribute" in wanted:
      step("generate", TINY, ref)
      launchers.append(Launcher("attribute", TINY, (), snapshot(ref, "trained")))
      seconds["attribute"] = step("attribute", TINY, ref)
      refs["attribute"] = attribute_outputs(ref)
  if "evaluate" in wanted:
    ref_eval = os.path.join(out, "ref_eval")
    step("train", TINY_EVAL, ref_eval)
    step("generate", TINY_EVAL, ref_eval)
    launchers.append(Launcher("evaluate", TINY_EVAL, EVAL_ARGS, snapshot(ref_eval, "eval")))
    seconds["evaluate"] = step("evaluate", TINY_EVAL, ref_eval, *EVAL_ARGS)
    refs["evaluate"] = evaluate_outputs(ref_eval)
  compiled = {k: compiled.get(name, True) for k, name in (
      ("train", "ref-train"), ("attribute", "ref-attribute"), ("evaluate", "ref_eval-evaluate"))}
  return [l for l in launchers if l.name in wanted], refs, seconds, compiled


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trials", type=int, default=5, help="Trials per launcher.")
  parser.add_argument("--out", default="/tmp/kill_resume", help="Scratch directory (emptied).")
  parser.add_argument("--launchers", default="train,attribute,evaluate")
  parser.add_argument("--seed", type=int, default=0, help="Seed of the kill times.")
  parser.add_argument("--compilation_cache", default=None,
                      help="Persistent XLA cache shared by every run (default OUT/xla_cache; "
                           "'' disables).")
  parser.add_argument("--timeout", type=float, default=900, help="Seconds per run.")
  args = parser.parse_args()

  out = os.path.abspath(args.out)
  if args.compilation_cache and os.path.abspath(args.compilation_cache).startswith(out + os.sep):
    parser.error("--compilation_cache inside --out would be emptied with it")
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  cache = (os.path.join(out, "xla_cache") if args.compilation_cache is None
           else args.compilation_cache)
  env = _env(cache)
  wanted = set(args.launchers.split(","))
  unknown = wanted - set(OUTPUTS)
  if unknown:
    parser.error(f"--launchers: unknown {sorted(unknown)} (known: {sorted(OUTPUTS)})")
  rng = random.Random(args.seed)
  t_start = time.time()
  launchers, refs, ref_seconds, compiled = prepare(out, env, cache, args.timeout, wanted)

  rows = []
  for launcher in launchers:
    reference, seconds = refs[launcher.name], ref_seconds[launcher.name]
    if compiled[launcher.name]:
      # A second uninterrupted run, from the same starting workdir with the XLA cache now
      # warm: its results must equal the reference's too (else a kill trial could not tell a
      # resume bug from a nondeterministic run), and its wall time, without the compiles of the
      # cold reference, is the span the kills are drawn in.
      workdir = os.path.join(out, "trials", f"{launcher.name}-repeat")
      shutil.copytree(launcher.base, workdir, symlinks=True)
      seconds = _run(_command(launcher, workdir, cache), env, workdir + ".log", args.timeout)
      outcome = compare(reference, OUTPUTS[launcher.name](workdir))
      rows.append((launcher.name, "repeat", float("nan"), seconds, outcome + " [no kill]"))
      print(f"{launcher.name} repeat, not killed: {seconds:.1f}s: {outcome}", flush=True)
      shutil.rmtree(workdir, ignore_errors=True)
    trial = attempt = 0
    while trial < args.trials:
      # Stratified: trial i kills in the i-th of `trials` equal slices of a warm run. On a
      # shared machine a run's length varies with the load: one that ends before its kill is
      # still compared, then the span shrinks to its length and the slice is drawn again.
      after = seconds * (trial + rng.random()) / args.trials
      workdir = os.path.join(out, "trials", f"{launcher.name}-{attempt}")
      shutil.copytree(launcher.base, workdir, symlinks=True)
      log = os.path.join(out, "trials", f"{launcher.name}-{attempt}")
      attempt += 1
      cmd = _command(launcher, workdir, cache)
      happened, left, elapsed = _run_and_kill(cmd, env, log + ".killed.log", after)
      try:
        _run(cmd, env, log + ".rerun.log", args.timeout)
        outcome = compare(reference, OUTPUTS[launcher.name](workdir))
      except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as e:
        outcome = f"RERUN FAILED: {str(e).splitlines()[0][:160]} (log {log}.rerun.log)"
      if happened != "killed":
        outcome += f" [{happened}]"
      if left:
        outcome += f" [{left}]"
      rows.append((launcher.name, trial if happened == "killed" else "-", after, seconds,
                   outcome))
      print(f"{launcher.name} trial {trial}: killed at {after:.1f}s of {seconds:.1f}s: "
            f"{outcome}", flush=True)
      if happened == "killed":
        trial += 1
      else:
        seconds = min(seconds, elapsed)
        if attempt >= 3 * args.trials:
          raise SystemExit(f"{launcher.name}: runs keep finishing before their kill")
      if outcome.startswith("equal"):
        shutil.rmtree(workdir, ignore_errors=True)   # a failed trial's workdir is kept to read

  print(f"\n{'launcher':<10} {'trial':>6} {'kill at (s)':>12} {'of (s)':>7}  outcome")
  for name, trial, after, seconds, outcome in rows:
    kill = "-" if after != after else f"{after:.1f}"   # NaN: the repeat run, not killed
    print(f"{name:<10} {trial:>6} {kill:>12} {seconds:>7.1f}  {outcome}")
  failed = [r for r in rows if not r[4].startswith("equal")]
  killed = sum(1 for r in rows if isinstance(r[1], int))
  print(f"\n{len(rows) - len(failed)}/{len(rows)} runs equal to the uninterrupted run "
        f"({killed} killed and resumed); "
        f"{time.time() - t_start:.0f}s in all")
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator="\n").writerows(
      [("launcher", "trial", "kill_s", "reference_s", "outcome")] + rows)
  with open(os.path.join(out, "trials.csv"), "w") as f:
    f.write(buffer.getvalue())
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
