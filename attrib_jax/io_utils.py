"""Atomic file and directory writes: the one way every stage of the project writes a file.

Contract: a reader sees either the previous complete file or the new complete file, never a
torn one, even if the writer is killed or the machine loses power. The bytes go to a temporary
file with a unique name in the destination's own folder (so `os.replace` is a rename within one
file system, atomic on POSIX), are fsynced, renamed over the destination, and the folder is
fsynced so that the rename itself survives a crash. Two writers of one path never share a
temporary file; the last rename wins.

`atomic_directory` does the same for a folder of files: it is built beside the destination and
renamed into place, so a reader finds it complete or absent, never old files beside new ones.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from typing import Any, Iterator

import numpy as np

_TMP_SUFFIX = ".tmp"
STAGING_SUFFIX = _TMP_SUFFIX   # what the staging folders of `atomic_directory` end with


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:   # some file systems do not open folders; the rename is still atomic
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (see the module doc); creates the folder."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".",
                             suffix=_TMP_SUFFIX)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _fsync_directory(directory)


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = True, **dumps_kwargs) -> None:
  """json.dumps(obj) written atomically (values json cannot encode are written as str)."""
  dumps_kwargs.setdefault("default", str)
  atomic_write_bytes(path, json.dumps(obj, indent=indent, sort_keys=sort_keys,
                                      **dumps_kwargs).encode("utf-8"))


def atomic_savez(path: str, **arrays: np.ndarray) -> None:
  """np.savez(path, **arrays), atomically. `path` is used as given (no '.npz' appended)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  atomic_write_bytes(path, buffer.getvalue())


def atomic_save_npy(path: str, array: np.ndarray) -> None:
  """np.save(path, array), atomically."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array))
  atomic_write_bytes(path, buffer.getvalue())


def atomic_save_image(path: str, image: Any, format: str = "PNG", **save_kwargs) -> None:
  """A PIL image (or a uint8 array) encoded in memory and written atomically."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  image.save(buffer, format=format, **save_kwargs)
  atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields an empty staging folder beside `path`; on a clean exit it replaces `path`.

  The old folder (if any) is renamed aside and removed only after the new one is in place, so
  at every moment `path` is either the complete old folder, absent, or the complete new one.
  On an exception the staging folder is removed and `path` is left as it was.
  """
  path = os.path.abspath(path.rstrip("/"))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=_TMP_SUFFIX)
  try:
    yield staging
    for root, _, files in os.walk(staging):
      for name in files:
        with open(os.path.join(root, name), "rb") as f:
          os.fsync(f.fileno())
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + ".old.",
                             suffix=_TMP_SUFFIX)
      os.rmdir(old)
      os.rename(path, old)
    os.rename(staging, path)
    _fsync_directory(parent)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


class CorruptFileError(ValueError):
  """A stored file that cannot be read back (truncated or damaged): names the file."""


# What numpy raises for a damaged .npz: an empty file (EOFError), a cut one (no zip directory),
# a flipped byte (a member's CRC), a damaged compressed member (zlib).
_DAMAGED = (EOFError, zipfile.BadZipFile, zlib.error)


def _damaged(path: str, error: Exception) -> CorruptFileError:
  return CorruptFileError(
      f"{path} cannot be read: it is truncated or damaged ({type(error).__name__}: {error}). "
      "The project writes every file atomically, so no interrupted run leaves one like this: "
      "it was cut or altered afterwards (a full disk, a partial copy). Delete it to compute it "
      "again.")


@contextlib.contextmanager
def open_npz(path: str) -> Iterator[Any]:
  """`np.load(path)` of an .npz for a `with` block. A truncated or damaged file raises
  CorruptFileError naming it, also where the damage shows only when a member is read; a
  missing file stays FileNotFoundError."""
  try:
    data = np.load(path)
  except FileNotFoundError:
    raise
  except (*_DAMAGED, ValueError, OSError) as e:   # ValueError: bytes numpy cannot place at all
    raise _damaged(path, e) from e
  with data:
    try:
      yield data
    except _DAMAGED as e:
      raise _damaged(path, e) from e


def load_npy(path: str, mmap_mode: str | None = None) -> np.ndarray:
  """`np.load(path, mmap_mode)` of an .npy; a truncated or damaged file raises CorruptFileError
  naming it (numpy's own message names neither the file nor what to do)."""
  try:
    return np.load(path, mmap_mode=mmap_mode)
  except FileNotFoundError:
    raise
  except (EOFError, ValueError, OSError) as e:
    raise _damaged(path, e) from e
