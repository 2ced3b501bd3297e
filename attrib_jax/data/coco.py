"""COCO-2017 captions as a TFDS dataset, read from a local copy.

The MSCOCO attribution setting trains on COCO-2017 train (118,287 images). The TFDS catalog's
`coco_captions` is COCO-2014 in the Karpathy split, a different set of items, so this builder
reads the official layout from `manual_dir`:

  manual_dir/train2017/000000000009.jpg ...
  manual_dir/annotations/captions_train2017.json
  (optional) manual_dir/val2017/ + annotations/captions_val2017.json -> a "validation" split

One item per image listed in the annotation file; `index` = position in ascending image id
order (stable across rebuilds and machines); `image_id` = the COCO id; `captions` = all of the
image's captions (5 to 7), ordered by annotation id. Downstream code (the loss sweep, Fisher)
uses the first 5, as the reference implementation does.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
from typing import Any, Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from attrib_jax.data import _common

_SPLITS = {"train": "train2017", "validation": "val2017"}
_WORKERS = min(8, os.cpu_count() or 1)
_CHUNK = 256


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
  """resolution None keeps the original images (RGB JPEGs stored byte for byte); an int
  resizes the shorter side and centre-crops to resolution x resolution, re-encoded as
  image_format."""
  resolution: int | None = None
  image_format: str = "jpeg"
  jpeg_quality: int = 95

  def __post_init__(self):
    _common.check_image_options(self.resolution, self.image_format)


def config(resolution: int | None = 128, image_format: str | None = None,
           jpeg_quality: int = 95) -> CocoConfig:
  """The Coco2017Captions config for a resolution: predefined "128px" (PNG) and "full"
  (None: originals), otherwise a config named "<resolution>px" or "<resolution>px_jpeg"."""
  if image_format is None:
    image_format = "jpeg" if resolution is None else "png"
  for predefined in Coco2017Captions.BUILDER_CONFIGS:
    if (predefined.resolution, predefined.image_format,
        predefined.jpeg_quality) == (resolution, image_format, jpeg_quality):
      return predefined
  if resolution is None:
    raise ValueError("original images (resolution None) are stored as they are: "
                     "image_format and jpeg_quality do not apply")
  name = f"{resolution}px" + ("" if image_format == "png" else f"_jpeg{jpeg_quality}")
  return CocoConfig(name=name, resolution=resolution, image_format=image_format,
                    jpeg_quality=jpeg_quality,
                    description=f"resized and centre-cropped to {resolution}px, {image_format}")


def _layout_help(manual_dir: Any) -> str:
  return (f"expected the COCO-2017 layout under {manual_dir}:\n"
          "  train2017/*.jpg\n"
          "  annotations/captions_train2017.json\n"
          "(from https://cocodataset.org: train2017.zip and annotations_trainval2017.zip)")


def read_annotations(annotation_file: str | os.PathLike[str]
                     ) -> list[tuple[int, str, list[str]]]:
  """[(image_id, file_name, captions)] in ascending image id order: position = item index.

  Captions of an image are ordered by annotation id. Raises if an image has no caption.
  """
  with open(annotation_file, encoding="utf-8") as f:
    data = json.load(f)
  for key in ("images", "annotations"):
    if key not in data:
      raise ValueError(f"{annotation_file} has no {key!r} list: not a COCO captions file")
  captions = collections.defaultdict(list)
  for ann in sorted(data["annotations"], key=lambda a: a["id"]):
    captions[ann["image_id"]].append(ann["caption"].strip())
  images = sorted(data["images"], key=lambda im: im["id"])
  ids = [im["id"] for im in images]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{annotation_file} lists some image ids more than once")
  uncaptioned = [i for i in ids if not captions.get(i)]
  if uncaptioned:
    raise ValueError(f"{len(uncaptioned)} images in {annotation_file} have no caption, e.g. "
                     f"ids {uncaptioned[:5]}")
  orphans = set(captions) - set(ids)
  if orphans:
    raise ValueError(f"{annotation_file}: captions refer to {len(orphans)} unlisted image ids, "
                     f"e.g. {sorted(orphans)[:5]}")
  return [(im["id"], im["file_name"], captions[im["id"]]) for im in images]


class Coco2017Captions(_common.LocalFilesBuilder):
  """COCO-2017 captions (see the module docstring); configs "128px" (default) and "full"."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _layout_help("manual_dir")
  BUILDER_CONFIGS = [
      CocoConfig(name="128px", resolution=128, image_format="png",
                 description="resized and centre-cropped to 128x128, lossless PNG "
                             "(the MSCOCO diffusion model's input)"),
      CocoConfig(name="full", description="original images"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=_common.caption_features(
            cfg.resolution, cfg.image_format,
            image_id=tfds.features.Scalar(dtype=np.int64, doc="COCO image id")),
        homepage="https://cocodataset.org",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = epath.Path(self._manual_root(dl_manager))
    splits = {}
    for split, folder in _SPLITS.items():
      annotation_file = root / "annotations" / f"captions_{folder}.json"
      image_dir = root / folder
      if split != "train" and not (annotation_file.exists() and image_dir.exists()):
        continue  # validation is optional
      if not annotation_file.exists():
        raise FileNotFoundError(f"missing {annotation_file}; {_layout_help(root)}")
      if not image_dir.is_dir():
        raise FileNotFoundError(f"missing image folder {image_dir}; {_layout_help(root)}")
      items = read_annotations(annotation_file)
      missing = [name for _, name, _ in items if not (image_dir / name).exists()]
      if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(items)} images listed in "
                                f"{annotation_file} are missing from {image_dir}, e.g. "
                                f"{missing[:5]}")
      splits[split] = self._generate_examples(os.fspath(image_dir), items)
    return splits

  def _generate_examples(self, image_dir: str, items: list[tuple[int, str, list[str]]]
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config

    def load(name: str) -> bytes:
      return _common.load_image_bytes(os.path.join(image_dir, name), cfg.resolution,
                                      cfg.image_format, cfg.jpeg_quality)

    # Decoding and resizing dominate; PIL releases the GIL, so threads help. Chunks bound the
    # memory held in flight.
    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
      for start in range(0, len(items), _CHUNK):
        chunk = items[start:start + _CHUNK]
        images = pool.map(load, [name for _, name, _ in chunk])
        for offset, ((image_id, _, captions), image) in enumerate(zip(chunk, images)):
          index = start + offset
          yield index, {"image": image, "index": index, "captions": captions,
                        "image_id": image_id}
