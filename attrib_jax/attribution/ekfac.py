"""AbU+: unlearning preconditioned by EK-FAC factors of the selected dense layers (SPEC §2, §5.1).

AbU's diagonal Fisher ignores how weights of one layer covary. AbU+ (the FastGDA teacher)
replaces it, per selected Dense layer, by an eigenvalue-corrected Kronecker factorisation
(EK-FAC, Kronfluence-style):

  A = E_tokens[a aᵀ]   (a: the layer's input, one row per token; [in, in])
  G = E_tokens[g gᵀ]   (g = ∂L/∂s, the loss gradient at the layer's output s = a K; [out, out])
  A = Q_A diag(λ_A) Q_Aᵀ,  G = Q_G diag(λ_G) Q_Gᵀ   (float64 eigh on the host)
  Λ = E_examples[(Q_Aᵀ ∇K Q_G)²]   ([in, out]: eigenvalues refitted in the Kronecker basis,
                                   ∇K the example's kernel gradient; a second pass)
  P(Ḡ) = Q_A [(Q_Aᵀ Ḡ Q_G) / (Λ + d)] Q_Gᵀ,   d = damping_scale · mean(Λ)  (0.1; per layer)
  θ' = θ + (α/N) · P(ḡ)   on the selected weights; ḡ the query gradient as in AbU.

Layout. Our kernels are [in, out] (torch's weight transposed), so every formula above is the
transpose of Kronfluence's Q_G [(Q_Gᵀ G Q_A) / (Λ + d)] Q_Aᵀ written for [out, in] weights, and
Λ is stored [in, out] like the kernel. A selected bias joins its kernel Kronfluence-style: the
input gets a trailing 1 (homogeneous coordinate), the layer's matrix is [kernel; bias] of shape
[in + 1, out], and A, Q_A, Λ have the extra row. Only Dense kernels (and their biases) are
supported; selecting a conv or norm weight is an error naming it.

Tokens. A Dense layer applied to [..., in] (cross-attention K/V read the text states [B, L, D]:
L tokens per example; a layer called twice contributes the tokens of both calls) has one
(a, g) row per token. As in Kronfluence, A and G are sums over every token of every example,
divided by the number of token rows; the per-example kernel gradient sums over the example's
tokens (∇K = Σ_t a_t g_tᵀ, exactly jax.grad's), and Λ averages its rotated squares over
*examples*. Only the eigenvectors of A and G enter P, so their normalisation does not change the
update; it does set the K-FAC limit: Λ = λ_A λ_Gᵀ gives P⁻¹ = A ⊗ G, a per-token quantity,
about T times smaller than the per-example Fisher when an example has T weakly correlated
tokens.

Capturing a and g without touching the model. `apply_fn` is opaque (any function that calls
a linen module's `apply`), so the capture is done with `flax.linen.intercept_methods`: while the
loss is traced, every call of a selected `nn.Dense` records its input and adds a zero "tap"
tensor to its output. The gradient of the example's loss with respect to the taps is exactly
∂L/∂s for each token, with no change to the module code (`Module.perturb` would need the model
to declare its taps). The taps are made device-varying inside `shard_map` (jax 0.10 would
otherwise psum their gradients over the mesh, see fisher.py).

Draws. The factor passes use the Fisher's examples exactly (`fisher.example_key`: epoch × item ×
flip, a uniform timestep, a random real caption, fresh noise), and the eigenvalue pass re-draws
the same examples as the covariance pass. The query gradient of the unlearning step draws each
(timestep, noise) pair independently, timesteps *with* replacement (SPEC §2, AbU+), keyed by
(seed, step, draw): ḡ does not depend on the device count or micro-batch.

Accumulation: float32 sums per micro-batch on device, psum over the `data` mesh, Kahan pairs on
device folded into float64 on the host every `flush_every` micro-batches (as the Fisher).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import selection
from attrib_jax.attribution import unlearn as unlearn_lib
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.diffusion.schedules import NoiseSchedule

Path = selection.Path
Flat = selection.Flat
EKFAC_VERSION = 1
_PROGRESS_EVERY = 50   # micro-batches between progress reports
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class EKFACSettings:
  """How the factors are estimated. `batch_size` and `flush_every` change speed and memory,
  not the result (beyond float32 rounding). One epoch = the flipped and unflipped training set
  (2N examples); each of the two passes visits `num_epochs` epochs. SPEC gives no count for
  AbU+; the default is one epoch (the diagonal Fisher's reference uses five)."""
  selection: Any = selection.DEFAULT   # a selection name or a predicate on parameter paths
  num_epochs: int = 1
  batch_size: int = 32        # examples per global micro-batch (rounded up to the device count)
  seed: int = 0
  flush_every: int = 64       # micro-batches between float64 folds on the host
  # The loss whose curvature the factors describe: None the plain loss; γ the Min-SNR-γ
  # training loss, each example's g scaled by √w(t), so G and Λ weigh it by w(t) (as the
  # diagonal Fisher's `min_snr_gamma`).
  min_snr_gamma: float | None = None

  def __post_init__(self):
    loss_lib.check_min_snr_gamma(self.min_snr_gamma)
    scores_lib.require_at_least("EKFACSettings", 1, num_epochs=self.num_epochs,
                                batch_size=self.batch_size, flush_every=self.flush_every)


@dataclasses.dataclass(frozen=True)
class EKFACUnlearnSettings:
  """The AbU+ step. α, steps and draws default to the AbU MSCOCO recipe (SPEC §2 gives no
  separate values for AbU+); timesteps are drawn with replacement."""
  alpha: float = 0.01
  num_steps: int = 1
  num_draws: int = 50_000     # (noise, timestep) draws per step
  micro_batch: int = 80       # draws per forward/backward on one device (memory knob)
  damping_scale: float = 0.1  # d = damping_scale · mean(Λ), per layer
  seed: int = 0
  selection: Any = selection.DEFAULT
  min_snr_gamma: float | None = None   # the query loss's timestep weights (as AbU's)

  def __post_init__(self):
    loss_lib.check_min_snr_gamma(self.min_snr_gamma)
    if self.num_steps < 1 or self.num_draws < 1 or self.micro_batch < 1:
      raise ValueError("num_steps, num_draws and micro_batch must be >= 1")
    if self.damping_scale < 0:
      raise ValueError("damping_scale must be >= 0")


@dataclasses.dataclass
class LayerFactors:
  """The EK-FAC factors of one Dense layer, float64, in kernel layout (see module doc)."""
  has_bias: bool                   # the bias is part of the layer matrix (last row)
  tokens_per_example: int          # token rows per example (summed over the layer's calls)
  activation_cov: np.ndarray       # A [in(+1), in(+1)]
  gradient_cov: np.ndarray         # G [out, out]
  activation_eigvals: np.ndarray   # λ_A ascending; eigenvectors are the columns of Q_A
  activation_eigvecs: np.ndarray
  gradient_eigvals: np.ndarray
  gradient_eigvecs: np.ndarray
  eigenvalues: np.ndarray | None = None  # Λ [in(+1), out], after `fit_eigenvalues`

  def damping(self, scale: float = 0.1) -> float:
    """d = scale · mean(Λ): Kronfluence's heuristic, layer by layer."""
    if self.eigenvalues is None:
      raise ValueError("The eigenvalues are not fitted yet (run fit_eigenvalues)")
    return float(scale * np.mean(self.eigenvalues))


@dataclasses.dataclass
class EKFAC:
  """layers: {module path (e.g. (..., 'attn2', 'to_k')): LayerFactors}; meta: provenance."""
  layers: dict[Path, LayerFactors]
  num_examples: int
  meta: dict

  def fingerprint(self) -> str:
    return self.meta["fingerprint"]

  def param_paths(self) -> set[Path]:
    """The parameter paths the factors precondition (kernels, plus biases where joined)."""
    return {m + (leaf,) for m, f in self.layers.items()
            for leaf in (("kernel", "bias") if f.has_bias else ("kernel",))}


# ------------------------------------------------------------------------ layer taps ---

@dataclasses.dataclass(frozen=True)
class _Layer:
  """What the kernels need to know of one selected Dense layer (static, hashable)."""
  module: Path
  has_bias: bool
  in_features: int
  out_features: int
  calls: tuple[tuple[int, ...], ...]   # output shape of each call, for a batch of one

  @property
  def tokens(self) -> int:
    return sum(int(np.prod(shape[:-1])) for shape in self.calls)


def _is_call(context) -> bool:
  return context.method_name == "__call__" and isinstance(context.module, nn.Dense)


def _dense_calls(apply_fn: Callable, params: Mapping[str, Any], x0_shape: tuple[int, ...],
                 text_shape: tuple[int, ...]) -> dict[Path, list]:
  """{module path: [(input shape, output shape) per call]} of every nn.Dense that one
  example's forward calls (traced abstractly: nothing is computed)."""
  found: dict[Path, list] = {}

  def forward(p, x, t, c):
    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if _is_call(context):
        inputs = args[0] if args else kwargs["inputs"]
        found.setdefault(tuple(context.module.path), []).append((inputs.shape, out.shape))
      return out
    with nn.intercept_methods(interceptor):
      return apply_fn(p, x, t, c)

  jax.eval_shape(forward, params, jax.ShapeDtypeStruct((1,) + tuple(x0_shape), jnp.float32),
                 jax.ShapeDtypeStruct((1,), jnp.int32),
                 jax.ShapeDtypeStruct((1,) + tuple(text_shape), jnp.float32))
  return found


def _selected_layers(apply_fn: Callable, params: Mapping[str, Any], selected: Flat,
                     x0_shape: tuple[int, ...], text_shape: tuple[int, ...]
                     ) -> tuple[_Layer, ...]:
  """The Dense layers behind the selected weights; anything else selected is an error."""
  calls = _dense_calls(apply_fn, params, x0_shape, text_shape)
  layers, covered = [], set()
  for module in sorted(calls):
    kernel, bias = module + ("kernel",), module + ("bias",)
    if kernel not in selected:
      if bias in selected:
        raise ValueError(f"EK-FAC preconditions a bias only with its kernel: "
                         f"{selection.path_name(bias)} is selected without its kernel")
      continue
    if selected[kernel].ndim != 2:
      raise ValueError(f"{selection.path_name(kernel)} is not a 2-D Dense kernel")
    in_features, out_features = selected[kernel].shape
    layers.append(_Layer(module, bias in selected, in_features, out_features,
                         tuple(tuple(out) for _, out in calls[module])))
    covered |= {kernel} | ({bias} if bias in selected else set())
  unsupported = sorted(selection.path_name(p) for p in set(selected) - covered)
  if unsupported:
    raise ValueError(f"EK-FAC covers nn.Dense kernels and biases only; these selected weights "
                     f"are not (or their layer is never called): {unsupported[:5]}")
  return tuple(layers)


def _tapped_forward(apply_fn: Callable, params: Any, x_t: jax.Array, t: jax.Array,
                    text: jax.Array, layers: tuple[_Layer, ...], taps: Mapping[Path, list]
                    ) -> tuple[jax.Array, dict[Path, list]]:
  """apply_fn with each selected Dense call recording its input and adding its tap."""
  inputs: dict[Path, list] = {layer.module: [] for layer in layers}

  def interceptor(next_fun, args, kwargs, context):
    if not _is_call(context) or tuple(context.module.path) not in inputs:
      return next_fun(*args, **kwargs)
    recorded = inputs[tuple(context.module.path)]
    out = next_fun(*args, **kwargs)
    out = out + taps[tuple(context.module.path)][len(recorded)].astype(out.dtype)
    recorded.append(args[0] if args else kwargs["inputs"])
    return out

  with nn.intercept_methods(interceptor):
    prediction = apply_fn(params, x_t, t, text)
  return prediction, inputs


def _example_tokens(apply_fn: Callable, params: Any, layers: tuple[_Layer, ...],
                    x0: jax.Array, text: jax.Array, t: jax.Array, noise: jax.Array,
                    schedule: NoiseSchedule, loss_scale: jax.Array = 1.0
                    ) -> tuple[dict, dict]:
  """({module: a [T, in(+1)]}, {module: g [T, out]}) for one example, float32, g the gradient
  of `loss_scale` · L. Call inside `shard_map` over `parallel.DATA`."""
  taps = {layer.module: [jax.lax.pcast(jnp.zeros(shape, jnp.float32), parallel.DATA,
                                       to="varying") for shape in layer.calls]
          for layer in layers}

  def loss(taps):
    recorded = {}

    def apply(p, x, tt, c):
      prediction, inputs = _tapped_forward(apply_fn, p, x, tt, c, layers, taps)
      recorded.update(inputs)
      return prediction
    value = loss_lib.per_example_loss(apply, params, x0[None], text[None], t[None],
                                      noise[None], schedule=schedule)[0]
    return loss_scale * value, recorded

  grads, inputs = jax.grad(loss, has_aux=True)(taps)
  acts, outs = {}, {}
  for layer in layers:
    a = jnp.concatenate([x.reshape(-1, layer.in_features).astype(jnp.float32)
                         for x in inputs[layer.module]], axis=0)
    if layer.has_bias:
      a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), jnp.float32)], axis=1)
    acts[layer.module] = a
    outs[layer.module] = jnp.concatenate([x.reshape(-1, layer.out_features)
                                          for x in grads[layer.module]], axis=0)
  return acts, outs


# ---------------------------------------------------------------------- factor kernel ---

@functools.lru_cache(maxsize=32)
def _factor_step(apply_fn: Callable, mesh, layers: tuple[_Layer, ...],
                 min_snr_gamma: float | None = None) -> Callable:
  """jit(step(acc, comp, params, schedule, seed, bases, refit, batch) -> (acc, comp)).

  The tree is {module: {"A": Σ a aᵀ, "G": Σ g gᵀ, "L": Σ_examples (Q_Aᵀ ∇K Q_G)²}} with
  bases = {module: (Q_A, Q_G)}. `refit` (a traced bool) picks which sums a pass fills, the
  others stay zero: both passes share one compiled forward/backward (compiling the model's
  per-example backward dominates small runs), and neither pays for the other's reductions.
  """

  def local_sum(params, schedule, seed, bases, refit, batch):
    def example(x0, text, index, flip, epoch):
      key = fisher_lib.example_key(seed, epoch, index, flip)
      t, noise = fisher_lib.draw_timestep_and_noise(key, x0.shape, schedule.num_train_timesteps)
      root_weight = jnp.sqrt(loss_lib.loss_weights(schedule, t, min_snr_gamma))
      return _example_tokens(apply_fn, params, layers, x0, text, t, noise, schedule,
                             root_weight)

    acts, outs = jax.vmap(example)(batch["x0"], batch["text"], batch["index"], batch["flip"],
                                   batch["epoch"])
    valid = batch["valid"]

    def covariances(layer):
      a, g = acts[layer.module], outs[layer.module]   # [B, T, in(+1)], [B, T, out]
      mask = valid[:, None, None]  # one matmul each, contracting examples and tokens together
      return {"A": jnp.einsum("bti,btj->ij", a * mask, a, precision=_HIGHEST),
              "G": jnp.einsum("bto,btp->op", g * mask, g, precision=_HIGHEST),
              "L": jnp.zeros((a.shape[-1], g.shape[-1]), jnp.float32)}

    def eigenvalues(layer):
      a, g = acts[layer.module], outs[layer.module]
      q_a, q_g = bases[layer.module]
      # Q_Aᵀ (Σ_t a_t g_tᵀ) Q_G = Σ_t (Q_Aᵀ a_t)(Q_Gᵀ g_t)ᵀ: rotate the tokens, not ∇K.
      rotated = jnp.einsum("bti,bto->bio", jnp.einsum("bti,ij->btj", a, q_a, precision=_HIGHEST),
                           jnp.einsum("bto,op->btp", g, q_g, precision=_HIGHEST),
                           precision=_HIGHEST)
      return {"A": jnp.zeros((a.shape[-1],) * 2, jnp.float32),
              "G": jnp.zeros((g.shape[-1],) * 2, jnp.float32),
              "L": jnp.einsum("b,bio->io", valid, jnp.square(rotated), precision=_HIGHEST)}

    # psum inside the branches: both then return mesh-invariant values, as cond requires.
    branch = lambda fn: lambda: jax.lax.psum({layer.module: fn(layer) for layer in layers},
                                             parallel.DATA)
    return jax.lax.cond(refit, branch(eigenvalues), branch(covariances))

  sharded_sum = jax.shard_map(local_sum, mesh=mesh, in_specs=(P(),) * 5 + (P(parallel.DATA),),
                              out_specs=P())

  def step(acc, comp, params, schedule, seed, bases, refit, batch):
    total = sharded_sum(params, schedule, seed, bases, refit, batch)
    # Kahan: (acc, comp) <- acc + total, comp the running rounding error of acc.
    y = jax.tree.map(jnp.subtract, total, comp)
    new = jax.tree.map(jnp.add, acc, y)
    return new, jax.tree.map(lambda n, a, yy: (n - a) - yy, new, acc, y)

  rep = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(rep,) * 7 + (parallel.batch_sharding(mesh),),
                 out_shardings=(rep, rep), donate_argnums=(0, 1))


# ---------------------------------------------------------------------------- driver ---

@dataclasses.dataclass
class _Plan:
  """The examples of one factor pass and the layers they feed."""
  rows: np.ndarray
  index: np.ndarray
  num_captions: np.ndarray
  layers: tuple[_Layer, ...]
  num_examples: int


def _plan(apply_fn, params, arrays, rows, settings: EKFACSettings) -> _Plan:
  rows, index, num_captions = fisher_lib.checked_items(arrays, rows, "EK-FAC")
  if settings.num_epochs < 1:
    raise ValueError("num_epochs must be >= 1")
  selected, _ = selection.split(params, selection.select(params, settings.selection))
  layers = _selected_layers(apply_fn, params, selected, arrays["latents"].shape[2:],
                            arrays["text_states"].shape[2:])
  return _Plan(rows, index, num_captions, layers, settings.num_epochs * 2 * rows.size)


def _pass_checkpoint_key(fingerprint: str, stage: str, bases) -> str:
  """What a pass's partial sums depend on: the factors' fingerprint (model, items, settings),
  the pass, and for the eigenvalue pass the bases it projects onto."""
  digest = "" if bases is None else scores_lib.params_fingerprint(
      {selection.path_name(m): {"a": np.asarray(qa), "g": np.asarray(qg)}
       for m, (qa, qg) in bases.items()})
  return scores_lib.settings_digest({"factors": fingerprint, "stage": stage, "bases": digest})


def _run_pass(apply_fn, params, arrays, schedule, plan: _Plan, settings: EKFACSettings, mesh,
              bases, stage: str, progress, checkpoint_path: str | None = None,
              fingerprint: str = "") -> dict:
  """One sweep over the plan's examples: the float64 host sums of the `_factor_step` tree
  (covariances when `bases` is None, else the eigenvalues in those bases).

  checkpoint_path: the sums and the number of examples done, written atomically at every
  flush; a rerun of the same pass (same `fingerprint`, stage and bases) continues from there,
  under any batch size or device count (the draws are keyed per example)."""
  key = checkpoint_path and _pass_checkpoint_key(fingerprint, stage, bases)
  refit = bases is not None
  step = _factor_step(apply_fn, mesh, plan.layers, settings.min_snr_gamma)
  batch = parallel.pad_to_multiple(settings.batch_size, mesh.size)
  per_epoch = 2 * plan.rows.size
  total = plan.num_examples
  num_batches = -(-total // batch)
  rep = parallel.replicated(mesh)
  if not refit:  # unused by the covariance branch; any matrices of the right shapes
    bases = {layer.module: (np.eye(layer.in_features + layer.has_bias),
                            np.eye(layer.out_features)) for layer in plan.layers}
  params_d, schedule_d, seed, refit_d, bases_d = jax.device_put(
      (params, schedule, np.uint32(settings.seed), np.bool_(refit),
       {m: tuple(np.asarray(q, np.float32) for q in qs) for m, qs in bases.items()}), rep)
  shapes = {layer.module: {"A": np.zeros((layer.in_features + layer.has_bias,) * 2),
                           "G": np.zeros((layer.out_features,) * 2),
                           "L": np.zeros((layer.in_features + layer.has_bias,
                                          layer.out_features))}
            for layer in plan.layers}
  host = jax.tree.map(lambda z: z.astype(np.float64), shapes)
  zeros = lambda: jax.device_put(jax.tree.map(lambda z: z.astype(np.float32), shapes), rep)
  acc, comp = zeros(), zeros()
  start = 0
  if checkpoint_path and os.path.exists(checkpoint_path):
    with io_utils.open_npz(checkpoint_path) as ckpt:
      if str(ckpt["key"]) != key:
        raise ValueError(f"{checkpoint_path} is an EK-FAC {stage} checkpoint of other "
                         "settings, model, items or bases; delete it or use another path")
      start = int(ckpt["examples_done"])
      host = {layer.module: {k: ckpt[f"{selection.path_name(layer.module)}/{k}"]
                             for k in ("A", "G", "L")} for layer in plan.layers}
  num_batches = -(-(total - start) // batch)   # of this run
  meter = scores_lib.ProgressMeter(stage, total, "examples", start=start)

  def save(examples_done: int):
    if checkpoint_path and jax.process_index() == 0:   # every process holds the same sums
      scores_lib.atomic_savez(checkpoint_path, key=np.asarray(key),
                              examples_done=np.asarray(examples_done),
                              **{f"{selection.path_name(m)}/{k}": v
                                 for m, sums in host.items() for k, v in sums.items()})

  gather = fisher_lib._gather_rows  # pylint: disable=protected-access  (the Fisher's batches)

  mine = parallel.process_rows(mesh, batch)  # this process's slots of each global batch
  for b in range(num_batches):
    ids = np.arange(start + b * batch, min(start + (b + 1) * batch, total))
    epoch, within = np.divmod(ids, per_epoch)
    pos, flip = np.divmod(within, 2)
    valid = np.ones(batch, np.float32)
    if ids.size < batch:  # pad with copies of the first example, masked out
      pad = batch - ids.size
      valid[ids.size:] = 0
      epoch, pos, flip = (np.concatenate([a, np.repeat(a[:1], pad)]) for a in (epoch, pos, flip))
    # The plan of the global batch is cheap; only this process's rows are drawn and read.
    epoch, pos, flip, valid = epoch[mine], pos[mine], flip[mine], valid[mine]
    item_rows = plan.rows[pos]
    caption = fisher_lib.draw_captions(settings.seed, epoch, plan.index[pos], flip,
                                       plan.num_captions[pos])
    host_batch = {
        "x0": gather(arrays["latents"], item_rows, flip).astype(np.float32),
        "text": gather(arrays["text_states"], item_rows, caption).astype(np.float32),
        "index": plan.index[pos].astype(np.uint32), "flip": flip.astype(np.int32),
        "epoch": epoch.astype(np.int32), "valid": valid}
    acc, comp = step(acc, comp, params_d, schedule_d, seed, bases_d, refit_d,
                     parallel.shard_batch(host_batch, mesh, batch))
    done = b + 1
    if done % settings.flush_every == 0 or done == num_batches:
      a, c = jax.device_get((acc, comp))
      host = jax.tree.map(lambda h, x, y: h + x.astype(np.float64) - y.astype(np.float64),
                          host, a, c)
      acc, comp = zeros(), zeros()
      save(min(start + done * batch, total))
    if progress and (done % _PROGRESS_EVERY == 0 or done == num_batches):
      progress(meter(min(start + done * batch, total)))
  return host


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ascending eigenvalues and eigenvectors with a canonical sign (each column's largest
  entry positive), so factors computed on different layouts compare entry by entry."""
  values, vectors = np.linalg.eigh(np.asarray(matrix, np.float64))
  pivot = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
  return values, vectors * np.where(pivot < 0, -1.0, 1.0)


def layer_factors(activation_cov: np.ndarray, gradient_cov: np.ndarray, *, has_bias: bool = False,
                  tokens_per_example: int = 1) -> LayerFactors:
  """A and G eigendecomposed (float64); Λ left to `fit_eigenvalues` (or set by the caller)."""
  a = 0.5 * (activation_cov + activation_cov.T)  # exact symmetry for eigh
  g = 0.5 * (gradient_cov + gradient_cov.T)
  (la, qa), (lg, qg) = _eigh(a), _eigh(g)
  return LayerFactors(has_bias, tokens_per_example, a, g, la, qa, lg, qg)


def _fingerprint(params_fp: str, settings: EKFACSettings, index: np.ndarray,
                 schedule: NoiseSchedule, num_examples: int) -> str:
  return scores_lib.settings_digest({
      "kind": "ekfac", "model": params_fp, "selection": str(settings.selection),
      "epochs": settings.num_epochs, "seed": settings.seed, "num_examples": num_examples,
      "items": scores_lib.settings_digest(np.asarray(index).tolist()),
      "schedule": scores_lib.params_fingerprint(
          {"alphas_cumprod": schedule.alphas_cumprod}) + schedule.prediction_type,
      **fisher_lib.loss_weight_digest(settings.min_snr_gamma)})


def compute_covariances(apply_fn: Callable, params: Mapping[str, Any], arrays: Mapping[str, Any],
                        schedule: NoiseSchedule, *, settings: EKFACSettings = EKFACSettings(),
                        mesh=None, rows: np.ndarray | None = None,
                        progress: Callable[[scores_lib.Progress], None] | None = None,
                        checkpoint_path: str | None = None) -> EKFAC:
  """Pass 1: A and G of every selected Dense layer, eigendecomposed; Λ not yet fitted.
  `checkpoint_path`: the pass's partial sums (see `_run_pass`)."""
  mesh = mesh or parallel.make_mesh()
  plan = _plan(apply_fn, params, arrays, rows, settings)
  fingerprint = _fingerprint(scores_lib.params_fingerprint(params), settings, plan.index,
                             schedule, plan.num_examples)
  sums = _run_pass(apply_fn, params, arrays, schedule, plan, settings, mesh, None,
                   "ekfac-covariance", progress, checkpoint_path, fingerprint)
  layers = {}
  for layer in plan.layers:
    rows_seen = plan.num_examples * layer.tokens
    layers[layer.module] = layer_factors(sums[layer.module]["A"] / rows_seen,
                                         sums[layer.module]["G"] / rows_seen,
                                         has_bias=layer.has_bias,
                                         tokens_per_example=layer.tokens)
  # The bases become replicated device arrays (pass 2, the AbU+ step): every process must
  # hold the same bits, and eigh on other hosts' CPUs need not give them. Process 0's win.
  eig = ("activation_eigvals", "activation_eigvecs", "gradient_eigvals", "gradient_eigvecs")
  shared = parallel.same_on_every_process(
      {m: {k: getattr(f, k) for k in eig} for m, f in layers.items()})
  layers = {m: dataclasses.replace(f, **shared[m]) for m, f in layers.items()}
  meta = {"version": EKFAC_VERSION, "num_examples": plan.num_examples,
          "fingerprint": _fingerprint(scores_lib.params_fingerprint(params), settings,
                                      plan.index, schedule, plan.num_examples),
          "settings": {k: str(v) if callable(v) else v
                       for k, v in dataclasses.asdict(settings).items()},
          "num_items": int(plan.rows.size),
          "conventions": "A, G: per-token means; Λ: per-example mean of (Q_Aᵀ ∇K Q_G)²; "
                         "kernel layout [in(+1 bias row), out]"}
  return EKFAC(layers=layers, num_examples=plan.num_examples, meta=meta)


def fit_eigenvalues(apply_fn: Callable, params: Mapping[str, Any], arrays: Mapping[str, Any],
                    schedule: NoiseSchedule, factors: EKFAC, *,
                    settings: EKFACSettings = EKFACSettings(), mesh=None,
                    rows: np.ndarray | None = None,
                    progress: Callable[[scores_lib.Progress], None] | None = None,
                    checkpoint_path: str | None = None) -> EKFAC:
  """Pass 2: Λ = mean over examples of (Q_Aᵀ ∇K Q_G)², same examples as pass 1 (the same
  model, items and settings, else an error). `checkpoint_path`: as pass 1's."""
  mesh = mesh or parallel.make_mesh()
  plan = _plan(apply_fn, params, arrays, rows, settings)
  fingerprint = _fingerprint(scores_lib.params_fingerprint(params), settings, plan.index,
                             schedule, plan.num_examples)
  if (fingerprint != factors.fingerprint()
      or {layer.module for layer in plan.layers} != set(factors.layers)):
    raise ValueError("The covariances were computed for another model, items, settings or "
                     "selection than this eigenvalue pass")
  bases = {m: (f.activation_eigvecs, f.gradient_eigvecs) for m, f in factors.layers.items()}
  sums = _run_pass(apply_fn, params, arrays, schedule, plan, settings, mesh, bases,
                   "ekfac-eigenvalues", progress, checkpoint_path, fingerprint)
  layers = {m: dataclasses.replace(f, eigenvalues=sums[m]["L"] / plan.num_examples)
            for m, f in factors.layers.items()}
  return EKFAC(layers=layers, num_examples=factors.num_examples, meta=dict(factors.meta))


def compute_ekfac(apply_fn: Callable, params: Mapping[str, Any], arrays: Mapping[str, Any],
                  schedule: NoiseSchedule, *, settings: EKFACSettings = EKFACSettings(),
                  mesh=None, rows: np.ndarray | None = None,
                  progress: Callable[[scores_lib.Progress], None] | None = None,
                  checkpoint_path: str | None = None) -> EKFAC:
  """EK-FAC factors of the selected Dense layers over `arrays` (both passes).

  Args:
    apply_fn: `apply_fn(params, x_t, t, text_states) -> prediction`; it must run a flax.linen
      module (the layers are found by intercepting its nn.Dense calls).
    params: the trained weights θ0.
    arrays: `latents` [N,2,h,w,c], `text_states` [N,K,L,D], `num_captions` [N], `index` [N].
    rows: which rows to use (default all).
    progress: receives a `Progress` per 50 micro-batches and at the end of each pass.
    checkpoint_path: a prefix for resumable state (`checkpoint_files`): each pass's partial
      sums, and pass 1's factors once it is done, so a rerun with the same model, items and
      settings continues where it stopped (the result equals an uninterrupted run's).
  """
  files = checkpoint_files(checkpoint_path) if checkpoint_path else {}
  factors = None
  if files and os.path.exists(files["covariances"]):
    factors = load_ekfac(files["covariances"])
    if factors.fingerprint() != expected_fingerprint(
        params, np.asarray(arrays["index"])[rows if rows is not None else slice(None)],
        schedule, settings):
      raise ValueError(f"{files['covariances']} holds the covariances of other settings or "
                       "another model; delete it or use another checkpoint path")
  if factors is None:
    factors = compute_covariances(apply_fn, params, arrays, schedule, settings=settings,
                                  mesh=mesh, rows=rows, progress=progress,
                                  checkpoint_path=files.get("covariance_pass"))
    if files and jax.process_index() == 0:
      save_ekfac(files["covariances"], factors)
  return fit_eigenvalues(apply_fn, params, arrays, schedule, factors, settings=settings,
                         mesh=mesh, rows=rows, progress=progress,
                         checkpoint_path=files.get("eigenvalue_pass"))


def checkpoint_files(checkpoint_path: str) -> dict[str, str]:
  """The files `compute_ekfac` keeps under a checkpoint prefix (remove them once the factors
  are saved): pass 1's partial sums, pass 1's factors, pass 2's partial sums."""
  return {"covariance_pass": checkpoint_path + ".covariance_pass.npz",
          "covariances": checkpoint_path + ".covariances.npz",
          "eigenvalue_pass": checkpoint_path + ".eigenvalue_pass.npz"}


def expected_fingerprint(params: Mapping[str, Any], index: np.ndarray, schedule: NoiseSchedule,
                         settings: EKFACSettings = EKFACSettings()) -> str:
  """The fingerprint `compute_ekfac` would give, to check saved factors before reusing them."""
  index = np.asarray(index).astype(np.int64)
  return _fingerprint(scores_lib.params_fingerprint(params), settings, index, schedule,
                      settings.num_epochs * 2 * index.size)


_FIELDS = ("activation_cov", "gradient_cov", "activation_eigvals", "activation_eigvecs",
           "gradient_eigvals", "gradient_eigvecs", "eigenvalues")


def save_ekfac(path: str, factors: EKFAC) -> None:
  """One npz: '<module path>/<field>' arrays, plus the metadata as json."""
  arrays = {"__meta__": np.asarray(json.dumps(factors.meta, sort_keys=True, default=str))}
  for module, f in factors.layers.items():
    name = selection.path_name(module)
    arrays[f"{name}/has_bias"] = np.asarray(f.has_bias)
    arrays[f"{name}/tokens_per_example"] = np.asarray(f.tokens_per_example)
    for field in _FIELDS:
      if getattr(f, field) is not None:
        arrays[f"{name}/{field}"] = getattr(f, field)
  scores_lib.atomic_savez(path, **arrays)


def load_ekfac(path: str, fingerprint: str | None = None) -> EKFAC:
  """Reads `save_ekfac`'s file; a fingerprint other than `fingerprint` (if given) is an
  error (see `expected_fingerprint`)."""
  grouped: dict[Path, dict] = {}
  with io_utils.open_npz(path) as data:
    meta = json.loads(str(data["__meta__"]))
    scores_lib.check_version(path, meta, EKFAC_VERSION, "EK-FAC factor file")
    for key in data.files:
      if key != "__meta__":
        name, field = key.rsplit("/", 1)
        grouped.setdefault(tuple(name.split("/")), {})[field] = data[key]
  if fingerprint is not None and meta["fingerprint"] != fingerprint:
    raise ValueError(f"{path} holds EK-FAC factors for other settings or another model "
                     f"({meta['fingerprint']} != {fingerprint})")
  layers = {m: LayerFactors(has_bias=bool(v["has_bias"]),
                            tokens_per_example=int(v["tokens_per_example"]),
                            **{f: v.get(f) for f in _FIELDS})
            for m, v in grouped.items()}
  return EKFAC(layers=layers, num_examples=int(meta["num_examples"]), meta=meta)


# --------------------------------------------------------------------- preconditioner ---

def kfac_eigenvalues(factors: LayerFactors) -> np.ndarray:
  """Λ = λ_A λ_Gᵀ: with these (and no damping) EK-FAC is K-FAC, P = (A ⊗ G)⁻¹."""
  return np.outer(factors.activation_eigvals, factors.gradient_eigvals)


def _join(grads: Mapping[Path, Any], module: Path, has_bias: bool) -> np.ndarray:
  kernel = np.asarray(grads[module + ("kernel",)], np.float64)
  if not has_bias:
    return kernel
  return np.concatenate([kernel, np.asarray(grads[module + ("bias",)], np.float64)[None]], 0)


def _split(matrix, module: Path, has_bias: bool) -> Flat:
  if not has_bias:
    return {module + ("kernel",): matrix}
  return {module + ("kernel",): matrix[:-1], module + ("bias",): matrix[-1]}


def inverse_eigenvalues(factors: EKFAC, *, damping_scale: float = 0.1,
                        scale: float = 1.0) -> dict[Path, np.ndarray]:
  """{module: scale / (Λ + d)} in float64; a non-positive Λ + d is an error."""
  out = {}
  for module, f in factors.layers.items():
    damped = f.eigenvalues + f.damping(damping_scale)
    if not np.isfinite(damped).all() or (damped <= 0).any():
      raise ValueError(f"Λ + damping is not positive at {selection.path_name(module)} "
                       f"(min {damped.min():.3g}); use damping_scale > 0")
    out[module] = scale / damped
  return out


def precondition(factors: EKFAC, grads: Mapping[Path, Any], *,
                 damping_scale: float = 0.1) -> Flat:
  """P(Ḡ) = Q_A [(Q_Aᵀ Ḡ Q_G) / (Λ + d)] Q_Gᵀ per layer, float64 on the host.

  `grads` is a flat dict over exactly `factors.param_paths()` (kernels [in, out], biases).
  """
  if set(grads) != factors.param_paths():
    raise ValueError("The gradient does not cover exactly the factors' weights")
  inverse = inverse_eigenvalues(factors, damping_scale=damping_scale)
  out = {}
  for module, f in factors.layers.items():
    qa, qg = f.activation_eigvecs, f.gradient_eigvecs
    w = _join(grads, module, f.has_bias)
    out.update(_split(qa @ ((qa.T @ w @ qg) * inverse[module]) @ qg.T, module, f.has_bias))
  return out


# --------------------------------------------------------------------------- unlearning ---

def draw_query(seed, step, draw_id, shape: tuple[int, ...], num_timesteps: int
               ) -> tuple[jax.Array, jax.Array]:
  """(timestep, noise) of draw `draw_id` of step `step`: independent draws, so timesteps come
  with replacement."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), draw_id)
  k_t, k_noise = jax.random.split(key)
  return (jax.random.randint(k_t, (), 0, num_timesteps),
          jax.random.normal(k_noise, shape, jnp.float32))


def query_draws(seed: int, step: int, num_draws: int, shape: tuple[int, ...],
                num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
  """All (timesteps [D], noise [D, *shape]) of one step, materialised (for tests/inspection)."""
  t, noise = jax.vmap(lambda i: draw_query(seed, step, i, shape, num_timesteps))(
      jnp.arange(num_draws))
  return np.asarray(t), np.asarray(noise)


def _independent_draws(seed, step, ids, shape, schedule, table, *, num_draws: int,
                       draws_per_batch: int):
  """AbU+'s draws (`draw_query`: timesteps with replacement); no per-step table."""
  del table, num_draws, draws_per_batch
  return jax.vmap(lambda i: draw_query(seed, step, i, shape, schedule.num_train_timesteps))(ids)


def _gradient_sum(apply_fn: Callable, mesh, settings: EKFACUnlearnSettings, selected, rest,
                  schedule, x0, text, step: int, region_mask=None):
  """Σ over the step's draws of w(t)·∇L (replicated): AbU's chunked kernel with AbU+'s draws."""
  return unlearn_lib.gradient_sum(apply_fn, mesh, selected, rest, schedule, x0, text,
                                  seed=settings.seed, step=step, num_draws=settings.num_draws,
                                  micro_batch=settings.micro_batch, draws=_independent_draws,
                                  min_snr_gamma=settings.min_snr_gamma,
                                  region_mask=region_mask)


@functools.lru_cache(maxsize=32)
def _update_program(mesh, num_draws: int, layers: tuple[tuple[Path, bool], ...]) -> Callable:
  """θ_sel + P(Σ∇L / D): the EK-FAC preconditioned update, on device in float32."""

  def update(selected, preconditioner, grad_sum):
    g = jax.tree.map(lambda s: s / num_draws, grad_sum)
    delta = {}
    for module, has_bias in layers:
      qa, qg, inverse = preconditioner[module]
      w = g[module + ("kernel",)]
      if has_bias:
        w = jnp.concatenate([w, g[module + ("bias",)][None]], 0)
      rotated = jnp.matmul(jnp.matmul(qa.T, w, precision=_HIGHEST), qg, precision=_HIGHEST)
      u = jnp.matmul(jnp.matmul(qa, rotated * inverse, precision=_HIGHEST), qg.T,
                     precision=_HIGHEST)
      delta.update(_split(u, module, has_bias))
    return jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), selected,
                        delta)

  rep = parallel.replicated(mesh)
  return jax.jit(update, in_shardings=(rep,) * 3, out_shardings=rep)


def _check_query(query_latent, query_text) -> tuple[np.ndarray, np.ndarray]:
  x0 = np.asarray(query_latent, np.float32)
  text = np.asarray(query_text, np.float32)
  if x0.ndim != 3 or text.ndim != 2:
    raise ValueError(f"query latent must be [h, w, c] and text [L, D]; got {x0.shape}, "
                     f"{text.shape}")
  return x0, text


def query_gradient(apply_fn: Callable, params: Mapping[str, Any], query_latent: np.ndarray,
                   query_text: np.ndarray, schedule: NoiseSchedule, *,
                   settings: EKFACUnlearnSettings = EKFACUnlearnSettings(), step: int = 0,
                   mesh=None, region_mask: np.ndarray | None = None) -> Flat:
  """ḡ of one AbU+ step (timesteps with replacement): mean over the step's draws; with
  `region_mask` ([h, w]) the loss of the region's latent cells only."""
  mesh = mesh or parallel.make_mesh()
  selected, rest = selection.split(params, selection.select(params, settings.selection))
  x0, text = _check_query(query_latent, query_text)
  rep = parallel.replicated(mesh)
  selected, rest, schedule_d, x0, text = jax.device_put((selected, rest, schedule, x0, text), rep)
  total = _gradient_sum(apply_fn, mesh, settings, selected, rest, schedule_d, x0, text, step,
                        region_mask)
  return {p: np.asarray(v) / settings.num_draws for p, v in total.items()}


def ekfac_unlearn(apply_fn: Callable, params: Mapping[str, Any], factors: EKFAC,
                  query_latent: np.ndarray, query_text: np.ndarray, schedule: NoiseSchedule, *,
                  num_train: int, settings: EKFACUnlearnSettings = EKFACUnlearnSettings(),
                  mesh=None,
                  progress: Callable[[scores_lib.Progress], None] | None = None,
                  region_mask: np.ndarray | None = None) -> dict:
  """θ' after `settings.num_steps` EK-FAC-preconditioned ascent steps on the query's loss
  (with `region_mask`, [h, w] latent cells of a query region: the region's loss only).

  Each step: θ ← θ + (α/N) · P(ḡ), ḡ recomputed at the current θ from fresh draws; one jitted
  program per micro-batch chunk (gradient over the mesh), then one for the preconditioning and
  update (on device, float32).

  Args:
    apply_fn: `apply_fn(params, x_t, t, text_states) -> prediction`.
    params: θ0 (nested dict). Only the selected leaves change.
    factors: `compute_ekfac`'s result, covering exactly the selected weights.
    query_latent: [h, w, c] the query's (scaled) latent.
    query_text: [L, D] text-encoder states of the query's prompt.
    num_train: N, the number of training images.
  Returns:
    θ' as a nested dict of device arrays (replicated over the mesh).
  """
  mesh = mesh or parallel.make_mesh()
  if num_train < 1:
    raise ValueError("num_train (N) must be >= 1")
  selected, rest = selection.split(params, selection.select(params, settings.selection))
  if set(selected) != factors.param_paths():
    missing = sorted(map(selection.path_name, set(selected) - factors.param_paths()))[:3]
    extra = sorted(map(selection.path_name, factors.param_paths() - set(selected)))[:3]
    raise ValueError(f"The EK-FAC factors do not cover the selection {settings.selection!r} "
                     f"(missing {missing}, unexpected {extra})")
  for module, f in factors.layers.items():
    expected = (f.activation_eigvecs.shape[0] - f.has_bias, f.gradient_eigvecs.shape[0])
    if selected[module + ("kernel",)].shape != expected:
      raise ValueError(f"Factor shape {expected} != kernel shape "
                       f"{selected[module + ('kernel',)].shape} at {selection.path_name(module)}")
  inverse = inverse_eigenvalues(factors, damping_scale=settings.damping_scale,
                                scale=settings.alpha / num_train)
  preconditioner = {}
  for module, f in factors.layers.items():
    with np.errstate(over="ignore"):
      inv32 = inverse[module].astype(np.float32)
    if not np.isfinite(inv32).all():
      raise ValueError(f"(α/N)/(Λ + d) overflows float32 at {selection.path_name(module)}")
    preconditioner[module] = (f.activation_eigvecs.astype(np.float32),
                              f.gradient_eigvecs.astype(np.float32), inv32)
  x0, text = _check_query(query_latent, query_text)
  layers = tuple((m, f.has_bias) for m, f in sorted(factors.layers.items()))
  update = _update_program(mesh, settings.num_draws, layers)
  rep = parallel.replicated(mesh)
  selected, rest, preconditioner, schedule_d, x0, text = jax.device_put(
      (selected, rest, preconditioner, schedule, x0, text), rep)
  meter = scores_lib.ProgressMeter("unlearn", settings.num_steps * settings.num_draws, "draws")
  for s in range(settings.num_steps):
    grad_sum = _gradient_sum(apply_fn, mesh, settings, selected, rest, schedule_d, x0, text, s,
                             region_mask)
    selected = update(selected, preconditioner, grad_sum)
    if progress:
      jax.block_until_ready(selected)
      progress(meter((s + 1) * settings.num_draws))
  return selection.merge(selected, rest)
