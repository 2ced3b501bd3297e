"""PyTorch (diffusers / transformers) state dicts <-> Flax linen parameter trees, without torch.

One naming rule serves every port. A Flax parameter path is the PyTorch key with
  * list indices joined to their list's name: `down_blocks.0.resnets.1` <-> `down_blocks_0/resnets_1`
  * the leaf renamed: Linear/Conv `weight` <-> `kernel`, norm `weight` <-> `scale`,
    Embedding `weight` <-> `embedding`; `bias` stays.
and kernels change layout: Linear (out, in) <-> (in, out); Conv OIHW <-> HWIO.

The conversion is driven by the Flax tree (from `jax.eval_shape(model.init, ...)`), so it is
strict in both directions: a parameter our model has but the file lacks, a tensor in the file we
would not use, and a shape mismatch are all errors naming the key. Nothing is guessed.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

from attrib_jax import io_utils

# Names of torch.nn.ModuleList attributes in the diffusers / transformers modules we port. Only
# these get `name_3` <-> `name.3`; a real attribute such as `time_embedding.linear_1` keeps its
# underscore.
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net", "layers",
    "layer",  # transformers ViT's `encoder.layer.N`
})
_LIST_SEGMENT = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Non-persistent or derived buffers some checkpoints still carry; never parameters.
DEFAULT_IGNORED_KEYS = (re.compile(r"(^|\.)position_ids$"),)

SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class WeightMismatchError(ValueError):
  """The weights on disk do not fit the model: names every offending key."""


def torch_key(flax_path: tuple[str, ...]) -> str:
  """The PyTorch state-dict key of a Flax parameter path."""
  parts = []
  for segment in flax_path[:-1]:
    match = _LIST_SEGMENT.match(segment)
    if match and match["name"] in LIST_NAMES:
      parts += [match["name"], match["index"]]
    else:
      parts.append(segment)
  leaf = flax_path[-1]
  parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
  return ".".join(parts)


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if array.ndim == 4:  # Conv2d OIHW -> HWIO
      return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:  # Linear (out, in) -> (in, out)
      return array.T
  return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if array.ndim == 4:  # HWIO -> OIHW
      return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:
      return array.T
  return array


def _summarise(keys: list[str], limit: int = 12) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def from_torch_state_dict(state: Mapping[str, np.ndarray], abstract_params: Any, *,
                          component: str = "model",
                          ignored_keys: Iterable[re.Pattern] = DEFAULT_IGNORED_KEYS) -> dict:
  """Converts a PyTorch state dict into the Flax params tree shaped like `abstract_params`.

  Args:
    state: torch key -> numpy array (as from `safetensors.numpy.load_file`).
    abstract_params: the model's params tree (arrays or `jax.ShapeDtypeStruct`s); its leaf
      dtypes are the dtypes of the result.
    component: a name for error messages.
    ignored_keys: regexes of file keys that are buffers, not parameters.

  Raises:
    WeightMismatchError: naming every missing, unexpected and mis-shaped key.
  """
  ignored_keys = tuple(ignored_keys)
  flat = traverse_util.flatten_dict(abstract_params)
  out, missing, mismatched, used = {}, [], [], set()
  for path, abstract in flat.items():
    key = torch_key(path)
    if key not in state:
      missing.append(f"{key} (ours: {'/'.join(path)})")
      continue
    used.add(key)
    array = _to_flax_layout(path[-1], np.asarray(state[key]))
    if tuple(array.shape) != tuple(abstract.shape):
      mismatched.append(f"{key}: file {tuple(np.shape(state[key]))} -> {tuple(array.shape)}, "
                        f"model {tuple(abstract.shape)}")
      continue
    out[path] = array.astype(abstract.dtype)
  unexpected = sorted(k for k in state if k not in used
                      and not any(p.search(k) for p in ignored_keys))
  problems = []
  if missing:
    problems.append(f"missing from the file: {_summarise(missing)}")
  if unexpected:
    problems.append(f"in the file but not in the model: {_summarise(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatch: {_summarise(mismatched)}")
  if problems:
    raise WeightMismatchError(f"{component}: weights do not match the model config; "
                              + "; ".join(problems))
  return traverse_util.unflatten_dict(out)


def to_torch_state_dict(params: Any) -> dict[str, np.ndarray]:
  """Flax params tree -> PyTorch state dict (numpy), the inverse of `from_torch_state_dict`."""
  state = {}
  for path, value in traverse_util.flatten_dict(params).items():
    key = torch_key(path)
    if key in state:
      raise ValueError(f"Two Flax parameters map to the same torch key {key}")
    state[key] = np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(value)))
  return state


def find_weights_file(directory: str | os.PathLike) -> list[str]:
  """The safetensors file(s) of a component directory (single file or a sharded index)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No such component directory: {directory}")
  for name in SAFETENSORS_NAMES:
    index = os.path.join(directory, name + ".index.json")
    if os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(directory, s) for s in shards]
    single = os.path.join(directory, name)
    if os.path.exists(single):
      return [single]
  found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if len(found) == 1:
    return [os.path.join(directory, found[0])]
  raise FileNotFoundError(
      f"No weights in {directory}: expected one of {', '.join(SAFETENSORS_NAMES)} "
      f"(found {found or 'no .safetensors files'}; .bin/.ckpt pickles are not read, convert "
      "them to safetensors first)")


def load_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a component directory as numpy (no torch)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state = {}
  for path in find_weights_file(directory):
    try:
      state.update(load_file(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise WeightMismatchError(f"Cannot read {path}: {e}") from e
  return state


def save_component(directory: str | os.PathLike, params: Any, config: Mapping[str, Any], *,
                   weights_name: str = "diffusion_pytorch_model.safetensors") -> None:
  """Writes `config.json` + safetensors that diffusers / transformers load directly."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  state = {k: v.astype(np.float32) if v.dtype.kind == "V" else v  # bfloat16 -> float32
           for k, v in to_torch_state_dict(params).items()}
  io_utils.atomic_write_bytes(os.path.join(directory, weights_name),
                              save(state, metadata={"format": "pt"}))
  io_utils.atomic_write_json(os.path.join(directory, "config.json"), dict(config))
