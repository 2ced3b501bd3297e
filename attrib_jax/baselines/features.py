"""Feature-space cosine similarity: the DINO / CLIP baselines, with a pluggable extractor.

score(item) = max over the item's flips of cos(f(query image), f(training image, flipped or
not)), with f an `Extractor`: uint8 images [n, H, W, 3] -> features [n, d]. The max over flips
matches AbU's (either view may be what the model learnt from). A zero feature vector has
cosine 0 with everything.

No pretrained DINO or CLIP exists in this environment, so for the tiny world this module
offers two honest extractors (and any callable can be passed instead):

  "unet" (default): the trained diffusion model's own activations. The image, encoded to the
    model's input by `context.encode_images` (VAE / pixel codec), goes in at a fixed
    timestep t (default 100) as the *mean* of q(x_t | x_0), sqrt(ᾱ_t)·x_0 (no noise, so the
    features are deterministic), conditioned on the empty prompt (so only the image speaks), and
    the output of one linen submodule is read (default `mid_block`, the UNet's bottleneck) and
    flattened (or mean-pooled). These are features learnt on exactly this world's images: the
    closest available stand-in for a self-supervised image encoder, and a "model feature"
    baseline in its own right. It reads the model under evaluation, so every retrained model
    gets its own features.
  "random-conv": two fixed random 3x3 stride-2 convolutions with ReLU (He-scaled Gaussian
    weights from numpy's PCG64 and a seed), average-pooled to a grid×grid map and flattened.
    Model-free and cheap; a local-texture descriptor barely above pixels. It is the one to use
    where features must not depend on the model (e.g. comparing images across retrained
    models).

Training-set features are computed once per context (in chunks), L2-normalised and cached
when they fit in `cache_bytes`; otherwise they are streamed for every query. `EmbeddingCosine`
is the shared machinery; `pixel.PixelCosine` is the same thing with the identity extractor.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax.baselines import interface
from attrib_jax.diffusion.schedules import NoiseSchedule, add_noise

Extractor = Callable[[np.ndarray], np.ndarray]


def pixels_to_input(images: np.ndarray) -> np.ndarray:
  """uint8 [n, H, W, 3] -> float32 in [-1, 1]: a pixel-space model's input (the tiny world)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def normalize_rows(x: np.ndarray) -> np.ndarray:
  """Unit L2 norm along the last axis, in float32. A zero or non-finite row is an error: its
  cosine with anything is undefined, and scoring it 0.0 would rank it as if measured."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
  bad = ~(np.isfinite(norm) & (norm > 0))
  if bad.any():
    rows = np.flatnonzero(bad.reshape(-1))
    raise ValueError(f"{rows.size} feature vectors have norm zero or are not finite (rows "
                     f"{rows[:5].tolist()} of {bad.size}): the feature extractor gives nothing "
                     "to compare for those images (blank images, or a broken extractor)")
  return (x / norm).astype(np.float32)


# ----------------------------------------------------------------------------- base ---

@dataclasses.dataclass(frozen=True)
class EmbeddingCosine(interface.Method):
  """Cosine between the query's embedding and each training image's, max over flips."""
  flips: tuple[int, ...] = (0, 1)
  chunk_size: int = 256          # training images embedded at a time
  cache_bytes: int = 1 << 30     # keep the training embeddings in memory up to this size

  def __post_init__(self):
    if tuple(self.flips) not in ((0,), (1,), (0, 1)):
      raise ValueError(f"flips must be (0,), (1,) or (0, 1), got {self.flips}")
    if self.chunk_size < 1:
      raise ValueError("chunk_size must be positive")

  @abc.abstractmethod
  def embed(self, images: np.ndarray, context: interface.Context) -> np.ndarray:
    """uint8 [n, H, W, 3] -> [n, d] (not normalised)."""

  def disk_key(self, context: interface.Context) -> Any:
    """What the training embeddings depend on, for the disk cache (None: memory only)."""
    return None

  def memory_key(self) -> tuple:
    return (self.name,) + tuple((f.name, repr(getattr(self, f.name)))
                                for f in dataclasses.fields(self)
                                if f.name not in ("chunk_size", "cache_bytes"))

  def _train_chunk(self, rows: np.ndarray, context: interface.Context) -> np.ndarray:
    """[n, F, d] normalised embeddings of the rows' flips."""
    images = context.training_images(rows)
    views = [images if f == 0 else images[:, :, ::-1] for f in self.flips]
    out = [normalize_rows(self.embed(v, context)) for v in views]
    return np.stack(out, axis=1)

  def _chunks(self, context: interface.Context):
    n = context.num_items
    for start in range(0, n, self.chunk_size):
      rows = np.arange(start, min(start + self.chunk_size, n))
      yield rows, self._train_chunk(rows, context)

  def train_embeddings(self, context: interface.Context) -> np.ndarray | None:
    """[N, F, d] cached embeddings, or None when they exceed `cache_bytes` (then streamed)."""
    key = ("embeddings",) + self.memory_key()
    if key not in context.cache:
      d = self.embed(context.training_images(np.arange(1)), context).shape[-1]
      if context.num_items * len(self.flips) * d * 4 > self.cache_bytes:
        return None
    compute = lambda: {"e": np.concatenate([c for _, c in self._chunks(context)])}
    disk_key = self.disk_key(context)
    return context.cached(key, compute, disk_name=self.name if disk_key else None,
                          disk_key=disk_key)["e"]

  def score(self, query: Any, context: interface.Context) -> np.ndarray:
    q = normalize_rows(self.embed(np.asarray(query.image)[None], context))[0]
    train = self.train_embeddings(context)
    if train is not None:
      scores = (train @ q).max(axis=1)
    else:
      scores = np.empty(context.num_items, np.float64)
      for rows, chunk in self._chunks(context):
        scores[rows] = (chunk @ q).max(axis=1)
    return self._check(scores, context)


# ----------------------------------------------------------------------- extractors ---

def unet_feature_fn(module: Any, schedule: NoiseSchedule, text_states: np.ndarray, *,
                    layer: str = "mid_block", timestep: int = 100, pool: str = "flatten"
                    ) -> Callable[[Any, jax.Array], jax.Array]:
  """The pure map (params, model inputs x0 [n, h, w, c]) -> [n, d] features of `unet_features`,
  unjitted, so that a caller can fold it into a larger program (the FastGDA query encoder)."""
  if pool not in ("flatten", "mean"):
    raise ValueError(f"pool must be 'flatten' or 'mean', got {pool!r}")
  path = tuple(layer.split("/"))
  text_states = jnp.asarray(text_states, jnp.float32)

  def capture(mdl, method_name):
    return method_name == "__call__" and mdl.path == path

  def run(params, schedule, x0):
    t = jnp.full((x0.shape[0],), timestep, jnp.int32)
    x_t = add_noise(schedule, x0, jnp.zeros_like(x0), t)
    text = jnp.broadcast_to(text_states, (x0.shape[0],) + text_states.shape)
    _, state = module.apply({"params": params}, x_t, t, text, capture_intermediates=capture)
    found = state.get("intermediates", {})
    for name in path:
      if name not in found:
        raise ValueError(f"the model has no submodule {layer!r} to read features from")
      found = found[name]
    h = found["__call__"][0].astype(jnp.float32)
    return h.reshape(h.shape[0], -1) if pool == "flatten" else jnp.mean(
        h.reshape(h.shape[0], -1, h.shape[-1]), axis=1)

  return run


def unet_features(module: Any, params: Any, schedule: NoiseSchedule, text_states: np.ndarray,
                  *, layer: str = "mid_block", timestep: int = 100, pool: str = "flatten",
                  batch_size: int = 64,
                  to_input: Callable[[np.ndarray], np.ndarray] = pixels_to_input,
                  input_shape: tuple[int, ...] | None = None) -> Extractor:
  """An extractor reading the output of `module`'s submodule `layer` (a '/' path).

  Args:
    module, params: the linen denoiser (`module.apply({'params': params}, x, t, text)`).
    schedule: its noise schedule (the input is sqrt(ᾱ_t)·x_0 at t = `timestep`).
    text_states: [L, D] conditioning, normally the empty prompt's states.
    layer: submodule path, e.g. "mid_block" or "down_blocks_1/attentions_0".
    pool: "flatten" keeps the spatial layout (the tiny world's captions name positions);
      "mean" averages over space (a global descriptor, like a CLS token).
    to_input: uint8 images -> the model's input (pixels in [-1, 1] for a pixel-space model, or
      its codec's folding; a VAE encoder for a latent model).
    input_shape: the model's [h, w, c]; if given, images that encode to another shape are an
      error naming the fix, rather than an obscure one from inside the network.
  """
  run = jax.jit(unet_feature_fn(module, schedule, text_states, layer=layer, timestep=timestep,
                                pool=pool))

  def extract(images: np.ndarray) -> np.ndarray:
    x0 = np.asarray(to_input(images), np.float32)
    if input_shape is not None and tuple(x0.shape[1:]) != tuple(input_shape):
      raise ValueError(f"images {images.shape[1:]} encode to {x0.shape[1:]}, the model takes "
                       f"{tuple(input_shape)}: set context.encode_images (the VAE encoder or "
                       "the pixel codec)")
    out = [np.asarray(run(params, schedule, x0[i:i + batch_size]))
           for i in range(0, x0.shape[0], batch_size)]
    return np.concatenate(out)

  return extract


@functools.partial(jax.jit, static_argnames="grid")
def _random_conv_apply(w1: jax.Array, w2: jax.Array, x: jax.Array, grid: int) -> jax.Array:
  conv = lambda h, w: jax.lax.conv_general_dilated(
      h, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  h = jax.nn.relu(conv(jax.nn.relu(conv(x, w1)), w2))
  n, height, width, c = h.shape
  if height % grid or width % grid:
    raise ValueError(f"random-conv: a {height}x{width} map does not pool to {grid}x{grid}")
  h = h.reshape(n, grid, height // grid, grid, width // grid, c).mean(axis=(2, 4))
  return h.reshape(n, -1)


def random_conv_features(*, seed: int = 0, widths: tuple[int, int] = (32, 64), grid: int = 4,
                         batch_size: int = 256) -> Extractor:
  """A fixed random two-layer conv net (see module doc); features [n, grid·grid·widths[1]]."""
  rng = np.random.default_rng(seed)  # numpy: fixed weights need no compiled threefry
  w1 = (rng.standard_normal((3, 3, 3, widths[0])) * np.sqrt(2.0 / 27)).astype(np.float32)
  w2 = (rng.standard_normal((3, 3, widths[0], widths[1]))
        * np.sqrt(2.0 / (9 * widths[0]))).astype(np.float32)

  def extract(images: np.ndarray) -> np.ndarray:
    x = pixels_to_input(images)
    return np.concatenate([np.asarray(_random_conv_apply(w1, w2, x[i:i + batch_size], grid))
                           for i in range(0, x.shape[0], batch_size)])

  return extract


def _build_unet(context: interface.Context, **config) -> Extractor:
  context.require("features/unet", "module", "params", "schedule")
  if "text_states" not in config:
    if "null_text_states" not in context.arrays:
      raise ValueError("the 'unet' extractor conditions on the empty prompt: context.arrays "
                       "needs 'null_text_states' (or pass extractor_config={'text_states': ...})")
    config["text_states"] = np.asarray(context.arrays["null_text_states"])
  config.setdefault("to_input", context.encode_images or pixels_to_input)
  config.setdefault("input_shape", tuple(context.arrays["latents"].shape[2:]))
  return unet_features(context.module, context.params, context.schedule, **config)


def _build_random_conv(context: interface.Context, **config) -> Extractor:
  del context
  return random_conv_features(**config)


# name -> (builder(context, **extractor_config), whether the features depend on the model)
EXTRACTORS: dict[str, tuple[Callable[..., Extractor], bool]] = {
    "unet": (_build_unet, True),
    "random-conv": (_build_random_conv, False),
}


# --------------------------------------------------------------------------- method ---

@interface.register
@dataclasses.dataclass(frozen=True)
class FeatureCosine(EmbeddingCosine):
  """Cosine similarity of extractor features, max over the training image's flips.

  `extractor` is a name in `EXTRACTORS` (built from the context with `extractor_config`) or a
  callable uint8 [n, H, W, 3] -> [n, d].
  """
  name = "features"
  extractor: str | Extractor = "unet"
  extractor_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.extractor, str) and self.extractor not in EXTRACTORS:
      raise ValueError(f"unknown extractor {self.extractor!r}; available: {sorted(EXTRACTORS)}"
                       " or a callable")

  def _extractor(self, context: interface.Context) -> Extractor:
    if callable(self.extractor):
      return self.extractor
    key = ("extractor", self.extractor, repr(sorted(self.extractor_config.items())))
    if key not in context.cache:
      build, _ = EXTRACTORS[self.extractor]
      context.cache[key] = build(context, **dict(self.extractor_config))
    return context.cache[key]

  def embed(self, images: np.ndarray, context: interface.Context) -> np.ndarray:
    features = np.asarray(self._extractor(context)(images))
    if features.ndim != 2 or features.shape[0] != images.shape[0]:
      raise ValueError(f"the extractor returned {features.shape} for {images.shape[0]} images; "
                       "expected [n, d]")
    return features

  def disk_key(self, context: interface.Context) -> Any:
    if callable(self.extractor) or any(callable(v) or isinstance(v, np.ndarray)
                                       for v in self.extractor_config.values()):
      return None  # a callable's identity cannot be keyed across runs
    _, uses_model = EXTRACTORS[self.extractor]
    return {"method": self.name, "extractor": self.extractor,
            "config": sorted(self.extractor_config.items()), "flips": list(self.flips),
            "data": context.data_digest(),
            "model": context.model_digest() if uses_model else None}
