"""transformers `CLIPTextModel` in flax.linen: prompt token ids -> the states the UNet attends to.

Stable Diffusion conditions its UNet on the text tower's last hidden state (77 x 768 for SD-1's
CLIP ViT-L/14, 77 x 1024 for SD-2's OpenCLIP ViT-H, whose checkpoint already drops the last
layer). Parameter paths equal the checkpoint keys, `text_model/embeddings/token_embedding/...`
<-> `text_model.embeddings.token_embedding.weight` (see `weights.py`).

Forward, as in transformers: token + position embeddings -> pre-norm transformer layers with a
causal mask (and an optional padding mask) -> final LayerNorm. The pooled output is the final
state at the end-of-text token. Every hidden state can be returned, for pipelines that condition
on an earlier layer ("clip skip"); such states go through `final_layer_norm` via
`module.apply(variables, h, method=CLIPTextModel.final_norm)`.

Usage:
  module, params, config = load_clip_text("/path/to/text_encoder")
  out = module.apply({"params": params}, input_ids)  # (B, 77) int32
  out.last_hidden_state  # (B, 77, D)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax.models import configuration
from attrib_jax.models import layers
from attrib_jax.models import weights

Array = jax.Array
COMPONENT = "CLIPTextModel"
PREFIX = "text_model"  # the key prefix of CLIPTextModel checkpoints (transformers < 5 layout)


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's sigmoid approximation of GELU (SD-1's text tower was trained with it)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}

# transformers 5 defaults of CLIPTextConfig for the options we read.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407,
}
_PINNED: dict[str, Any] = {
    # Dropout only acts in training, and the text tower is frozen here: not implemented.
    "attention_dropout": [0.0, 0], "dropout": [0.0, 0],
    "output_attentions": False,
}
_IGNORED = (
    "projection_dim",  # read only by CLIPTextModelWithProjection's head, not CLIPTextModel
    "initializer_range", "initializer_factor",  # initialisation of new torch weights
    "bos_token_id", "pad_token_id",  # tokenizer facts; the forward pass never reads them
    # Generic transformers bookkeeping with no effect on CLIPTextModel's forward.
    "output_hidden_states", "return_dict", "use_return_dict", "torchscript",
    "tie_word_embeddings", "chunk_size_feed_forward", "gradient_checkpointing",
    "_attn_implementation_autoset", "id2label", "label2id", "problem_type",
)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The text tower a transformers CLIPTextConfig describes."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    """Reads a CLIPTextConfig config.json dict strictly.

    Raises:
      UnsupportedConfigError: naming the first option the port does not implement.
    """
    c, bad = configuration.read_options(config, component=COMPONENT, defaults=_DEFAULTS,
                                        pinned=_PINNED, ignored=_IGNORED)

    if c["hidden_act"] not in ACTIVATIONS:
      raise bad("hidden_act", f"supported: {sorted(ACTIVATIONS)}")
    if c["hidden_size"] % c["num_attention_heads"]:
      raise bad("num_attention_heads", f"hidden_size {c['hidden_size']} does not split evenly")
    if not isinstance(c["eos_token_id"], int) or isinstance(c["eos_token_id"], bool):
      raise bad("eos_token_id", "one int is needed to find the pooled (end-of-text) position")
    return cls(**{k: c[k] for k in _DEFAULTS})

  def to_transformers(self) -> dict[str, Any]:
    """A config.json dict that transformers' CLIPTextModel loads as this network."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "attention_dropout": 0.0, **dataclasses.asdict(self)}


class CLIPTextOutput(NamedTuple):
  last_hidden_state: Array  # (B, L, D), after the final LayerNorm
  pooled_output: Array  # (B, D), last_hidden_state at the end-of-text token
  # Embedding output, then each layer's output (the last is *before* the final norm), as
  # transformers' `output_hidden_states=True`; None unless asked for.
  hidden_states: Optional[tuple[Array, ...]] = None


class CLIPAttention(nn.Module):
  """Multi-head self-attention with q/k/v/out projections (all with bias)."""
  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    """x (B, L, D); mask (B or 1, 1, L, L) bool, True where a query may attend to a key."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, length, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    split = lambda t: t.reshape(batch, length, self.num_heads, head_dim)
    q = split(layers.dense(self.hidden_size, name="q_proj", **kw)(x))
    k = split(layers.dense(self.hidden_size, name="k_proj", **kw)(x))
    v = split(layers.dense(self.hidden_size, name="v_proj", **kw)(x))
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    scores = jnp.einsum("blhd,bmhd->bhlm", q, k, preferred_element_type=jnp.float32)
    # A finite fill keeps a fully masked row (padding at position 0) finite instead of NaN.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    h = jnp.einsum("bhlm,bmhd->blhd", probs, v).reshape(batch, length, self.hidden_size)
    return layers.dense(self.hidden_size, name="out_proj", **kw)(h)


class CLIPMLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = ACTIVATIONS[self.hidden_act](layers.dense(self.intermediate_size, name="fc1", **kw)(x))
    return layers.dense(x.shape[-1], name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
  """x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(name="layer_norm1", epsilon=c.layer_norm_eps, **kw)(x)
    x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, name="self_attn", **kw)(h, mask)
    h = layers.layer_norm(name="layer_norm2", epsilon=c.layer_norm_eps, **kw)(x)
    return x + CLIPMLP(c.intermediate_size, c.hidden_act, name="mlp", **kw)(h)


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, position_ids: Optional[Array]) -> Array:
    c = self.config
    init = nn.initializers.normal(0.02)
    tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                      param_dtype=self.param_dtype, embedding_init=init,
                      name="token_embedding")(input_ids)
    if position_ids is None:
      position_ids = jnp.arange(input_ids.shape[-1])[None]
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                         param_dtype=self.param_dtype, embedding_init=init,
                         name="position_embedding")(position_ids)
    return tokens + positions


class CLIPEncoder(nn.Module):
  """`layers_0` ... `layers_{n-1}`; returns the embedding output and every layer's output."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array, mask: Array) -> tuple[Array, ...]:
    states = (h,)
    for i in range(self.config.num_hidden_layers):
      h = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")(h, mask)
      states += (h,)
    return states


class CLIPTextTransformer(nn.Module):
  """The `text_model` of CLIPTextModel: embeddings, encoder layers, final LayerNorm."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # `embeddings` holds the two tables, as in the checkpoint (text_model.embeddings.*).
    self.embeddings = CLIPTextEmbeddings(c, **kw)
    self.encoder = CLIPEncoder(c, **kw)
    self.final_layer_norm = layers.layer_norm(epsilon=c.layer_norm_eps, name=None, **kw)

  def __call__(self, input_ids: Array, attention_mask: Optional[Array],
               position_ids: Optional[Array], output_hidden_states: bool) -> CLIPTextOutput:
    c = self.config
    batch, length = input_ids.shape
    if length > c.max_position_embeddings:
      raise ValueError(f"{length} tokens exceed max_position_embeddings="
                       f"{c.max_position_embeddings}")
    h = self.embeddings(input_ids, position_ids)
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:  # keys that are padding are never attended to
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    hidden_states = self.encoder(h, mask)
    last = self.final_layer_norm(hidden_states[-1])
    if c.eos_token_id == 2:
      # Checkpoints from before transformers' PR #24773 carry eos_token_id=2; transformers
      # then pools at the largest id (the end-of-text token is the vocab's last).
      eos_position = jnp.argmax(input_ids, axis=-1)
    else:  # the first end-of-text token (padding may repeat it)
      eos_position = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
    pooled = last[jnp.arange(batch), eos_position]
    return CLIPTextOutput(last, pooled, hidden_states if output_hidden_states else None)


class CLIPTextModel(nn.Module):
  """CLIPTextModel(input_ids (B, L) int) -> CLIPTextOutput (float32 whatever `dtype`)."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.text_model = CLIPTextTransformer(self.config, self.dtype, self.param_dtype)

  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               position_ids: Optional[Array] = None,
               output_hidden_states: bool = False) -> CLIPTextOutput:
    """Encodes token ids; padding is attended to unless `attention_mask` says otherwise.

    Args:
      input_ids: (B, L) token ids, L <= max_position_embeddings.
      attention_mask: optional (B, L), 1 for real tokens, 0 for padding. Stable Diffusion
        pipelines pass none: padding tokens are then attended to (causally), as in training.
      position_ids: optional (B or 1, L); default 0..L-1.
      output_hidden_states: also return every layer's output (see CLIPTextOutput).
    """
    out = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)
    f32 = lambda x: x.astype(jnp.float32)
    return CLIPTextOutput(f32(out.last_hidden_state), f32(out.pooled_output),
                          None if out.hidden_states is None
                          else tuple(f32(h) for h in out.hidden_states))

  def final_norm(self, hidden_state: Array) -> Array:
    """The final LayerNorm alone, for conditioning on an earlier layer's hidden state."""
    return self.text_model.final_layer_norm(hidden_state).astype(jnp.float32)


def _dummy_ids(config: CLIPTextConfig) -> Array:
  return jnp.zeros((1, config.max_position_embeddings), jnp.int32)


def init_clip_text(config_dict: Mapping[str, Any], rng: Array, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> tuple[CLIPTextModel, dict]:
  """A freshly initialised text tower for a CLIPTextConfig dict (tests, toy models)."""
  module = CLIPTextModel(CLIPTextConfig.from_transformers(config_dict), dtype=dtype,
                         param_dtype=param_dtype)
  params = jax.jit(module.init)(rng, _dummy_ids(module.config))["params"]
  return module, params


def abstract_params(module: CLIPTextModel) -> dict:
  """The parameter tree's shapes and dtypes, without allocating it."""
  return jax.eval_shape(module.init, jax.random.key(0), _dummy_ids(module.config))["params"]


def _with_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers >= 5 saves CLIPTextModel keys without `text_model.`; older files with it."""
  if any(k.startswith(PREFIX + ".") for k in state):
    return dict(state)
  return {f"{PREFIX}.{k}": v for k, v in state.items()}


def load_clip_text(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32
                   ) -> tuple[CLIPTextModel, dict, dict[str, Any]]:
  """Loads a transformers CLIPTextModel directory (config.json + safetensors) without torch.

  Returns:
    (module, params, config_dict); params are `param_dtype` (float32) jax arrays.

  Raises:
    UnsupportedConfigError: naming a config option the port does not implement.
    WeightMismatchError: naming every missing, unexpected or mis-shaped weight.
  """
  config_dict = configuration.read_config(directory)
  module = CLIPTextModel(CLIPTextConfig.from_transformers(config_dict), dtype=dtype,
                         param_dtype=param_dtype)
  params = weights.from_torch_state_dict(_with_prefix(weights.load_state_dict(directory)),
                                         abstract_params(module), component=COMPONENT)
  return module, jax.tree.map(jnp.asarray, params), config_dict


def save_clip_text(directory: str | os.PathLike, params: Any,
                   config_dict: Mapping[str, Any]) -> None:
  """Writes config.json + model.safetensors (keys `text_model.*`) that transformers loads."""
  CLIPTextConfig.from_transformers(config_dict)  # refuse to write a config we cannot read
  weights.save_component(directory, params, config_dict, weights_name="model.safetensors")


# ----------------------------------------------------------------- with projection ---
# CLIPTextModelWithProjection: the same tower plus transformers' bias-free `text_projection` of
# the pooled (end-of-text) state, the text half of CLIP's joint embedding space. Its checkpoint
# is `text_model.*` + `text_projection.weight`; its config is CLIPTextConfig's, whose
# `projection_dim` (which CLIPTextModel ignores) sizes the projection.
COMPONENT_WITH_PROJECTION = "CLIPTextModelWithProjection"
DEFAULT_PROJECTION_DIM = 512  # transformers 5's CLIPTextConfig default


class CLIPTextWithProjectionOutput(NamedTuple):
  text_embeds: Array  # (B, projection_dim): text_projection(pooled_output)
  last_hidden_state: Array  # (B, L, D)
  pooled_output: Array  # (B, D)


class CLIPTextModelWithProjection(nn.Module):
  """(input_ids (B, L) int) -> CLIPTextWithProjectionOutput (float32 whatever `dtype`)."""
  config: CLIPTextConfig
  projection_dim: int = DEFAULT_PROJECTION_DIM
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.text_model = CLIPTextTransformer(self.config, self.dtype, self.param_dtype)
    self.text_projection = layers.dense(self.projection_dim, name=None, use_bias=False,
                                        dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               position_ids: Optional[Array] = None) -> CLIPTextWithProjectionOutput:
    """As CLIPTextModel.__call__ (without hidden states), plus the projected pooled state."""
    out = self.text_model(input_ids, attention_mask, position_ids, False)
    f32 = lambda x: x.astype(jnp.float32)
    return CLIPTextWithProjectionOutput(f32(self.text_projection(out.pooled_output)),
                                        f32(out.last_hidden_state), f32(out.pooled_output))


def projection_dim_of(config_dict: Mapping[str, Any]) -> int:
  """The config's projection_dim (transformers' default when absent), checked."""
  value = config_dict.get("projection_dim", DEFAULT_PROJECTION_DIM)
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise configuration.UnsupportedConfigError(
        f"{COMPONENT_WITH_PROJECTION}: config option projection_dim={value!r} must be a "
        "positive int")
  return value


def init_clip_text_with_projection(config_dict: Mapping[str, Any], rng: Array, *,
                                   dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
                                   ) -> tuple[CLIPTextModelWithProjection, dict]:
  """A freshly initialised projected text tower for a CLIPTextConfig dict."""
  module = CLIPTextModelWithProjection(CLIPTextConfig.from_transformers(config_dict),
                                       projection_dim_of(config_dict), dtype, param_dtype)
  return module, jax.jit(module.init)(rng, _dummy_ids(module.config))["params"]


def load_clip_text_with_projection(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
                                   param_dtype: Any = jnp.float32
                                   ) -> tuple[CLIPTextModelWithProjection, dict, dict[str, Any]]:
  """Loads a transformers CLIPTextModelWithProjection directory without torch.

  Raises:
    UnsupportedConfigError, WeightMismatchError: as load_clip_text (a plain CLIPTextModel
      file lacks `text_projection.weight`).
  """
  config_dict = configuration.read_config(directory)
  module = CLIPTextModelWithProjection(CLIPTextConfig.from_transformers(config_dict),
                                       projection_dim_of(config_dict), dtype, param_dtype)
  abstract = jax.eval_shape(module.init, jax.random.key(0), _dummy_ids(module.config))["params"]
  params = weights.from_torch_state_dict(weights.load_state_dict(directory), abstract,
                                         component=COMPONENT_WITH_PROJECTION)
  return module, jax.tree.map(jnp.asarray, params), config_dict


def save_clip_text_with_projection(directory: str | os.PathLike, params: Any,
                                   config_dict: Mapping[str, Any]) -> None:
  """Writes config.json + model.safetensors (`text_model.*`, `text_projection.weight`)."""
  CLIPTextConfig.from_transformers(config_dict)
  projection_dim_of(config_dict)
  weights.save_component(directory, jax.tree.map(np.asarray, params), config_dict,
                         weights_name="model.safetensors")
