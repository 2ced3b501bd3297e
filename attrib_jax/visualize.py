"""Pictures people would rather look at than read: image grids with captions, written as PNG."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from attrib_jax import io_utils


def image_grid(images: np.ndarray, labels: Sequence[str] | None = None, *, columns: int = 8,
               scale: int = 4, label_height: int = 12) -> Image.Image:
  """uint8 [N, H, W, 3] -> one image, each tile upscaled (nearest) and optionally labelled."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"image_grid wants uint8 [N, H, W, 3], got {images.shape}")
  n, h, w, _ = images.shape
  columns = max(1, min(columns, n))
  rows = -(-n // columns)
  tile_h = h * scale + (label_height if labels else 0)
  grid = Image.new("RGB", (columns * w * scale, rows * tile_h), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i, image in enumerate(images):
    x, y = (i % columns) * w * scale, (i // columns) * tile_h
    grid.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST), (x, y))
    if labels:
      draw.text((x + 2, y + h * scale), str(labels[i])[: (w * scale) // 6], fill=(0, 0, 0))
  return grid


def save_png(path: str, image: Image.Image) -> None:
  """Atomic: a reader never sees half a file."""
  io_utils.atomic_save_image(path, image)


def save_image_grid(path: str, images: np.ndarray, labels: Sequence[str] | None = None,
                    **kwargs) -> None:
  save_png(path, image_grid(images, labels, **kwargs))
