"""Local attribution: a query region, in pixels of the query image, and the latent cells it
covers (the AbU paper's cropped queries).

A region is a half-open pixel box [x0, x1) × [y0, y1) (PIL's crop box), x to the right, y down.
Only the unlearning step sees it: the query's loss becomes the mean over the latent cells the
box overlaps, so the step forgets what the model drew there. The loss sweep over the training
items stays the full-image loss (the region belongs to the query, not to the items).

A latent cell stands for a `factor` × `factor` block of pixels, factor = image side / latent
side: 4 for the tiny world's pixel codec (space-to-depth, `models/pipeline.py`), 8 for the
Stable Diffusion VAE. A cell counts when it overlaps the box, so a box never loses a partly
covered cell (an object's edge).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Region:
  """A pixel box [x0, x1) × [y0, y1) of the query image."""
  x0: int
  y0: int
  x1: int
  y1: int

  def __post_init__(self):
    values = (self.x0, self.y0, self.x1, self.y1)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
      raise ValueError(f"region {values}: coordinates must be integers (pixels)")
    if min(values) < 0:
      raise ValueError(f"region {self}: coordinates must be >= 0")
    if not (self.x0 < self.x1 and self.y0 < self.y1):
      raise ValueError(f"region {self}: needs x0 < x1 and y0 < y1 (an empty box)")

  @classmethod
  def parse(cls, text: str) -> "Region":
    """From "x0,y0,x1,y1" (the flag's form)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
      if len(parts) != 4:
        raise ValueError
      values = [int(p) for p in parts]
    except ValueError:
      raise ValueError(f"region {text!r}: expected four integers x0,y0,x1,y1 "
                       "(pixels of the query image)") from None
    return cls(*values)

  def __str__(self) -> str:
    return f"{self.x0},{self.y0},{self.x1},{self.y1}"

  @property
  def key(self) -> str:
    """A file-name-safe name: results of one query and region are cached under it."""
    return f"region-{self.x0}-{self.y0}-{self.x1}-{self.y1}"

  def as_list(self) -> list[int]:
    return [int(self.x0), int(self.y0), int(self.x1), int(self.y1)]

  def check(self, image_hw: Sequence[int]) -> None:
    """Raises unless the box lies inside an image of [height, width]."""
    height, width = int(image_hw[0]), int(image_hw[1])
    if self.x1 > width or self.y1 > height:
      raise ValueError(f"region {self} is outside the {width}x{height} query image "
                       f"(x1 <= {width} and y1 <= {height} needed)")

  def latent_mask(self, image_hw: Sequence[int], latent_hw: Sequence[int]) -> np.ndarray:
    """[h, w] float32: 1 on the latent cells the box overlaps, 0 elsewhere."""
    self.check(image_hw)
    (height, width), (h, w) = (int(v) for v in image_hw[:2]), (int(v) for v in latent_hw[:2])
    if height % h or width % w or height // h != width // w:
      raise ValueError(f"image {height}x{width} is not a whole, square multiple of the latent "
                       f"{h}x{w}: cannot map pixels to latent cells")
    factor = height // h
    mask = np.zeros((h, w), np.float32)
    # Cell c spans pixels [c·f, (c+1)·f): it overlaps [x0, x1) when c·f < x1 and (c+1)·f > x0.
    mask[self.y0 // factor:-(-self.y1 // factor), self.x0 // factor:-(-self.x1 // factor)] = 1
    return mask


def draw_box(image: np.ndarray, region: Region) -> np.ndarray:
  """A copy of a uint8 [H, W, 3] image with the region's outline in yellow (for pictures)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top  (pictures only)
  picture = Image.fromarray(np.asarray(image, np.uint8))
  ImageDraw.Draw(picture).rectangle((region.x0, region.y0, region.x1 - 1, region.y1 - 1),
                                    outline=(255, 230, 0))
  return np.asarray(picture)


def query_mask(region: Region | None, image: np.ndarray, latent: np.ndarray
               ) -> np.ndarray | None:
  """The latent mask of `region` for a query's image [H, W, 3] and latent [h, w, c]; None for
  no region."""
  if region is None:
    return None
  return region.latent_mask(np.shape(image)[:2], np.shape(latent)[:2])
