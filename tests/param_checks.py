"""Comparing two trained parameter trees that should agree up to float32 rounding; not a test
module itself."""
from __future__ import annotations

import numpy as np


def noise_only(path) -> bool:
  """A key projection's bias: q·b adds the same logit to every key, so its gradient is zero in
  exact arithmetic and its trained value is rounding noise that Adam turns into steps of the
  learning rate. Two correct runs agree on it only at the weights' scale, not at its own."""
  return tuple(path[-2:]) in (("k_proj", "bias"), ("to_k", "bias"))


def weights_scale(flat: dict) -> float:
  """The largest |w| over every leaf of a flattened tree."""
  return max(float(np.abs(np.asarray(v)).max()) for v in flat.values())
