"""AbC's soft attribution (SPEC §4): a calibrator that turns one query's scores into probabilities.

    e_i = exp(inv_tau · (s_i − max_j s_j))            (the top candidate has e = 1)
    p_i = relu(e_i + b) / Σ_j relu(e_j + b)           (b < 0 truncates weak matches to exactly 0)

Fit (`fit_calibrator`, jax + optax): the mean over queries of the query's NLL = the mean over its
m exemplars of −log p_i (AbC's `loss_forward`: Σ log p over the exemplars / m; for one exemplar
the same as −log of the summed mass, for a style set of m the optimum spreads 1/m on each).
inv_tau is learnt in log space from 1 / (mean per-query std of the scores), so scores of any
scale start at unit spread; b = softplus(raw) − 1 > −1 keeps the top candidate's weight 1 + b
positive, so probabilities always exist. First the temperature alone (b = 0, the exact softmax
NLL); then, from there, (inv_tau, b) with relu replaced by a softplus: AbC's softplus(100 x)/100,
and a sharper softplus(1e4 x)/1e4 with the evaluation's eps floor inside the loss. The
surrogates are not the relu the calibrator is used with (measured on synthetic scores: AbC's
β = 100 alone left test NLL *above* the plain softmax at 600-5,000 candidates, since every
candidate keeps log 2 / β of weight), so the fit returns whichever of the three has the lowest
relu NLL on the fitting queries. Full batch, a fixed number of Adam steps with a cosine-decayed
rate inside one jit: deterministic.

Evaluation (numpy float64): `probabilities` with the true relu; NLL floors each exemplar's
probability at eps = 1e-8 (−log eps = 18.4 nats), the same floor for every method compared
(the plain softmax's tiny probabilities are floored too), so an exemplar truncated to 0 costs
what a softmax giving it 1e-8 costs and no method gains from the floor above that.
`truncated_fraction` says how often the floor was hit. Both reliability diagrams compare a
probability p with the target y = 1/m for the query's m exemplars, 0 otherwise (the
distribution the NLL's optimum reaches); ECE = Σ_bins (n_b / N) · |mean y − mean p|.
`top1_reliability`, the one the report shows, takes one point per query: its top candidate's p
against that candidate's y (for single exemplars the usual "is the top-1 right?"). `reliability`
bins every (query, candidate) pair; with hundreds of candidates nearly every pair sits at
p ≈ y ≈ 0, so its ECE is ~0 for any method and says little.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

EPS = 1e-8          # probability floor in the NLL, for every method alike
SHARPNESS = 100.0   # softplus(β x) / β in place of relu while fitting (AbC's β)
_BIAS_RAW_AT_ZERO = math.log(math.e - 1.0)   # softplus(raw) - 1 = 0


@dataclasses.dataclass(frozen=True)
class Calibrator:
  inv_tau: float
  bias: float

  def __post_init__(self):
    if not (math.isfinite(self.inv_tau) and self.inv_tau > 0):
      raise ValueError(f"Calibrator.inv_tau must be finite and > 0, got {self.inv_tau}")
    if not (math.isfinite(self.bias) and self.bias > -1):
      # e of the top candidate is 1: with b <= -1 every weight is truncated to 0.
      raise ValueError(f"Calibrator.bias must be finite and > -1, got {self.bias}")


def _scores(scores) -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[1] == 0:
    raise ValueError(f"scores must be [queries, candidates], got shape {scores.shape}")
  bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
  if bad.size:
    raise ValueError(f"scores of queries {bad[:10].tolist()} are not finite")
  return scores


def _positives(positives, shape) -> np.ndarray:
  positives = np.asarray(positives)
  if positives.shape != tuple(shape):
    raise ValueError(f"positives {positives.shape} must match {tuple(shape)}")
  positives = positives.astype(bool)
  empty = np.flatnonzero(~positives.any(axis=1))
  if empty.size:
    raise ValueError(f"queries {empty[:10].tolist()} have no positive candidate")
  return positives


def probabilities(cal: Calibrator, scores) -> np.ndarray:
  """[Q, C] float64 calibrated probabilities (relu truncation); rows sum to 1."""
  s = _scores(scores)
  e = np.exp(cal.inv_tau * (s - s.max(axis=1, keepdims=True)))
  w = np.maximum(e + cal.bias, 0.0)
  return w / w.sum(axis=1, keepdims=True)


def softmax_probabilities(scores, temperature: float = 1.0) -> np.ndarray:
  """[Q, C] the plain softmax of scores / temperature (the uncalibrated reference: inv_tau =
  1 / temperature, b = 0)."""
  return probabilities(Calibrator(1.0 / temperature, 0.0), scores)


def _probs(probs, positives) -> tuple[np.ndarray, np.ndarray]:
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2:
    raise ValueError(f"probabilities must be [queries, candidates], got {probs.shape}")
  if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1 + 1e-9).any():
    raise ValueError("probabilities must be finite and within [0, 1]")
  return probs, _positives(positives, probs.shape)


def negative_log_likelihood(probs, positives, eps: float = EPS) -> np.ndarray:
  """[Q] mean over a query's exemplars of −log max(p, eps)."""
  probs, positives = _probs(probs, positives)
  nll = -np.log(np.maximum(probs, eps))
  return (nll * positives).sum(axis=1) / positives.sum(axis=1)


def true_mass(probs, positives) -> np.ndarray:
  """[Q] probability mass on a query's exemplars."""
  probs, positives = _probs(probs, positives)
  return (probs * positives).sum(axis=1)


def truncated_fraction(probs, positives, eps: float = EPS) -> np.ndarray:
  """[Q] fraction of a query's exemplars whose probability is below eps (the NLL floor)."""
  probs, positives = _probs(probs, positives)
  return ((probs < eps) & positives).sum(axis=1) / positives.sum(axis=1)


def _binned(p: np.ndarray, y: np.ndarray, num_bins: int) -> dict:
  """Points (p, y) in equal-width bins of p on [0, 1]: bin_edges [B+1], confidence / accuracy
  [B] (mean p / mean y; NaN in empty bins), count [B], ece = Σ (n_b/N) |acc_b - conf_b|."""
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # Bins [e_i, e_i+1), the last one closed at 1.
  which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, num_bins - 1)
  count = np.bincount(which, minlength=num_bins)
  sum_p = np.bincount(which, weights=p, minlength=num_bins)
  sum_y = np.bincount(which, weights=y, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    confidence = np.where(count > 0, sum_p / count, np.nan)
    accuracy = np.where(count > 0, sum_y / count, np.nan)
  ece = float(np.sum(np.abs(sum_y - sum_p)) / p.size)
  return {"bin_edges": edges, "confidence": confidence, "accuracy": accuracy,
          "count": count.astype(np.int64), "ece": ece}


def reliability(probs, positives, num_bins: int = 10) -> dict:
  """Reliability diagram over all (query, candidate) pairs, equal-width bins on [0, 1].

  Returns bin_edges [B+1], confidence / accuracy [B] (mean p / mean target y = 1/m on the
  query's exemplars, 0 elsewhere; NaN in empty bins), count [B] (pairs), ece (pair-weighted).
  """
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  probs, positives = _probs(probs, positives)
  target = positives / positives.sum(axis=1, keepdims=True)
  return _binned(probs.ravel(), target.ravel(), num_bins)


def top1_reliability(probs, positives, num_bins: int = 10) -> dict:
  """Reliability of each query's top candidate: its p (the confidence) against its target y
  (1/m if it is one of the query's m exemplars, else 0). Same keys as `reliability`; counts
  are queries. Ties for the top go to the lowest candidate index (numpy's argmax)."""
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  probs, positives = _probs(probs, positives)
  top = np.argmax(probs, axis=1)
  rows = np.arange(probs.shape[0])
  return _binned(probs[rows, top], positives[rows, top] / positives.sum(axis=1), num_bins)


# ------------------------------------------------------------------------------- fitting ---

def _log_softplus(z):
  """log(softplus(z)), exact to float precision also where softplus underflows (z << 0)."""
  safe = jnp.maximum(z, -30.0)
  return jnp.where(z > -30.0, jnp.log(jax.nn.softplus(safe)), z)


def _unpack(params, fit_bias: bool):
  inv_tau = jnp.exp(params["log_inv_tau"])
  bias = jax.nn.softplus(params["bias_raw"]) - 1.0 if fit_bias else jnp.zeros(())
  return inv_tau, bias


def fit_loss(params, shifted, weights, *, fit_bias: bool = True,
             sharpness: float = SHARPNESS, floor: float | None = None):
  """The fitting objective: mean over queries of Σ_i w_i · (−log p_i), w = positives / m,
  shifted = scores − row max; relu → softplus(β x)/β (β cancels in the ratio). Without a bias
  p is exactly the softmax of inv_tau · scores. floor > 0: −log(p + floor), the evaluation's
  floor made smooth."""
  inv_tau, bias = _unpack(params, fit_bias)
  if fit_bias:
    logw = _log_softplus(sharpness * (jnp.exp(inv_tau * shifted) + bias))
  else:
    logw = inv_tau * shifted
  logp = logw - jax.scipy.special.logsumexp(logw, axis=1, keepdims=True)
  floor = 0.0 if floor is None else floor
  logp = jnp.where(floor > 0, jnp.logaddexp(logp, jnp.log(jnp.maximum(floor, 1e-38))), logp)
  return -jnp.mean(jnp.sum(weights * logp, axis=1))


@functools.partial(jax.jit, static_argnames=("fit_bias",))
def _fit(params, shifted, weights, steps, learning_rate, sharpness, floor, *, fit_bias):
  # Settings are traced, not static: one compile per shape serves every fit.
  adam = optax.scale_by_adam()

  def loss(p):
    return fit_loss(p, shifted, weights, fit_bias=fit_bias, sharpness=sharpness, floor=floor)

  def body(i, carry):
    p, state = carry
    updates, state = adam.update(jax.grad(loss)(p), state, p)
    # Cosine decay to 1 % of the rate: the last steps settle instead of oscillating.
    rate = learning_rate * (0.01 + 0.99 * 0.5 * (1 + jnp.cos(jnp.pi * i / steps)))
    return jax.tree.map(lambda v, u: v - rate * u, p, updates), state

  params, _ = jax.lax.fori_loop(0, steps, body, (params, adam.init(params)))
  return params, loss(params)


def initial_params(scores) -> dict:
  """log inv_tau = −log(mean per-query std of the scores): unit spread at any scale; b = 0."""
  spread = float(np.mean(np.std(_scores(scores), axis=1)))
  inv_tau = 1.0 / spread if spread > 0 else 1.0
  return {"log_inv_tau": jnp.asarray(math.log(inv_tau), jnp.float32),
          "bias_raw": jnp.asarray(_BIAS_RAW_AT_ZERO, jnp.float32)}


# (name, sharpness, floor) of the biased fits tried after the temperature-only one.
BIASED_FITS = (("abc_softplus100", SHARPNESS, None), ("softplus1e4_floored", 1e4, EPS))


def fit_candidates(scores, positives, *, steps: int = 1000, lr: float = 0.05, seed: int = 0,
                   fit_bias: bool = True, max_queries: int | None = None
                   ) -> dict[str, tuple[Calibrator, float]]:
  """name -> (calibrator, its evaluated NLL (relu, eps floor) on these queries).

  "temperature": b = 0, inv_tau by the exact softmax NLL (convex in inv_tau: one optimum),
  started at unit spread. Then, if fit_bias, each of BIASED_FITS started from it: AbC's softplus(100 x)
  surrogate, and a sharper one with the evaluation's floor inside the loss. The surrogates do
  not equal the relu the calibrator is used with (softplus(100 x)/100 leaves log 2 / 100 on
  every candidate, C of them), so the fit can only be judged by the relu NLL.
  """
  if steps < 1 or not lr > 0:
    raise ValueError(f"fit_calibrator needs steps >= 1 and lr > 0, got {steps}, {lr}")
  s = _scores(scores)
  pos = _positives(positives, s.shape)
  if max_queries is not None and s.shape[0] > max_queries:
    rows = np.sort(np.random.default_rng(seed).choice(s.shape[0], max_queries, replace=False))
    s, pos = s[rows], pos[rows]
  shifted = jnp.asarray(s - s.max(axis=1, keepdims=True), jnp.float32)
  weights = jnp.asarray(pos / pos.sum(axis=1, keepdims=True), jnp.float32)
  common = dict(steps=jnp.int32(steps), learning_rate=jnp.float32(lr))

  def finish(params, loss, biased):
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"calibrator fit diverged (loss {float(loss)}); lower lr")
    inv_tau, bias = _unpack(params, biased)
    # b can round to -1 in float32 only if softplus(raw) underflows; keep it valid.
    cal = Calibrator(float(inv_tau), max(float(bias), -1.0 + 1e-6))
    return cal, float(negative_log_likelihood(probabilities(cal, s), pos).mean())

  start, loss = _fit(initial_params(s), shifted, weights, sharpness=jnp.float32(SHARPNESS),
                     floor=jnp.float32(0), fit_bias=False, **common)
  out = {"temperature": finish(start, loss, False)}
  if fit_bias:
    for name, sharpness, floor in BIASED_FITS:
      params, loss = _fit(start, shifted, weights, sharpness=jnp.float32(sharpness),
                          floor=jnp.float32(floor or 0), fit_bias=True, **common)
      out[name] = finish(params, loss, True)
  return out


def fit_calibrator(scores, positives, *, steps: int = 1000, lr: float = 0.05, seed: int = 0,
                   fit_bias: bool = True, max_queries: int | None = None) -> Calibrator:
  """Fits (inv_tau, b) by the mean NLL of the true exemplars on these queries: of
  `fit_candidates`, the one with the lowest evaluated (relu, eps-floored) NLL on them.

  fit_bias=False fits the temperature alone (b = 0: a plain softmax; the ablation that says what
  the truncation adds). max_queries caps the queries used (drawn with `seed`) for memory; all
  are used otherwise and `seed` plays no part (full-batch Adam is deterministic).
  """
  fits = fit_candidates(scores, positives, steps=steps, lr=lr, seed=seed, fit_bias=fit_bias,
                        max_queries=max_queries)
  return min(fits.values(), key=lambda cal_nll: cal_nll[1])[0]
