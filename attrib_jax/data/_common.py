"""Pieces shared by every dataset builder: record schema, image encoding, the base class.

Every dataset in attrib_jax has the same record schema, so that training, the Fisher and the
loss sweep read any of them the same way:

  image:    encoded PNG or JPEG bytes (decoded to uint8 [H, W, 3] on read).
  index:    the item's stable integer identity, 0..N-1. TFDS shuffles records when it writes
            them, so record position means nothing; attribution scores are keyed by `index`.
  captions: every caption of the item, in a stable order (a Sequence of Text).

Images are handed to TFDS as already-encoded bytes: encoding numpy arrays inside TFDS needs
TensorFlow, which this project never installs.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

IMAGE_FORMATS = ("png", "jpeg")


def encode_image(image: np.ndarray | Image.Image, image_format: str = "png",
                 jpeg_quality: int = 95) -> bytes:
  """Encodes an RGB image as PNG (lossless) or JPEG bytes, deterministically."""
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  if image_format == "png":
    image.save(buffer, format="PNG", optimize=False)
  else:
    image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
  return buffer.getvalue()


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
  """Scales the shorter side to `resolution` (bicubic, antialiased), then crops the centre.

  The usual preprocessing of text-to-image training sets (and of the MSCOCO model's 128 px
  images): no aspect distortion, the centre square kept.
  """
  width, height = image.size
  scale = resolution / min(width, height)
  new_w = max(resolution, round(width * scale))
  new_h = max(resolution, round(height * scale))
  image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left = (new_w - resolution) // 2
  top = (new_h - resolution) // 2
  return image.crop((left, top, left + resolution, top + resolution))


def load_image_bytes(path: str | os.PathLike[str], resolution: int | None,
                     image_format: str, jpeg_quality: int = 95) -> bytes:
  """Reads an image file and returns the bytes to store in a record.

  Without a resolution, an RGB JPEG or PNG is stored as its original bytes (no generation loss)
  and anything else (greyscale, CMYK, palette, alpha, other formats) is converted to RGB and
  stored as lossless PNG, so that every stored image decodes to [H, W, 3] as PIL's RGB
  conversion of the file. With a resolution, the resized crop is encoded as `image_format`.
  EXIF orientation is ignored, as PIL and the COCO annotations both ignore it.
  """
  with open(path, "rb") as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    if resolution is None and image.format in ("JPEG", "PNG") and image.mode == "RGB":
      return data
    image.load()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
      # Composite transparent pixels over white rather than whatever colour they hide.
      rgba = image.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    if resolution is None:
      return encode_image(image, "png")
    return encode_image(resize_center_crop(image, resolution), image_format, jpeg_quality)


def caption_features(resolution: int | None, image_format: str,
                     **extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """The shared record schema (see the module docstring), plus dataset-specific fields."""
  shape = (resolution, resolution, 3) if resolution else (None, None, 3)
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=shape, encoding_format=image_format),
      "index": tfds.features.Scalar(dtype=np.int64, doc="stable item identity, 0..N-1"),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      **extra,
  })


def check_image_options(resolution: int | None, image_format: str) -> None:
  if resolution is not None and (not isinstance(resolution, int) or resolution <= 0):
    raise ValueError(f"resolution must be a positive int or None, got {resolution!r}")
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder):
  """A GeneratorBasedBuilder that always writes array_record files.

  array_record is the only TFDS format readable without TensorFlow (by random access, through
  `as_data_source`), so any other format is refused here instead of failing at read time.
  """

  def __init__(self, **kwargs: Any):
    file_format = kwargs.setdefault("file_format", "array_record")
    if str(getattr(file_format, "value", file_format)) != "array_record":
      raise ValueError(f"{type(self).__name__} only writes array_record, got {file_format!r}: "
                       "other TFDS formats cannot be read without TensorFlow")
    super().__init__(**kwargs)

  # TFDS announces a build in bold as "Downloading and preparing dataset Unknown size ...", and
  # its end in a second line; nothing is downloaded here, so one plain line says what happens.
  def _log_download_bytes(self) -> None:
    print(f"dataset: writing {self.name}/{self.builder_config.name if self.builder_config else ''}"
          f" to {self.data_dir}", flush=True)

  def _log_download_done(self) -> None:
    pass


class LocalFilesBuilder(ArrayRecordBuilder):
  """An ArrayRecordBuilder reading local files from `manual_dir`.

  The folder is given either to the constructor (`manual_dir=...`) or, the TFDS way, through
  `download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))`; the
  constructor's wins when both are given.
  """

  def __init__(self, *, manual_dir: str | os.PathLike[str] | None = None, **kwargs: Any):
    self._local_manual_dir = None if manual_dir is None else os.fspath(manual_dir)
    super().__init__(**kwargs)

  def _manual_root(self, dl_manager: tfds.download.DownloadManager) -> str:
    """The manual folder, or FileNotFoundError saying what is expected in it."""
    if self._local_manual_dir is not None:
      if not os.path.isdir(self._local_manual_dir):
        raise FileNotFoundError(f"manual_dir {self._local_manual_dir} does not exist.\n"
                                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      return self._local_manual_dir
    try:
      return os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS's way of saying the folder is missing or empty
      raise FileNotFoundError(str(e)) from None
