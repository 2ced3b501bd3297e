"""Generating queries, and the query format that attribution reads.

A query directory holds one generated image and everything needed to attribute it:
  image.png         the decoded image
  latent.npy        the final denoised latent [h, w, c] (what AbU unlearns; for pixel-space
                    models, the pixels in [-1, 1] through the pixel codec)
  text_states.npy   the prompt's text-encoder states [L, D]
  query.json        prompt, seed, sampler settings, model directory, and optional ground truth
A query can also be made from any image + prompt (`query_from_image`), e.g. a real photo.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from attrib_jax import io_utils
from attrib_jax.diffusion import sampling
from attrib_jax.models import pipeline as pipeline_lib


class Query(NamedTuple):
  latent: np.ndarray        # [h, w, c] float32
  text_states: np.ndarray   # [L, D] float32
  image: np.ndarray         # uint8 [H, W, 3]
  info: dict                # prompt, seed, ...


def generate(pipe: pipeline_lib.Pipeline, prompts: Sequence[str], seeds: Sequence[int], *,
             sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 7.5,
             eta: float = 0.0, batch_size: int = 16) -> list[Query]:
  """One image per (prompt, seed); image i depends only on (prompt i, seed i), not on batching:
  each query is sampled with its own key, vmapped over the batch."""
  if len(prompts) != len(seeds):
    raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
  if sampler not in ("ddim", "ddpm"):
    raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
  encode = pipeline_lib.make_text_encoder_fn(pipe.text_encoder, pipe.text_params, pipe.tokenizer)
  null = jnp.asarray(encode([""]))
  states = encode(list(prompts))
  settings = dict(latent_shape=pipe.latent_shape, num_steps=num_steps,
                  guidance_scale=guidance_scale)

  # The weights are an argument, not a closed-over constant: a constant would be baked into
  # the program, so every other model of the same shape (e.g. each customized model of AbC)
  # would compile it again instead of hitting the persistent compilation cache.
  def one(params, text_states, seed):
    key = jax.random.key(seed)
    if sampler == "ddim":
      x = sampling.ddim_sample(pipe.schedule, pipe.apply_unet, params,
                               text_states[None], null, key, eta=eta, **settings)
    else:
      x = sampling.ddpm_sample(pipe.schedule, pipe.apply_unet, params,
                               text_states[None], null, key, **settings)
    return x[0]

  batched = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
  queries = []
  for start in range(0, len(prompts), batch_size):
    chunk = slice(start, start + batch_size)
    latents = batched(pipe.unet_params, jnp.asarray(states[chunk]),
                      jnp.asarray(seeds[chunk], jnp.uint32))
    images = pipeline_lib.latents_to_images(pipe, latents)
    for i, (latent, image) in enumerate(zip(np.asarray(latents), images)):
      k = start + i
      queries.append(Query(latent, states[k], image, {
          "prompt": prompts[k], "seed": int(seeds[k]), "sampler": sampler,
          "num_steps": num_steps, "guidance_scale": guidance_scale, "eta": eta}))
  return queries


def query_from_image(pipe: pipeline_lib.Pipeline, image: np.ndarray, prompt: str,
                     seed: int = 0) -> Query:
  """A query from an existing image and its prompt (the latent is a keyed VAE sample)."""
  image = np.asarray(image)
  shape = pipe.latent_shape
  pipe.tokenizer.check_fits(prompt)
  # Checked before encoding: another size fails inside the pixel codec or the VAE's
  # convolutions with a message that names neither the image nor the size the model takes.
  scale = (pipe.pixel_patch if pipe.vae is None
           else 2 ** (len(pipe.configs["vae"]["block_out_channels"]) - 1))
  want = (shape[0] * scale, shape[1] * scale)
  if image.ndim != 3 or image.shape[2] != 3 or tuple(image.shape[:2]) != want:
    raise ValueError(f"the query image is {'x'.join(map(str, image.shape))}, but the model "
                     f"takes {want[0]}x{want[1]}x3 RGB images: resize it to {want[0]}x{want[1]} "
                     "first")
  latent = pipeline_lib.images_to_latents(image[None], vae=pipe.vae, vae_params=pipe.vae_params,
                                          pixel_patch=pipe.pixel_patch,
                                          key=jax.random.key(seed))[0]
  if tuple(latent.shape) != tuple(shape):
    raise ValueError(f"image {image.shape} gives a latent {tuple(latent.shape)}, the model "
                     f"wants {shape}: resize the image to the model's resolution")
  encode = pipeline_lib.make_text_encoder_fn(pipe.text_encoder, pipe.text_params, pipe.tokenizer)
  return Query(np.asarray(latent), encode([prompt])[0], image,
               {"prompt": prompt, "seed": seed, "source": "image"})


def query_digest(query: Query) -> str:
  """sha256 (16 hex characters) of what a query's attribution depends on: its latent, its text
  states and its prompt. Results are keyed by this, never by the query's directory name, so a
  name reused for other content is recomputed instead of answered with the old scores."""
  h = hashlib.sha256()
  for array in (query.latent, query.text_states):
    array = np.ascontiguousarray(np.asarray(array, np.float32))
    h.update(f"{array.shape}".encode())
    h.update(array.tobytes())
  h.update(str(query.info.get("prompt")).encode("utf-8"))
  return h.hexdigest()[:16]


def save_query(directory: str, query: Query, extra: dict[str, Any] | None = None) -> None:
  """Writes a query directory, complete or not at all: the files are written into a staging
  folder that replaces `directory` in one rename (never new arrays beside old metadata).
  query.json records the content digest (`query_digest`), checked by `load_query`."""
  info = dict(query.info, **(extra or {}))
  info["digest"] = query_digest(query)
  with io_utils.atomic_directory(directory) as staging:
    Image.fromarray(query.image).save(os.path.join(staging, "image.png"))
    np.save(os.path.join(staging, "latent.npy"), query.latent.astype(np.float32))
    np.save(os.path.join(staging, "text_states.npy"), query.text_states.astype(np.float32))
    with open(os.path.join(staging, "query.json"), "w") as f:
      json.dump(info, f, indent=2)


def load_query(directory: str) -> Query:
  """Reads `save_query`'s directory; arrays that do not match the recorded digest are an
  error (a directory assembled from two queries)."""
  path = os.path.join(directory, "query.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a complete query (query.json missing)")
  with open(path) as f:
    info = json.load(f)
  query = Query(io_utils.load_npy(os.path.join(directory, "latent.npy")),
                io_utils.load_npy(os.path.join(directory, "text_states.npy")),
                np.asarray(Image.open(os.path.join(directory, "image.png")).convert("RGB")), info)
  if "digest" in info and info["digest"] != query_digest(query):
    raise ValueError(f"{directory}: latent.npy / text_states.npy do not match query.json "
                     f"(digest {query_digest(query)} != recorded {info['digest']}); the "
                     "directory mixes two queries: delete it and generate it again")
  return query


def is_generated_as(directory: str, request: dict[str, Any]) -> bool:
  """Whether `directory` holds a complete query generated with every field of `request`
  (prompt, seed, sampler settings). A query directory is named by its place in a plan, so a
  rerun asking another prompt under the same name must regenerate, not keep the old image."""
  path = os.path.join(directory, "query.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    info = json.load(f)
  return all(info.get(k) == v for k, v in json.loads(json.dumps(request)).items())


def list_queries(root: str) -> list[str]:
  """Complete query directories under root, sorted by name."""
  if not os.path.isdir(root):
    return []
  return sorted(os.path.join(root, d) for d in os.listdir(root)
                if not d.endswith(io_utils.STAGING_SUFFIX)  # a killed save_query's leftovers
                and os.path.exists(os.path.join(root, d, "query.json")))
