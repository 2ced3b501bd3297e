"""The launchers' progress line (launch.common.Eta, used by launch.distill): the ETA counts units, not calls, and reused units are free."""
from __future__ import annotations

import pytest

from launch import common  # not launch.distill: its --config flag would clash with test_serve's


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


@pytest.fixture
def lines(monkeypatch):
  out = []
  monkeypatch.setattr(common, "log", out.append)
  return out


def test_batched_calls_count_units(lines):
  clock = _Clock()
  eta = common.Eta("queries", 10, clock=clock)
  clock.now += 2.0
  eta(4, "queries")           # one call, 4 units in 2 s: 2 units/s, 6 left -> 3 s
  assert lines[-1] == "queries: 4/10 queries, 2s, ETA 3s", lines
  clock.now += 2.0
  eta(8, "queries")           # 8 units in 4 s: 2 left -> 1 s (calls/s would say 4 s)
  assert lines[-1].endswith("ETA 1s"), lines


def test_reused_units_do_not_speed_the_rate(lines):
  clock = _Clock()
  eta = common.Eta("teacher", 10, clock=clock)
  for i in range(1, 6):       # five kept from an earlier run, read in no time
    eta(i, "training queries", reused=True)
  assert lines[-1].endswith("ETA unknown (nothing computed yet)"), lines
  clock.now += 30.0
  eta(6, "training queries")  # one computed unit, 30 s: 4 left -> 120 s
  assert lines[-1] == "teacher: 6/10 training queries, 30s, ETA 120s", lines
  clock.now += 10.0
  eta(7, "training queries")  # 2 units in 40 s: 3 left -> 60 s
  assert lines[-1].endswith("ETA 60s"), lines
