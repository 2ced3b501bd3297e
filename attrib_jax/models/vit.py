"""transformers `ViTModel` in flax.linen (DINO ViT-B/16's layout): images -> CLS and patch tokens.

AbC compares images by the CLS token of DINO ViT-B/16, a `ViTModel` saved without its pooling
layer (`add_pooling_layer=False`). Parameter paths equal the checkpoint keys as `save_pretrained`
writes them (`encoder.layer.0.attention.attention.query.weight` <->
`encoder/layer_0/attention/attention/query/kernel`; see `weights.py`).

Forward, as in transformers: a stride-`patch_size` convolution cuts the image into patch
embeddings, a learnt CLS token goes first, learnt position embeddings are added, then pre-norm
encoder layers (x + attn(layernorm_before(x)); x + mlp(layernorm_after(x))) and a final
`layernorm`. The input is channels-last, `(B, H, W, C)`, already preprocessed
(`image_processing.py`); H and W must equal the config's `image_size` (no position-embedding
interpolation).

Usage:
  module, params, config = load_vit("/path/to/dino-vitb16")
  out = module.apply({"params": params}, pixels)   # (B, 224, 224, 3) float32
  out.cls_token                                     # (B, 768)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax.models import configuration
from attrib_jax.models import layers
from attrib_jax.models import weights

Array = jax.Array
COMPONENT = "ViTModel"

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    # transformers' "gelu_new" / "gelu_pytorch_tanh" are the tanh approximation.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

# transformers 5 defaults of ViTConfig for the options we read.
_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": True,
}
_PINNED: dict[str, Any] = {
    # Dropout acts only in training; the tower is frozen here: not implemented.
    "hidden_dropout_prob": [0.0, 0], "attention_probs_dropout_prob": [0.0, 0],
    "output_attentions": False,
}
_IGNORED = (
    "encoder_stride",  # read only by ViTForMaskedImageModeling's decoder
    "pooler_output_size", "pooler_act",  # the pooling layer, which DINO checkpoints lack
    "initializer_range",  # initialisation of new torch weights
    # Generic transformers bookkeeping with no effect on the forward pass.
    "output_hidden_states", "return_dict", "use_return_dict", "torchscript",
    "tie_word_embeddings", "chunk_size_feed_forward", "gradient_checkpointing",
    "is_encoder_decoder", "_attn_implementation_autoset", "id2label", "label2id",
    "problem_type",
)


def _int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The image tower a transformers ViTConfig describes."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "ViTConfig":
    """Reads a ViTConfig config.json dict strictly.

    Raises:
      UnsupportedConfigError: naming the first option the port does not implement.
    """
    c, bad = configuration.read_options(config, component=COMPONENT, defaults=_DEFAULTS,
                                        pinned=_PINNED, ignored=_IGNORED)

    if c["hidden_act"] not in ACTIVATIONS:
      raise bad("hidden_act", f"supported: {sorted(ACTIVATIONS)}")
    if c["hidden_size"] % c["num_attention_heads"]:
      raise bad("num_attention_heads", f"hidden_size {c['hidden_size']} does not split evenly")
    for key in ("image_size", "patch_size"):
      if not _int(c[key]):
        raise bad(key, "one int is needed (square images and patches only)")
    if c["image_size"] % c["patch_size"]:
      raise bad("patch_size", f"image_size {c['image_size']} is not a multiple of it")
    return cls(**{k: c[k] for k in _DEFAULTS})

  def to_transformers(self) -> dict[str, Any]:
    """A config.json dict that transformers' ViTModel loads as this network."""
    return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, **dataclasses.asdict(self)}


class ViTOutput(NamedTuple):
  last_hidden_state: Array  # (B, 1 + P, D), after the final layernorm; CLS first
  cls_token: Array  # (B, D), last_hidden_state[:, 0]: DINO's image descriptor
  patch_tokens: Array  # (B, P, D), last_hidden_state[:, 1:], patches in row-major order


class ViTSelfAttention(nn.Module):
  """`attention.attention`: the query/key/value projections and the scaled softmax."""
  hidden_size: int
  num_heads: int
  use_bias: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    batch, length, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    split = lambda t: t.reshape(batch, length, self.num_heads, head_dim)
    q = split(layers.dense(self.hidden_size, name="query", **kw)(x))
    k = split(layers.dense(self.hidden_size, name="key", **kw)(x))
    v = split(layers.dense(self.hidden_size, name="value", **kw)(x))
    scores = jnp.einsum("blhd,bmhd->bhlm", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * head_dim ** -0.5, axis=-1).astype(v.dtype)
    return jnp.einsum("bhlm,bmhd->blhd", probs, v).reshape(batch, length, self.hidden_size)


class ViTAttention(nn.Module):
  """`attention`: self-attention, then `output.dense` (the checkpoint's nesting)."""
  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = ViTSelfAttention(c.hidden_size, c.num_attention_heads, c.qkv_bias, name="attention",
                         **kw)(x)
    return _Dense(c.hidden_size, name="output", **kw)(h)


class _Dense(nn.Module):
  """A module holding one Linear called `dense` (transformers' `*.output.dense` nesting)."""
  features: int
  activation: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = layers.dense(self.features, name="dense", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    return ACTIVATIONS[self.activation](h) if self.activation else h


class ViTLayer(nn.Module):
  """x + attention(layernorm_before(x)), then x + output(intermediate(layernorm_after(x)))."""
  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(name="layernorm_before", epsilon=c.layer_norm_eps, **kw)(x)
    x = x + ViTAttention(c, name="attention", **kw)(h)
    h = layers.layer_norm(name="layernorm_after", epsilon=c.layer_norm_eps, **kw)(x)
    h = _Dense(c.intermediate_size, c.hidden_act, name="intermediate", **kw)(h)
    return x + _Dense(c.hidden_size, name="output", **kw)(h)


class ViTPatchEmbeddings(nn.Module):
  """`patch_embeddings.projection`: a patch_size x patch_size, stride patch_size conv."""
  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    c = self.config
    h = layers.Conv2d(c.hidden_size, c.patch_size, c.patch_size, 0, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="projection")(pixels)
    return h.reshape(h.shape[0], -1, c.hidden_size)  # row-major patches, as torch's flatten(2)


class ViTEmbeddings(nn.Module):
  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    c = self.config
    init = nn.initializers.normal(0.02)
    cls_token = self.param("cls_token", init, (1, 1, c.hidden_size), self.param_dtype)
    positions = self.param("position_embeddings", init, (1, c.num_patches + 1, c.hidden_size),
                           self.param_dtype)
    patches = ViTPatchEmbeddings(c, self.dtype, self.param_dtype, name="patch_embeddings")(pixels)
    cls = jnp.broadcast_to(cls_token.astype(patches.dtype), (patches.shape[0], 1, c.hidden_size))
    return jnp.concatenate([cls, patches], axis=1) + positions.astype(patches.dtype)


class ViTEncoder(nn.Module):
  """`layer_0` ... `layer_{n-1}` (transformers' `encoder.layer.N`)."""
  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    for i in range(self.config.num_hidden_layers):
      h = ViTLayer(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")(h)
    return h


class ViTModel(nn.Module):
  """ViTModel(pixels (B, H, W, C) float) -> ViTOutput (float32 whatever `dtype`)."""
  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> ViTOutput:
    c = self.config
    expected = (c.image_size, c.image_size, c.num_channels)
    if tuple(pixels.shape[1:]) != expected:
      raise ValueError(f"{COMPONENT}: images {tuple(pixels.shape[1:])} given, the model takes "
                       f"(H, W, C) = {expected} (preprocess them with image_processing.py)")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = ViTEmbeddings(c, name="embeddings", **kw)(pixels.astype(self.dtype))
    h = ViTEncoder(c, name="encoder", **kw)(h)
    h = layers.layer_norm(name="layernorm", epsilon=c.layer_norm_eps, **kw)(h)
    h = h.astype(jnp.float32)
    return ViTOutput(h, h[:, 0], h[:, 1:])


def _dummy_pixels(config: ViTConfig) -> Array:
  return jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)


def init_vit(config_dict: Mapping[str, Any], rng: Array, *, dtype: Any = jnp.float32,
             param_dtype: Any = jnp.float32) -> tuple[ViTModel, dict]:
  """A freshly initialised ViT for a ViTConfig dict (tests, toy models)."""
  module = ViTModel(ViTConfig.from_transformers(config_dict), dtype=dtype,
                    param_dtype=param_dtype)
  return module, jax.jit(module.init)(rng, _dummy_pixels(module.config))["params"]


def abstract_params(module: ViTModel) -> dict:
  """The parameter tree's shapes and dtypes, without allocating it."""
  return jax.eval_shape(module.init, jax.random.key(0), _dummy_pixels(module.config))["params"]


def load_vit(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
             param_dtype: Any = jnp.float32) -> tuple[ViTModel, dict, dict[str, Any]]:
  """Loads a transformers ViTModel directory (config.json + safetensors) without torch.

  The file must hold exactly the ViTModel without pooler (DINO's checkpoints); a pooler or a
  classifier head shows up as unexpected keys.

  Returns:
    (module, params, config_dict); params are `param_dtype` (float32) jax arrays.

  Raises:
    UnsupportedConfigError: naming a config option the port does not implement.
    WeightMismatchError: naming every missing, unexpected or mis-shaped weight.
  """
  config_dict = configuration.read_config(directory)
  module = ViTModel(ViTConfig.from_transformers(config_dict), dtype=dtype,
                    param_dtype=param_dtype)
  params = weights.from_torch_state_dict(weights.load_state_dict(directory),
                                         abstract_params(module), component=COMPONENT)
  return module, jax.tree.map(jnp.asarray, params), config_dict


def save_vit(directory: str | os.PathLike, params: Any, config_dict: Mapping[str, Any]) -> None:
  """Writes config.json + model.safetensors that transformers' ViTModel loads."""
  ViTConfig.from_transformers(config_dict)  # refuse to write a config we cannot read
  weights.save_component(directory, jax.tree.map(np.asarray, params), config_dict,
                         weights_name="model.safetensors")
