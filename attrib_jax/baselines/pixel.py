"""Pixel-space cosine similarity: the nearest-neighbour baseline of the attribution papers.

Each image becomes the vector of its pixels scaled to [-1, 1] (x / 127.5 − 1, the pixel-space
model's own input), flattened over H·W·3. By default the vectors are *not* mean-centred: the
score is the plain cosine of those vectors. With `center=True` each image's own mean (over all
its pixels and channels) is subtracted first, so the score is the Pearson correlation of the
two images' pixels, blind to a uniform brightness shift. An item's score is the max over its
unflipped and horizontally flipped image, as AbU takes the max over flips.

The query is compared through its uint8 image (`query.image`), as the training images are.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from attrib_jax.baselines import features, interface


@interface.register
@dataclasses.dataclass(frozen=True)
class PixelCosine(features.EmbeddingCosine):
  """cos(query pixels, training pixels), max over the training image's flips."""
  name = "pixel"
  center: bool = False

  def embed(self, images: np.ndarray, context: interface.Context) -> np.ndarray:
    del context
    x = features.pixels_to_input(images).reshape(images.shape[0], -1)
    if self.center:
      x = x - x.mean(axis=1, keepdims=True)
    return x
