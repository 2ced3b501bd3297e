"""One interface for every attribution method: `method.score(query, context) -> scores [N]`.

A method scores every training item for one query: a float64 vector aligned with the rows of
`context.arrays` (row i is the item whose stable dataset index is `arrays['index'][i]`), higher
meaning more influential. Rankings, top-K removal and the metrics (`attribution.scores`) read
that vector and nothing else, so AbU, the baselines and any later method are interchangeable in
the evaluation.

`Context` bundles what a method may need about the model and its training set; each method
names the fields it reads and `Context.require` fails with the method's name when one is
missing. A method's expensive per-model work (training-set features, a Gram factorisation) is
computed once per context and reused for every query through `Context.cached`; with `cache_dir`
set it is also written to disk under a key of the model's weights, the data's indices and the
method's settings, so a rerun (or a resumed evaluation) does not recompute it.

Methods are frozen dataclasses whose fields are their settings. `make_method(name, **config)`
builds one from the registry and refuses unknown names and unknown settings by name; a method
defined elsewhere joins the registry with the `register` decorator.
"""
from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from attrib_jax import io_utils
from attrib_jax.attribution import scores as scores_lib

# images getter: rows (positions in `arrays`) -> uint8 [n, H, W, 3]
ImageSource = np.ndarray | Callable[[np.ndarray], np.ndarray]
# captions getter: rows -> one list of caption strings per row
CaptionSource = Sequence[Sequence[str]] | Callable[[np.ndarray], Sequence[Sequence[str]]]


@dataclasses.dataclass(eq=False)
class Context:
  """The trained model and its training set, as attribution methods see them.

  Attributes:
    arrays: precomputed arrays (`data.precompute` layout): `latents` [N, 2, h, w, c]
      (unflipped, flipped), `text_states` [N, K, L, D], `num_captions` [N], `index` [N], and
      optionally `null_text_states` [L, D].
    images: the training images, uint8 [N, H, W, 3] (unflipped), or a getter
      `rows -> uint8 [n, H, W, 3]` for sets too large to hold in memory.
    apply_fn: the denoiser, `apply_fn(params, x_t, t, text_states) -> prediction`.
    params: its trained weights θ0.
    schedule: the noise schedule it was trained with.
    mesh: the 1-D `data` mesh (`attrib_jax.parallel`) for device-parallel methods; None means
      every device.
    module: the linen module behind `apply_fn` (`module.apply({'params': p}, x, t, text)`),
      needed only by extractors that read intermediate activations.
    encode_images: uint8 images [n, H, W, 3] -> the model's input [n, h, w, c] (the VAE
      encoder, or the pixel codec's space-to-depth), for extractors that run the model on
      images; None means the pixels in [-1, 1] unchanged (a pixel-space model with no codec).
    captions: the training captions, one list of strings per row, or a getter
      `rows -> lists`, for the text-only baselines.
    cache_dir: where methods may persist per-model precomputations (None: memory only).
    progress: optional callback receiving `attribution.scores.Progress` during long passes.
    cache: the in-memory cache (filled by `cached`).
  """
  arrays: Mapping[str, Any]
  images: ImageSource | None = None
  apply_fn: Callable | None = None
  params: Any = None
  schedule: Any = None
  mesh: Any = None
  module: Any = None
  encode_images: Callable[[np.ndarray], Any] | None = None
  captions: CaptionSource | None = None
  cache_dir: str | None = None
  progress: Callable[[scores_lib.Progress], None] | None = None
  cache: dict = dataclasses.field(default_factory=dict)

  @property
  def num_items(self) -> int:
    return len(self.arrays["index"])

  def require(self, method: str, *fields: str) -> None:
    """Raises ValueError naming every field in `fields` that is None for `method`."""
    missing = [f for f in fields if getattr(self, f) is None]
    if missing:
      raise ValueError(f"method {method!r} needs context field(s) {missing}")

  def training_images(self, rows: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, 3] for the given rows (positions in `arrays`), unflipped."""
    if self.images is None:
      raise ValueError("this method needs the training images (context.images)")
    rows = np.asarray(rows)
    images = self.images[rows] if isinstance(self.images, np.ndarray) else self.images(rows)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"training images must be uint8 [n, H, W, 3], got {images.dtype} "
                       f"{images.shape}")
    if images.shape[0] != rows.size:
      raise ValueError(f"asked for {rows.size} training images, got {images.shape[0]}")
    return images

  def item_captions(self, rows: np.ndarray) -> list[list[str]]:
    """The caption strings of the given rows (positions in `arrays`)."""
    if self.captions is None:
      raise ValueError("this method needs the training captions (context.captions)")
    rows = np.asarray(rows)
    if callable(self.captions):
      out = [list(c) for c in self.captions(rows)]
    else:
      out = [list(self.captions[int(r)]) for r in rows]
    if len(out) != rows.size:
      raise ValueError(f"asked for the captions of {rows.size} items, got {len(out)}")
    return out

  def data_digest(self) -> str:
    """Digest of which items (and in which order) the arrays hold."""
    key = self.cache.get(("__data_digest__",))
    if key is None:
      index = np.ascontiguousarray(np.asarray(self.arrays["index"], np.int64))
      key = scores_lib.settings_digest({"n": int(index.size),
                                        "index": scores_lib.params_fingerprint({"i": index})})
      self.cache[("__data_digest__",)] = key
    return key

  def model_digest(self) -> str:
    """`params_fingerprint` of the weights, computed once per context."""
    key = self.cache.get(("__model_digest__",))
    if key is None:
      key = scores_lib.params_fingerprint(self.params)
      self.cache[("__model_digest__",)] = key
    return key

  def cached(self, key: tuple, compute: Callable[[], dict[str, np.ndarray]], *,
             disk_name: str | None = None, disk_key: Any = None) -> dict[str, np.ndarray]:
    """`compute()`'s arrays, computed once per `key` in this context.

    With `cache_dir` set and `disk_name` given, the arrays are also stored in
    `{cache_dir}/{disk_name}-{digest}.npz` where digest hashes `disk_key` (which must say
    everything the arrays depend on: model, data, settings); a later context finds them there.
    """
    if key in self.cache:
      return self.cache[key]
    path = None
    if self.cache_dir and disk_name:
      digest = scores_lib.settings_digest(disk_key)
      path = os.path.join(self.cache_dir, f"{disk_name}-{digest}.npz")
      if os.path.exists(path):
        with io_utils.open_npz(path) as data:
          self.cache[key] = {k: data[k] for k in data.files}
        return self.cache[key]
    value = compute()
    if path:
      scores_lib.atomic_savez(path, **value)
    self.cache[key] = value
    return value


class Method(abc.ABC):
  """An attribution method: settings (dataclass fields) plus `score`.

  Subclasses are frozen dataclasses with a class-level `name` (the registry name).
  """
  name: ClassVar[str]

  @abc.abstractmethod
  def score(self, query: Any, context: Context) -> np.ndarray:
    """Scores [N] float64 for `query` (a `generation.Query`), aligned with
    `context.arrays['index']`; higher = more influential."""

  def score_many(self, queries: list, context: Context) -> np.ndarray:
    """[Q, N]: `score` for each query (methods may override with a batched version)."""
    return np.stack([self.score(q, context) for q in queries])

  def config(self) -> dict:
    """The method's name and settings, JSON-able (callables by qualified name)."""
    out = {"method": self.name}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if callable(value):
        value = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', value)}"
      out[f.name] = value
    return out

  def _check(self, scores: np.ndarray, context: Context) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    if scores.shape != (context.num_items,):
      raise ValueError(f"{self.name} produced scores {scores.shape}, expected "
                       f"({context.num_items},)")
    if not np.isfinite(scores).all():
      raise ValueError(f"{self.name} produced non-finite scores")
    return scores


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
  """Class decorator: adds a Method subclass to the registry under `cls.name`."""
  name = getattr(cls, "name", None)
  if not isinstance(name, str) or not name:
    raise ValueError(f"{cls.__qualname__} needs a class attribute `name`")
  if name in _REGISTRY and _REGISTRY[name] is not cls:
    raise ValueError(f"method name {name!r} is already registered by "
                     f"{_REGISTRY[name].__qualname__}")
  _REGISTRY[name] = cls
  return cls


def _load_builtins() -> None:
  import attrib_jax.baselines  # noqa: F401  (registers the built-in methods)


def available_methods() -> list[str]:
  _load_builtins()
  return sorted(_REGISTRY)


def make_method(name: str, **config: Any) -> Method:
  """The registered method `name` with `config` as its settings.

  Raises:
    ValueError: for an unknown method name or a setting the method does not have (named).
  """
  _load_builtins()
  if name not in _REGISTRY:
    raise ValueError(f"unknown attribution method {name!r}; available: {sorted(_REGISTRY)}")
  cls = _REGISTRY[name]
  known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(f"method {name!r} has no setting(s) {unknown}; its settings: "
                     f"{sorted(known)}")
  return cls(**config)
