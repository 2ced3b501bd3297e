"""Reading a built dataset by stable item index, without TensorFlow.

TFDS shuffles records when it writes them, so record k is not item k. Attribution code asks
for items by identity ("the loss of item 4711 before and after unlearning"), so `load_split`
returns a random-access source keyed by the `index` field every builder stores. Building the
index -> record map reads each record's small fields once (images are not decoded).
"""
from __future__ import annotations

import collections.abc
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

_MAP_CHUNK = 1024


def _to_str(value: Any) -> Any:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _clean(example: dict[str, Any]) -> dict[str, Any]:
  """Plain Python values: captions as a list of str, scalars as int/str."""
  out = {}
  for key, value in example.items():
    if key == "captions":
      out[key] = [_to_str(c) for c in value]
    elif isinstance(value, np.ndarray) and value.ndim == 0:
      out[key] = value.item()
    elif isinstance(value, np.generic):
      out[key] = value.item()
    else:
      out[key] = _to_str(value)
  return out


class IndexedSource(collections.abc.Sequence):
  """Random access to a split by item index: `source[i]` is the item whose `index` is i.

  Items are dicts {"image": uint8 [H, W, 3], "index": int, "captions": list[str], ...}.
  Supports `len`, `source[i]` and `source.get_many(indices)` (a batch read), so it can back a
  grain data loader directly.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str = "train"):
    self.builder = builder
    self.split = split
    self._source = builder.as_data_source(split=split)
    light = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    n = len(light)
    positions = np.full(n, -1, np.int64)
    for start in range(0, n, _MAP_CHUNK):
      keys = list(range(start, min(n, start + _MAP_CHUNK)))
      for record, example in zip(keys, light.__getitems__(keys)):
        index = int(example["index"])
        if not 0 <= index < n or positions[index] != -1:
          raise ValueError(f"{builder.name}/{split}: item index {index} is out of range "
                           f"[0, {n}) or repeated; the dataset is corrupt")
        positions[index] = record
    self._positions = positions

  def __len__(self) -> int:
    return len(self._positions)

  def record_of(self, index: int) -> int:
    """Where item `index` sits in the record files."""
    return int(self._positions[index])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.get_many(range(*index.indices(len(self))))
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"item index {index} out of range [0, {len(self)})")
    return _clean(self._source[self.record_of(index)])

  def get_many(self, indices) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    for index in indices:
      if not 0 <= index < len(self):
        raise IndexError(f"item index {index} out of range [0, {len(self)})")
    examples = self._source.__getitems__([self.record_of(i) for i in indices])
    return [_clean(e) for e in examples]

  def __repr__(self) -> str:
    return f"IndexedSource({self.builder.name}/{self.split}, {len(self)} items)"


def load_split(builder: tfds.core.DatasetBuilder | str | os.PathLike[str],
               split: str = "train") -> IndexedSource:
  """A prepared split, randomly accessible by item index.

  Args:
    builder: a prepared builder (e.g. `TinyWorld(data_dir=d, config=...)` after
      `download_and_prepare()`), or the path of a built dataset version directory
      (e.g. ".../tiny_world/seed0_n2000_r32/1.0.0"), read without the builder class.
    split: the split name.
  """
  if isinstance(builder, (str, os.PathLike)):
    builder = tfds.builder_from_directory(os.fspath(builder))
  if split not in builder.info.splits:
    raise ValueError(f"{builder.name} at {builder.data_dir} has no split {split!r} "
                     f"(has {list(builder.info.splits)}); was it prepared?")
  return IndexedSource(builder, split)


def prepare(builder: tfds.core.DatasetBuilder,
            manual_dir: str | os.PathLike[str] | None = None) -> tfds.core.DatasetBuilder:
  """Builds a dataset if not built yet (reading local files from `manual_dir`), returns it."""
  config = tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)
  builder.download_and_prepare(download_config=config)
  return builder
