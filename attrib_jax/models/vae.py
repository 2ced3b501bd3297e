"""diffusers `AutoencoderKL` in flax.linen, channels-last (NHWC): images <-> diffusion latents.

The Stable Diffusion VAE maps a 3 x 8H x 8W image in [-1, 1] to a diagonal Gaussian over
4 x H x W latents (SPEC §1: 128 px COCO images -> 4 x 16 x 16). The diffusion model is trained on
`scaling_factor * z`; decoding undoes the scale first. Parameter paths equal diffusers' keys
(`encoder/down_blocks_0/resnets_1/conv1/kernel` <-> `encoder.down_blocks.0.resnets.1.conv1.weight`).

Architecture (diffusers' Encoder / Decoder with DownEncoderBlock2D / UpDecoderBlock2D):
  encoder: conv_in -> per level [resnets (no time embedding), stride-2 conv downsampler with
    diffusers' asymmetric (0, 1) padding, except at the last level] -> mid_block (resnet,
    single-head self-attention with GroupNorm and residual, resnet) -> GroupNorm, SiLU, conv_out
    to 2 x latent_channels (mean and log-variance) -> quant_conv (1x1).
  decoder: post_quant_conv (1x1) -> conv_in -> mid_block -> per level, widest first,
    [layers_per_block + 1 resnets, nearest x2 + conv upsampler except at the last level] ->
    GroupNorm, SiLU, conv_out.
The output activation is SiLU whatever `act_fn` says (diffusers hard-codes it); `act_fn` is the
resnets' activation.

Usage:
  vae, params, config = load_vae("/path/to/vae")
  posterior = vae.apply({"params": params}, images_nhwc, method=vae.encode)
  latents = vae.config.scale_latents(posterior.sample(key))  # what the UNet is trained on
  images = vae.apply({"params": params}, vae.config.unscale_latents(latents), method=vae.decode)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from attrib_jax.models import configuration
from attrib_jax.models import layers
from attrib_jax.models import weights

Array = jax.Array
COMPONENT = "AutoencoderKL"
EPS = 1e-6  # every GroupNorm of diffusers' VAE

# diffusers 0.42 defaults of AutoencoderKL's options (older config.json files lack newer keys).
_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_PINNED: dict[str, Any] = {
    # Per-channel latent statistics some newer VAEs (SDXL-era pipelines) normalise with; SD 1/2
    # and our MSCOCO model use the scalar scaling_factor only.
    "latents_mean": None, "latents_std": None,
}
_IGNORED = (
    "sample_size",  # a default image size for pipelines (and tiling), not part of the network
    # A pipeline hint to keep the VAE in float32 under fp16; here the caller picks `dtype`.
    "force_upcast",
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The autoencoder a diffusers AutoencoderKL config describes."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None  # latents = (z - shift) * scale when set
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    """Reads a diffusers AutoencoderKL config dict strictly.

    Raises:
      UnsupportedConfigError: naming the first option the port does not implement.
    """
    c, bad = configuration.read_options(config, component=COMPONENT, defaults=_DEFAULTS,
                                        pinned=_PINNED, ignored=_IGNORED)

    n = len(c["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
      if any(t != block for t in c[key]):
        raise bad(key, f"only {block}")
      if len(c[key]) != n:
        raise bad(key, f"{len(c[key])} blocks for {n} block_out_channels")
    if c["act_fn"] not in layers.ACTIVATIONS:
      raise bad("act_fn", f"supported: {sorted(layers.ACTIVATIONS)}")
    if not isinstance(c["layers_per_block"], int):
      raise bad("layers_per_block", "one int for every block")
    for ch in c["block_out_channels"]:
      if ch % c["norm_num_groups"]:
        raise bad("norm_num_groups", f"{ch} channels do not split into groups")
    return cls(
        in_channels=c["in_channels"], out_channels=c["out_channels"],
        block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=c["layers_per_block"], act_fn=c["act_fn"],
        latent_channels=c["latent_channels"], norm_num_groups=c["norm_num_groups"],
        scaling_factor=float(c["scaling_factor"]),
        shift_factor=None if c["shift_factor"] is None else float(c["shift_factor"]),
        use_quant_conv=bool(c["use_quant_conv"]),
        use_post_quant_conv=bool(c["use_post_quant_conv"]),
        mid_block_add_attention=bool(c["mid_block_add_attention"]))

  def scale_latents(self, z: Array) -> Array:
    """VAE latents -> the diffusion model's latents: (z - shift_factor) * scaling_factor."""
    if self.shift_factor is not None:
      z = z - self.shift_factor
    return z * self.scaling_factor

  def unscale_latents(self, latents: Array) -> Array:
    """The inverse of `scale_latents`, applied before `decode`."""
    z = latents / self.scaling_factor
    return z if self.shift_factor is None else z + self.shift_factor

  def to_diffusers(self) -> dict[str, Any]:
    """A config.json dict that diffusers' AutoencoderKL loads as this network."""
    n = len(self.block_out_channels)
    return {"_class_name": COMPONENT, **dataclasses.asdict(self),
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n}


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior q(z | x) = N(mean, exp(logvar)), NHWC; a pytree (jit-returnable).

  `logvar` is clipped to [-30, 20], as diffusers does before computing the standard deviation.
  """
  mean: Array
  logvar: Array

  @classmethod
  def from_moments(cls, moments: Array) -> "DiagonalGaussian":
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> Array:
    return jnp.exp(self.logvar)

  def sample(self, key: Array) -> Array:
    """mean + std * N(0, 1) noise drawn from `key`."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> Array:
    return self.mean

  def kl(self) -> Array:
    """KL(q || N(0, 1)) per example, summed over the latent elements (the VAE's prior term)."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _resnet(config: VAEConfig, name: str, out_channels: int, kw: dict) -> layers.ResnetBlock2D:
  return layers.ResnetBlock2D(out_channels, groups=config.norm_num_groups, eps=EPS,
                              act_fn=config.act_fn, use_time_emb=False, name=name, **kw)


class MidBlock(nn.Module):
  """diffusers UNetMidBlock2D without time embedding: resnet, [attention], resnet."""
  config: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = h.shape[-1]
    h = _resnet(c, "resnets_0", channels, kw)(h)
    if c.mid_block_add_attention:
      # One head as wide as the channels, GroupNorm in front, residual inside.
      h = layers.Attention(heads=1, dim_head=channels, bias=True,
                           norm_num_groups=c.norm_num_groups, norm_eps=EPS,
                           residual_connection=True, name="attentions_0", **kw)(h)
    return _resnet(c, "resnets_1", channels, kw)(h)


class DownEncoderBlock2D(nn.Module):
  """`resnets_0..`, then `downsamplers_0`: a stride-2 conv after padding bottom/right by one."""
  config: VAEConfig
  out_channels: int
  add_downsample: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.config.layers_per_block):
      h = _resnet(self.config, f"resnets_{j}", self.out_channels, kw)(h)
    if self.add_downsample:
      # padding=0 selects diffusers' asymmetric (0, 1) pad: the VAE's only downsampling mode.
      h = layers.Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(h)
    return h


class UpDecoderBlock2D(nn.Module):
  """`resnets_0..` (layers_per_block + 1 of them), then `upsamplers_0`: nearest x2 + conv."""
  config: VAEConfig
  out_channels: int
  add_upsample: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.config.layers_per_block + 1):
      h = _resnet(self.config, f"resnets_{j}", self.out_channels, kw)(h)
    if self.add_upsample:
      h = layers.Upsample2D(self.out_channels, name="upsamplers_0", **kw)(h)
    return h


class Encoder(nn.Module):
  """image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""
  config: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = len(c.block_out_channels)
    h = layers.conv(c.block_out_channels[0], 3, name="conv_in", **kw)(x)
    for i, channels in enumerate(c.block_out_channels):
      h = DownEncoderBlock2D(c, channels, add_downsample=i < n - 1, name=f"down_blocks_{i}",
                             **kw)(h)
    h = MidBlock(c, name="mid_block", **kw)(h)
    h = layers.GroupNorm(c.norm_num_groups, EPS, name="conv_norm_out", **kw)(h)
    return layers.conv(2 * c.latent_channels, 3, name="conv_out", **kw)(jax.nn.silu(h))


class Decoder(nn.Module):
  """latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""
  config: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = len(c.block_out_channels)
    h = layers.conv(c.block_out_channels[-1], 3, name="conv_in", **kw)(z)
    h = MidBlock(c, name="mid_block", **kw)(h)
    for i, channels in enumerate(reversed(c.block_out_channels)):
      h = UpDecoderBlock2D(c, channels, add_upsample=i < n - 1, name=f"up_blocks_{i}", **kw)(h)
    h = layers.GroupNorm(c.norm_num_groups, EPS, name="conv_norm_out", **kw)(h)
    return layers.conv(c.out_channels, 3, name="conv_out", **kw)(jax.nn.silu(h))


class AutoencoderKL(nn.Module):
  """`encode` (images -> DiagonalGaussian) and `decode` (latents -> images), NHWC, float32 out.

  Neither applies `scaling_factor`: the diffusion code scales latents explicitly with
  `config.scale_latents` / `config.unscale_latents`, so the convention is visible where latents
  are made.
  """
  config: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(c, **kw)
    self.decoder = Decoder(c, **kw)
    if c.use_quant_conv:
      self.quant_conv = layers.conv(2 * c.latent_channels, 1, name=None, **kw)
    if c.use_post_quant_conv:
      self.post_quant_conv = layers.conv(c.latent_channels, 1, name=None, **kw)

  def encode(self, x: Array) -> DiagonalGaussian:
    """x (B, H, W, in_channels), values in [-1, 1] -> the posterior over latents (float32)."""
    moments = self.encoder(x.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: Array) -> Array:
    """Unscaled latents (B, h, w, latent_channels) -> images (B, H, W, out_channels), float32."""
    z = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array, key: Optional[Array] = None) -> Array:
    """Reconstruction: decode(posterior sample with `key`, or its mean without one)."""
    posterior = self.encode(x)
    return self.decode(posterior.mode() if key is None else posterior.sample(key))


def dummy_input(config: VAEConfig, batch: int = 1) -> Array:
  """The smallest image that traces the whole network (for init and eval_shape)."""
  side = 2 ** (len(config.block_out_channels) - 1)
  return jnp.zeros((batch, side, side, config.in_channels), jnp.float32)


def init_vae(config_dict: Mapping[str, Any], rng: Array, *, dtype: Any = jnp.float32,
             param_dtype: Any = jnp.float32) -> tuple[AutoencoderKL, dict]:
  """A freshly initialised VAE (PyTorch-like init) for a diffusers config dict."""
  module = AutoencoderKL(VAEConfig.from_diffusers(config_dict), dtype=dtype,
                         param_dtype=param_dtype)
  params = jax.jit(module.init)(rng, dummy_input(module.config))["params"]
  return module, params


def abstract_params(module: AutoencoderKL) -> dict:
  """The parameter tree's shapes and dtypes, without allocating it."""
  return jax.eval_shape(module.init, jax.random.key(0), dummy_input(module.config))["params"]


def load_vae(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
             param_dtype: Any = jnp.float32) -> tuple[AutoencoderKL, dict, dict[str, Any]]:
  """Loads a diffusers AutoencoderKL directory (config.json + safetensors) without torch.

  Returns:
    (module, params, config_dict); params are `param_dtype` (float32) jax arrays.

  Raises:
    UnsupportedConfigError: naming a config option the port does not implement.
    WeightMismatchError: naming every missing, unexpected or mis-shaped weight.
  """
  config_dict = configuration.read_config(directory)
  module = AutoencoderKL(VAEConfig.from_diffusers(config_dict), dtype=dtype,
                         param_dtype=param_dtype)
  params = weights.from_torch_state_dict(weights.load_state_dict(directory),
                                         abstract_params(module), component=COMPONENT)
  return module, jax.tree.map(jnp.asarray, params), config_dict


def save_vae(directory: str | os.PathLike, params: Any, config_dict: Mapping[str, Any]) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors that diffusers loads."""
  VAEConfig.from_diffusers(config_dict)  # refuse to write a config we cannot read
  weights.save_component(directory, params, config_dict)
