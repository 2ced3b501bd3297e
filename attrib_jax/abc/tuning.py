"""AbC's tuned features (SPEC §4): two linear maps on frozen backbone features, trained contrastively.

Model: features are L2-normalised, then mapped by one square linear map for real images
(exemplars, distractors) and another for generated images, both identity-initialised with zero
bias, then L2-normalised again; the score is their cosine. At initialisation the tuned score is
the plain cosine of the backbone features. (Normalising the input first makes a bias mean the
same at any backbone feature scale; it leaves the initial cosine unchanged.)

Training (InfoNCE): a step draws `batch_size` generated queries, one positive per query (a random
exemplar of its set) and `num_negatives` candidates drawn uniformly from all real rows; each query
is scored against every drawn row (the batch's positives and the negatives), candidates that are
also positives of that query other than its own drawn one are masked out, and the loss is the
cross-entropy of its positive among the rest at `temperature`. Weight decay (decoupled, AdamW
style) pulls the maps toward their identity start, not toward zero (a zero map loses the
features). Draws come from a numpy generator seeded by `seed`: training is deterministic.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attrib_jax import config_blocks

KINDS = ("real", "generated")


@dataclasses.dataclass(frozen=True)
class TuningSettings:
  steps: int = 1000
  learning_rate: float = 1e-3
  batch_size: int = 64            # generated queries per step
  temperature: float = 0.07       # InfoNCE temperature on cosines
  seed: int = 0
  weight_decay: float = 1e-4      # decoupled, toward the identity maps
  num_negatives: int = 256        # real rows drawn per step, shared by the batch

  def __post_init__(self):
    for name in ("steps", "batch_size", "num_negatives"):
      if getattr(self, name) < 1:
        raise ValueError(f"TuningSettings.{name} must be >= 1, got {getattr(self, name)}")
    if not self.learning_rate > 0 or not self.temperature > 0 or self.weight_decay < 0:
      raise ValueError("TuningSettings: learning_rate and temperature must be > 0 and "
                       f"weight_decay >= 0, got {self.learning_rate}, {self.temperature}, "
                       f"{self.weight_decay}")

  @classmethod
  def from_config(cls, config: Any) -> "TuningSettings":
    """From a config block (a ConfigDict or dict) of these fields; unknown keys are an error
    naming them."""
    return config_blocks.settings_from_block(cls, config, "tuning")


def _identity(key, shape, dtype=jnp.float32):
  del key
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"identity init needs a square kernel, got {shape}")
  return jnp.eye(shape[0], dtype=dtype)


def _unit(x, eps: float = 1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class TunedMaps(nn.Module):
  """Two square maps, "real" and "generated"; output unit vectors."""
  dim: int

  @nn.compact
  def __call__(self, x, kind: str):
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    dense = nn.Dense(self.dim, kernel_init=_identity, bias_init=nn.initializers.zeros,
                     name=kind)
    return _unit(dense(_unit(x)))

  def both(self, x):
    """Touches both maps (for init)."""
    return self(x, "real"), self(x, "generated")


def init_maps(dim: int) -> Any:
  """Parameters {"real": {kernel = I, bias = 0}, "generated": {...}} for dim-d features."""
  if dim < 1:
    raise ValueError(f"feature dim must be >= 1, got {dim}")
  x = jnp.zeros((1, dim), jnp.float32)
  return TunedMaps(dim).init(jax.random.key(0), x, method=TunedMaps.both)["params"]


def _dim(params) -> int:
  return int(params["real"]["kernel"].shape[0])


@functools.partial(jax.jit, static_argnames=("kind",))
def _embed(params, feats, kind):
  return TunedMaps(_dim(params)).apply({"params": params}, feats, kind)


def embed(params, feats, kind: str, batch_size: int = 8192) -> np.ndarray:
  """[n, D] float32 unit embeddings of backbone features through the `kind` map."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  feats = np.asarray(feats, np.float32)
  if feats.ndim != 2 or feats.shape[1] != _dim(params):
    raise ValueError(f"{kind} features {feats.shape} must be [n, {_dim(params)}]")
  if len(feats) == 0:
    return np.zeros((0, feats.shape[1]), np.float32)
  return np.concatenate([np.asarray(_embed(params, feats[i:i + batch_size], kind))
                         for i in range(0, len(feats), batch_size)])


def tuned_scores(params, gen_feats, real_feats) -> np.ndarray:
  """[Q, C] cosine of the generated queries' and the real candidates' tuned embeddings."""
  return embed(params, gen_feats, "generated") @ embed(params, real_feats, "real").T


# ----------------------------------------------------------------------------- training ---

def info_nce(params, queries, candidates, target, mask, temperature):
  """Mean over queries of −log softmax at column `target`, over unmasked candidates."""
  model = TunedMaps(_dim(params))
  q = model.apply({"params": params}, queries, "generated")
  c = model.apply({"params": params}, candidates, "real")
  logits = jnp.where(mask, q @ c.T / temperature, -jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=1)
  return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))


@jax.jit
def _step(params, opt_state, anchor, gen_table, real_table, qi, ci, target, mask, temperature,
          learning_rate, weight_decay):
  # Settings are traced, not static: one compile per shape serves every setting. Feature
  # tables live on the device; a batch is gathered there from its indices.
  loss, grads = jax.value_and_grad(info_nce)(params, gen_table[qi], real_table[ci], target,
                                             mask, temperature)
  updates, opt_state = optax.scale_by_adam().update(grads, opt_state, params)
  # Decoupled weight decay toward the identity start (anchor), AdamW style.
  params = jax.tree.map(lambda p, u, a: p - learning_rate * (u + weight_decay * (p - a)),
                        params, updates, anchor)
  return params, opt_state, loss


def train_maps(real_feats, gen_feats, positives, settings: TuningSettings,
               progress: Callable[[int, float, float], None] | None = None) -> Any:
  """Trains the two maps on tuning-split queries; returns their params.

  real_feats [R, D] (exemplars + distractors), gen_feats [Q, D], positives bool [Q, R] (a
  query's set's exemplar rows). progress(step, loss, seconds so far) after every step.
  """
  real = np.asarray(real_feats, np.float32)
  gen = np.asarray(gen_feats, np.float32)
  positives = np.asarray(positives).astype(bool)
  if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
    raise ValueError(f"real features {real.shape} and generated features {gen.shape} must be "
                     "[n, D] with the same D")
  if positives.shape != (len(gen), len(real)):
    raise ValueError(f"positives {positives.shape} must be [{len(gen)} queries, {len(real)} "
                     "real rows]")
  empty = np.flatnonzero(~positives.any(axis=1))
  if empty.size:
    raise ValueError(f"tuning queries {empty[:10].tolist()} have no positive real row")
  dim = real.shape[1]
  params = anchor = init_maps(dim)
  opt_state = optax.scale_by_adam().init(params)
  hyper = (jnp.float32(settings.temperature), jnp.float32(settings.learning_rate),
           jnp.float32(settings.weight_decay))
  pos_rows = [np.flatnonzero(p) for p in positives]
  rng = np.random.default_rng(settings.seed)
  batch = min(settings.batch_size, len(gen))
  num_neg = min(settings.num_negatives, len(real))
  gen_table, real_table = jnp.asarray(gen), jnp.asarray(real)
  began = time.perf_counter()
  for i in range(settings.steps):
    qi = rng.choice(len(gen), batch, replace=False)
    own = np.array([rng.choice(pos_rows[q]) for q in qi])
    ci = np.concatenate([own, rng.choice(len(real), num_neg, replace=False)])
    # A drawn row that is another positive of the query (its set's other exemplar, or its own
    # positive drawn again) is neither its target nor a negative.
    mask = ~positives[qi][:, ci]
    mask[np.arange(batch), np.arange(batch)] = True
    params, opt_state, loss = _step(params, opt_state, anchor, gen_table, real_table, qi, ci,
                                    np.arange(batch), mask, *hyper)
    if progress is not None:
      progress(i + 1, float(loss), time.perf_counter() - began)
  return params
