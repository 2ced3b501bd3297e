"""Teacher data and input features for FastGDA (SPEC §5.1-5.2).

Teacher: AbU / AbU+ (`attribution.runner.AbU`) unlearns the query once, then the loss sweep
scores only the query's C candidate rows (`sweep(rows=...)`). The sweep keys each slot's noise
by the item's dataset index, so an item's pre loss does not depend on which subset it is
scored in: with `sweep.method="cached"` the runner's one pre-loss cache (every training item,
computed once per model) is sliced per subset, never recomputed; with "jvp" (the tiny
default) the primal forward runs inside the jvp and there is no separate pre pass at all.

Features (the student's input): an image feature ⊕ a text feature, each L2-normalised so that
neither half outweighs the other by its scale. In the tiny world no DINO / CLIP towers exist,
so the image feature is the trained UNet's own bottleneck (`baselines.features.unet_features`:
`mid_block`, flattened, at t = 100, empty prompt) read from the model's input space (the
precomputed latents for training items, a query's latent for a query) and the text feature is
the frozen text tower's hidden states averaged over tokens (and, for an item, over its real
captions).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.baselines import features as features_lib


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
  layer: str = "mid_block"
  timestep: int = 100
  pool: str = "flatten"


class Featurizer:
  """Image ⊕ text features of training rows and of queries, for one trained model."""

  def __init__(self, pipe: Any, arrays: Any, settings: FeatureSettings = FeatureSettings()):
    self.arrays = arrays
    self._image = features_lib.unet_features(
        pipe.unet, pipe.unet_params, pipe.schedule, np.asarray(arrays["null_text_states"]),
        layer=settings.layer, timestep=settings.timestep, pool=settings.pool,
        to_input=lambda x: np.asarray(x, np.float32))   # inputs are already the model's

  def image(self, model_inputs: np.ndarray) -> np.ndarray:
    return features_lib.normalize_rows(self._image(model_inputs))

  @staticmethod
  def text(states: np.ndarray, num_captions: np.ndarray | None = None) -> np.ndarray:
    """[n, L, D] (a prompt each) or [n, K, L, D] with `num_captions` -> unit [n, D]."""
    states = np.asarray(states, np.float64)
    if states.ndim == 3:
      return features_lib.normalize_rows(states.mean(axis=1))
    token_mean = states.mean(axis=2)                                  # [n, K, D]
    mask = np.arange(states.shape[1])[None] < np.asarray(num_captions)[:, None]
    pooled = (token_mean * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1)[:, None]
    return features_lib.normalize_rows(pooled)

  def items(self, chunk: int = 256, log: Callable[[str], None] | None = None) -> np.ndarray:
    """[N, d] features of every training row (unflipped view and its real captions)."""
    n = len(self.arrays["index"])
    out = []
    for start in range(0, n, chunk):
      rows = slice(start, min(start + chunk, n))
      image = self.image(np.asarray(self.arrays["latents"][rows, 0]))
      text = self.text(self.arrays["text_states"][rows], self.arrays["num_captions"][rows])
      out.append(np.concatenate([image, text], axis=1))
      if log:
        log(f"features: {min(start + chunk, n)}/{n} items")
    return np.concatenate(out).astype(np.float32)

  def queries(self, queries: list[generation.Query]) -> np.ndarray:
    if not queries:
      return np.zeros((0, 0), np.float32)
    image = self.image(np.stack([q.latent for q in queries]))
    text = self.text(np.stack([q.text_states for q in queries]))
    return np.concatenate([image, text], axis=1).astype(np.float32)


CANDIDATES_BY = ("image", "image_text", "caption-words")


def candidate_rows(query_feature: np.ndarray, item_features: np.ndarray, count: int,
                   image_dim: int, by: str = "image",
                   word_scores: np.ndarray | None = None) -> np.ndarray:
  """The `count` rows nearest the query, ascending by row so the sweep reads them in storage
  order. by="image": by the image feature alone (the paper's DINO neighbours); "image_text":
  by the whole image ⊕ text feature (both halves unit length, so each counts alike);
  "caption-words": the top `count` of `word_scores` (the caption-words baseline's scores of
  every row for this query), for a world whose teacher's top items share the query's words
  more often than its looks (docs/fastgda.md)."""
  if not 1 <= count <= item_features.shape[0]:
    raise ValueError(f"distill.num_candidates = {count} must lie in [1, "
                     f"{item_features.shape[0]}] (the training set's size)")
  if by not in CANDIDATES_BY:
    raise ValueError(f"distill.candidates_by must be one of {CANDIDATES_BY}, got {by!r}")
  if by == "caption-words":
    if word_scores is None or np.shape(word_scores) != (item_features.shape[0],):
      raise ValueError("distill.candidates_by='caption-words' needs the query's caption-words "
                       f"score of each of the {item_features.shape[0]} rows")
    sims = np.asarray(word_scores, np.float64)
  else:
    width = image_dim if by == "image" else item_features.shape[1]
    sims = item_features[:, :width] @ query_feature[:width]
  return np.sort(np.argsort(-sims, kind="stable")[:count])


def is_current(path: str, model_fingerprint: str, rows: np.ndarray) -> bool:
  """Whether `path` holds the teacher's ranking of exactly `rows` by this model."""
  if not os.path.exists(path):
    return False
  with np.load(path) as done:
    return (str(done["model"]) == model_fingerprint
            and np.array_equal(np.sort(done["ranked_rows"]), rows))


def score_candidates(abu: Any, query: generation.Query, rows: np.ndarray, path: str,
                     log: Callable[[str], None] = print) -> dict:
  """AbU over the candidate `rows` only; writes `path` (npz: rows ranked most influential first,
  their τ, the model fingerprint) atomically and returns it. An existing file is reused."""
  if is_current(path, abu.model_fingerprint, rows):
    with np.load(path) as done:
      return {k: done[k] for k in done.files}
  if os.path.exists(path):
    log(f"teacher: {path} is of another model or candidate set; recomputing")
  params_after = abu.unlearn(query)
  pre = abu.pre_slot_losses           # None unless sweep.method == "cached"
  result = sweep_lib.sweep(
      abu.apply_fn, abu.params, params_after, abu.arrays, abu.schedule,
      settings=abu.settings.sweep, mesh=abu.mesh, rows=rows,
      pre_slot_losses=None if pre is None else pre[rows],
      checkpoint_path=path + ".sweep_partial.npz")
  tau = scores_lib.image_scores(result.delta)
  order = np.lexsort((rows, -tau))      # τ descending, ties by row
  out = {"ranked_rows": rows[order].astype(np.int64), "tau": tau[order],
         "model": np.asarray(abu.model_fingerprint)}
  io_utils.atomic_savez(path, **out)
  if os.path.exists(path + ".sweep_partial.npz"):
    os.remove(path + ".sweep_partial.npz")
  return out


def index_to_row(arrays: Any) -> dict[int, int]:
  return {int(i): r for r, i in enumerate(np.asarray(arrays["index"]))}
