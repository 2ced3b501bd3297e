"""A text-to-image model directory in the diffusers layout, loaded without torch.

  model_index.json
  unet/          config.json + diffusion_pytorch_model.safetensors
  text_encoder/  config.json + model.safetensors
  tokenizer/     vocab.json + merges.txt (+ tokenizer_config.json) or tokenizer.json
  scheduler/     scheduler_config.json
  vae/           config.json + diffusion_pytorch_model.safetensors  (absent: pixel space)

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
                  {"unet": unet_config, "text_encoder": text_config, "vae": vae_config})


def save_model_index(directory: str, *, pixel_space: bool) -> None:
  index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
           "unet": ["diffusers", "UNet2DConditionModel"],
           "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "scheduler": ["diffusers", "DDPMScheduler"],
           "vae": [None, None] if pixel_space else ["diffusers", "AutoencoderKL"]}
  tmp = os.path.join(directory, "model_index.json.tmp")
  with open(tmp, "w") as f:
    json.dump(index, f, indent=2)
  os.replace(tmp, os.path.join(directory, "model_index.json"))


def save_scheduler(directory: str, scheduler_config: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  schedules.NoiseSchedule.from_config(scheduler_config)  # refuse to write what we cannot read
  tmp = os.path.join(directory, "scheduler_config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(dict(scheduler_config), f, indent=2)
  os.replace(tmp, os.path.join(directory, "scheduler_config.json"))


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
  x = latents
  if pipeline.vae is not None:
    x = pipeline.vae.apply({"params": pipeline.vae_params},
                           pipeline.vae.config.unscale_latents(latents),
                           method=vae_lib.AutoencoderKL.decode)
  return np.asarray(jnp.clip(jnp.round((x + 1) * 127.5), 0, 255)).astype(np.uint8)
