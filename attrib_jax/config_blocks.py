"""Settings dataclasses built from a config block, refusing unknown keys by name.

A config block is an `ml_collections.ConfigDict` or a plain mapping whose keys are the
dataclass's fields; a key the dataclass does not have is almost always a typo, so it is an
error naming it and listing the known fields rather than a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def settings_from_block(cls: type[T], block: Any, what: str) -> T:
  """`cls(**block)` after checking every key is a field of `cls`; `what` names the block."""
  values = dict(block.to_dict() if hasattr(block, "to_dict") else (block or {}))
  known = sorted(f.name for f in dataclasses.fields(cls))
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(f"unknown {what} settings {unknown}; known: {known}")
  return cls(**values)
