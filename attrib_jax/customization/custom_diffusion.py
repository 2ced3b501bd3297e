"""Custom Diffusion (Kumari et al. 2023): customize a text-to-image model toward an exemplar set.

Trains only the UNet's cross-attention K/V projections and the embedding row of a new modifier
token (`<new1>`), on the exemplars captioned with the token, while regularisation items (drawn
from the model's training set, with their own captions) keep the rest of the model's prompts
as they were. The loss is the standard per-example diffusion loss (`diffusion.loss`): each step
averages it over a batch of exemplars plus `prior_loss_weight` times its mean over a batch of
regularisation items, as Custom Diffusion's prior preservation does.

The new row starts as the initializer word's embedding (Custom Diffusion's default "ktn", a
rare single token of CLIP's vocabulary); a word the tokenizer splits into several tokens starts
as the mean of their rows. Only that row gets gradient: the table's other rows are frozen
inputs of the step, the row is a separate trainable leaf inserted at its id.

`customize` returns a `delta.CustomDelta`; `delta.apply_delta` turns it into a pipeline.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from attrib_jax import config_blocks
from attrib_jax.attribution import selection
from attrib_jax.customization import delta as delta_lib
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.models import pipeline as pipeline_lib


@dataclasses.dataclass(frozen=True)
class CustomizationSettings:
  """Defaults: Custom Diffusion's single-concept recipe (250 steps, 8 images a step: 4
  exemplars + 4 regularisation, AdamW lr 8e-5, 200 regularisation images, prior weight 1)."""
  modifier_token: str = "<new1>"
  initializer: str = "ktn"
  num_steps: int = 250
  learning_rate: float = 8e-5
  batch_size: int = 4              # exemplar draws per step (and as many regularisation draws)
  num_regularization: int = 200    # training items drawn as regularisation
  prior_loss_weight: float = 1.0
  weight_decay: float = 1e-2       # AdamW, as Custom Diffusion's script
  grad_clip_norm: float = 1.0
  min_snr_gamma: Optional[float] = None   # None: the plain loss; γ: as a Min-SNR-trained base
  seed: int = 0

  def __post_init__(self):
    loss_lib.check_min_snr_gamma(self.min_snr_gamma)
    for name in ("num_steps", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"CustomizationSettings.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_regularization < 0 or self.prior_loss_weight < 0:
      raise ValueError("num_regularization and prior_loss_weight must be >= 0")
    if self.num_regularization == 0 and self.prior_loss_weight > 0:
      raise ValueError("prior_loss_weight > 0 needs num_regularization > 0 (or set it to 0)")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if not self.initializer.strip():
      raise ValueError("CustomizationSettings.initializer is empty")

  @classmethod
  def from_config(cls, config: Any) -> "CustomizationSettings":
    """From a config block (a ConfigDict or dict) of these fields; unknown keys are an error
    naming them."""
    return config_blocks.settings_from_block(cls, config, "customization")


class Items(NamedTuple):
  """Training items for customization: latents [n, ...] and what conditions them."""
  latents: np.ndarray
  token_ids: Optional[np.ndarray] = None    # [n, L] (exemplars: the step encodes them)
  text_states: Optional[np.ndarray] = None  # [n, L, D] (regularisation: fixed states)


def initial_row(pipe: pipeline_lib.Pipeline, initializer: str) -> np.ndarray:
  """The new token's starting embedding: the initializer word's row (mean over its tokens)."""
  ids = pipe.tokenizer.tokenize(initializer)
  if not ids:
    raise ValueError(f"the initializer {initializer!r} tokenizes to nothing")
  table = traverse_util.flatten_dict(pipe.text_params)[delta_lib.TABLE_PATH]
  return np.asarray(jnp.mean(jnp.asarray(table)[np.asarray(ids)], axis=0), np.float32)


def exemplar_items(pipe: pipeline_lib.Pipeline, images: np.ndarray, captions: Sequence[str],
                   *, modifier_token: str, seed: int = 0) -> Items:
  """Exemplar images (uint8 [n, H, W, 3]) and captions naming the modifier token.

  `pipe` must already know the token (`prepare_pipeline`). Latents: the pixel codec, or one
  keyed VAE sample per image (a fixed seed: the same exemplars give the same latents).
  """
  images = np.asarray(images)
  if len(images) == 0 or len(images) != len(captions):
    raise ValueError(f"exemplars: {len(images)} images and {len(captions)} captions (need the "
                     "same number, at least one)")
  missing = [c for c in captions if modifier_token not in c]
  if missing:
    raise ValueError(f"exemplar captions must contain {modifier_token!r}; these do not: "
                     f"{missing[:3]}")
  for c in captions:
    pipe.tokenizer.check_fits(c)
  latents = pipeline_lib.images_to_latents(images, vae=pipe.vae, vae_params=pipe.vae_params,
                                           pixel_patch=pipe.pixel_patch,
                                           key=jax.random.key(seed))
  if tuple(latents.shape[1:]) != tuple(pipe.latent_shape):
    raise ValueError(f"exemplar images {images.shape[1:]} give latents {latents.shape[1:]}, the "
                     f"UNet takes {pipe.latent_shape}")
  return Items(np.asarray(latents, np.float32), token_ids=pipe.tokenizer(list(captions)).input_ids)


def regularization_items(pipe: pipeline_lib.Pipeline, latents: np.ndarray,
                         captions: Sequence[str]) -> Items:
  """Regularisation items: training latents and their own captions (encoded once: the new row
  never enters them, so their text states are fixed)."""
  if len(latents) != len(captions):
    raise ValueError(f"regularisation: {len(latents)} latents and {len(captions)} captions")
  encode = pipeline_lib.make_text_encoder_fn(pipe.text_encoder, pipe.text_params, pipe.tokenizer)
  return Items(np.asarray(latents, np.float32), text_states=encode(list(captions)))


def draw_regularization(num_items: int, count: int, seed: int) -> np.ndarray:
  """Which training rows serve as regularisation: `count` distinct rows, sorted, keyed."""
  if count > num_items:
    raise ValueError(f"{count} regularisation items asked of a training set of {num_items}")
  return np.sort(np.random.default_rng([seed, 18]).choice(num_items, count, replace=False))


def prepare_pipeline(pipe: pipeline_lib.Pipeline, settings: CustomizationSettings
                     ) -> pipeline_lib.Pipeline:
  """The base pipeline with the modifier token added, its row at the initializer's embedding
  (the starting point of training; `customize` builds it itself)."""
  row = initial_row(pipe, settings.initializer)
  start = delta_lib.CustomDelta(
      kv={k: np.asarray(v) for k, v in _kv_of(pipe.unet_params).items()},
      token=settings.modifier_token, token_id=len(pipe.tokenizer), embedding_row=row,
      initializer=settings.initializer, base=delta_lib.base_fingerprint(pipe))
  return delta_lib.apply_delta(pipe, start, check_text_table=False)


def _kv_of(unet_params: Any) -> dict[str, Any]:
  kv, _ = selection.split(unet_params, selection.select(unet_params, "cross-attn-kv"))
  return {selection.path_name(p): v for p, v in kv.items()}


def make_optimizer(settings: CustomizationSettings) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(settings.grad_clip_norm),
                     optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay))


def make_train_step(pipe: pipeline_lib.Pipeline, settings: CustomizationSettings,
                    optimizer: optax.GradientTransformation, token_id: int) -> Callable:
  """A jitted, pure step(trainable, opt_state, frozen, data, step) -> (trainable, opt_state, loss).

  trainable = {"kv": {path name: K/V weight}, "row": [D]}; frozen = {"unet": the other UNet
  weights (flat), "text": the text tower's params, its table holding a placeholder at
  `token_id`}; data = exemplar latents/ids and regularisation latents/states. Each step draws
  its exemplars, regularisation items, timesteps and noise from (seed, step) alone.
  """
  schedule, s = pipe.schedule, settings
  text_encoder = pipe.text_encoder
  names = {selection.path_name(p): p for p in traverse_util.flatten_dict(pipe.unet_params)}
  weights_fn = lambda t: loss_lib.loss_weights(schedule, t, s.min_snr_gamma)

  def losses(trainable, frozen, latents, text_states, key):
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, (latents.shape[0],), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    unet = dict(frozen["unet"])
    unet.update({names[k]: v for k, v in trainable["kv"].items()})
    params = traverse_util.unflatten_dict(unet)
    per = loss_lib.per_example_loss(pipe.apply_unet, params, latents, text_states, t, noise,
                                    schedule=schedule)
    return per * weights_fn(t)

  def objective(trainable, frozen, data, key):
    k_ex, k_reg, k_l1, k_l2 = jax.random.split(key, 4)
    flat_text = dict(traverse_util.flatten_dict(frozen["text"]))
    table = flat_text[delta_lib.TABLE_PATH]
    # Only the new row is trainable: it replaces the placeholder at token_id, so gradient
    # reaches it and no other row.
    flat_text[delta_lib.TABLE_PATH] = table.at[token_id].set(trainable["row"])
    text_params = traverse_util.unflatten_dict(flat_text)
    pick = jax.random.randint(k_ex, (s.batch_size,), 0, data["ex_latents"].shape[0])
    states = text_encoder.apply({"params": text_params},
                                data["ex_ids"][pick]).last_hidden_state
    loss = jnp.mean(losses(trainable, frozen, data["ex_latents"][pick], states, k_l1))
    if "reg_latents" in data:
      pick = jax.random.randint(k_reg, (s.batch_size,), 0, data["reg_latents"].shape[0])
      loss = loss + s.prior_loss_weight * jnp.mean(
          losses(trainable, frozen, data["reg_latents"][pick], data["reg_states"][pick], k_l2))
    return loss

  @jax.jit
  def step(trainable, opt_state, frozen, data, index):
    key = jax.random.fold_in(jax.random.key(s.seed), index)
    loss, grads = jax.value_and_grad(objective)(trainable, frozen, data, key)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


# Jitted steps kept for the next `customize` call with the same model and settings: a benchmark
# customizes one base toward many sets (AbC: 20+), and each new jit would trace and compile
# (or look up) the same program again, tens of seconds apiece on a loaded 2-core CPU. Keyed by
# what the step closes over; the schedule by identity (held in the value, so its id stays
# unique while the entry lives). The optimizer is made from the settings alone.
_STEP_CACHE: dict = {}
_STEP_CACHE_SIZE = 4


def _reused_train_step(pipe: pipeline_lib.Pipeline, settings: CustomizationSettings,
                       optimizer: optax.GradientTransformation, token_id: int) -> Callable:
  key = (pipe.unet, pipe.text_encoder, id(pipe.schedule), pipe.pixel_patch, settings, token_id)
  if key not in _STEP_CACHE:
    while len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
      _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    _STEP_CACHE[key] = (make_train_step(pipe, settings, optimizer, token_id), pipe.schedule)
  return _STEP_CACHE[key][0]


def customize(pipe: pipeline_lib.Pipeline, exemplars: Items, regularization: Optional[Items],
              settings: CustomizationSettings,
              progress: Optional[Callable[[int, float, float], None]] = None
              ) -> delta_lib.CustomDelta:
  """Custom Diffusion on `pipe` (the base; untouched). Returns the delta.

  Args:
    pipe: the base pipeline, without the modifier token.
    exemplars: `exemplar_items(prepare_pipeline(pipe, settings), ...)`: latents and token ids of
      captions that contain the token.
    regularization: `regularization_items(pipe, ...)`, or None when prior_loss_weight is 0.
    settings: the recipe.
    progress: called as progress(step, loss, seconds_so_far) after every step (the caller's
      console line; the loop itself prints nothing).
  """
  s = settings
  if exemplars.token_ids is None or len(exemplars.latents) == 0:
    raise ValueError("exemplars need latents and token ids (see exemplar_items)")
  token_id = len(pipe.tokenizer)
  if not np.any(np.asarray(exemplars.token_ids) == token_id):
    raise ValueError(f"no exemplar caption holds the modifier token {s.modifier_token!r} "
                     f"(id {token_id}): were the ids made by prepare_pipeline's tokenizer?")
  if tuple(exemplars.latents.shape[1:]) != tuple(pipe.latent_shape):
    raise ValueError(f"exemplar latents {exemplars.latents.shape[1:]}, the UNet takes "
                     f"{pipe.latent_shape}")
  start = prepare_pipeline(pipe, s)
  data = {"ex_latents": jnp.asarray(exemplars.latents),
          "ex_ids": jnp.asarray(exemplars.token_ids, jnp.int32)}
  if s.prior_loss_weight > 0:
    if regularization is None or regularization.text_states is None:
      raise ValueError("prior_loss_weight > 0 needs regularisation items with text states")
    if len(regularization.latents) == 0:
      raise ValueError("the regularisation set is empty")
    if tuple(regularization.latents.shape[1:]) != tuple(pipe.latent_shape):
      raise ValueError(f"regularisation latents {regularization.latents.shape[1:]}, the UNet "
                       f"takes {pipe.latent_shape}")
    data["reg_latents"] = jnp.asarray(regularization.latents)
    data["reg_states"] = jnp.asarray(regularization.text_states)
  mask = selection.select(start.unet_params, "cross-attn-kv")
  kv, rest = selection.split(start.unet_params, mask)
  table = traverse_util.flatten_dict(start.text_params)[delta_lib.TABLE_PATH]
  trainable = {"kv": {selection.path_name(p): v for p, v in kv.items()},
               "row": jnp.asarray(table[token_id])}
  frozen = {"unet": rest, "text": start.text_params}
  optimizer = make_optimizer(s)
  opt_state = optimizer.init(trainable)
  step = _reused_train_step(start, s, optimizer, token_id)
  began = time.perf_counter()
  for i in range(s.num_steps):
    trainable, opt_state, loss = step(trainable, opt_state, frozen, data, i)
    if progress is not None:
      progress(i + 1, float(loss), time.perf_counter() - began)
  return delta_lib.CustomDelta(
      kv={k: np.asarray(v) for k, v in trainable["kv"].items()}, token=s.modifier_token,
      token_id=token_id, embedding_row=np.asarray(trainable["row"], np.float32),
      initializer=s.initializer, base=delta_lib.base_fingerprint(pipe),
      settings=dataclasses.asdict(s))
