"""A text-to-image model directory in the diffusers layout, loaded without torch.

  model_index.json
  unet/          config.json + diffusion_pytorch_model.safetensors
  text_encoder/  config.json + model.safetensors
  tokenizer/     vocab.json + merges.txt (+ tokenizer_config.json) or tokenizer.json
  scheduler/     scheduler_config.json
  vae/           config.json + diffusion_pytorch_model.safetensors
  pixel_codec.json  instead of vae/ for pixel-space models: {"patch": p}; the latent is the
                 image in [-1, 1] with each p x p patch folded into channels (space-to-depth),
                 an exact, parameter-free codec that lets a UNet work at 1/p the resolution

A Stable Diffusion snapshot on disk has exactly this layout; so does every model trained here,
which diffusers' `UNet2DConditionModel.from_pretrained(dir, subfolder="unet")` reads back.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax import io_utils
from attrib_jax.diffusion import schedules
from attrib_jax.models import clip_text
from attrib_jax.models import tokenizer as tokenizer_lib
from attrib_jax.models import unet as unet_lib
from attrib_jax.models import vae as vae_lib
from attrib_jax.models import weights


class Pipeline(NamedTuple):
  unet: unet_lib.UNet2DConditionModel
  unet_params: Any
  text_encoder: clip_text.CLIPTextModel
  text_params: Any
  tokenizer: tokenizer_lib.CLIPTokenizer
  schedule: schedules.NoiseSchedule
  vae: Optional[vae_lib.AutoencoderKL]
  vae_params: Any
  configs: dict  # component -> its config dict
  pixel_patch: int = 1  # pixel space only: the space-to-depth patch size

  def apply_unet(self, params, x_t, t, text_states):
    return self.unet.apply({"params": params}, x_t, t, text_states)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    size = self.configs["unet"].get("sample_size")
    if not size:
      raise ValueError("the UNet config has no sample_size: cannot tell the latent shape")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (*size, self.unet.config.in_channels)


def _component(directory: str, name: str) -> str:
  path = os.path.join(directory, name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} has no {name}/ component (a diffusers pipeline "
                            "directory needs unet/, text_encoder/, tokenizer/, scheduler/)")
  return path


def load_pipeline(directory: str, *, dtype: Any = jnp.float32) -> Pipeline:
  """Loads every component; `dtype` is the computation dtype of the networks."""
  unet, unet_params, unet_config = unet_lib.load_unet(_component(directory, "unet"), dtype=dtype)
  text, text_params, text_config = clip_text.load_clip_text(
      _component(directory, "text_encoder"), dtype=dtype)
  tok = tokenizer_lib.load_tokenizer(_component(directory, "tokenizer"))
  schedule = schedules.NoiseSchedule.from_pretrained(_component(directory, "scheduler"))
  vae = vae_params = vae_config = None
  if os.path.isdir(os.path.join(directory, "vae")):
    vae, vae_params, vae_config = vae_lib.load_vae(os.path.join(directory, "vae"), dtype=dtype)
  return Pipeline(unet, unet_params, text, text_params, tok, schedule, vae, vae_params,
                  {"unet": unet_config, "text_encoder": text_config, "vae": vae_config},
                  read_pixel_patch(directory))


PIXEL_CODEC_FILE = "pixel_codec.json"


def read_pixel_patch(directory: str) -> int:
  path = os.path.join(directory, PIXEL_CODEC_FILE)
  if not os.path.exists(path):
    return 1
  with open(path) as f:
    codec = json.load(f)
  if set(codec) != {"patch"} or not isinstance(codec["patch"], int) or codec["patch"] < 1:
    raise ValueError(f"{path}: expected {{\"patch\": positive int}}, got {codec}")
  return codec["patch"]


def write_pixel_patch(directory: str, patch: int) -> None:
  io_utils.atomic_write_json(os.path.join(directory, PIXEL_CODEC_FILE), {"patch": int(patch)},
                             indent=None, sort_keys=False)


def space_to_depth(x: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C]."""
  if patch == 1:
    return x
  b, h, w, c = x.shape
  if h % patch or w % patch:
    raise ValueError(f"image {h}x{w} is not divisible by the pixel patch {patch}")
  x = x.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // patch, w // patch, patch * patch * c)


def depth_to_space(x: jax.Array, patch: int) -> jax.Array:
  """The inverse of `space_to_depth`."""
  if patch == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, patch, patch, c // (patch * patch))
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * patch, w * patch, c // (patch * patch))


def images_to_latents(images: jax.Array, *, vae=None, vae_params=None, pixel_patch: int = 1,
                      key: Optional[jax.Array] = None) -> jax.Array:
  """uint8 [B, H, W, 3] -> what the UNet is trained on: a keyed VAE sample (scaled), or the
  pixels in [-1, 1] folded by the pixel codec."""
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  if vae is None:
    return space_to_depth(x, pixel_patch)
  if key is None:
    raise ValueError("encoding with a VAE samples the posterior: pass a key")
  posterior = vae.apply({"params": vae_params}, x, method=vae_lib.AutoencoderKL.encode)
  return vae.config.scale_latents(posterior.sample(key))


def save_model_index(directory: str, *, pixel_space: bool) -> None:
  index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
           "unet": ["diffusers", "UNet2DConditionModel"],
           "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "scheduler": ["diffusers", "DDPMScheduler"],
           "vae": [None, None] if pixel_space else ["diffusers", "AutoencoderKL"]}
  io_utils.atomic_write_json(os.path.join(directory, "model_index.json"), index,
                             sort_keys=False)


def save_scheduler(directory: str, scheduler_config: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  schedules.NoiseSchedule.from_config(scheduler_config)  # refuse to write what we cannot read
  io_utils.atomic_write_json(os.path.join(directory, "scheduler_config.json"),
                             dict(scheduler_config), sort_keys=False)


def save_unet(directory: str, params: Any, config: dict) -> None:
  unet_lib.UNetConfig.from_diffusers(config)  # refuse to write what we cannot read
  weights.save_component(directory, params, dict(config, _class_name="UNet2DConditionModel"))


def make_text_encoder_fn(text_encoder: clip_text.CLIPTextModel, text_params: Any,
                         tok: tokenizer_lib.CLIPTokenizer):
  """prompts -> last hidden states [n, L, D] (numpy, float32), jitted per padded length."""
  encode = jax.jit(lambda p, ids: text_encoder.apply({"params": p}, ids).last_hidden_state)

  def encode_prompts(prompts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    out = []
    for start in range(0, len(prompts), batch_size):
      ids = tok(list(prompts[start:start + batch_size])).input_ids
      out.append(np.asarray(encode(text_params, ids), np.float32))
    return np.concatenate(out)

  return encode_prompts


def latents_to_images(pipeline: Pipeline, latents: jax.Array) -> np.ndarray:
  """Final latents -> uint8 images [B, H, W, 3] (VAE decode, or pixels in pixel space)."""
  x = depth_to_space(jnp.asarray(latents), pipeline.pixel_patch)
  if pipeline.vae is not None:
    x = pipeline.vae.apply({"params": pipeline.vae_params},
                           pipeline.vae.config.unscale_latents(latents),
                           method=vae_lib.AutoencoderKL.decode)
  return np.asarray(jnp.clip(jnp.round((x + 1) * 127.5), 0, 255)).astype(np.uint8)
