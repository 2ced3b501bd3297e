"""Precomputed training arrays: what the model sees of each item, computed once.

As in the reference code, every item is encoded once, with its horizontal flip, and the text
encoder states of its first K captions are stored; training, Fisher and the loss sweep then
never run the VAE or the text encoder. Pixel-space worlds store pixels scaled to [-1, 1].

Layout of a precompute directory (all `.npy`, memory-mappable):
  latents.npy          [N, 2, h, w, c]  (unflipped, flipped)
  text_states.npy      [N, K, L, D]
  num_captions.npy     [N] int32        real captions per item (<= K; the rest is padding)
  index.npy            [N] int64        the dataset's stable `index` of each row
  null_text_states.npy [L, D]           states of the empty prompt (classifier-free guidance)
  manifest.json        shapes, dtypes, encoder fingerprints, rows done so far
Writing is chunked and resumable: `manifest.json` records the rows completed, rewritten
atomically after each chunk, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from attrib_jax import io_utils

ARRAYS = ("latents", "text_states", "num_captions", "index")
DTYPES = {"float32": np.float32, "float16": np.float16}


_write_json_atomic = io_utils.atomic_write_json


def precompute(out_dir: str, *, num_items: int, get_items: Callable[[np.ndarray], tuple],
               encode_images: Callable[[np.ndarray], np.ndarray],
               encode_text: Callable[[Sequence[str]], np.ndarray], num_captions: int,
               dtype: str = "float32", chunk_size: int = 256,
               fingerprint: dict | None = None, log: Callable[[str], None] = print) -> str:
  """Encodes every item; resumes an interrupted run with the same fingerprint.

  Args:
    out_dir: where the arrays go.
    num_items: N.
    get_items: rows -> (images uint8 [n, H, W, 3], captions list of lists, dataset indices).
    encode_images: images uint8 [n, H, W, 3] -> latents [n, h, w, c] (deterministic: use the
      latent mean or a keyed sample; the reference's unseeded sampling is a trap).
    encode_text: prompts -> states [n, L, D].
    num_captions: K, captions kept per item.
    dtype: storage dtype, "float32" or "float16".
    fingerprint: what the arrays depend on (encoders, dataset, resolution); a directory made
      with another fingerprint is an error rather than silently mixed.
  """
  if num_items <= 0:
    raise ValueError(f"Cannot precompute an empty dataset (num_items={num_items}) into {out_dir}")
  if dtype not in DTYPES:
    raise ValueError(f"precompute dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, "manifest.json")
  fingerprint = dict(fingerprint or {}, num_items=num_items, num_captions=num_captions,
                     dtype=dtype)
  # As the manifest will read it back: JSON has no tuples, so a tuple-valued setting (e.g. the
  # world's `patterns`) must compare equal to the list it is stored as.
  fingerprint = json.loads(json.dumps(fingerprint, default=str))
  store = DTYPES[dtype]
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get("fingerprint") == fingerprint and manifest.get("rows_done") == num_items:
      return out_dir   # complete: nothing to encode (every leave-K-out retraining lands here)

  null_states = np.asarray(encode_text([""]))[0]
  probe_images, _, _ = get_items(np.arange(1))
  latent_shape = np.asarray(encode_images(probe_images)).shape[1:]
  shapes = {"latents": (num_items, 2) + latent_shape,
            "text_states": (num_items, num_captions) + null_states.shape,
            "num_captions": (num_items,), "index": (num_items,)}
  dtypes = {"latents": store, "text_states": store, "num_captions": np.int32,
            "index": np.int64}

  done = 0
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get("fingerprint") != fingerprint:
      raise ValueError(f"{out_dir} holds arrays made with other settings "
                       f"({manifest.get('fingerprint')} vs {fingerprint}); use another "
                       "directory or delete it")
    done = manifest["rows_done"]
    arrays = {k: io_utils.load_npy(os.path.join(out_dir, k + ".npy"), mmap_mode="r+")
              for k in ARRAYS}
  else:
    arrays = {k: np.lib.format.open_memmap(os.path.join(out_dir, k + ".npy"), mode="w+",
                                           dtype=dtypes[k], shape=shapes[k]) for k in ARRAYS}
    io_utils.atomic_save_npy(os.path.join(out_dir, "null_text_states.npy"),
                             null_states.astype(store))
    manifest = {"fingerprint": fingerprint, "rows_done": 0,
                "shapes": {k: list(v) for k, v in shapes.items()}}
    _write_json_atomic(manifest_path, manifest)

  start_time, start_done = time.time(), done
  while done < num_items:
    rows = np.arange(done, min(done + chunk_size, num_items))
    images, captions, indices = get_items(rows)
    images = np.asarray(images)
    flipped = images[:, :, ::-1]
    latents = np.stack([encode_images(images), encode_images(flipped)], axis=1)
    prompts, counts = [], []
    for item_captions in captions:
      if not item_captions:
        raise ValueError(f"Item {indices[len(counts)]} has no captions")
      kept = list(item_captions[:num_captions])
      counts.append(len(kept))
      prompts += kept + [""] * (num_captions - len(kept))
    states = np.asarray(encode_text(prompts)).reshape((rows.size, num_captions)
                                                       + null_states.shape)
    arrays["latents"][rows] = latents.astype(store)
    arrays["text_states"][rows] = states.astype(store)
    arrays["num_captions"][rows] = counts
    arrays["index"][rows] = indices
    for a in arrays.values():
      a.flush()
    done = int(rows[-1]) + 1
    manifest["rows_done"] = done
    _write_json_atomic(manifest_path, manifest)
    rate = (done - start_done) / max(time.time() - start_time, 1e-9)
    log(f"precompute: {done}/{num_items} items, {rate:.1f} items/s, "
        f"ETA {(num_items - done) / max(rate, 1e-9):.0f}s")
  return out_dir


def load(out_dir: str, mmap: bool = True) -> dict[str, np.ndarray]:
  """Reads a finished precompute directory (memory-mapped by default)."""
  manifest_path = os.path.join(out_dir, "manifest.json")
  if not os.path.exists(manifest_path):
    raise FileNotFoundError(f"No precomputed arrays in {out_dir} (manifest.json missing)")
  with open(manifest_path) as f:
    manifest = json.load(f)
  n = manifest["fingerprint"]["num_items"]
  if manifest["rows_done"] != n:
    raise ValueError(f"{out_dir} is incomplete ({manifest['rows_done']}/{n} rows): rerun the "
                     "precompute step to finish it")
  mode = "r" if mmap else None
  out = {k: io_utils.load_npy(os.path.join(out_dir, k + ".npy"), mmap_mode=mode) for k in ARRAYS}
  out["null_text_states"] = io_utils.load_npy(os.path.join(out_dir, "null_text_states.npy"))
  # An array of another run copied in (or rewritten) would otherwise surface as a shape error
  # deep inside a jitted step, naming no file.
  for k, shape in manifest.get("shapes", {}).items():
    if tuple(out[k].shape) != tuple(shape):
      raise ValueError(f"{os.path.join(out_dir, k + '.npy')} has shape {tuple(out[k].shape)}, "
                       f"but {manifest_path} records {tuple(shape)}: the arrays are not one "
                       "precompute's; delete the directory and rerun launch.train")
  out["manifest"] = manifest
  return out
