"""Text-only baselines: rank training items by how much their captions resemble the prompt.

Neither method looks at an image. They are the floor that tells attribution from caption
lookup: where a query shares rare words with its influential items' captions, these solve the
benchmark, and any image-based method must be read beside them.

- `caption`: cosine between the query's text-encoder states and each stored caption's states
  (`arrays['text_states']`, the same encoder that conditions the model), max over the item's
  real captions (`arrays['num_captions']`). `pooling="flat"` compares the whole [L, D] sequence
  (padding positions included, as the UNet's cross-attention sees it); `"mean"` compares the
  token-averaged state.
- `caption-words`: Okapi BM25 of the prompt's words against each caption (document frequencies
  over every stored caption), max over the item's captions. It needs the caption strings
  (`context.captions`) and the prompt (`query.info['prompt']`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from attrib_jax.baselines import interface

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
  """Lower-case alphanumeric words of `text`."""
  return _WORD.findall(text.lower())


@interface.register
@dataclasses.dataclass(frozen=True)
class CaptionCosine(interface.Method):
  """cos(prompt states, caption states), max over each item's captions."""
  name = "caption"
  pooling: str = "flat"

  def __post_init__(self):
    if self.pooling not in ("flat", "mean"):
      raise ValueError(f"caption: pooling must be 'flat' or 'mean', got {self.pooling!r}")

  def _pool(self, states: np.ndarray) -> np.ndarray:
    """[..., L, D] -> [..., F] float64."""
    states = np.asarray(states, np.float64)
    if self.pooling == "mean":
      return states.mean(axis=-2)
    return states.reshape(states.shape[:-2] + (-1,))

  def _caption_embeddings(self, context: interface.Context) -> dict[str, np.ndarray]:
    def compute():
      arrays = context.arrays
      pooled = self._pool(arrays["text_states"])                      # [N, K, F]
      norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
      valid = np.arange(pooled.shape[1])[None] < np.asarray(arrays["num_captions"])[:, None]
      if np.any(valid & (norms[..., 0] == 0)):
        raise ValueError("caption: a stored caption has all-zero text states")
      unit = np.where(norms > 0, pooled / np.where(norms > 0, norms, 1.0), 0.0)
      return {"unit": unit.astype(np.float32), "valid": valid}
    return context.cached((self.name, self.pooling), compute)

  def score(self, query: Any, context: interface.Context) -> np.ndarray:
    context.require(self.name, "arrays")
    cached = self._caption_embeddings(context)
    q = self._pool(query.text_states)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm == 0:
      raise ValueError("caption: the query's text states are zero or non-finite")
    cos = np.einsum("nkf,f->nk", cached["unit"].astype(np.float64), q / norm)
    return self._check(np.where(cached["valid"], cos, -np.inf).max(axis=1), context)


@interface.register
@dataclasses.dataclass(frozen=True)
class CaptionWords(interface.Method):
  """BM25 of the prompt's words against each caption, max over each item's captions."""
  name = "caption-words"
  k1: float = 1.2
  b: float = 0.75

  def __post_init__(self):
    if not self.k1 > 0:
      raise ValueError(f"caption-words: k1 must be > 0, got {self.k1}")
    if not 0 <= self.b <= 1:
      raise ValueError(f"caption-words: b must be in [0, 1], got {self.b}")

  def _corpus(self, context: interface.Context) -> dict[str, Any]:
    def compute():
      captions = context.item_captions(np.arange(context.num_items))
      docs = [[words(c) for c in item] for item in captions]
      if any(not item for item in docs):
        empty = [i for i, item in enumerate(docs) if not item][:5]
        raise ValueError(f"caption-words: items at rows {empty} have no captions")
      document_frequency: dict[str, int] = {}
      lengths = []
      for item in docs:
        for doc in item:
          lengths.append(len(doc))
          for w in set(doc):
            document_frequency[w] = document_frequency.get(w, 0) + 1
      return {"docs": docs, "df": document_frequency, "num_docs": len(lengths),
              "mean_length": max(float(np.mean(lengths)), 1e-9)}
    return context.cached((self.name,), compute)

  def score(self, query: Any, context: interface.Context) -> np.ndarray:
    prompt = (query.info or {}).get("prompt")
    if not isinstance(prompt, str):
      raise ValueError("caption-words: the query has no prompt (query.info['prompt'])")
    corpus = self._corpus(context)
    terms = set(words(prompt))
    n, df = corpus["num_docs"], corpus["df"]
    # BM25's idf with the +1 inside the log, so a word in every caption still weighs >= 0.
    idf = {w: np.log(1.0 + (n - df.get(w, 0) + 0.5) / (df.get(w, 0) + 0.5)) for w in terms}
    scores = np.empty(context.num_items)
    for row, item in enumerate(corpus["docs"]):
      best = 0.0
      for doc in item:
        norm = self.k1 * (1 - self.b + self.b * len(doc) / corpus["mean_length"])
        total = 0.0
        for w in terms:
          tf = doc.count(w)
          if tf:
            total += idf[w] * tf * (self.k1 + 1) / (tf + norm)
        best = max(best, total)
      scores[row] = best
    return self._check(scores, context)
