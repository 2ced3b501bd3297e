"""Image preprocessing read from a transformers `preprocessor_config.json` (numpy and PIL only).

The ViT and CLIP towers expect the pixels their image processor made: resized (a fixed
height/width, or the shortest edge to a length keeping the aspect ratio), centre-cropped,
rescaled (1/255) and normalised per channel. This module reads the fields of a
ViTImageProcessor / CLIPImageProcessor config and applies them the way transformers' PIL
backend does (resize in PIL on the uint8 image, then crop, rescale, normalise), returning
channels-last float32 `(n, h, w, 3)` for the Flax towers.

A field that is absent takes the default of the processor class the file names
(`image_processor_type` or the older `feature_extractor_type`); a field that would change the
pixels and that this module does not implement (padding, a longest edge, ...) is an error
naming it, as in `configuration.check_config`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from attrib_jax import io_utils
from attrib_jax.models import configuration

FILENAME = "preprocessor_config.json"
COMPONENT = "image processor"

IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

# Class defaults of transformers' ViTImageProcessor and CLIPImageProcessor. `square`: whether
# an int `size` means height = width = size (ViT) or the shortest edge (CLIP).
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ViT": dict(do_resize=True, size={"height": 224, "width": 224}, resample=2,
                do_center_crop=False, crop_size=None, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=IMAGENET_STANDARD[0],
                image_std=IMAGENET_STANDARD[1], square=True),
    "CLIP": dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                 crop_size={"height": 224, "width": 224}, do_rescale=True,
                 rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP[0],
                 image_std=OPENAI_CLIP[1], square=False),
}
_USED = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
         "rescale_factor", "do_normalize", "image_mean", "image_std")
_PINNED = {"do_pad": [False, None], "do_convert_rgb": [True, False, None],
           "input_data_format": [None, "channels_last"]}
_IGNORED = ("image_processor_type", "feature_extractor_type", "processor_class",
            "data_format", "return_tensors", "default_to_square_size")


def _class_of(config: Mapping[str, Any]) -> str:
  name = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
  for prefix in ("CLIP", "ViT"):  # the longer-prefixed class names first
    if name.startswith(prefix) and not name.startswith("ViTMAE"):
      return prefix
  raise configuration.UnsupportedConfigError(
      f"{COMPONENT}: image_processor_type={name!r} is not supported (ViTImageProcessor or "
      "CLIPImageProcessor, or the older ViTFeatureExtractor / CLIPFeatureExtractor)")


def _size(value: Any, square: bool, key: str) -> tuple[str, tuple[int, ...]]:
  """('hw', (h, w)) or ('shortest_edge', (s,)) from transformers' size forms."""
  def positive(x):
    return isinstance(x, int) and not isinstance(x, bool) and x > 0
  if positive(value):
    return ("hw", (value, value)) if square else ("shortest_edge", (value,))
  if isinstance(value, Mapping):
    keys = set(value)
    if keys == {"height", "width"} and positive(value["height"]) and positive(value["width"]):
      return "hw", (value["height"], value["width"])
    if keys == {"shortest_edge"} and positive(value["shortest_edge"]):
      return "shortest_edge", (value["shortest_edge"],)
  raise configuration.UnsupportedConfigError(
      f"{COMPONENT}: {key}={value!r} is not supported (an int, {{'height', 'width'}} or "
      "{'shortest_edge'})")


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """The preprocessing a ViT / CLIP image processor config describes."""
  do_resize: bool
  size: tuple[str, tuple[int, ...]]       # ('hw', (h, w)) or ('shortest_edge', (s,))
  resample: int                            # a PIL resampling filter (2 bilinear, 3 bicubic)
  do_center_crop: bool
  crop_size: tuple[int, int] | None
  do_rescale: bool
  rescale_factor: float
  do_normalize: bool
  image_mean: tuple[float, float, float]
  image_std: tuple[float, float, float]

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "ImageProcessorConfig":
    """Reads a preprocessor_config.json dict strictly (see the module doc)."""
    kind = _class_of(config)
    configuration.check_config(config, component=f"{COMPONENT} ({kind})", used=_USED,
                               pinned=_PINNED, ignored=_IGNORED)
    c = {**_CLASS_DEFAULTS[kind], **{k: v for k, v in config.items() if k in _USED}}
    if c["resample"] not in (0, 1, 2, 3, 4, 5):
      raise configuration.UnsupportedConfigError(
          f"{COMPONENT}: resample={c['resample']!r} is not a PIL filter number (0-5)")
    crop = None
    if c["do_center_crop"]:
      _, crop = _size(c["crop_size"], True, "crop_size")
    mean, std = (tuple(float(v) for v in np.broadcast_to(c[k], (3,)))
                 for k in ("image_mean", "image_std"))
    if c["do_normalize"] and not all(s > 0 for s in std):
      raise configuration.UnsupportedConfigError(f"{COMPONENT}: image_std={std} must be > 0")
    return cls(do_resize=bool(c["do_resize"]), size=_size(c["size"], c["square"], "size"),
               resample=int(c["resample"]), do_center_crop=bool(c["do_center_crop"]),
               crop_size=crop, do_rescale=bool(c["do_rescale"]),
               rescale_factor=float(c["rescale_factor"]), do_normalize=bool(c["do_normalize"]),
               image_mean=mean, image_std=std)

  def output_size(self, height: int, width: int) -> tuple[int, int]:
    """The (h, w) an image of this size comes out at."""
    if self.do_center_crop:
      return self.crop_size
    return self._resized(height, width)

  def _resized(self, height: int, width: int) -> tuple[int, int]:
    if not self.do_resize:
      return height, width
    form, value = self.size
    if form == "hw":
      return value
    short, long = sorted((height, width))
    new_long = int(value[0] * long / short)  # transformers truncates, as torchvision did
    return (value[0], new_long) if height <= width else (new_long, value[0])

  def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """uint8 RGB images [n, H, W, 3] (or a list of [H, W, 3] of any sizes) -> float32
    [n, h, w, 3]."""
    out = []
    for i, image in enumerate(images):
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{COMPONENT}: image {i} must be uint8 [H, W, 3], got {image.dtype} "
                         f"{image.shape}")
      height, width = image.shape[:2]
      if self.do_resize:
        h, w = self._resized(height, width)  # PIL, on the uint8 image, as transformers does
        image = np.asarray(Image.fromarray(image).resize((w, h), resample=self.resample))
      if self.do_center_crop:
        ch, cw = self.crop_size
        h, w = image.shape[:2]
        if ch > h or cw > w:
          # transformers pads with zeros there; no tower's own config asks for it.
          raise ValueError(f"{COMPONENT}: crop_size {(ch, cw)} exceeds the resized image "
                           f"{(h, w)} (padding is not implemented)")
        top, left = (h - ch) // 2, (w - cw) // 2
        image = image[top:top + ch, left:left + cw]
      x = image.astype(np.float64)
      if self.do_rescale:
        x = x * self.rescale_factor
      x = x.astype(np.float32)  # transformers rescales to float32, then normalises in it
      if self.do_normalize:
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std,
                                                                         np.float32)
      out.append(x)
    if not out:
      raise ValueError(f"{COMPONENT}: no images given")
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
      raise ValueError(f"{COMPONENT}: images come out at different sizes {sorted(shapes)}; "
                       "set a fixed size or a centre crop")
    return np.stack(out).astype(np.float32)


def read_image_processor(directory: str | os.PathLike) -> ImageProcessorConfig:
  """The preprocessing of a model directory's preprocessor_config.json.

  Raises:
    FileNotFoundError: naming the file when the directory lacks it.
    UnsupportedConfigError: naming a field this module does not implement.
  """
  path = os.path.join(os.fspath(directory), FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {FILENAME} in {os.fspath(directory)}: the tower's image "
                            "preprocessing (resize, crop, normalisation) is read from it")
  return ImageProcessorConfig.from_transformers(configuration.read_config(path))


def save_image_processor(directory: str | os.PathLike, config: Mapping[str, Any]) -> None:
  """Writes a preprocessor_config.json dict after checking that it reads back."""
  ImageProcessorConfig.from_transformers(config)
  os.makedirs(os.fspath(directory), exist_ok=True)
  io_utils.atomic_write_json(os.path.join(os.fspath(directory), FILENAME),
                             json.loads(json.dumps(dict(config))))
