"""The AbC feature baselines on real towers: `dino` (ViT CLS cosine) and `clip` (image_embeds cosine).

score(item) = max over flips of cos(f(query image), f(training image)), with f the CLS token of
a transformers ViTModel directory (DINO ViT-B/16) or the image_embeds of a
CLIPVisionModelWithProjection directory (CLIP ViT-B/32), after that directory's
preprocessor_config.json. No such weights ship here, so the method needs the user's directory:

  make_method("dino", weights="/path/to/dino-vitb16")
  # launch.evaluate: evaluation.method_configs={"dino": {"weights": "/path"}}
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np

from attrib_jax.attribution import scores as scores_lib
from attrib_jax.baselines import features
from attrib_jax.baselines import interface
from attrib_jax.models import clip_vision
from attrib_jax.models import image_processing
from attrib_jax.models import vit

# name -> (loader, the output field compared, what the directory must hold)
TOWERS: dict[str, tuple[Callable, str, str]] = {
    "dino": (vit.load_vit, "cls_token", "a transformers ViTModel (e.g. DINO ViT-B/16)"),
    "clip": (clip_vision.load_clip_vision, "image_embeds",
             "a transformers CLIPVisionModelWithProjection (e.g. CLIP ViT-B/32)"),
}


@dataclasses.dataclass(frozen=True)
class Tower:
  """A loaded tower: uint8 images [n, H, W, 3] -> features [n, d]."""
  kind: str
  directory: str
  fingerprint: str
  run: Callable[[np.ndarray], np.ndarray]
  batch_size: int = 64

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    return np.concatenate([self.run(images[i:i + self.batch_size])
                           for i in range(0, images.shape[0], self.batch_size)])


def load_tower(kind: str, directory: str, *, batch_size: int = 64) -> Tower:
  """Loads a `dino` / `clip` tower directory (weights, config.json, preprocessor_config.json).

  Raises:
    ValueError for an unknown kind; FileNotFoundError, UnsupportedConfigError and
    WeightMismatchError naming what is missing or wrong in the directory.
  """
  if kind not in TOWERS:
    raise ValueError(f"unknown feature tower {kind!r}; available: {sorted(TOWERS)}")
  load, field, _ = TOWERS[kind]
  directory = os.path.abspath(os.fspath(directory))
  module, params, _ = load(directory)
  preprocess = image_processing.read_image_processor(directory)
  apply = jax.jit(lambda p, x: getattr(module.apply({"params": p}, x), field))

  def run(images: np.ndarray) -> np.ndarray:
    return np.asarray(apply(params, preprocess(images)))

  return Tower(kind, directory, scores_lib.params_fingerprint(params), run, batch_size)


@dataclasses.dataclass(frozen=True)
class _TowerCosine(features.EmbeddingCosine):
  weights: str | None = None   # the tower's transformers directory (required)
  batch_size: int = 64

  def __post_init__(self):
    super().__post_init__()
    if not self.weights:
      raise ValueError(
          f"method {self.name!r} needs a weights directory holding {TOWERS[self.name][2]} "
          "(config.json, model.safetensors, preprocessor_config.json): make_method("
          f"{self.name!r}, weights='/path') or evaluation.method_configs={{{self.name!r}: "
          "{'weights': '/path'}}; no pretrained weights ship with this environment")

  def tower(self, context: interface.Context) -> Tower:
    key = ("tower", self.name, os.path.abspath(self.weights), self.batch_size)
    if key not in context.cache:
      context.cache[key] = load_tower(self.name, self.weights, batch_size=self.batch_size)
    return context.cache[key]

  def embed(self, images: np.ndarray, context: interface.Context) -> np.ndarray:
    return self.tower(context)(images)

  def disk_key(self, context: interface.Context) -> Any:
    tower = self.tower(context)
    return {"method": self.name, "weights": tower.directory, "tower": tower.fingerprint,
            "flips": list(self.flips), "data": context.data_digest()}


@interface.register
@dataclasses.dataclass(frozen=True)
class DinoCosine(_TowerCosine):
  """Cosine of a ViT's CLS token (AbC's DINO ViT-B/16 baseline)."""
  name = "dino"


@interface.register
@dataclasses.dataclass(frozen=True)
class ClipCosine(_TowerCosine):
  """Cosine of a CLIP vision tower's image_embeds (AbC's CLIP ViT-B/32 baseline)."""
  name = "clip"


def delta_g_features(feature_extractor: dict, method_configs: dict
                     ) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
  """The counterfactual evaluation's ΔG feature function and its key (part of each cell's
  fingerprint, so a change of extractor re-measures the cells).

  `feature_extractor={"clip": "/dir"}` names a CLIP tower; without it, a configured `clip`
  method's weights (`method_configs["clip"]["weights"]`) are used; otherwise the random-conv
  features with `feature_extractor` as their settings.
  """
  settings = dict(feature_extractor)
  directory = settings.pop("clip", None)
  if directory is not None and settings:
    raise ValueError(f"evaluation.feature_extractor: 'clip' takes no other settings, got "
                     f"{sorted(settings)}")
  if directory is None:
    directory = dict(method_configs.get("clip", {})).get("weights")
    if directory is None:
      return features.random_conv_features(**settings), settings
  tower = load_tower("clip", directory)
  return tower, {"clip": tower.directory, "tower": tower.fingerprint}
