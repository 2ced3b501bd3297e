"""Which weights Attribution by Unlearning updates, chosen by parameter path.

AbU updates only the cross-attention key and value projections (SPEC §2): they are the weights
that read the text, and a Fisher over them is small enough to store. The other selections exist
for the paper's ablations. Paths follow diffusers' names (`.../attn2/to_k/kernel`), so the
rules work on the real UNet and on any test model that names its layers the same way.

Selected weights travel as *flat dicts* keyed by path tuples (`flax.traverse_util`): a plain
pytree that `grad`, `vmap` and `jit` handle, whose keys say what each leaf is, and which saves
to npz with readable names.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

Path = tuple[str, ...]
Flat = dict[Path, Any]


def _is_cross_attn_kv(path: Path) -> bool:
  return any(a == "attn2" and b in ("to_k", "to_v") for a, b in zip(path, path[1:]))


SELECTIONS: dict[str, Callable[[Path], bool]] = {
    "cross-attn-kv": _is_cross_attn_kv,
    "cross-attn": lambda path: "attn2" in path,
    "attn": lambda path: "attn1" in path or "attn2" in path,
    "all": lambda path: True,
}
DEFAULT = "cross-attn-kv"


def _rule(name: str | Callable[[Path], bool]) -> Callable[[Path], bool]:
  if callable(name):
    return name
  if name not in SELECTIONS:
    raise ValueError(f"Unknown weight selection {name!r}; choose one of {sorted(SELECTIONS)}")
  return SELECTIONS[name]


def select(params: Mapping[str, Any], name: str | Callable[[Path], bool] = DEFAULT) -> dict:
  """A pytree of bools shaped like `params`: True where the selection `name` updates.

  `name` is one of `SELECTIONS` or a predicate on the path tuple. Selecting nothing is an
  error: a model without `attn2` layers would otherwise be "unlearned" by a no-op.
  """
  rule = _rule(name)
  flat = traverse_util.flatten_dict(params)
  mask = {path: bool(rule(path)) for path in flat}
  if not any(mask.values()):
    raise ValueError(f"Selection {name!r} matches no parameter (first paths: "
                     f"{['/'.join(p) for p in list(flat)[:3]]})")
  return traverse_util.unflatten_dict(mask)


def split(params: Mapping[str, Any], mask: Mapping[str, Any]) -> tuple[Flat, Flat]:
  """(selected, rest): two flat dicts {path: leaf} that together hold every leaf once."""
  flat = traverse_util.flatten_dict(params)
  flat_mask = traverse_util.flatten_dict(mask)
  if set(flat) != set(flat_mask):
    raise ValueError("The mask does not match the parameter tree's paths")
  selected = {p: v for p, v in flat.items() if flat_mask[p]}
  rest = {p: v for p, v in flat.items() if not flat_mask[p]}
  return selected, rest


def merge(selected: Flat, rest: Flat) -> dict:
  """The nested parameter dict from `split`'s two halves (usable inside jit/grad)."""
  overlap = set(selected) & set(rest)
  if overlap:
    raise ValueError(f"Paths in both halves: {sorted('/'.join(p) for p in overlap)[:3]}")
  return traverse_util.unflatten_dict({**rest, **selected})


def count(params: Mapping[str, Any], mask: Mapping[str, Any] | None = None) -> int:
  """Number of scalar weights selected by `mask` (all of them without a mask). Works on
  `jax.eval_shape` output, so a full-size model need not be allocated."""
  flat = traverse_util.flatten_dict(params)
  flat_mask = traverse_util.flatten_dict(mask) if mask is not None else None
  return int(sum(int(np.prod(v.shape)) for p, v in flat.items()
                 if flat_mask is None or flat_mask[p]))


def path_name(path: Path) -> str:
  """'down_blocks_0/attentions_0/.../to_k/kernel': the key a path gets in saved files."""
  return "/".join(path)
