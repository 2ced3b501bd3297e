"""transformers `CLIPVisionModelWithProjection` in flax.linen (ViT-B/32 layout): images -> image_embeds.

AbC's CLIP baseline compares images by CLIP ViT-B/32's projected image embedding. Parameter
paths equal the checkpoint keys (`vision_model.encoder.layers.0.self_attn.q_proj.weight` <->
`vision_model/encoder/layers_0/self_attn/q_proj/kernel`; see `weights.py`). The encoder layers
are the text tower's (`clip_text.CLIPEncoder`, pre-norm, the same names), without a mask.

Forward, as in transformers: a bias-free stride-`patch_size` conv gives patch embeddings, a
learnt `class_embedding` goes first, position embeddings are added, then `pre_layrnorm` (sic,
the checkpoint's spelling), the encoder, `post_layernorm` on the CLS state only (the pooled
output) and the bias-free `visual_projection` -> image_embeds. `last_hidden_state` is the
encoder's output, before any post-norm, as transformers returns it. The input is channels-last,
`(B, H, W, C)`, preprocessed (`image_processing.py`), with H = W = `image_size`.

Usage:
  module, params, config = load_clip_vision("/path/to/clip-vit-b32-vision")
  module.apply({"params": params}, pixels).image_embeds   # (B, projection_dim)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax.models import clip_text
from attrib_jax.models import configuration
from attrib_jax.models import layers
from attrib_jax.models import weights

Array = jax.Array
COMPONENT = "CLIPVisionModelWithProjection"

# transformers 5 defaults of CLIPVisionConfig for the options we read.
_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512,
    "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3, "image_size": 224,
    "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
_PINNED: dict[str, Any] = {
    # Dropout acts only in training; the tower is frozen here: not implemented.
    "attention_dropout": [0.0, 0], "dropout": [0.0, 0],
    "output_attentions": False,
}
_IGNORED = (
    "initializer_range", "initializer_factor",  # initialisation of new torch weights
    # Generic transformers bookkeeping with no effect on the forward pass.
    "output_hidden_states", "return_dict", "use_return_dict", "torchscript",
    "tie_word_embeddings", "chunk_size_feed_forward", "gradient_checkpointing",
    "is_encoder_decoder", "_attn_implementation_autoset", "id2label", "label2id",
    "problem_type",
)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The image tower a transformers CLIPVisionConfig describes (with its projection)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
    """Reads a CLIPVisionConfig config.json dict strictly.

    Raises:
      UnsupportedConfigError: naming the first option the port does not implement.
    """
    c, bad = configuration.read_options(config, component=COMPONENT, defaults=_DEFAULTS,
                                        pinned=_PINNED, ignored=_IGNORED)

    if c["hidden_act"] not in clip_text.ACTIVATIONS:
      raise bad("hidden_act", f"supported: {sorted(clip_text.ACTIVATIONS)}")
    if c["hidden_size"] % c["num_attention_heads"]:
      raise bad("num_attention_heads", f"hidden_size {c['hidden_size']} does not split evenly")
    for key in ("image_size", "patch_size"):
      if not isinstance(c[key], int) or isinstance(c[key], bool):
        raise bad(key, "one int is needed (square images and patches only)")
    if c["image_size"] % c["patch_size"]:
      raise bad("patch_size", f"image_size {c['image_size']} is not a multiple of it")
    return cls(**{k: c[k] for k in _DEFAULTS})

  def to_transformers(self) -> dict[str, Any]:
    """A config.json dict that transformers' CLIPVisionModelWithProjection loads."""
    return {"architectures": ["CLIPVisionModelWithProjection"],
            "model_type": "clip_vision_model", "attention_dropout": 0.0,
            **dataclasses.asdict(self)}


class CLIPVisionOutput(NamedTuple):
  image_embeds: Array  # (B, projection_dim): visual_projection(pooled_output)
  last_hidden_state: Array  # (B, 1 + P, D): the encoder's output (no post-norm), CLS first
  pooled_output: Array  # (B, D): post_layernorm of the CLS state


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    c = self.config
    init = nn.initializers.normal(0.02)
    class_embedding = self.param("class_embedding", init, (c.hidden_size,), self.param_dtype)
    patches = layers.Conv2d(c.hidden_size, c.patch_size, c.patch_size, 0, use_bias=False,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            name="patch_embedding")(pixels)
    patches = patches.reshape(patches.shape[0], -1, c.hidden_size)  # row-major, as flatten(2)
    cls = jnp.broadcast_to(class_embedding.astype(patches.dtype),
                           (patches.shape[0], 1, c.hidden_size))
    positions = nn.Embed(c.num_positions, c.hidden_size, dtype=self.dtype,
                         param_dtype=self.param_dtype, embedding_init=init,
                         name="position_embedding")(jnp.arange(c.num_positions)[None])
    return jnp.concatenate([cls, patches], axis=1) + positions


class CLIPVisionTransformer(nn.Module):
  """The `vision_model`: embeddings, pre_layrnorm, encoder, post_layernorm (on the CLS)."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> tuple[Array, Array]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = CLIPVisionEmbeddings(c, name="embeddings", **kw)(pixels.astype(self.dtype))
    h = layers.layer_norm(name="pre_layrnorm", epsilon=c.layer_norm_eps, **kw)(h)
    everything = jnp.ones((1, 1, h.shape[1], h.shape[1]), bool)  # vision attends everywhere
    # clip_text's encoder reads hidden_size, heads, intermediate_size, hidden_act and eps,
    # which CLIPVisionConfig has under the same names.
    last = clip_text.CLIPEncoder(c, name="encoder", **kw)(h, everything)[-1]
    pooled = layers.layer_norm(name="post_layernorm", epsilon=c.layer_norm_eps, **kw)(last[:, 0])
    return last, pooled


class CLIPVisionModelWithProjection(nn.Module):
  """(pixels (B, H, W, C) float) -> CLIPVisionOutput (float32 whatever `dtype`)."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> CLIPVisionOutput:
    c = self.config
    expected = (c.image_size, c.image_size, c.num_channels)
    if tuple(pixels.shape[1:]) != expected:
      raise ValueError(f"{COMPONENT}: images {tuple(pixels.shape[1:])} given, the model takes "
                       f"(H, W, C) = {expected} (preprocess them with image_processing.py)")
    last, pooled = CLIPVisionTransformer(c, self.dtype, self.param_dtype,
                                         name="vision_model")(pixels)
    embeds = layers.dense(c.projection_dim, name="visual_projection", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype)(pooled)
    f32 = lambda x: x.astype(jnp.float32)
    return CLIPVisionOutput(f32(embeds), f32(last), f32(pooled))


def _dummy_pixels(config: CLIPVisionConfig) -> Array:
  return jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)


def init_clip_vision(config_dict: Mapping[str, Any], rng: Array, *, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32
                     ) -> tuple[CLIPVisionModelWithProjection, dict]:
  """A freshly initialised image tower for a CLIPVisionConfig dict (tests, toy models)."""
  module = CLIPVisionModelWithProjection(CLIPVisionConfig.from_transformers(config_dict),
                                         dtype=dtype, param_dtype=param_dtype)
  return module, jax.jit(module.init)(rng, _dummy_pixels(module.config))["params"]


def abstract_params(module: CLIPVisionModelWithProjection) -> dict:
  """The parameter tree's shapes and dtypes, without allocating it."""
  return jax.eval_shape(module.init, jax.random.key(0), _dummy_pixels(module.config))["params"]


def load_clip_vision(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32
                     ) -> tuple[CLIPVisionModelWithProjection, dict, dict[str, Any]]:
  """Loads a transformers CLIPVisionModelWithProjection directory without torch.

  Returns:
    (module, params, config_dict); params are `param_dtype` (float32) jax arrays.

  Raises:
    UnsupportedConfigError: naming a config option the port does not implement.
    WeightMismatchError: naming every missing, unexpected or mis-shaped weight (a plain
      CLIPVisionModel file lacks `visual_projection.weight`).
  """
  config_dict = configuration.read_config(directory)
  module = CLIPVisionModelWithProjection(CLIPVisionConfig.from_transformers(config_dict),
                                         dtype=dtype, param_dtype=param_dtype)
  params = weights.from_torch_state_dict(weights.load_state_dict(directory),
                                         abstract_params(module), component=COMPONENT)
  return module, jax.tree.map(jnp.asarray, params), config_dict


def save_clip_vision(directory: str | os.PathLike, params: Any,
                     config_dict: Mapping[str, Any]) -> None:
  """Writes config.json + model.safetensors that transformers loads."""
  CLIPVisionConfig.from_transformers(config_dict)  # refuse to write a config we cannot read
  weights.save_component(directory, jax.tree.map(np.asarray, params), config_dict,
                         weights_name="model.safetensors")
