"""Reading diffusers / transformers `config.json` files strictly.

A port supports a subset of what its PyTorch original can be configured to do. Every key of
a config is therefore either *used* by the port, *pinned* (supported only at one value, e.g.
`class_embed_type: null`), or *metadata*. Anything else is an error that names the key: a
silently ignored option would give a model that loads and runs but is not the model in the file.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

# Keys written by save_pretrained that describe provenance, not the network.
METADATA_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_commit_hash", "_use_default_values",
    "architectures", "transformers_version", "model_type", "torch_dtype", "dtype",
})


class UnsupportedConfigError(ValueError):
  """A config.json asks for something the Flax port does not implement."""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a config.json (or the config.json inside a directory)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No config.json at {path}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e


def check_config(config: Mapping[str, Any], *, component: str, used: Iterable[str],
                 pinned: Mapping[str, Any] = (), ignored: Iterable[str] = ()) -> None:
  """Raises UnsupportedConfigError for a key the port would otherwise silently ignore.

  Args:
    config: the parsed config.json.
    component: a name for messages, e.g. "UNet2DConditionModel".
    used: keys the port reads.
    pinned: key -> the only value the port supports (a list of values is accepted as
      "any of these").
    ignored: keys that are irrelevant to the forward pass (e.g. a sample size that is only a
      default for pipelines).
  """
  used, ignored, pinned = set(used), set(ignored), dict(pinned)
  for key, value in config.items():
    if key in used or key in ignored or key in METADATA_KEYS:
      continue
    if key in pinned:
      allowed = pinned[key]
      ok = value in allowed if isinstance(allowed, list) else value == allowed
      if not ok:
        raise UnsupportedConfigError(
            f"{component}: config option {key}={value!r} is not supported by the Flax port "
            f"(supported: {allowed!r})")
      continue
    raise UnsupportedConfigError(
        f"{component}: unknown config option {key!r} (value {value!r}); the Flax port does not "
        "implement it and will not ignore it silently")


def read_options(config: Mapping[str, Any], *, component: str, defaults: Mapping[str, Any],
                used: Iterable[str] | None = None, pinned: Mapping[str, Any] = (),
                ignored: Iterable[str] = ()):
  """`check_config`, then the options the port reads (defaults filled in) and a `bad(key, why)`
  that builds the UnsupportedConfigError naming that option and its value."""
  check_config(config, component=component, used=defaults if used is None else used,
               pinned=pinned, ignored=ignored)
  c = {**defaults, **{k: v for k, v in config.items() if k in defaults}}

  def bad(key: str, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(
        f"{component}: config option {key}={c[key]!r} is not supported by the Flax port: {why}")

  return c, bad
