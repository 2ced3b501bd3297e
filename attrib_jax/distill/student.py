"""The FastGDA student (SPEC §5.2-5.3): one MLP f shared by queries and training items.

score(q, z) = scale · cos(f(q), f(z)) + bias predicts, through a sigmoid, the teacher's rank
label j / K of z for q (j = 0-based position in the teacher's top-K list, 0 = most
influential; the released code's convention). A *low* score therefore means *influential*:
retrieval orders items by score ascending. Because scale is learnt and may take either sign,
`retrieval_query` folds -sign(scale) into the query's unit embedding, so that a plain
maximum-inner-product search over the items' unit embeddings returns the most influential
items first (what `index.py` serves).

Loss "rank": pointwise binary cross-entropy with logits against j / K; with probability
`outlier_prob` a pair's item is replaced by a random item outside the query's candidates and
labelled (K - 1) / K (they are at least as uninfluential as the last candidate).
Loss "regression": the score regresses the teacher's τ standardised per query, negated so the
same "ascending = influential" convention holds (the paper's weak baseline, mAP ≈ 0.01).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import json
import os

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attrib_jax import io_utils

LOSSES = ("rank", "regression")


@dataclasses.dataclass(frozen=True)
class StudentSettings:
  """Network and optimisation (SPEC §5: 1280 -> 768 x3 -> 768, dropout 0.1, AdamW 1e-3/0.01,
  batch 4096, 10 epochs). The tiny world shrinks the widths and the batch."""
  hidden: tuple[int, ...] = (768, 768, 768)
  out_dim: int = 768
  dropout: float = 0.1
  learning_rate: float = 1e-3
  weight_decay: float = 0.01
  batch_size: int = 4096
  num_epochs: int = 10
  outlier_prob: float = 0.1
  loss: str = "rank"
  seed: int = 0

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"student.loss must be one of {LOSSES}, got {self.loss!r}")
    if not self.hidden or min(self.hidden) < 1 or self.out_dim < 1:
      raise ValueError(f"student widths must be positive, got hidden={self.hidden}, "
                       f"out_dim={self.out_dim}")
    if not 0 <= self.dropout < 1 or not 0 <= self.outlier_prob < 1:
      raise ValueError("student.dropout and student.outlier_prob must lie in [0, 1)")
    if self.batch_size < 1 or self.num_epochs < 1:
      raise ValueError("student.batch_size and student.num_epochs must be positive")


class Student(nn.Module):
  """f: features [n, in_dim] -> embeddings [n, out_dim] (unnormalised), plus scale and bias."""
  hidden: Sequence[int]
  out_dim: int
  dropout: float

  def setup(self):
    self.layers = [nn.Dense(w, name=f"dense_{i}") for i, w in enumerate(self.hidden)]
    self.out = nn.Dense(self.out_dim, name="out")
    self.drop = nn.Dropout(self.dropout)
    # Negative from the start: a shared f maps an item like the query close to it (cos -> 1),
    # and like items are the influential ones, whose labels j / K are near 0. Started positive,
    # the scale must cross zero while f learns against the grain (measured: test mAP below
    # chance on a world where influence is plain cosine). |5| lets cos = ±1 reach labels near
    # 0 and 1; the bias starts at the midpoint, sigmoid(0) = 1/2.
    self.scale = self.param("scale", nn.initializers.constant(-5.0), ())
    self.bias = self.param("bias", nn.initializers.zeros, ())

  def embed(self, x, train: bool = False):
    for layer in self.layers:
      x = self.drop(nn.relu(layer(x)), deterministic=not train)
    return self.out(x)

  def score(self, fq, fz):
    """scale · cos(fq, fz) + bias, row by row."""
    return self.scale * _cosine(fq, fz) + self.bias

  def __call__(self, q, z, train: bool = False):
    return self.score(self.embed(q, train), self.embed(z, train))


def _unit(x, eps: float = 1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _cosine(a, b):
  return jnp.sum(_unit(a) * _unit(b), axis=-1)


def make_model(settings: StudentSettings) -> Student:
  return Student(tuple(settings.hidden), settings.out_dim, settings.dropout)


def init_params(settings: StudentSettings, in_dim: int) -> Any:
  x = jnp.zeros((1, in_dim), jnp.float32)
  return make_model(settings).init(jax.random.key(settings.seed), x, x)["params"]


def optimizer(settings: StudentSettings) -> optax.GradientTransformation:
  return optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)


# ------------------------------------------------------------------------ teacher data ---

@dataclasses.dataclass(frozen=True)
class TeacherData:
  """Rankings of T training queries, each over its own C candidate rows.

  query_features [T, d]; ranked_rows [T, C]: candidate rows of the item table, most
  influential first; tau [T, C] float64: the teacher's scores in that order (regression)."""
  query_features: np.ndarray
  ranked_rows: np.ndarray
  tau: np.ndarray | None = None

  def __post_init__(self):
    t, c = self.ranked_rows.shape
    if self.query_features.shape[0] != t:
      raise ValueError(f"{self.query_features.shape[0]} query features for {t} rankings")
    if self.tau is not None and self.tau.shape != (t, c):
      raise ValueError(f"tau {self.tau.shape} does not match the rankings {(t, c)}")


def pair_labels(data: TeacherData, loss: str) -> np.ndarray:
  """[T, C] float32 targets: j / K (rank) or -standardised τ (regression)."""
  t, k = data.ranked_rows.shape
  if loss == "rank":
    return np.broadcast_to(np.arange(k, dtype=np.float32) / k, (t, k)).copy()
  if data.tau is None:
    raise ValueError("student.loss='regression' needs the teacher's scores (TeacherData.tau)")
  tau = np.asarray(data.tau, np.float64)
  z = (tau - tau.mean(1, keepdims=True)) / np.maximum(tau.std(1, keepdims=True), 1e-30)
  return (-z).astype(np.float32)


def swap_outliers(rng: np.random.Generator, query_ids: np.ndarray, rows: np.ndarray,
                  labels: np.ndarray, data: TeacherData, num_items: int, prob: float
                  ) -> tuple[np.ndarray, np.ndarray]:
  """With probability `prob` per pair, a random item outside its query's candidates, labelled
  (K - 1) / K. Membership is looked up in one sorted array of query·N + row keys."""
  t, k = data.ranked_rows.shape
  if prob == 0:
    return rows, labels
  if k >= num_items:
    raise ValueError(f"outlier swaps need items outside the {k} candidates of {num_items}")
  keys = np.sort((np.arange(t)[:, None] * num_items + data.ranked_rows).ravel())
  swap = rng.random(rows.size) < prob
  picks = np.flatnonzero(swap)
  new = rng.integers(0, num_items, picks.size)
  while True:   # redraw the picks that landed inside their query's candidates
    key = query_ids[picks] * num_items + new
    pos = np.minimum(np.searchsorted(keys, key), keys.size - 1)
    inside = keys[pos] == key
    if not inside.any():
      break
    new[inside] = rng.integers(0, num_items, int(inside.sum()))
  rows, labels = rows.copy(), labels.copy()
  rows[picks] = new
  labels[picks] = (k - 1) / k
  return rows, labels


# --------------------------------------------------------------------------- training ---

def _loss_fn(model: Student, loss: str):
  def fn(params, q, z, labels, key):
    logits = model.apply({"params": params}, q, z, train=True, rngs={"dropout": key})
    if loss == "rank":
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    return jnp.mean((logits - labels) ** 2)
  return fn


@functools.lru_cache(maxsize=8)
def _train_step(settings: StudentSettings) -> Callable:
  model, tx = make_model(settings), optimizer(settings)
  loss_fn = _loss_fn(model, settings.loss)

  @jax.jit
  def step(params, opt_state, query_table, item_table, qi, zi, labels, key):
    # The feature tables live on the device; a batch is gathered there from its indices.
    loss, grads = jax.value_and_grad(loss_fn)(params, query_table[qi], item_table[zi],
                                              labels, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(settings: StudentSettings, data: TeacherData, item_features: np.ndarray, *,
          log: Callable[[str], None] = print, log_every: int = 50) -> tuple[Any, list[float]]:
  """Trains the student on the teacher's rankings; returns (params, loss per epoch)."""
  item_features = np.asarray(item_features, np.float32)
  query_features = np.asarray(data.query_features, np.float32)
  if item_features.shape[1] != query_features.shape[1]:
    raise ValueError(f"item features are {item_features.shape[1]}-d, query features "
                     f"{query_features.shape[1]}-d: both go through one network")
  num_items = item_features.shape[0]
  if data.ranked_rows.min() < 0 or data.ranked_rows.max() >= num_items:
    raise ValueError(f"candidate rows outside the {num_items} items")
  t, c = data.ranked_rows.shape
  labels_all = pair_labels(data, settings.loss).ravel()
  qids_all = np.repeat(np.arange(t), c)
  rows_all = data.ranked_rows.ravel().astype(np.int64)
  params = init_params(settings, item_features.shape[1])
  opt_state = optimizer(settings).init(params)
  step = _train_step(settings)
  q_table, z_table = jnp.asarray(query_features), jnp.asarray(item_features)
  rng = np.random.default_rng(settings.seed)
  key = jax.random.key(settings.seed + 1)
  batch = min(settings.batch_size, qids_all.size)
  steps_per_epoch = qids_all.size // batch     # drop the ragged tail: one compiled shape
  total = steps_per_epoch * settings.num_epochs
  losses, t0, done = [], time.perf_counter(), 0
  for epoch in range(settings.num_epochs):
    order = rng.permutation(qids_all.size)
    qids, rows, labels = qids_all[order], rows_all[order], labels_all[order]
    if settings.loss == "rank":
      rows, labels = swap_outliers(rng, qids, rows, labels, data, num_items,
                                   settings.outlier_prob)
    epoch_loss = []
    for s in range(steps_per_epoch):
      sl = slice(s * batch, (s + 1) * batch)
      key, sub = jax.random.split(key)
      params, opt_state, loss = step(params, opt_state, q_table, z_table, qids[sl], rows[sl],
                                     labels[sl], sub)
      epoch_loss.append(loss)
      done += 1
      if log_every and done % log_every == 0:
        rate = done / (time.perf_counter() - t0)
        log(f"student: step {done}/{total}, loss {float(loss):.4f}, {rate:.1f} steps/s, "
            f"ETA {(total - done) / rate:.0f}s")
    losses.append(float(np.mean(jax.device_get(epoch_loss))))
    log(f"student: epoch {epoch + 1}/{settings.num_epochs}, mean loss {losses[-1]:.4f}")
  return params, losses


# ---------------------------------------------------------------------------- serving ---

@functools.lru_cache(maxsize=8)
def _embed_fn(settings: StudentSettings) -> Callable:
  model = make_model(settings)
  return jax.jit(lambda params, x: _unit(model.apply({"params": params}, x,
                                                     method=Student.embed)))


def embed(settings: StudentSettings, params: Any, features: np.ndarray,
          batch_size: int = 4096) -> np.ndarray:
  """Unit embeddings [n, out_dim] (dropout off), in float32."""
  features = np.asarray(features, np.float32)
  fn = _embed_fn(settings)
  return np.concatenate([np.asarray(fn(params, features[i:i + batch_size]))
                         for i in range(0, max(len(features), 1), batch_size)])


def retrieval_query(params: Any, query_embeddings: np.ndarray) -> np.ndarray:
  """Unit query embeddings signed so that a larger inner product means a lower score, i.e. a
  more influential item (see module doc)."""
  sign = -1.0 if float(params["scale"]) > 0 else 1.0
  return (sign * np.asarray(query_embeddings, np.float32)).astype(np.float32)


def scores(params: Any, query_embeddings: np.ndarray, item_embeddings: np.ndarray) -> np.ndarray:
  """[q, n] student scores scale · cos + bias from unit embeddings (low = influential)."""
  cos = np.asarray(query_embeddings, np.float32) @ np.asarray(item_embeddings, np.float32).T
  return float(params["scale"]) * cos + float(params["bias"])


def rank_items(params: Any, query_embeddings: np.ndarray, item_embeddings: np.ndarray
               ) -> np.ndarray:
  """[q, n] item rows by ascending score (most influential first; ties by row)."""
  s = scores(params, query_embeddings, item_embeddings)
  return np.argsort(s, axis=1, kind="stable")


# ------------------------------------------------------------------------------ files ---

def save(path: str, settings: StudentSettings, params: Any, extra: dict | None = None) -> None:
  """params as an npz (flattened names) and the settings in its `__meta__`, atomically."""
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(params)).items()}
  meta = {"settings": dataclasses.asdict(settings), **(extra or {})}
  io_utils.atomic_savez(path, __meta__=np.asarray(json.dumps(meta)), **flat)


def load(path: str) -> tuple[StudentSettings, Any, dict]:
  """(settings, params, meta) of a file written by `save`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no student at {path}: run launch.distill's train stage first")
  with np.load(path) as data:
    meta = json.loads(str(data["__meta__"]))
    flat = {tuple(k.split("/")): jnp.asarray(data[k]) for k in data.files if k != "__meta__"}
  raw = dict(meta["settings"])
  raw["hidden"] = tuple(raw["hidden"])
  return StudentSettings(**raw), traverse_util.unflatten_dict(flat), meta
