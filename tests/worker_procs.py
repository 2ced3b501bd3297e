"""Helpers for the tests that run several Python processes at once (multi-host, kill/resume);
not a test module itself."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest


def free_port() -> int:
  """A localhost port nothing listens on now (for a `jax.distributed` coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], logs: list[str], timeout_s: float,
             what: str = "process") -> None:
  """All exit 0, or every process still running is killed and the logs' tails are shown.

  A peer that died leaves the others waiting in a collective or a barrier, so the first
  failure (or the deadline) ends them all instead of hanging the suite.
  """
  deadline = time.monotonic() + timeout_s
  while any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      break
    time.sleep(0.5)
  if any(p.returncode != 0 for p in procs):
    tails = "\n".join(f"--- {log}\n{open(log).read()[-3000:]}" for log in logs)
    pytest.fail(f"{what} exit codes {[p.returncode for p in procs]}:\n{tails}")
