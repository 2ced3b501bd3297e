"""Whether a customized model draws its concept: measures of generated images against exemplars.

`nearest_exemplar_distance`: per generated image, the mean absolute pixel difference (0..255) to
its nearest exemplar; lower is closer. `trait_scores`: the tiny world's validated trait detector
(`tiny_world_detector.trait_score`) on each image, for concepts that are a visual trait.
"""
from __future__ import annotations

import numpy as np

from attrib_jax.data import tiny_world_detector


def nearest_exemplar_distance(images: np.ndarray, exemplars: np.ndarray) -> np.ndarray:
  """[n] mean |image - nearest exemplar| over pixels and channels, uint8 [n|m, H, W, 3] inputs."""
  images, exemplars = np.asarray(images, np.float32), np.asarray(exemplars, np.float32)
  if images.ndim != 4 or exemplars.ndim != 4 or images.shape[1:] != exemplars.shape[1:]:
    raise ValueError(f"images {images.shape} and exemplars {exemplars.shape} must both be "
                     "[n, H, W, 3] of one size")
  if len(images) == 0 or len(exemplars) == 0:
    raise ValueError("no images or no exemplars to compare")
  diff = np.abs(images[:, None] - exemplars[None]).mean(axis=(2, 3, 4))
  return diff.min(axis=1)


def trait_scores(images: np.ndarray, trait: str) -> np.ndarray:
  """[n] trait detector scores (~1 drawn, ~0 absent)."""
  return np.array([tiny_world_detector.trait_score(im, trait) for im in np.asarray(images)])
