"""diffusers `UNet2DConditionModel` in flax.linen, channels-last (NHWC).

The text-conditioned latent UNet of Stable Diffusion 1.x/2.x and of the MSCOCO model the
attribution papers train (SPEC §1). Parameter paths equal diffusers' state-dict keys (see
`weights.py`), so checkpoints load and export without a name map.

Supported: CrossAttnDownBlock2D / DownBlock2D down blocks, UNetMidBlock2DCrossAttn,
UpBlock2D / CrossAttnUpBlock2D up blocks, positional time embedding, linear or 1x1-conv
transformer projections, per-block head counts, and the config options listed in
`UNetConfig.from_diffusers`. Everything else a config can ask for raises
`UnsupportedConfigError` naming the option (see `configuration.py`).

Usage:
  module, params, config = load_unet("/path/to/unet")  # diffusers directory
  eps = module.apply({"params": params}, latents_nhwc, timesteps, text_states)
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from attrib_jax.models import configuration
from attrib_jax.models import layers
from attrib_jax.models import weights

Array = jax.Array
COMPONENT = "UNet2DConditionModel"

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers 0.42 defaults of the options we read: a config.json written by an older diffusers
# lacks newer keys, and diffusers fills them from its signature the same way.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1.0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "attention_head_dim": 8,
    "use_linear_projection": False, "upcast_attention": False, "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "addition_embed_type": None, "addition_embed_type_num_heads": 64,
    "resnet_time_scale_shift": "default",
}

# Options supported at one value only (diffusers' default, unless noted).
_PINNED: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,  # True doubles every block's time-embedding width
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "dropout": [0.0, 0],  # dropout is not implemented
    # diffusers itself refuses a non-null value (its `attention_head_dim` naming quirk).
    "num_attention_heads": None,
}

# Options with no effect on the supported blocks: each is read only by a block type, mid block
# or embedding that the pins above rule out.
_IGNORED = (
    "sample_size",  # a default image size for pipelines, not part of the network
    "resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",  # Simple*/Resnet*
    "mid_block_only_cross_attention",  # UNetMidBlock2DSimpleCrossAttn
    "addition_time_embed_dim",  # addition_embed_type="text_time"
    "projection_class_embeddings_input_dim",  # class_embed_type / addition_embed_type
)

_USED = tuple(k for k in _DEFAULTS if k not in _PINNED)  # check_config reads `used` first


def _per_block(config: Mapping[str, Any], key: str, count: int) -> tuple:
  value = config[key]
  if isinstance(value, (list, tuple)):
    if len(value) != count:
      raise configuration.UnsupportedConfigError(
          f"{COMPONENT}: config option {key}={value!r} has {len(value)} entries for {count} "
          "down blocks")
    return tuple(value)
  return (value,) * count


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The network a diffusers UNet config describes, with per-block values spelled out."""
  in_channels: int
  out_channels: int
  center_input_sample: bool
  flip_sin_to_cos: bool
  freq_shift: float
  down_block_types: tuple[str, ...]
  up_block_types: tuple[str, ...]
  block_out_channels: tuple[int, ...]
  layers_per_block: tuple[int, ...]
  transformer_layers_per_block: tuple[int, ...]
  num_attention_heads: tuple[int, ...]  # per down block (diffusers' `attention_head_dim`)
  cross_attention_dim: int
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False
  time_embedding_dim: Optional[int] = None
  time_embedding_act_fn: Optional[str] = None
  timestep_post_act: Optional[str] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  addition_embed_type: Optional[str] = None  # None or "text" (pooled prompt -> time embedding)
  addition_embed_type_num_heads: int = 64
  resnet_time_scale_shift: str = "default"  # or "scale_shift": FiLM after norm2

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """Reads a diffusers UNet2DConditionModel config dict strictly (see module docstring).

    Raises:
      UnsupportedConfigError: naming the first option the port does not implement.
    """
    c, bad = configuration.read_options(config, component=COMPONENT, defaults=_DEFAULTS, used=_USED,
                                        pinned=_PINNED, ignored=_IGNORED)

    down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
    for key, types, allowed in (("down_block_types", down, DOWN_BLOCK_TYPES),
                                ("up_block_types", up, UP_BLOCK_TYPES)):
      for t in types:
        if t not in allowed:
          raise bad(key, f"block type {t!r} (supported: {', '.join(allowed)})")
    n = len(down)
    if len(up) != n or len(c["block_out_channels"]) != n:
      raise bad("up_block_types", "down_block_types, up_block_types and block_out_channels "
                "must have the same length")
    if not isinstance(c["norm_num_groups"], int):
      raise bad("norm_num_groups", "an int is required (None skips output norms)")
    transformer_layers = _per_block(c, "transformer_layers_per_block", n)
    if any(not isinstance(t, int) for t in transformer_layers):
      raise bad("transformer_layers_per_block", "per-block ints only (no nested lists)")
    cross = _per_block(c, "cross_attention_dim", n)
    if len(set(cross)) != 1:
      raise bad("cross_attention_dim", "one width for all blocks (every block reads the same "
                "encoder_hidden_states)")
    for key in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
      if c[key] is not None and c[key] not in layers.ACTIVATIONS:
        raise bad(key, f"supported activations: {sorted(layers.ACTIVATIONS)}")
    for key in ("conv_in_kernel", "conv_out_kernel"):
      if c[key] % 2 != 1:
        raise bad(key, "odd kernel sizes only")
    if c["resnet_time_scale_shift"] not in layers.TIME_EMBEDDING_NORMS:
      raise bad("resnet_time_scale_shift", f"one of {layers.TIME_EMBEDDING_NORMS}")
    if c["addition_embed_type"] not in (None, "text"):
      raise bad("addition_embed_type", "None or 'text' only")
    if c["addition_embed_type"] == "text" and cross[0] % c["addition_embed_type_num_heads"]:
      raise bad("addition_embed_type_num_heads",
                f"cross_attention_dim {cross[0]} does not split into that many heads")
    # diffusers' quirk: with num_attention_heads unset (always, see _PINNED),
    # `attention_head_dim` is the number of heads of each block's transformer.
    heads = _per_block(c, "attention_head_dim", n)
    for h, ch in zip(heads, c["block_out_channels"]):
      if ch % h:
        raise bad("attention_head_dim", f"{ch} channels do not split into {h} heads")
    return cls(
        in_channels=c["in_channels"], out_channels=c["out_channels"],
        center_input_sample=bool(c["center_input_sample"]),
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=c["freq_shift"],
        down_block_types=down, up_block_types=up,
        block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=_per_block(c, "layers_per_block", n),
        transformer_layers_per_block=transformer_layers, num_attention_heads=heads,
        cross_attention_dim=cross[0], downsample_padding=c["downsample_padding"],
        mid_block_scale_factor=float(c["mid_block_scale_factor"]), act_fn=c["act_fn"],
        norm_num_groups=c["norm_num_groups"], norm_eps=float(c["norm_eps"]),
        use_linear_projection=bool(c["use_linear_projection"]),
        upcast_attention=bool(c["upcast_attention"]),
        time_embedding_dim=c["time_embedding_dim"],
        time_embedding_act_fn=c["time_embedding_act_fn"],
        timestep_post_act=c["timestep_post_act"], conv_in_kernel=c["conv_in_kernel"],
        conv_out_kernel=c["conv_out_kernel"], addition_embed_type=c["addition_embed_type"],
        addition_embed_type_num_heads=c["addition_embed_type_num_heads"],
        resnet_time_scale_shift=c["resnet_time_scale_shift"])


class _BlockSettings(nn.Module):
  """Fields every UNet block shares (a base class only for its dataclass fields)."""
  out_channels: int
  num_layers: int
  config: UNetConfig
  attention_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def resnet(self, name: str, out_channels: Optional[int] = None,
             output_scale_factor: float = 1.0) -> layers.ResnetBlock2D:
    c = self.config
    return layers.ResnetBlock2D(out_channels or self.out_channels, groups=c.norm_num_groups,
                                eps=c.norm_eps, act_fn=c.act_fn,
                                time_embedding_norm=c.resnet_time_scale_shift,
                                output_scale_factor=output_scale_factor, name=name,
                                dtype=self.dtype, param_dtype=self.param_dtype)

  def transformer(self, name: str, heads: int, num_layers: int) -> layers.Transformer2DModel:
    c = self.config
    return layers.Transformer2DModel(
        heads, self.out_channels // heads, num_layers=num_layers,
        cross_attention_dim=c.cross_attention_dim, norm_num_groups=c.norm_num_groups,
        use_linear_projection=c.use_linear_projection, upcast_attention=c.upcast_attention,
        attention_impl=self.attention_impl, name=name, dtype=self.dtype,
        param_dtype=self.param_dtype)


class DownBlock(_BlockSettings):
  """CrossAttnDownBlock2D (heads > 0) or DownBlock2D (heads == 0); returns (h, skips)."""
  heads: int = 0
  transformer_layers: int = 1
  add_downsample: bool = True

  @nn.compact
  def __call__(self, h: Array, temb: Array, context: Array) -> tuple[Array, tuple[Array, ...]]:
    skips = ()
    for i in range(self.num_layers):
      h = self.resnet(f"resnets_{i}")(h, temb)
      if self.heads:
        h = self.transformer(f"attentions_{i}", self.heads, self.transformer_layers)(h, context)
      skips += (h,)
    if self.add_downsample:
      h = layers.Downsample2D(self.out_channels, padding=self.config.downsample_padding,
                              name="downsamplers_0", dtype=self.dtype,
                              param_dtype=self.param_dtype)(h)
      skips += (h,)
    return h, skips


class UpBlock(_BlockSettings):
  """CrossAttnUpBlock2D (heads > 0) or UpBlock2D (heads == 0): concat a skip per resnet."""
  heads: int = 0
  transformer_layers: int = 1
  add_upsample: bool = True

  @nn.compact
  def __call__(self, h: Array, skips: Sequence[Array], temb: Array, context: Array,
               upsample_size: Optional[tuple[int, int]] = None) -> Array:
    skips = list(skips)
    for i in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = self.resnet(f"resnets_{i}")(h, temb)
      if self.heads:
        h = self.transformer(f"attentions_{i}", self.heads, self.transformer_layers)(h, context)
    if self.add_upsample:
      h = layers.Upsample2D(self.out_channels, name="upsamplers_0", dtype=self.dtype,
                            param_dtype=self.param_dtype)(h, upsample_size)
    return h


class MidBlock(_BlockSettings):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) x num_layers."""
  heads: int = 1
  transformer_layers: int = 1

  @nn.compact
  def __call__(self, h: Array, temb: Array, context: Array) -> Array:
    scale = self.config.mid_block_scale_factor
    h = self.resnet("resnets_0", output_scale_factor=scale)(h, temb)
    for i in range(self.num_layers):
      h = self.transformer(f"attentions_{i}", self.heads, self.transformer_layers)(h, context)
      h = self.resnet(f"resnets_{i + 1}", output_scale_factor=scale)(h, temb)
    return h


class UNet2DConditionModel(nn.Module):
  """eps = UNet(sample (B, H, W, C_in), timesteps (B,) or scalar, context (B, M, D)).

  The output is float32 whatever the computation dtype, so losses are taken in float32.
  `attention_impl` picks the attention kernel ("auto", "cpu", "xla"; see
  `layers.dot_product_attention`); it changes speed, not results.
  """
  config: UNetConfig
  attention_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, sample: Array, timesteps: Array | int | float,
               encoder_hidden_states: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blocks = dict(config=c, attention_impl=self.attention_impl, **kw)
    n = len(c.block_out_channels)
    batch = sample.shape[0]
    if c.center_input_sample:
      sample = 2 * sample - 1.0
    context = encoder_hidden_states.astype(self.dtype)

    # Time embedding, shared by every resnet.
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_emb = layers.timestep_embedding(timesteps, c.block_out_channels[0],
                                      flip_sin_to_cos=c.flip_sin_to_cos,
                                      freq_shift=c.freq_shift)
    temb = layers.TimestepEmbedding(c.time_embedding_dim or 4 * c.block_out_channels[0],
                                    act_fn=c.act_fn, post_act_fn=c.timestep_post_act,
                                    name="time_embedding", **kw)(t_emb.astype(self.dtype))
    if c.addition_embed_type == "text":
      temb = temb + layers.TextTimeEmbedding(
          temb.shape[-1], c.addition_embed_type_num_heads, name="add_embedding", **kw)(context)
    if c.time_embedding_act_fn is not None:
      temb = layers.get_activation(c.time_embedding_act_fn)(temb)

    h = layers.conv(c.block_out_channels[0], c.conv_in_kernel, name="conv_in",
                    **kw)(sample.astype(self.dtype))
    skips = (h,)
    for i, block_type in enumerate(c.down_block_types):
      h, block_skips = DownBlock(
          c.block_out_channels[i], c.layers_per_block[i],
          heads=c.num_attention_heads[i] if block_type == "CrossAttnDownBlock2D" else 0,
          transformer_layers=c.transformer_layers_per_block[i], add_downsample=i < n - 1,
          name=f"down_blocks_{i}", **blocks)(h, temb, context)
      skips += block_skips

    h = MidBlock(c.block_out_channels[-1], 1, heads=c.num_attention_heads[-1],
                 transformer_layers=c.transformer_layers_per_block[-1], name="mid_block",
                 **blocks)(h, temb, context)

    # Samples not divisible by 2**(n-1) need each upsampler told its target size.
    spatial = sample.shape[1:3]
    force_size = any(d % 2 ** (n - 1) for d in spatial)
    reversed_channels = c.block_out_channels[::-1]
    for i, block_type in enumerate(c.up_block_types):
      j = n - 1 - i  # the matching down block
      num_layers = c.layers_per_block[j] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      upsample_size = tuple(skips[-1].shape[1:3]) if force_size and i < n - 1 else None
      h = UpBlock(
          reversed_channels[i], num_layers,
          heads=c.num_attention_heads[j] if block_type == "CrossAttnUpBlock2D" else 0,
          transformer_layers=c.transformer_layers_per_block[j], add_upsample=i < n - 1,
          name=f"up_blocks_{i}", **blocks)(h, block_skips, temb, context, upsample_size)

    h = layers.GroupNorm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(h)
    h = layers.get_activation(c.act_fn)(h)
    h = layers.conv(c.out_channels, c.conv_out_kernel, name="conv_out", **kw)(h)
    return h.astype(jnp.float32)


def dummy_inputs(config: UNetConfig, batch: int = 1) -> tuple[Array, Array, Array]:
  """The smallest inputs that trace the whole network (for init and eval_shape)."""
  side = 2 ** (len(config.block_out_channels) - 1)
  return (jnp.zeros((batch, side, side, config.in_channels), jnp.float32),
          jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32))


def init_unet(config_dict: Mapping[str, Any], rng: Array, *, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32) -> tuple[UNet2DConditionModel, dict]:
  """A freshly initialised UNet for a diffusers config dict, with PyTorch's default init.

  Kernels are uniform within 1/sqrt(fan_in), norm scales one, biases zero, a pooling offset
  normal with std 1/sqrt(width): the distributions
  `module.init` draws from, but from a single random draw. (`jax.jit(module.init)` generates
  each parameter with its own threefry expansion and takes 15-25 s to compile on CPU even for a
  tiny UNet; this takes well under a second.)
  """
  module = UNet2DConditionModel(UNetConfig.from_diffusers(config_dict), dtype=dtype,
                                param_dtype=param_dtype)
  # One program per network: leave-K-out evaluation initialises the same network hundreds of
  # times in a process, and a fresh closure would be traced and compiled (or loaded) each time.
  key = (module.config, jnp.dtype(dtype).name, jnp.dtype(param_dtype).name)
  if key not in _INIT_PROGRAMS:
    _INIT_PROGRAMS[key] = _init_program(traverse_util.flatten_dict(abstract_params(module)))
  return module, _INIT_PROGRAMS[key](rng)


_INIT_PROGRAMS: dict = {}
_ABSTRACT_PARAMS: dict = {}


def _init_program(flat: Mapping[tuple[str, ...], Any]):
  """The jitted initialiser of `init_unet` for a flattened abstract parameter tree."""

  @jax.jit
  def init(rng):
    kernels = [p for p in flat if p[-1] == "kernel"]
    sizes = [math.prod(flat[p].shape) for p in kernels]
    draws = dict(zip(kernels, jnp.split(
        jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0), np.cumsum(sizes)[:-1])))
    out = {}
    for path, leaf in flat.items():
      if path[-1] == "kernel":
        fan_in = math.prod(leaf.shape[:-1])
        value = draws[path].reshape(leaf.shape) / math.sqrt(fan_in)
      elif path[-1] == "scale":
        value = jnp.ones(leaf.shape)
      elif path[-1] == "bias":
        value = jnp.zeros(leaf.shape)
      elif path[-1] == "positional_embedding":  # the text-time pooling query's offset
        value = jax.random.normal(jax.random.fold_in(rng, 1), leaf.shape) / math.sqrt(
            leaf.shape[-1])
      else:
        raise ValueError(f"No initialiser for parameter {'/'.join(path)}")
      out[path] = value.astype(leaf.dtype)
    return traverse_util.unflatten_dict(out)

  return init


def abstract_params(module: UNet2DConditionModel) -> dict:
  """The parameter tree's shapes and dtypes, without allocating it (traced once per network:
  shape structs are immutable, so the tree is shared)."""
  key = (module.config, jnp.dtype(module.dtype).name, jnp.dtype(module.param_dtype).name)
  if key not in _ABSTRACT_PARAMS:
    _ABSTRACT_PARAMS[key] = jax.eval_shape(module.init, jax.random.key(0),
                                           *dummy_inputs(module.config))["params"]
  return _ABSTRACT_PARAMS[key]


def load_unet(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32
              ) -> tuple[UNet2DConditionModel, dict, dict[str, Any]]:
  """Loads a diffusers UNet directory (config.json + safetensors) without torch.

  Returns:
    (module, params, config_dict); params are float32 (`param_dtype`) jax arrays.

  Raises:
    UnsupportedConfigError: naming a config option the port does not implement.
    WeightMismatchError: naming every missing, unexpected or mis-shaped weight.
  """
  config_dict = configuration.read_config(directory)
  module = UNet2DConditionModel(UNetConfig.from_diffusers(config_dict), dtype=dtype,
                                param_dtype=param_dtype)
  params = weights.from_torch_state_dict(weights.load_state_dict(directory),
                                         abstract_params(module), component=COMPONENT)
  return module, jax.tree.map(jnp.asarray, params), config_dict
