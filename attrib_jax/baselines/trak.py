"""TRAK and D-TRAK: projected per-example gradients and the projected-Gram inverse.

Features. For a training example z = (item, flip) and each timestep t in `timesteps`,

    key  = fold_in(key(seed), 0, index, flip, t)    (0: the training domain; 1: queries)
    caption ~ uniform over the item's real captions,  noise ~ N(0, I)      (two splits of key)

and the example's gradient is g(z) = ∇_θ mean_t f(θ; x0, caption, t, noise), over the selected
weights θ (`selection`, default all). f is the objective:
  "loss"        (TRAK): the denoising loss, `diffusion.loss.per_example_loss`;
  "output_norm" (D-TRAK, Zheng et al. 2024): mean(ε_θ(x_t, t, c)²), the squared norm of the
    network's output divided by its size d (1/d rescales Φ and so the effective λ only).
The feature is φ(z) = Rᵀ g(z) with R a [P, k] random matrix, Rademacher (±1/√k, default) or
Gaussian (N(0, 1/k)); g's P entries are the selected weights in sorted path order, each
flattened row-major. Row r of R depends only on (seed, r, k): Rademacher signs come from a
counter-based 32-bit integer hash (32 signs per hash word; threefry would be slow to compile
and spend 32 random bits per sign), Gaussian rows from jax.random keyed per row (see
`projection_rows`). R is generated `block_rows` rows at a time inside the jitted program and
never held whole, so `block_rows`, `batch_size` and the device count change memory and speed,
not Φ.
The query's feature uses the same timesteps, with domain 1, index 0, flip 0 and its own text.

Scores (TRAK's linear datamodel, no ensembling): with Φ [M, k] the features of every training
example, score(z) = φ(z)ᵀ (ΦᵀΦ + λI)⁻¹ φ_q, formed in float64 by a Cholesky solve. λ =
`damping` · trace(ΦᵀΦ)/k ("relative", default: scale-free) or λ = `damping` ("absolute").
An item's score sums its flips' scores (`flip_reduce="sum"`): in the linear datamodel removing
an item removes both of its views, so their predicted effects add; "max" is AbU's convention.
If the model was trained without random flips, use `flips=(0,)`: flipped views were never
training examples and do not belong in the Gram.

Per-example gradients are `vmap(grad)` over a batch of examples inside one `jit`, the batch
split over the `data` mesh (`attrib_jax.parallel`); the network is traced at "highest" matmul
precision, so Φ does not depend on the accelerator's TF32/bf16 defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from attrib_jax import parallel
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import selection
from attrib_jax.baselines import interface
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.diffusion.schedules import NoiseSchedule, add_noise

OBJECTIVES = ("loss", "output_norm")
PROJECTIONS = ("rademacher", "gaussian")
TRAIN, QUERY, PROJECTION = 0, 1, 2   # key domains


# ------------------------------------------------------------------------ objectives ---

def objective_values(objective: str, apply_fn: Callable, params: Any, x0: jax.Array,
                     text_states: jax.Array, t: jax.Array, noise: jax.Array, *,
                     schedule: NoiseSchedule) -> jax.Array:
  """[B] values of TRAK's ("loss") or D-TRAK's ("output_norm") per-example objective."""
  if objective == "loss":
    return loss_lib.per_example_loss(apply_fn, params, x0, text_states, t, noise,
                                     schedule=schedule)
  if objective == "output_norm":
    x_t = add_noise(schedule, x0, noise, t)
    eps = apply_fn(params, x_t, t, text_states).astype(jnp.float32)
    return jnp.mean(jnp.square(eps).reshape(eps.shape[0], -1), axis=1)
  raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def draw(seed: jax.Array | int, domain: int, index: jax.Array, flip: jax.Array,
         timestep: jax.Array, num_captions: jax.Array,
         shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(caption, noise) of one (example, timestep) slot; see the module doc."""
  key = jax.random.key(seed)
  for value in (domain, index, flip, timestep):
    key = jax.random.fold_in(key, value)
  k_caption, k_noise = jax.random.split(key)
  # bits mod n rather than randint: one threefry call instead of several (compile time); the
  # modulo bias is below n / 2**32.
  count = jnp.maximum(num_captions, 1).astype(jnp.uint32)
  caption = (jax.random.bits(k_caption, (), jnp.uint32) % count).astype(jnp.int32)
  return caption, jax.random.normal(k_noise, shape, jnp.float32)


# ------------------------------------------------------------------------ projection ---

def _mix32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash (Wellons' "lowbias32" constants), wrapping uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def projection_rows(seed: jax.Array | int, rows: jax.Array, proj_dim: int,
                    kind: str) -> jax.Array:
  """Rows `rows` of R: [len(rows), proj_dim] float32, scaled by 1/√k.

  "rademacher": the sign in column c of row r is bit (c mod 32) of
  mix(mix(r·φ + s) ^ mix(c div 32 + κ)), with s = mix(seed ^ mix(2)) and φ, κ odd constants: a
  counter-based hash, so one 32-bit word gives 32 signs and any block of rows is generated on
  its own. "gaussian": N(0, 1) from jax.random (threefry) keyed by fold_in(key(s), r).
  """
  rows = rows.astype(jnp.uint32)
  root = _mix32(jnp.asarray(seed, jnp.uint32) ^ _mix32(jnp.uint32(PROJECTION)))
  if kind == "rademacher":
    num_words = -(-proj_dim // 32)
    row_word = _mix32(rows * jnp.uint32(0x9E3779B9) + root)
    col_word = _mix32(jnp.arange(num_words, dtype=jnp.uint32) + jnp.uint32(0x85EBCA6B))
    words = _mix32(row_word[:, None] ^ col_word[None, :])
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    signs = 1.0 - 2.0 * bits.reshape(rows.shape[0], -1)[:, :proj_dim].astype(jnp.float32)
  elif kind == "gaussian":
    key = jax.random.key(root)
    signs = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r), (proj_dim,),
                                                 jnp.float32))(rows)
  else:
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")
  return signs / np.float32(np.sqrt(proj_dim))


def flatten_gradients(grads: Mapping[selection.Path, jax.Array]) -> jax.Array:
  """{path: [b, *shape]} -> [b, P]: weights in sorted path order, each flattened row-major
  (the row order of R)."""
  return jnp.concatenate([grads[p].reshape(grads[p].shape[0], -1).astype(jnp.float32)
                          for p in sorted(grads)], axis=1)


def projection_matrix(num_rows: int, proj_dim: int, seed: int = 0,
                      kind: str = "rademacher") -> np.ndarray:
  """The whole R [P, k], as `project` uses it block by block (for tests and small models)."""
  return np.asarray(projection_rows(seed, jnp.arange(num_rows), proj_dim, kind))


def project(flat_grads: jax.Array, seed: jax.Array | int, proj_dim: int, kind: str,
            block_rows: int) -> jax.Array:
  """flat_grads [b, P] @ R [P, k] -> [b, k], generating `block_rows` rows of R at a time.

  Blocks of ~2k rows keep R's block in cache: measured on 2 busy CPU cores (P = 4.6M, k =
  1024, 8 examples), 2,048-row blocks ran 3x faster than 16k-row blocks and as fast as a
  matmul with R materialised.
  """
  b, n = flat_grads.shape
  block = min(block_rows, n)
  num_full = n // block
  product = lambda part, start, size: jnp.dot(
      part, projection_rows(seed, start + jnp.arange(size), proj_dim, kind),
      precision=jax.lax.Precision.HIGHEST)

  def body(i, acc):
    part = jax.lax.dynamic_slice_in_dim(flat_grads, i * block, block, axis=1)
    return acc + product(part, i * block, block)
  out = jax.lax.fori_loop(0, num_full, body, jnp.zeros((b, proj_dim), jnp.float32))
  if n > num_full * block:  # the last, partial block
    out = out + product(flat_grads[:, num_full * block:], num_full * block, n - num_full * block)
  return out


# --------------------------------------------------------------------------- kernel ---

_PROGRAMS: dict = {}   # (apply_fn, mesh, program settings, latent shape) -> (draws, features)


def _programs(apply_fn: Callable, mesh, method: "TRAK",
              latent_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
  """`_make_programs`, built once per network, mesh, settings and shape in a process.

  The programs take the weights as arguments, so every model of one network (AbC's customized
  models, each a context of its own) shares them instead of compiling its own."""
  key = (apply_fn, mesh, method.objective, method.proj_dim, method.projection,
         method.block_rows, tuple(method.timesteps), tuple(latent_shape))
  if key not in _PROGRAMS:
    _PROGRAMS[key] = _make_programs(apply_fn, mesh, method, latent_shape)
  return _PROGRAMS[key]


def _make_programs(apply_fn: Callable, mesh, method: "TRAK",
                   latent_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
  """(draws, features), both jitted over the mesh, the batch split over `data`:

  draws(seed, batch) -> (caption [b, T], noise [b, T, *latent]);
  features(selected, rest, schedule, seed, batch) -> φ [b, k], with `caption` and `noise`
  from `draws` in the batch. Two programs, because XLA compiles each far faster than one
  holding both (measured on the tests' micro model: about 3 + 1 s against 10 s).
  """
  timesteps = tuple(int(t) for t in method.timesteps)
  ts = np.asarray(timesteps, np.int32)

  def draws(seed, batch):
    one = lambda d, i, f, c: jax.vmap(
        lambda t: draw(seed, d, i, f, t, c, latent_shape))(jnp.asarray(ts))
    return jax.vmap(one)(batch["domain"], batch["index"], batch["flip"], batch["num_captions"])

  def example_grad(selected, rest, schedule, x0, texts, caption, noise):
    text = texts[caption]
    x0s = jnp.broadcast_to(x0, (len(timesteps),) + x0.shape)

    def f(sel):
      values = objective_values(method.objective, apply_fn, selection.merge(sel, rest), x0s,
                                text, jnp.asarray(ts), noise, schedule=schedule)
      return jnp.mean(values)
    return jax.grad(f)(selected)

  def features(selected, rest, schedule, seed, batch):
    with jax.default_matmul_precision("highest"):
      grads = jax.vmap(example_grad, in_axes=(None,) * 3 + (0,) * 4)(
          selected, rest, schedule, batch["x0"], batch["text"], batch["caption"],
          batch["noise"])
      return project(flatten_gradients(grads), seed, method.proj_dim, method.projection,
                     method.block_rows)

  rep, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return (jax.jit(draws, in_shardings=(rep, split), out_shardings=split),
          jax.jit(features, in_shardings=(rep, rep, rep, rep, split), out_shardings=split))


# --------------------------------------------------------------------------- method ---

@interface.register
@dataclasses.dataclass(frozen=True)
class TRAK(interface.Method):
  """TRAK-style attribution (see module doc); `objective="output_norm"` is D-TRAK."""
  name = "trak"
  objective: str = "loss"
  proj_dim: int = 1024
  projection: str = "rademacher"
  damping: float = 1e-3
  damping_mode: str = "relative"
  timesteps: tuple[int, ...] = tuple(range(0, 1000, 100))
  flips: tuple[int, ...] = (0, 1)
  flip_reduce: str = "sum"
  selection: str = "all"
  seed: int = 0
  batch_size: int = 8          # examples per jitted call (rounded up to the device count)
  block_rows: int = 2048       # projection rows generated at a time (see `project`)

  def __post_init__(self):
    checks = {"objective": (self.objective, OBJECTIVES),
              "projection": (self.projection, PROJECTIONS),
              "damping_mode": (self.damping_mode, ("relative", "absolute")),
              "flip_reduce": (self.flip_reduce, ("sum", "max"))}
    for field, (value, allowed) in checks.items():
      if value not in allowed:
        raise ValueError(f"{self.name}: {field} must be one of {allowed}, got {value!r}")
    if tuple(self.flips) not in ((0,), (1,), (0, 1)):
      raise ValueError(f"flips must be (0,), (1,) or (0, 1), got {self.flips}")
    if self.proj_dim < 1 or self.block_rows < 1 or self.batch_size < 1 or not self.timesteps:
      raise ValueError("proj_dim, block_rows, batch_size must be positive; timesteps non-empty")
    if self.damping < 0:
      raise ValueError("damping must be >= 0")
    object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
    object.__setattr__(self, "flips", tuple(int(f) for f in self.flips))

  # ------------------------------------------------------------------ plumbing ---

  def feature_settings(self) -> dict:
    """The settings Φ depends on (not batch_size or block_rows)."""
    return {"objective": self.objective, "proj_dim": self.proj_dim,
            "projection": self.projection, "timesteps": list(self.timesteps),
            "flips": list(self.flips), "selection": self.selection, "seed": self.seed}

  def _setup(self, context: interface.Context) -> dict:
    """Selected/rest weights on the mesh, the compiled programs, the global batch size."""
    context.require(self.name, "apply_fn", "params", "schedule")
    key = ("trak-setup", self.name, repr(sorted(self.feature_settings().items())),
           self.batch_size, self.block_rows)
    if key not in context.cache:
      mesh = context.mesh or parallel.make_mesh()
      selected, rest = selection.split(context.params,
                                       selection.select(context.params, self.selection))
      rep = parallel.replicated(mesh)
      draws, features = _programs(context.apply_fn, mesh, self,
                                  tuple(context.arrays["latents"].shape[2:]))
      context.cache[key] = {
          "mesh": mesh, "batch": parallel.pad_to_multiple(self.batch_size, mesh.size),
          "seed": jax.device_put(np.uint32(self.seed), rep),
          "weights": jax.device_put((selected, rest, context.schedule), rep),
          "draws": draws, "features": features}
    return context.cache[key]

  def _run(self, setup: dict, batch: dict[str, np.ndarray]) -> np.ndarray:
    """φ for the rows of a host batch (padded to the programs' batch size here)."""
    n = batch["index"].shape[0]
    size = setup["batch"]
    padded = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) if n < size else v
              for k, v in batch.items()}
    padded = parallel.shard_global_batch(padded, setup["mesh"])
    padded["caption"], padded["noise"] = setup["draws"](setup["seed"], padded)
    phi = setup["features"](*setup["weights"], setup["seed"], padded)
    return parallel.to_host(phi)[:n]

  # ------------------------------------------------------------------ features ---

  def training_features(self, context: interface.Context) -> np.ndarray:
    """Φ [N, F, k] float32 (F = len(flips)), cached per context (and on disk if asked)."""
    def compute():
      setup = self._setup(context)
      arrays = context.arrays
      n, flips = context.num_items, np.asarray(self.flips, np.int32)
      rows = np.repeat(np.arange(n), flips.size)
      flip = np.tile(flips, n)
      index = np.asarray(arrays["index"]).astype(np.int64)
      if index.size and (index.min() < 0 or index.max() >= 2**32):
        raise ValueError("dataset indices must fit in uint32 (they key the random draws)")
      out = np.empty((rows.size, self.proj_dim), np.float32)
      meter = scores_lib.ProgressMeter(self.name, rows.size, "examples")
      step = setup["batch"]
      for start in range(0, rows.size, step):
        r, f = rows[start:start + step], flip[start:start + step]
        batch = {"x0": np.asarray(arrays["latents"][r, f], np.float32),
                 "text": np.asarray(arrays["text_states"][r], np.float32),
                 "num_captions": np.asarray(arrays["num_captions"])[r].astype(np.int32),
                 "index": index[r].astype(np.uint32), "flip": f,
                 "domain": np.full(r.size, TRAIN, np.int32)}
        out[start:start + r.size] = self._run(setup, batch)
        if context.progress:
          context.progress(meter(start + r.size))
      return {"features": out.reshape(n, flips.size, self.proj_dim)}

    key = ("trak-features", repr(sorted(self.feature_settings().items())))
    disk_key = {"method": "trak-features", **self.feature_settings(),
                "model": context.model_digest() if context.cache_dir else None,
                "data": context.data_digest() if context.cache_dir else None,
                "schedule": scores_lib.params_fingerprint(
                    {"a": context.schedule.alphas_cumprod}) + context.schedule.prediction_type}
    return context.cached(key, compute, disk_name="trak-features",
                          disk_key=disk_key)["features"]

  def query_features(self, queries: list, context: interface.Context) -> np.ndarray:
    """φ_q [Q, k] float32 for queries (`generation.Query`: latent [h,w,c], text [L,D])."""
    setup = self._setup(context)
    text_shape = context.arrays["text_states"].shape[1:]  # [K, L, D]: the query fills caption 0
    out = []
    for start in range(0, len(queries), setup["batch"]):
      chunk = queries[start:start + setup["batch"]]
      text = np.zeros((len(chunk),) + tuple(text_shape), np.float32)
      for i, q in enumerate(chunk):
        text[i, 0] = np.asarray(q.text_states, np.float32)
      batch = {"x0": np.stack([np.asarray(q.latent, np.float32) for q in chunk]),
               "text": text, "num_captions": np.ones(len(chunk), np.int32),
               "index": np.zeros(len(chunk), np.uint32), "flip": np.zeros(len(chunk), np.int32),
               "domain": np.full(len(chunk), QUERY, np.int32)}
      out.append(self._run(setup, batch))
    return np.concatenate(out)

  # -------------------------------------------------------------------- scores ---

  def damping_value(self, gram: np.ndarray) -> float:
    if self.damping_mode == "absolute":
      return float(self.damping)
    return float(self.damping * np.trace(gram) / gram.shape[0])

  def _factor(self, context: interface.Context) -> dict:
    """Φ as [M, k] float64 and the Cholesky factor of ΦᵀΦ + λI, once per context."""
    key = ("trak-factor", repr(sorted(self.feature_settings().items())), self.damping,
           self.damping_mode)
    if key not in context.cache:
      phi = self.training_features(context).astype(np.float64)
      flat = phi.reshape(-1, phi.shape[-1])
      gram = flat.T @ flat
      lam = self.damping_value(gram)
      if lam == 0 and np.linalg.matrix_rank(gram) < gram.shape[0]:
        raise ValueError(f"{self.name}: ΦᵀΦ is singular (proj_dim {self.proj_dim} vs "
                         f"{flat.shape[0]} examples); use damping > 0")
      factor = scipy.linalg.cho_factor(gram + lam * np.eye(gram.shape[0]), lower=True)
      context.cache[key] = {"phi": flat, "factor": factor, "lam": lam,
                            "shape": phi.shape[:2]}
    return context.cache[key]

  def scores_from_features(self, query_features: np.ndarray,
                           context: interface.Context) -> np.ndarray:
    """[Q, N] from φ_q [Q, k]: Φ (ΦᵀΦ + λI)⁻¹ φ_q per example, reduced over flips."""
    f = self._factor(context)
    solved = scipy.linalg.cho_solve(f["factor"], np.asarray(query_features, np.float64).T)
    per_example = (f["phi"] @ solved).T.reshape((-1,) + tuple(f["shape"]))
    return per_example.sum(-1) if self.flip_reduce == "sum" else per_example.max(-1)

  def score_many(self, queries: list, context: interface.Context) -> np.ndarray:
    scores = self.scores_from_features(self.query_features(list(queries), context), context)
    return np.stack([self._check(s, context) for s in scores])

  def score(self, query: Any, context: interface.Context) -> np.ndarray:
    return self.score_many([query], context)[0]


@interface.register
@dataclasses.dataclass(frozen=True)
class DTRAK(TRAK):
  """D-TRAK: TRAK with the squared output norm ‖ε_θ‖² as the objective (module doc)."""
  name = "d-trak"
  objective: str = "output_norm"
