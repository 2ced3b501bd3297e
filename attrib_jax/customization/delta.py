"""A customized model saved as a delta on its base pipeline (Custom Diffusion's format, ours).

Custom Diffusion changes only the UNet's cross-attention K/V projections and adds one token
(`<new1>`) with its own row in the text encoder's embedding table, so that is all a delta holds:

  delta.npz   kv/<param path>: every attn2 to_k / to_v weight of the UNet (Flax layout)
              token_embedding: the new token's row [D]
  delta.json  the token (content, id), the initializer word, the base's fingerprint (the K/V
              paths and shapes, the text table's shape and a digest of it), the settings

`apply_delta(base, delta)` returns the customized Pipeline: the tokenizer with the token added,
a text encoder one row larger, the UNet with the delta's K/V. Everything is checked first: a
delta made on another base (other shapes, another text table) or a damaged file raises an error
naming what does not fit; nothing is applied halfway.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from attrib_jax import io_utils
from attrib_jax.attribution import selection
from attrib_jax.models import clip_text
from attrib_jax.models import pipeline as pipeline_lib

DELTA_FILE = "delta.npz"
META_FILE = "delta.json"
FORMAT = "attrib_jax.custom_diffusion_delta/1"
TABLE_PATH = ("text_model", "embeddings", "token_embedding", "embedding")
KV_PREFIX = "kv/"
ROW_KEY = "token_embedding"


class DeltaMismatchError(ValueError):
  """A delta does not fit the base pipeline it is applied to: names what differs."""


@dataclasses.dataclass(frozen=True)
class CustomDelta:
  """What customization changed. `kv` maps `selection.path_name` paths to arrays."""
  kv: Mapping[str, np.ndarray]
  token: str
  token_id: int
  embedding_row: np.ndarray       # [D] float32
  initializer: str
  base: Mapping[str, Any]         # `base_fingerprint` of the pipeline it was trained on
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def kv_paths(unet_params: Any) -> dict[str, tuple[int, ...]]:
  """Path name -> shape of every cross-attention K/V weight (what customization trains)."""
  mask = traverse_util.flatten_dict(selection.select(unet_params, "cross-attn-kv"))
  flat = traverse_util.flatten_dict(unet_params)
  return {selection.path_name(p): tuple(int(d) for d in flat[p].shape)
          for p, chosen in mask.items() if chosen}


def _table_digest(table: np.ndarray) -> str:
  table = np.ascontiguousarray(np.asarray(table, np.float32))
  return hashlib.sha256(table.tobytes()).hexdigest()[:16]


def base_fingerprint(pipe: pipeline_lib.Pipeline) -> dict[str, Any]:
  """What a delta depends on in its base: the K/V shapes, the text table, the next token id.

  The table's digest tells a different text encoder of the same shape apart: the new row was
  trained against that encoder's other rows and layers, and means nothing under another.
  """
  table = traverse_util.flatten_dict(pipe.text_params)[TABLE_PATH]
  return {"kv_shapes": {k: list(v) for k, v in kv_paths(pipe.unet_params).items()},
          "text_table_shape": [int(d) for d in table.shape],
          "text_table_sha256": _table_digest(table),
          "tokenizer_size": len(pipe.tokenizer)}


def with_token_row(text_encoder: clip_text.CLIPTextModel, text_params: Any,
                   row: Any) -> tuple[clip_text.CLIPTextModel, dict]:
  """The text tower with one more embedding row (id = the old vocab_size), set to `row`."""
  flat = traverse_util.flatten_dict(text_params)
  table = flat[TABLE_PATH]
  row = jnp.asarray(row, table.dtype)
  if row.shape != table.shape[1:]:
    raise DeltaMismatchError(f"the token embedding row has shape {tuple(row.shape)}, the text "
                             f"encoder's rows {tuple(table.shape[1:])}")
  flat = dict(flat)
  flat[TABLE_PATH] = jnp.concatenate([jnp.asarray(table), row[None]], axis=0)
  config = dataclasses.replace(text_encoder.config, vocab_size=table.shape[0] + 1)
  module = clip_text.CLIPTextModel(config, dtype=text_encoder.dtype,
                                   param_dtype=text_encoder.param_dtype)
  return module, traverse_util.unflatten_dict(flat)


def check_fits(pipe: pipeline_lib.Pipeline, delta: CustomDelta, *,
               check_text_table: bool = True) -> None:
  """Raises DeltaMismatchError naming every way `delta` does not fit the base `pipe`."""
  problems = []
  want = kv_paths(pipe.unet_params)
  missing = sorted(set(want) - set(delta.kv))
  extra = sorted(set(delta.kv) - set(want))
  shapes = [f"{k}: delta {tuple(delta.kv[k].shape)}, base {want[k]}" for k in sorted(want)
            if k in delta.kv and tuple(delta.kv[k].shape) != want[k]]
  if missing:
    problems.append(f"K/V weights the base has but the delta lacks: {missing[:4]}"
                    + (f" (+{len(missing) - 4})" if len(missing) > 4 else ""))
  if extra:
    problems.append(f"K/V weights in the delta the base does not have: {extra[:4]}"
                    + (f" (+{len(extra) - 4})" if len(extra) > 4 else ""))
  if shapes:
    problems.append(f"K/V shape mismatch: {shapes[:4]}")
  table = traverse_util.flatten_dict(pipe.text_params)[TABLE_PATH]
  if tuple(delta.embedding_row.shape) != tuple(table.shape[1:]):
    problems.append(f"token embedding row {tuple(delta.embedding_row.shape)}, the base text "
                    f"encoder's rows {tuple(table.shape[1:])}")
  if delta.token_id != table.shape[0]:
    problems.append(f"token {delta.token!r} has id {delta.token_id}, but the base text encoder "
                    f"has {table.shape[0]} rows (the new row would be id {table.shape[0]})")
  if delta.token_id != len(pipe.tokenizer):
    problems.append(f"token {delta.token!r} has id {delta.token_id}, but the base tokenizer's "
                    f"next id is {len(pipe.tokenizer)}")
  if check_text_table and not problems:
    digest = _table_digest(table)
    if digest != delta.base.get("text_table_sha256"):
      problems.append(f"the base text encoder's embedding table differs from the one the "
                      f"delta was trained on (sha256 {digest} vs "
                      f"{delta.base.get('text_table_sha256')}): another text encoder")
  if problems:
    raise DeltaMismatchError("the customization delta does not fit this base pipeline: "
                             + "; ".join(problems))


def apply_delta(pipe: pipeline_lib.Pipeline, delta: CustomDelta, *,
                check_text_table: bool = True) -> pipeline_lib.Pipeline:
  """The customized pipeline: `pipe` with the delta's token, embedding row and K/V weights."""
  check_fits(pipe, delta, check_text_table=check_text_table)
  tokenizer = pipe.tokenizer.add_tokens([delta.token])
  if len(tokenizer) - 1 != delta.token_id:   # add_tokens gives the next id; checked above
    raise DeltaMismatchError(f"the tokenizer gave {delta.token!r} id {len(tokenizer) - 1}, "
                             f"the delta says {delta.token_id}")
  text_encoder, text_params = with_token_row(pipe.text_encoder, pipe.text_params,
                                             delta.embedding_row)
  flat = dict(traverse_util.flatten_dict(pipe.unet_params))
  for path in flat:
    name = selection.path_name(path)
    if name in delta.kv:
      flat[path] = jnp.asarray(delta.kv[name], flat[path].dtype)
  configs = dict(pipe.configs)
  configs["text_encoder"] = dict(configs.get("text_encoder") or {},
                                 vocab_size=text_encoder.config.vocab_size)
  return pipe._replace(unet_params=traverse_util.unflatten_dict(flat),
                       text_encoder=text_encoder, text_params=text_params,
                       tokenizer=tokenizer, configs=configs)


def save_delta(directory: str, delta: CustomDelta) -> None:
  """Writes delta.npz + delta.json as one folder (atomic: complete or absent)."""
  arrays = {KV_PREFIX + k: np.asarray(v, np.float32) for k, v in delta.kv.items()}
  arrays[ROW_KEY] = np.asarray(delta.embedding_row, np.float32)
  meta = {"format": FORMAT, "token": delta.token, "token_id": int(delta.token_id),
          "initializer": delta.initializer, "base": dict(delta.base),
          "settings": dict(delta.settings),
          "arrays": {k: list(v.shape) for k, v in arrays.items()}}
  with io_utils.atomic_directory(directory) as staging:
    io_utils.atomic_savez(os.path.join(staging, DELTA_FILE), **arrays)
    io_utils.atomic_write_json(os.path.join(staging, META_FILE), meta)


def load_delta(directory: str) -> CustomDelta:
  """Reads a saved delta; a missing, damaged or inconsistent file raises naming it."""
  meta_path = os.path.join(directory, META_FILE)
  npz_path = os.path.join(directory, DELTA_FILE)
  for path in (meta_path, npz_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{directory} is not a customization delta: no {path}")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise io_utils.CorruptFileError(f"{meta_path} cannot be read: {e}") from e
  needed = ("format", "token", "token_id", "initializer", "base", "arrays")
  if not isinstance(meta, dict) or any(k not in meta for k in needed):
    raise io_utils.CorruptFileError(f"{meta_path} lacks keys "
                                    f"{[k for k in needed if k not in (meta or {})]}")
  if meta["format"] != FORMAT:
    raise io_utils.CorruptFileError(f"{meta_path}: format {meta['format']!r}, expected "
                                    f"{FORMAT!r}")
  with io_utils.open_npz(npz_path) as data:
    arrays = {k: np.asarray(data[k]) for k in data.files}
  listed = {k: tuple(v) for k, v in meta["arrays"].items()}
  found = {k: tuple(v.shape) for k, v in arrays.items()}
  if listed != found:
    differ = sorted(k for k in set(listed) | set(found) if listed.get(k) != found.get(k))
    raise io_utils.CorruptFileError(f"{npz_path} does not hold what {meta_path} lists: "
                                    f"{differ[:4]} differ")
  if ROW_KEY not in arrays:
    raise io_utils.CorruptFileError(f"{npz_path} has no {ROW_KEY!r} array")
  bad = [k for k, v in arrays.items() if not np.all(np.isfinite(v))]
  if bad:
    raise io_utils.CorruptFileError(f"{npz_path}: non-finite values in {bad[:4]}")
  kv = {k[len(KV_PREFIX):]: v for k, v in arrays.items() if k.startswith(KV_PREFIX)}
  return CustomDelta(kv=kv, token=meta["token"], token_id=int(meta["token_id"]),
                     embedding_row=arrays[ROW_KEY], initializer=meta["initializer"],
                     base=meta["base"], settings=meta.get("settings", {}))


def load_customized(base_dir: str, delta_dir: str, **kwargs) -> pipeline_lib.Pipeline:
  """`load_pipeline(base_dir)` with the delta in `delta_dir` applied."""
  return apply_delta(pipeline_lib.load_pipeline(base_dir, **kwargs), load_delta(delta_dir))
