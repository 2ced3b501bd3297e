"""Random scores: the floor every attribution method must beat.

Scores are uniform in [0, 1), drawn from numpy's PCG64 seeded by (seed, a digest of the query's
latent and text states): the same seed and query give the same scores, different queries get
independent draws, and several seeds give the "random removal over several draws" floor.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from attrib_jax.baselines import interface


def query_digest(query: Any) -> list[int]:
  """Four uint32 words of sha256 over the query's latent and text states (bytes, shape)."""
  h = hashlib.sha256()
  for array in (query.latent, query.text_states):
    array = np.ascontiguousarray(np.asarray(array, np.float32))
    h.update(str(array.shape).encode())
    h.update(array.tobytes())
  return np.frombuffer(h.digest()[:16], np.uint32).tolist()


@interface.register
@dataclasses.dataclass(frozen=True)
class RandomScores(interface.Method):
  """Uniform random scores, deterministic in (seed, query)."""
  name = "random"
  seed: int = 0

  def score(self, query: Any, context: interface.Context) -> np.ndarray:
    rng = np.random.default_rng([self.seed] + query_digest(query))
    return self._check(rng.random(context.num_items), context)
