"""The user's own captioned images as a TFDS dataset: an image folder plus a captions file.

Layout (the folder is TFDS's `manual_dir`):

  my_images/cat.jpg, my_images/sub/dog.png, ...
  my_images/captions.jsonl   one JSON object per line:
                               {"file": "cat.jpg", "caption": "a cat"} or
                               {"file": "sub/dog.png", "captions": ["a dog", "a puppy"]}
  or my_images/captions.csv  a header row with columns file,caption (others ignored);
                             several rows for one file give it several captions.

Files are relative to the folder. Several entries for one file add up, in file order.
Every image in the folder must have a caption and every captioned file must exist: a silent
mismatch would change which items the attribution scores refer to. `index` = position in
sorted relative-path order (Python string order on "/"-separated paths); `file_name` keeps the
path for reference.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import posixpath
from typing import Any, Iterator

import tensorflow_datasets as tfds

from attrib_jax.data import _common

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_CAPTION_FILES = ("captions.jsonl", "captions.csv")


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """captions_file: path relative to the folder (or absolute); None finds captions.jsonl or
  captions.csv in the folder. resolution None keeps RGB JPEG/PNG files byte for byte; an int
  resizes the shorter side and centre-crops, re-encoding as image_format."""
  captions_file: str | None = None
  resolution: int | None = None
  image_format: str = "png"
  jpeg_quality: int = 95

  def __post_init__(self):
    _common.check_image_options(self.resolution, self.image_format)


def _normalise(name: str, source: str) -> str:
  path = posixpath.normpath(name.replace("\\", "/"))
  if not name or posixpath.isabs(path) or path == ".." or path.startswith("../"):
    raise ValueError(f"{source}: file {name!r} must be a path inside the image folder")
  return path


def _read_jsonl(path: str) -> list[tuple[str, list[str], str]]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
      if not isinstance(row, dict) or "file" not in row:
        raise ValueError(f"{where}: expected an object with a \"file\" key")
      if ("caption" in row) == ("captions" in row):
        raise ValueError(f"{where}: give exactly one of \"caption\" or \"captions\"")
      captions = [row["caption"]] if "caption" in row else row["captions"]
      if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: captions must be strings")
      rows.append((row["file"], captions, where))
  return rows


def _read_csv(path: str) -> list[tuple[str, list[str], str]]:
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
      raise ValueError(f"{path}: the header row must name the columns file and caption, "
                       f"got {reader.fieldnames}")
    return [(row["file"] or "", [row["caption"] or ""], f"{path}:{reader.line_num}")
            for row in reader]


def read_captions(folder: str | os.PathLike[str], captions_file: str | None = None
                  ) -> list[tuple[str, list[str]]]:
  """[(relative file, captions)] in sorted file order: position = item index.

  Raises with the offending entries named for: a missing or ambiguous captions file, bad
  rows, empty captions, captioned files that do not exist, images without captions, and an
  empty dataset.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder} does not exist")
  if captions_file is None:
    found = [n for n in DEFAULT_CAPTION_FILES if os.path.isfile(os.path.join(folder, n))]
    if len(found) != 1:
      raise FileNotFoundError(
          f"{folder} must hold exactly one of {DEFAULT_CAPTION_FILES} (found {found}); or "
          "name the captions file in the config")
    captions_file = found[0]
  path = os.path.join(folder, captions_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"captions file {path} does not exist")
  if path.endswith(".jsonl"):
    rows = _read_jsonl(path)
  elif path.endswith(".csv"):
    rows = _read_csv(path)
  else:
    raise ValueError(f"captions file {path} must end in .jsonl or .csv")

  captions = collections.defaultdict(list)
  for name, texts, where in rows:
    if not isinstance(name, str):
      raise ValueError(f"{where}: file must be a string, got {name!r}")
    texts = [t.strip() for t in texts]
    if not texts or not all(texts):
      raise ValueError(f"{where}: empty caption for {name!r}")
    captions[_normalise(name, where)].extend(texts)

  missing = sorted(n for n in captions if not os.path.isfile(os.path.join(folder, n)))
  if missing:
    raise FileNotFoundError(f"{len(missing)} captioned files do not exist in {folder}, e.g. "
                            f"{missing[:5]}")
  on_disk = set()
  caption_path = os.path.abspath(path)
  for root, _, files in os.walk(folder):
    for file in files:
      full = os.path.join(root, file)
      if file.lower().endswith(IMAGE_EXTENSIONS) and os.path.abspath(full) != caption_path:
        on_disk.add(os.path.relpath(full, folder).replace(os.sep, "/"))
  uncaptioned = sorted(on_disk - set(captions))
  if uncaptioned:
    raise ValueError(f"{len(uncaptioned)} images in {folder} have no caption in {path}, e.g. "
                     f"{uncaptioned[:5]}; caption them or move them out")
  if not captions:
    raise ValueError(f"no captioned images: {path} has no entries")
  return [(name, captions[name]) for name in sorted(captions)]


class ImageFolderCaptions(_common.LocalFilesBuilder):
  """A folder of captioned images (see the module docstring); one split, "train".

  Name each dataset with its own config so datasets do not share a directory:
  `ImageFolderCaptions(data_dir=d, config=ImageFolderConfig(name="pets", resolution=64))`,
  then `reader.prepare(builder, manual_dir="path/to/folder")` (or pass `manual_dir=` here).
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  BUILDER_CONFIGS = [ImageFolderConfig(name="default", description="original images")]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=_common.caption_features(
            cfg.resolution, cfg.image_format,
            file_name=tfds.features.Text(doc="path relative to the image folder")),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    folder = self._manual_root(dl_manager)
    items = read_captions(folder, self.builder_config.captions_file)
    return {"train": self._generate_examples(folder, items)}

  def _generate_examples(self, folder: str, items: list[tuple[str, list[str]]]
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    for index, (name, captions) in enumerate(items):
      path = os.path.join(folder, name)
      try:
        image = _common.load_image_bytes(path, cfg.resolution, cfg.image_format,
                                         cfg.jpeg_quality)
      except (OSError, ValueError) as e:  # PIL's errors name a buffer, not the user's file
        raise ValueError(f"{path} cannot be read as an image ({e}); fix or remove it and its "
                         "caption") from e
      yield index, {"image": image, "index": index, "captions": captions, "file_name": name}
