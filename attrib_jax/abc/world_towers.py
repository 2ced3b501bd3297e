"""In-world feature towers: a tiny CLIP and a tiny DINO-like ViT trained on the world itself.

No pretrained DINO or CLIP exists for the tiny world, and towers trained on photographs would
say little about 32x32 procedural scenes. So the same classes the real weights load into
(`models/clip_vision.py` CLIPVisionModelWithProjection, `models/clip_text.py`
CLIPTextModelWithProjection, `models/vit.py` ViTModel without pooler) are trained at tiny
sizes on the world's images, and written as transformers directories (config.json +
model.safetensors + preprocessor_config.json). `baselines.towers.load_tower("clip"|"dino", dir)`
and transformers' `from_pretrained` read them unchanged, so the tiny benchmark runs the code
paths real weights run.

- CLIP: image and text towers trained together with CLIP's symmetric InfoNCE loss and a
  learnable logit scale (initialised at 1 / 0.07, capped at 100 as CLIP does). Each step draws
  a batch of items without replacement and one of each item's captions at random. No image
  augmentation: the captions name position (left / right / top / bottom), colour and size, so a
  flip, crop or colour jitter would contradict them.
- DINO-like: a ViTModel trained self-supervised with SimCLR's NT-Xent loss between two
  augmented views of each image (random crop resized back, small contrast / brightness change,
  small Gaussian noise) through a 2-layer MLP head that is dropped when saving. Chosen over
  DINO's teacher-student distillation because a contrastive loss with in-batch negatives cannot
  collapse and needs no EMA / centering schedule to tune: it trains in a minute or two. The
  augmentations keep hue (colour is what the world's concepts are made of) and do not flip.
  The feature is the CLS token of the final layernorm, as DINO's.

Both read the images through the preprocessing their preprocessor_config.json describes
(normalised by the world's own per-channel mean and standard deviation), the augmentations act
on those preprocessed pixels. Training is pure and jitted (flax.linen + optax); the only side
effects are in `build_world_towers`, which writes each directory atomically and reuses a
finished one (after checking it was trained with the same settings and data).

Usage:
  settings = WorldTowerSettings.from_config({"clip_steps": 600})
  dirs = build_world_towers(out_dir, images, captions, tokenizer, settings, progress=print)
  tower = baselines.towers.load_tower("clip", dirs["clip"])
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from attrib_jax import config_blocks
from attrib_jax import io_utils
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.models import clip_text
from attrib_jax.models import clip_vision
from attrib_jax.models import image_processing
from attrib_jax.models import vit

Array = jax.Array
KINDS = ("clip", "clip_text", "dino")
RECORD_FILE = "world_tower.json"   # how a tower was trained (settings, data digest, losses)
RECORD_VERSION = 1
MAX_LOGIT_SCALE = 100.0            # CLIP clips its learnt logit scale at 100


@dataclasses.dataclass(frozen=True)
class WorldTowerSettings:
  """Sizes and training of the in-world towers; defaults for a 32x32 world, sized to train in
  minutes on 2 cores (timings: docs/abc.md, "In-world towers")."""
  # Image towers (CLIP vision and the ViT share these sizes).
  image_size: int = 32
  patch_size: int = 8
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  intermediate_size: int = 128
  projection_dim: int = 64        # CLIP's joint space; also the SimCLR head's output
  # CLIP's text tower.
  text_hidden_size: int = 64
  text_num_layers: int = 2
  text_max_length: int = 32       # positions; a longer caption is an error (never truncated)
  # Training (both towers).
  clip_steps: int = 250
  dino_steps: int = 200
  batch_size: int = 128
  learning_rate: float = 1e-3
  weight_decay: float = 0.05
  warmup_steps: int = 30
  grad_clip_norm: float = 1.0
  clip_init_temperature: float = 0.07
  dino_temperature: float = 0.1
  # DINO-like views (on the preprocessed pixels; colours in [0, 1] pixel units).
  crop_scale_min: float = 0.7     # a crop's side, as a fraction of the image's
  brightness: float = 0.1         # +- brightness shift and +- relative contrast change
  noise_std: float = 0.03
  channel_shuffle: float = 0.0    # probability that a view's RGB channels are permuted
  seed: int = 0

  def __post_init__(self):
    scores_lib.require_at_least(
        "WorldTowerSettings", 1, image_size=self.image_size, patch_size=self.patch_size,
        hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
        intermediate_size=self.intermediate_size, projection_dim=self.projection_dim,
        text_hidden_size=self.text_hidden_size, text_num_layers=self.text_num_layers,
        clip_steps=self.clip_steps, dino_steps=self.dino_steps)
    scores_lib.require_at_least("WorldTowerSettings", 2, batch_size=self.batch_size,
                                text_max_length=self.text_max_length)
    if not 0 <= self.channel_shuffle <= 1:
      raise ValueError(f"WorldTowerSettings.channel_shuffle must be in [0, 1], got "
                       f"{self.channel_shuffle}")
    scores_lib.require_at_least("WorldTowerSettings", 0, warmup_steps=self.warmup_steps,
                                weight_decay=self.weight_decay, brightness=self.brightness,
                                noise_std=self.noise_std)
    if self.image_size % self.patch_size:
      raise ValueError(f"WorldTowerSettings.patch_size {self.patch_size} does not divide "
                       f"image_size {self.image_size}")
    for name, width in (("hidden_size", self.hidden_size),
                        ("text_hidden_size", self.text_hidden_size)):
      if width % self.num_heads:
        raise ValueError(f"WorldTowerSettings.{name} {width} does not split into num_heads "
                         f"{self.num_heads}")
    for name in ("learning_rate", "clip_init_temperature", "dino_temperature", "grad_clip_norm"):
      if not getattr(self, name) > 0:
        raise ValueError(f"WorldTowerSettings.{name} must be > 0, got {getattr(self, name)}")
    if not 0 < self.crop_scale_min <= 1:
      raise ValueError(f"WorldTowerSettings.crop_scale_min must be in (0, 1], got "
                       f"{self.crop_scale_min}")

  @classmethod
  def from_config(cls, config: Any) -> "WorldTowerSettings":
    """From a config block (a ConfigDict or dict) of these fields; unknown keys are an error
    naming them."""
    return config_blocks.settings_from_block(cls, config, "world tower")


@dataclasses.dataclass(frozen=True)
class TowerProgress(scores_lib.Progress):
  """`scores.Progress` of a tower's training (stage "towers/clip" or "towers/dino", unit
  "steps") plus the step's loss."""
  loss: float = math.nan

  def __str__(self) -> str:
    return f"{super().__str__()}, loss {self.loss:.4f}"


# ------------------------------------------------------------------------------ configs ---

def channel_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of uint8 images in [0, 1] units (float64, rounded
  to 4 decimals: the normalisation constants the towers' preprocessor configs carry)."""
  x = np.asarray(images, np.float64).reshape(-1, 3) / 255.0
  mean, std = x.mean(0), x.std(0)
  if not (std > 0).all():
    raise ValueError(f"images have a constant channel (std {std}); cannot normalise")
  return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def clip_vision_config(s: WorldTowerSettings) -> dict[str, Any]:
  return clip_vision.CLIPVisionConfig(
      hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
      projection_dim=s.projection_dim, num_hidden_layers=s.num_layers,
      num_attention_heads=s.num_heads, image_size=s.image_size,
      patch_size=s.patch_size).to_transformers()


def clip_text_config(s: WorldTowerSettings, tokenizer) -> dict[str, Any]:
  """A CLIPTextModelWithProjection config for the world's tokenizer (every id it makes)."""
  ids = [*tokenizer.vocab.values(), *(t.id for t in tokenizer.added_tokens)]
  config = clip_text.CLIPTextConfig(
      vocab_size=max(ids) + 1, hidden_size=s.text_hidden_size,
      intermediate_size=2 * s.text_hidden_size, num_hidden_layers=s.text_num_layers,
      num_attention_heads=s.num_heads, max_position_embeddings=s.text_max_length,
      eos_token_id=tokenizer.eos_token_id).to_transformers()
  return {**config, "architectures": ["CLIPTextModelWithProjection"],
          "projection_dim": s.projection_dim, "bos_token_id": tokenizer.bos_token_id,
          "pad_token_id": tokenizer.pad_token_id}


def vit_config(s: WorldTowerSettings) -> dict[str, Any]:
  # layer_norm_eps 1e-6 as DINO's ViTs.
  return vit.ViTConfig(hidden_size=s.hidden_size, num_hidden_layers=s.num_layers,
                       num_attention_heads=s.num_heads, intermediate_size=s.intermediate_size,
                       layer_norm_eps=1e-6, image_size=s.image_size,
                       patch_size=s.patch_size).to_transformers()


def processor_config(kind: str, s: WorldTowerSettings, mean: Sequence[float],
                     std: Sequence[float]) -> dict[str, Any]:
  """preprocessor_config.json: CLIP's (shortest edge, bicubic, centre crop) or ViT's (fixed
  size, bilinear) with the world's normalisation. A world image of `image_size` passes the
  resize unchanged (PIL returns a copy at the same size)."""
  common = dict(do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(mean), image_std=list(std), do_convert_rgb=True)
  if kind == "clip":
    return dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": s.image_size},
                resample=3, do_center_crop=True,
                crop_size={"height": s.image_size, "width": s.image_size}, **common)
  return dict(image_processor_type="ViTImageProcessor",
              size={"height": s.image_size, "width": s.image_size}, resample=2, **common)


# ----------------------------------------------------------------------------- training ---

def _optimizer(s: WorldTowerSettings, num_steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, s.learning_rate,
                                                min(s.warmup_steps, num_steps - 1) or 0,
                                                max(num_steps, 1))
  # Decay matrices only (not biases, norms' scales or the logit scale), as CLIP's recipe.
  decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(s.grad_clip_norm),
                     optax.adamw(schedule, weight_decay=s.weight_decay, mask=decay))


def _normalized(x: Array) -> Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def clip_loss(image_embeds: Array, text_embeds: Array, log_scale: Array) -> Array:
  """CLIP's symmetric InfoNCE: mean of image->text and text->image cross-entropies, pair i
  being the positive of row i; the logit scale is exp(log_scale) capped at 100."""
  scale = jnp.exp(jnp.minimum(log_scale, math.log(MAX_LOGIT_SCALE)))
  logits = scale * _normalized(image_embeds) @ _normalized(text_embeds).T
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def nt_xent_loss(z1: Array, z2: Array, temperature: float) -> Array:
  """SimCLR's NT-Xent: each view's positive is the other view of its image, the negatives the
  2B - 2 other views of the batch."""
  z = _normalized(jnp.concatenate([z1, z2]))
  n = z1.shape[0]
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)   # never oneself
  labels = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class ProjectionHead(nn.Module):
  """SimCLR's MLP head on the CLS token (trained, then dropped: the ViT's CLS is the feature)."""
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Dense(self.out, name="fc2")(nn.gelu(nn.Dense(self.hidden, name="fc1")(x)))


def augment(key: Array, pixels: Array, s: WorldTowerSettings, std: Array) -> Array:
  """One random view of preprocessed pixels [B, H, W, 3]: a crop (side in [crop_scale_min, 1]
  of the image, anywhere inside it) resized back, contrast and brightness changes of up to
  +-`brightness`, Gaussian noise of `noise_std` ([0, 1] pixel units; `std` the normalisation's
  per-channel std converts them)."""
  batch, height, width, _ = pixels.shape
  k_side, k_offset, k_contrast, k_bright, k_noise = jax.random.split(key, 5)
  side = jax.random.uniform(k_side, (batch,), minval=s.crop_scale_min, maxval=1.0)
  offset = jax.random.uniform(k_offset, (batch, 2)) * (1 - side)[:, None] * jnp.array(
      [height, width], jnp.float32)

  def crop(image, side, offset):
    # scale_and_translate maps input coordinate u to output (u * scale + translation).
    return jax.image.scale_and_translate(image, image.shape, (0, 1), jnp.full((2,), 1 / side),
                                         -offset / side, method="linear", antialias=False)

  views = jax.vmap(crop)(pixels, side, offset)
  contrast = 1 + jax.random.uniform(k_contrast, (batch, 1, 1, 1), minval=-s.brightness,
                                    maxval=s.brightness)
  bright = jax.random.uniform(k_bright, (batch, 1, 1, 1), minval=-s.brightness,
                              maxval=s.brightness) / std
  noise = s.noise_std * jax.random.normal(k_noise, views.shape) / std
  views = views * contrast + bright + noise
  if s.channel_shuffle > 0:   # colour made unreliable in some views: shape must carry them
    k_swap, k_perm = jax.random.split(jax.random.fold_in(key, 1))
    perms = jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(k_perm, batch))
    shuffled = jnp.take_along_axis(views, perms[:, None, None, :], axis=-1)
    swap = jax.random.uniform(k_swap, (batch, 1, 1, 1)) < s.channel_shuffle
    views = jnp.where(swap, shuffled, views)
  return views


def fresh_params(abstract: Any, seed: Sequence[int]) -> dict:
  """Initial weights for an abstract parameter tree, drawn with numpy as the modules' own
  initialisers draw them: LayerNorm scales 1, biases 0, kernels U(+-1/sqrt(fan_in)) (torch's
  Linear / Conv default, `layers.TORCH_KERNEL_INIT`), embeddings, CLS and position tables
  N(0, 0.02^2). (A kernel at N(0, 0.02^2) as transformers initialises trained 3x slower here.)

  Not the modules' own `init`: on XLA:CPU compiling (or running op by op) an init costs as
  much as compiling the training step, for arrays numpy draws in milliseconds.
  """
  rng = np.random.default_rng(list(seed))
  flat = traverse_util.flatten_dict(abstract)
  out = {}
  for path in sorted(flat, key=lambda p: tuple(map(str, p))):
    leaf, name = flat[path], path[-1]
    if name == "scale":
      value = np.ones(leaf.shape)
    elif name == "bias":
      value = np.zeros(leaf.shape)
    elif name == "kernel":   # [..., fan_in, out] (dense) or [h, w, in, out] (conv)
      limit = 1 / math.sqrt(math.prod(leaf.shape[:-1]))
      value = rng.uniform(-limit, limit, leaf.shape)
    else:
      value = 0.02 * rng.standard_normal(leaf.shape)
    out[path] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(out)


@functools.lru_cache(maxsize=8)
def _clip_functions(s: WorldTowerSettings, text_config_json: str):
  """(init, step) of the CLIP pair; the step is jitted once per settings and tokenizer."""
  text_config = json.loads(text_config_json)
  vision_module = clip_vision.CLIPVisionModelWithProjection(
      clip_vision.CLIPVisionConfig.from_transformers(clip_vision_config(s)))
  text_module = clip_text.CLIPTextModelWithProjection(
      clip_text.CLIPTextConfig.from_transformers(text_config), s.projection_dim)
  optimizer = _optimizer(s, s.clip_steps)

  abstract = {"vision": clip_vision.abstract_params(vision_module),
              "text": jax.eval_shape(text_module.init, jax.random.key(0), jnp.zeros(
                  (1, text_module.config.max_position_embeddings), jnp.int32))["params"]}
  opt_init = jax.jit(optimizer.init)

  def init(seed):
    params = fresh_params(abstract, seed)
    params["log_scale"] = jnp.asarray(math.log(1 / s.clip_init_temperature), jnp.float32)
    return params, opt_init(params)

  def loss_fn(params, pixels, ids):
    image = vision_module.apply({"params": params["vision"]}, pixels).image_embeds
    text = text_module.apply({"params": params["text"]}, ids).text_embeds
    return clip_loss(image, text, params["log_scale"])

  def step(params, opt_state, key, pixels, ids, num_captions):
    k_items, k_captions = jax.random.split(key)
    rows = jax.random.choice(k_items, pixels.shape[0], (s.batch_size,), replace=False)
    which = jax.random.randint(k_captions, (s.batch_size,), 0, num_captions[rows])
    loss, grads = jax.value_and_grad(loss_fn)(params, pixels[rows], ids[rows, which])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return init, jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _dino_functions(s: WorldTowerSettings):
  """(init, step) of the ViT + SimCLR head; the step is jitted once per settings."""
  module = vit.ViTModel(vit.ViTConfig.from_transformers(vit_config(s)))
  head = ProjectionHead(2 * s.hidden_size, s.projection_dim)
  optimizer = _optimizer(s, s.dino_steps)

  abstract = {"vit": vit.abstract_params(module),
              "head": jax.eval_shape(head.init, jax.random.key(0),
                                     jnp.zeros((1, s.hidden_size)))["params"]}
  opt_init = jax.jit(optimizer.init)

  def init(seed):
    params = fresh_params(abstract, seed)
    return params, opt_init(params)

  def loss_fn(params, views):
    cls = module.apply({"params": params["vit"]}, views).cls_token
    z = head.apply({"params": params["head"]}, cls)
    return nt_xent_loss(*jnp.split(z, 2), s.dino_temperature)

  def step(params, opt_state, key, pixels, std):
    k_items, k_view1, k_view2 = jax.random.split(key, 3)
    rows = jax.random.choice(k_items, pixels.shape[0], (s.batch_size,), replace=False)
    batch = pixels[rows]
    views = jnp.concatenate([augment(k_view1, batch, s, std), augment(k_view2, batch, s, std)])
    loss, grads = jax.value_and_grad(loss_fn)(params, views)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return init, jax.jit(step, donate_argnums=(0, 1))


def _loop(stage: str, num_steps: int, step: Callable, key: Array,
          progress: Optional[Callable[[TowerProgress], None]]) -> np.ndarray:
  """Runs `step(key) -> loss` num_steps times; the losses [num_steps] (float64)."""
  meter = scores_lib.ProgressMeter(stage, num_steps, "steps")
  losses = np.zeros(num_steps)
  for i in range(num_steps):
    losses[i] = float(step(jax.random.fold_in(key, i)))
    if i == 0:  # the rate from here on: the first step's compilation would skew the ETA
      first, meter = meter, scores_lib.ProgressMeter(stage, num_steps, "steps", start=1)
    if progress is not None:
      p = first(1) if i == 0 else meter(i + 1)
      progress(TowerProgress(p.stage, p.done, p.total, p.unit, p.rate, p.eta_s, losses[i]))
  return losses


def _check_data(images: np.ndarray, captions: Sequence[Sequence[str]] | None,
                s: WorldTowerSettings) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"world towers: images must be uint8 [N, H, W, 3], got {images.dtype} "
                     f"{images.shape}")
  if images.shape[0] < s.batch_size:
    raise ValueError(f"world towers: {images.shape[0]} images, fewer than "
                     f"WorldTowerSettings.batch_size={s.batch_size}")
  if captions is not None:
    if len(captions) != images.shape[0]:
      raise ValueError(f"world towers: {images.shape[0]} images but {len(captions)} caption "
                       "lists")
    empty = [i for i, c in enumerate(captions) if not len(c)]
    if empty:
      raise ValueError(f"world towers: items {empty[:5]} have no caption")
  return images


def tokenize_captions(tokenizer, captions: Sequence[Sequence[str]], max_length: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """token ids [N, K, max_length] int32 (an item with fewer than K captions repeats its first)
  and num_captions [N]. A caption longer than max_length is an error naming it."""
  k = max(len(c) for c in captions)
  ids = np.zeros((len(captions), k, max_length), np.int32)
  for i, item in enumerate(captions):
    for text in item:
      tokenizer.check_fits(text, max_length)
    rows = tokenizer(list(item) + [item[0]] * (k - len(item)), max_length).input_ids
    ids[i] = rows
  return ids, np.array([len(c) for c in captions], np.int32)


def train_clip(images: np.ndarray, captions: Sequence[Sequence[str]], tokenizer,
               settings: WorldTowerSettings,
               progress: Optional[Callable[[TowerProgress], None]] = None) -> dict[str, Any]:
  """Trains the CLIP pair on (images uint8 [N, H, W, 3], captions: a list of strings per item).

  Returns:
    {"vision_params", "vision_config", "text_params", "text_config", "processor",
     "log_scale", "losses" [clip_steps]} (numpy; configs as config.json dicts).
  """
  s = settings
  images = _check_data(images, captions, s)
  mean, std = channel_statistics(images)
  processor = processor_config("clip", s, mean, std)
  pixels = jnp.asarray(image_processing.ImageProcessorConfig.from_transformers(processor)(images))
  ids, num_captions = tokenize_captions(tokenizer, captions, s.text_max_length)
  text_config = clip_text_config(s, tokenizer)
  init, step = _clip_functions(s, json.dumps(text_config, sort_keys=True))
  ids, num_captions = jnp.asarray(ids), jnp.asarray(num_captions)
  state = list(init((s.seed, 0)))
  key_steps = jax.random.fold_in(jax.random.key(s.seed), 0)

  def one(key):
    state[0], state[1], loss = step(state[0], state[1], key, pixels, ids, num_captions)
    return loss

  losses = _loop("towers/clip", s.clip_steps, one, key_steps, progress)
  params = jax.tree.map(np.asarray, state[0])
  return {"vision_params": params["vision"], "vision_config": clip_vision_config(s),
          "text_params": params["text"], "text_config": text_config, "processor": processor,
          "log_scale": float(params["log_scale"]), "losses": losses}


def train_dino(images: np.ndarray, settings: WorldTowerSettings,
               progress: Optional[Callable[[TowerProgress], None]] = None) -> dict[str, Any]:
  """Trains the DINO-like ViT (SimCLR views) on images uint8 [N, H, W, 3].

  Returns:
    {"params", "config", "processor", "losses" [dino_steps]} (the head is not returned).
  """
  s = settings
  images = _check_data(images, None, s)
  mean, std = channel_statistics(images)
  processor = processor_config("dino", s, mean, std)
  pixels = jnp.asarray(image_processing.ImageProcessorConfig.from_transformers(processor)(images))
  init, step = _dino_functions(s)
  state = list(init((s.seed, 1)))
  key_steps = jax.random.fold_in(jax.random.key(s.seed), 1)
  std = jnp.asarray(std, jnp.float32)

  def one(key):
    state[0], state[1], loss = step(state[0], state[1], key, pixels, std)
    return loss

  losses = _loop("towers/dino", s.dino_steps, one, key_steps, progress)
  return {"params": jax.tree.map(np.asarray, state[0]["vit"]), "config": vit_config(s),
          "processor": processor, "losses": losses}


# -------------------------------------------------------------------------- directories ---

def data_digest(images: np.ndarray, token_ids: np.ndarray | None = None) -> str:
  """What a tower was trained on: the images' bytes (and the captions' token ids)."""
  arrays = {"images": np.asarray(images)}
  if token_ids is not None:
    arrays["token_ids"] = np.asarray(token_ids)
  return scores_lib.params_fingerprint(arrays)


def _record(kind: str, settings: WorldTowerSettings, digest: str, losses: np.ndarray,
            seconds: float, **extra: Any) -> dict[str, Any]:
  every = max(1, len(losses) // 50)
  return {"version": RECORD_VERSION, "kind": kind, "settings": dataclasses.asdict(settings),
          "data": digest, "seconds": round(seconds, 2), "loss_first": float(losses[0]),
          "loss_last": float(losses[-1]),
          "losses": {str(i): round(float(losses[i]), 5) for i in range(0, len(losses), every)},
          **extra}


def _finished(directory: str, kind: str, settings: WorldTowerSettings, digest: str) -> bool:
  """Whether `directory` holds this tower already; one trained otherwise is an error naming
  what differs (it is never silently reused or overwritten)."""
  path = os.path.join(directory, RECORD_FILE)
  if not os.path.exists(path):
    if os.path.exists(directory) and os.listdir(directory):
      raise ValueError(f"{directory} exists but holds no {RECORD_FILE}: not an in-world tower "
                       "this code wrote; move it away or choose another out_dir")
    return False
  with open(path) as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise io_utils.CorruptFileError(f"{path} is damaged ({e}): delete {directory}") from e
  scores_lib.check_version(path, record, RECORD_VERSION, "world tower record")
  ours = dataclasses.asdict(settings)
  # Only the settings that shape this tower count (the DINO tower does not depend on the
  # text tower's width, for instance).
  relevant = _RELEVANT[kind]
  # A setting added after a tower was written counts as its default there.
  theirs = {f.name: f.default for f in dataclasses.fields(WorldTowerSettings)}
  theirs.update(record.get("settings", {}))
  differ = sorted(k for k in relevant if theirs.get(k) != ours[k])
  if differ:
    shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} now" for k in differ)
    raise ValueError(f"{directory} holds a {kind} tower trained with other settings ({shown}): "
                     "delete it to retrain, or choose another out_dir")
  if record.get("data") != digest:
    raise ValueError(f"{directory} holds a {kind} tower trained on other data (digest "
                     f"{record.get('data')} there, {digest} now): delete it to retrain, or "
                     "choose another out_dir")
  return True


_SHARED = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
           "intermediate_size", "projection_dim", "batch_size", "learning_rate", "weight_decay",
           "warmup_steps", "grad_clip_norm", "seed")
_CLIP_ONLY = ("text_hidden_size", "text_num_layers", "text_max_length", "clip_steps",
              "clip_init_temperature")
_RELEVANT = {
    "clip": _SHARED + _CLIP_ONLY, "clip_text": _SHARED + _CLIP_ONLY,
    "dino": _SHARED + ("dino_steps", "dino_temperature", "crop_scale_min", "brightness",
                       "noise_std", "channel_shuffle"),
}


def build_world_towers(out_dir: str, images: np.ndarray, captions: Sequence[Sequence[str]],
                       tokenizer, settings: WorldTowerSettings,
                       progress: Optional[Callable[[TowerProgress], None]] = None
                       ) -> dict[str, str]:
  """Trains (or reuses) the in-world towers and writes them as transformers directories.

  Args:
    out_dir: gets `clip/` (CLIPVisionModelWithProjection), `clip_text/`
      (CLIPTextModelWithProjection) and `dino/` (ViTModel), each with config.json,
      model.safetensors, world_tower.json (how it was trained) and, for the image towers,
      preprocessor_config.json.
    images: the world's training images, uint8 [N, H, W, 3].
    captions: one list of caption strings per image.
    tokenizer: the world's `models.tokenizer.CLIPTokenizer` (the base model's).
    settings: sizes and training.
    progress: receives a TowerProgress after every training step.

  Returns:
    {"clip": dir, "clip_text": dir, "dino": dir} (absolute paths).

  Raises:
    ValueError naming a tower in out_dir trained with other settings or data, bad images or
    captions, a caption longer than text_max_length.
  """
  s = settings
  out_dir = os.path.abspath(os.fspath(out_dir))
  images = _check_data(images, captions, s)
  dirs = {kind: os.path.join(out_dir, kind) for kind in KINDS}
  ids, _ = tokenize_captions(tokenizer, captions, s.text_max_length)
  clip_digest, dino_digest = data_digest(images, ids), data_digest(images)

  # The two CLIP halves are trained together: both must be there to be reused.
  have = [_finished(dirs[k], k, s, clip_digest) for k in ("clip_text", "clip")]
  if not all(have):
    began = time.perf_counter()
    out = train_clip(images, captions, tokenizer, s, progress)
    seconds = time.perf_counter() - began
    extra = {"logit_scale": math.exp(min(out["log_scale"], math.log(MAX_LOGIT_SCALE)))}
    with io_utils.atomic_directory(dirs["clip_text"]) as staging:
      clip_text.save_clip_text_with_projection(staging, out["text_params"], out["text_config"])
      io_utils.atomic_write_json(os.path.join(staging, RECORD_FILE), _record(
          "clip_text", s, clip_digest, out["losses"], seconds, **extra))
    with io_utils.atomic_directory(dirs["clip"]) as staging:
      clip_vision.save_clip_vision(staging, out["vision_params"], out["vision_config"])
      image_processing.save_image_processor(staging, out["processor"])
      io_utils.atomic_write_json(os.path.join(staging, RECORD_FILE), _record(
          "clip", s, clip_digest, out["losses"], seconds, **extra))
  if not _finished(dirs["dino"], "dino", s, dino_digest):
    began = time.perf_counter()
    out = train_dino(images, s, progress)
    seconds = time.perf_counter() - began
    with io_utils.atomic_directory(dirs["dino"]) as staging:
      vit.save_vit(staging, out["params"], out["config"])
      image_processing.save_image_processor(staging, out["processor"])
      io_utils.atomic_write_json(os.path.join(staging, RECORD_FILE), _record(
          "dino", s, dino_digest, out["losses"], seconds))
  return dirs


def read_record(directory: str) -> dict[str, Any]:
  """The world_tower.json of a tower directory (how it was trained, its losses and time)."""
  with open(os.path.join(os.fspath(directory), RECORD_FILE)) as f:
    return json.load(f)


def text_embedder(directory: str, tokenizer, *, batch_size: int = 256
                  ) -> Callable[[Sequence[str]], np.ndarray]:
  """texts -> text_embeds [n, projection_dim] of a clip_text directory (not normalised)."""
  module, params, config = clip_text.load_clip_text_with_projection(directory)
  length = config["max_position_embeddings"]
  apply = jax.jit(lambda p, ids: module.apply({"params": p}, ids).text_embeds)

  def embed(texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    for t in texts:
      tokenizer.check_fits(t, length)
    return np.concatenate([np.asarray(apply(params, tokenizer(texts[i:i + batch_size],
                                                              length).input_ids))
                           for i in range(0, len(texts), batch_size)])

  return embed
