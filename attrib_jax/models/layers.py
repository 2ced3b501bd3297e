"""Building blocks shared by the UNet and VAE ports (flax.linen, channels-last).

Every submodule is named like the attribute of its diffusers counterpart (`to_out_0`, `net_2`,
`time_emb_proj` ...), so a parameter path is the PyTorch state-dict key (see `weights.py`) and
weights convert mechanically in both directions.

Layout is NHWC throughout: convolutions, norms and attention all take the channel axis last, so
there are no NCHW <-> NHWC transposes. Token sequences are the image rows flattened,
`(B, H*W, C)`, which for channels-last data is a free reshape.

CPU speed (see `dot_product_attention` and `Transformer2DModel`): the memory-bound parts of the
transformers (attention scores, the GEGLU hidden layer) are computed a few samples at a time so
that they stay in cache; on other backends the same modules run as single batched ops.

Numerics: parameters are stored in `param_dtype` (float32 by default); `dtype` is the
computation dtype. Normalisation statistics and softmax are always computed in float32, which
keeps bfloat16 runs close to float32 ones.

Initialisers follow PyTorch's defaults for kernels (uniform with bound 1/sqrt(fan_in)), so a
model trained from scratch here starts from the same distribution as the reference code; biases
start at zero.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Array = jax.Array

# PyTorch's default Linear/Conv kernel init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _mish(x: Array) -> Array:
  return x * jnp.tanh(jax.nn.softplus(x))


# diffusers' `get_activation` names -> functions. GELU is the exact (erf) form, as in torch.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": _mish,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
  """The activation diffusers calls `name`; an error names unknown ones."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unsupported activation {name!r} (supported: {sorted(ACTIVATIONS)})")
  return ACTIVATIONS[name]


def dense(features: int, *, name: str, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.Dense:
  """A torch.nn.Linear equivalent (same init distribution for the kernel)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=TORCH_KERNEL_INIT, name=name)


class Conv2d(nn.Module):
  """torch.nn.Conv2d on NHWC data: params `kernel` (kh, kw, in, out) and `bias`, as nn.Conv.

  Why not nn.Conv: on CPU, XLA lowers a 3x3 convolution over an input smaller than the kernel
  (the 2x2 maps deep in the UNet) to a slow generic loop, 50-70x slower than the same arithmetic
  as one matmul over the nine shifted copies of the input (im2col). This module takes that path
  for such inputs and the native convolution everywhere else. A 1x1 convolution is a matmul
  over the channels, and is computed as one: under `jax.vmap` over per-model kernels, jitted
  with the models axis sharded over a mesh, XLA:CPU (jax 0.10.2) returned wrong values for the
  native 1x1 convolution (the 3x3 one was exact; tests/test_grouped_retrain.py keeps the case).
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, s, p = self.kernel_size, self.stride, self.padding
    kernel = self.param("kernel", TORCH_KERNEL_INIT, (k, k, x.shape[-1], self.features),
                        self.param_dtype).astype(self.dtype)
    x = x.astype(self.dtype)
    if k == 1 and p == 0:
      y = x[:, ::s, ::s, :] @ kernel[0, 0]
    elif k > 1 and min(x.shape[1:3]) < k:
      batch, height, width, channels = x.shape
      x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
      out_h, out_w = (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1
      patches = [x[:, i:i + s * (out_h - 1) + 1:s, j:j + s * (out_w - 1) + 1:s, :]
                 for i in range(k) for j in range(k)]
      y = jnp.concatenate(patches, axis=-1) @ kernel.reshape(k * k * channels, self.features)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def conv(features: int, kernel_size: int = 3, *, name: str, stride: int = 1,
         padding: Optional[int] = None, use_bias: bool = True, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> Conv2d:
  """A torch.nn.Conv2d equivalent; padding defaults to 'same' for odd kernels."""
  pad = (kernel_size - 1) // 2 if padding is None else padding
  return Conv2d(features, kernel_size, stride, pad, use_bias=use_bias, dtype=dtype,
                param_dtype=param_dtype, name=name)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over channels-last data of any rank (B, ..., C).

  Statistics are computed in float32 (two-pass: mean, then mean squared deviation, which XLA
  fuses into the reductions) and the affine map is folded into one per-(batch, channel)
  multiply-add, so the normalised tensor is written once, in `dtype`.
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into "
                       f"{self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
    batch = x.shape[0]
    grouped = x.reshape(batch, -1, self.num_groups, channels // self.num_groups)
    grouped = grouped.astype(jnp.float32)
    mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=(1, 3), keepdims=True)
    inv = jax.lax.rsqrt(var + self.epsilon)  # (B, 1, G, 1)
    # Fold (x - mean) * inv * scale + bias into x * a + b with a, b of shape (B, C).
    a = (inv * scale.astype(jnp.float32).reshape(self.num_groups, -1)).reshape(batch, channels)
    b = bias.astype(jnp.float32) - (mean * a.reshape(inv.shape[0], 1, self.num_groups, -1)
                                    ).reshape(batch, channels)
    shape = (batch,) + (1,) * (x.ndim - 2) + (channels,)
    y = x.astype(jnp.float32) * a.reshape(shape) + b.reshape(shape)
    return y.astype(self.dtype)


def layer_norm(*, name: str, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """torch.nn.LayerNorm over the last axis; exact (two-pass) variance for parity."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False, name=name)


TIME_EMBEDDING_NORMS = ("default", "scale_shift")


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (pre-norm), NHWC.

  norm1 -> act -> conv1 (+ time_emb_proj(act(temb))) -> norm2 -> act -> conv2, plus the input
  (through a 1x1 `conv_shortcut` when the channel count changes), divided by
  `output_scale_factor`. Dropout is not implemented (inference and dropout-free training only).
  `temb` may be None, as in the VAE, where `temb_channels` is None and there is no projection.
  time_embedding_norm="scale_shift" projects temb to a (scale, shift) pair applied after norm2,
  h * (1 + scale) + shift: a multiplicative path for whatever the embedding carries (with
  addition_embed_type="text", the pooled prompt), where "default" can only add a bias.
  """
  out_channels: Optional[int] = None
  groups: int = 32
  groups_out: Optional[int] = None
  eps: float = 1e-6
  act_fn: str = "silu"
  use_time_emb: bool = True
  time_embedding_norm: str = "default"
  output_scale_factor: float = 1.0
  use_in_shortcut: Optional[bool] = None
  conv_shortcut_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None) -> Array:
    act = get_activation(self.act_fn)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_channels = x.shape[-1]
    out_channels = self.out_channels or in_channels
    h = act(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = conv(out_channels, 3, name="conv1", **kw)(h)
    if self.time_embedding_norm not in TIME_EMBEDDING_NORMS:
      raise ValueError(f"time_embedding_norm must be one of {TIME_EMBEDDING_NORMS}, "
                       f"got {self.time_embedding_norm!r}")
    scale_shift = self.use_time_emb and self.time_embedding_norm == "scale_shift"
    if self.use_time_emb:
      if temb is None:
        raise ValueError("ResnetBlock2D built with a time embedding needs `temb`")
      width = 2 * out_channels if scale_shift else out_channels
      t = dense(width, name="time_emb_proj", **kw)(act(temb))[:, None, None, :]
      if not scale_shift:
        h = h + t
    h = GroupNorm(self.groups_out or self.groups, self.eps, name="norm2", **kw)(h)
    if scale_shift:
      scale, shift = jnp.split(t, 2, axis=-1)
      h = h * (1 + scale) + shift
    h = act(h)
    h = conv(out_channels, 3, name="conv2", **kw)(h)
    shortcut = (in_channels != out_channels if self.use_in_shortcut is None
                else self.use_in_shortcut)
    if shortcut:
      x = conv(out_channels, 1, name="conv_shortcut", use_bias=self.conv_shortcut_bias, **kw)(x)
    out = x.astype(h.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """diffusers `Downsample2D`: 3x3 conv with stride 2 (or 2x2 average pooling without conv).

  `padding` follows torch: symmetric padding of that many pixels; padding=0 means diffusers'
  asymmetric (0, 1) pad on the bottom/right before a VALID conv (the VAE encoder's choice).
  """
  out_channels: Optional[int] = None
  use_conv: bool = True
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if not self.use_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.out_channels or x.shape[-1], 3, stride=2, padding=self.padding, name="conv",
                dtype=self.dtype, param_dtype=self.param_dtype)(x)


def upsample_nearest(x: Array, output_size: Optional[tuple[int, int]] = None) -> Array:
  """Nearest-neighbour upsampling of NHWC data, x2 or to `output_size` (torch's index rule)."""
  batch, height, width, channels = x.shape
  if output_size is None or tuple(output_size) == (2 * height, 2 * width):
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)
  out_h, out_w = output_size
  # torch 'nearest': source index = floor(dst * in / out).
  rows = np.floor(np.arange(out_h) * (height / out_h)).astype(np.int32)
  cols = np.floor(np.arange(out_w) * (width / out_w)).astype(np.int32)
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """diffusers `Upsample2D` (interpolate=True, no transposed conv): nearest x2, then 3x3 conv."""
  out_channels: Optional[int] = None
  use_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, output_size: Optional[tuple[int, int]] = None) -> Array:
    x = upsample_nearest(x, output_size)
    if self.use_conv:
      x = conv(self.out_channels or x.shape[-1], 3, name="conv", dtype=self.dtype,
               param_dtype=self.param_dtype)(x)
    return x


# Working-set budgets of the CPU paths (bytes per loop iteration), a few L2-sized blocks: the
# AMD EPYC these were tuned on has 1 MiB of L2 per core and 32 MiB of shared L3.
_CPU_SCORE_BYTES = 4 << 20
_CPU_TRANSFORMER_BYTES = 8 << 20


def resolve_attention_impl(impl: str) -> str:
  """"auto" -> "cpu" on the CPU backend, "xla" elsewhere; checks the name."""
  if impl == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "xla"
  if impl not in ("cpu", "xla"):
    raise ValueError(f"Unknown attention impl {impl!r} (auto, cpu, xla)")
  return impl


def batch_chunk(batch: int, bytes_per_item: int, budget: int) -> int:
  """The largest divisor of `batch` whose items fit in `budget` bytes (at least 1)."""
  return max([c for c in range(1, batch + 1) if batch % c == 0 and c * bytes_per_item <= budget]
             or [1])


def _softmax_attention(q: Array, k: Array, v: Array, upcast: bool) -> Array:
  """Heads-major attention core: (..., L, D) x (..., M, D) -> (..., L, D); q is pre-scaled."""
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  scores = jnp.einsum("...ld,...md->...lm", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("...lm,...md->...ld", probs, v)


def dot_product_attention(q: Array, k: Array, v: Array, heads: int, *, upcast: bool = False,
                          impl: str = "auto") -> Array:
  """Multi-head softmax attention on (B, L, heads*D) x (B, M, heads*D) -> (B, L, heads*D).

  impl:
    "cpu": heads-major (B, H, L, D) operands, and a sequential loop over groups of batch
      elements sized so that each group's scores fit `_CPU_SCORE_BYTES` (cache). On a CPU,
      attention over 16x16 latents is bound by writing and re-reading the (B, H, L, M) scores;
      this path measured 5-10x faster than one batched einsum or `jax.nn.dot_product_attention`
      (and it is what PyTorch's CPU flash attention does by other means). The loop runs over a
      slice of the batch axis, so a batch-sharded caller stays correct but gathers the batch.
    "xla": `jax.nn.dot_product_attention` (one fused op; the choice for GPU/TPU).
    "auto": "cpu" on the CPU backend, "xla" elsewhere.
  `upcast` computes the scores in float32 even for bfloat16 inputs (diffusers'
  `upcast_attention`; the scores are accumulated in float32 either way).
  """
  impl = resolve_attention_impl(impl)
  batch, length, inner = q.shape
  source = k.shape[1]
  dim_head = inner // heads
  q = q.reshape(batch, length, heads, dim_head)
  k = k.reshape(batch, source, heads, dim_head)
  v = v.reshape(batch, source, heads, dim_head)
  if impl == "xla":
    if upcast:
      q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    out = jax.nn.dot_product_attention(q, k, v.astype(q.dtype)).astype(v.dtype)
    return out.reshape(batch, length, inner)
  q = q * jnp.asarray(1.0 / math.sqrt(dim_head), q.dtype)
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, D)
  chunk = batch_chunk(batch, heads * length * source * 4, _CPU_SCORE_BYTES)
  if chunk == batch:
    out = _softmax_attention(q, k, v, upcast)
  else:
    groups = lambda t: t.reshape((batch // chunk, chunk) + t.shape[1:])
    out = jax.lax.map(lambda args: _softmax_attention(*args, upcast),
                      (groups(q), groups(k), groups(v)))
    out = out.reshape((batch,) + out.shape[2:])
  return out.transpose(0, 2, 1, 3).reshape(batch, length, inner)


class Attention(nn.Module):
  """diffusers `Attention` with the default processor: to_q/to_k/to_v, softmax, to_out_0.

  Self-attention when `context` is None, cross-attention otherwise (keys and values from the
  context). Accepts tokens (B, L, C) or an NHWC image, which is flattened to tokens and restored
  afterwards. The optional `group_norm`, `residual_connection` and `rescale_output_factor` are
  the VAE mid-block attention's settings.
  """
  heads: int
  dim_head: int
  out_dim: Optional[int] = None  # defaults to the query's channel count
  bias: bool = False  # on to_q / to_k / to_v
  out_bias: bool = True
  upcast_attention: bool = False
  norm_num_groups: Optional[int] = None
  norm_eps: float = 1e-5
  residual_connection: bool = False
  rescale_output_factor: float = 1.0
  attention_impl: str = "auto"  # see dot_product_attention
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual = x
    image_shape = x.shape if x.ndim == 4 else None
    if image_shape is not None:
      x = x.reshape(x.shape[0], -1, x.shape[-1])
    if self.norm_num_groups is not None:
      x = GroupNorm(self.norm_num_groups, self.norm_eps, name="group_norm", **kw)(x)
    inner = self.heads * self.dim_head
    source = x if context is None else context
    q = dense(inner, name="to_q", use_bias=self.bias, **kw)(x)
    k = dense(inner, name="to_k", use_bias=self.bias, **kw)(source)
    v = dense(inner, name="to_v", use_bias=self.bias, **kw)(source)
    h = dot_product_attention(q, k, v, self.heads, upcast=self.upcast_attention,
                              impl=self.attention_impl)
    h = dense(self.out_dim or residual.shape[-1], name="to_out_0", use_bias=self.out_bias,
              **kw)(h)
    if image_shape is not None:
      h = h.reshape(image_shape[:-1] + (h.shape[-1],))
    if self.residual_connection:
      h = h + residual.astype(h.dtype)
    if self.rescale_output_factor != 1.0:
      h = h / self.rescale_output_factor
    return h


class GEGLU(nn.Module):
  """`proj` to twice the width; first half times GELU(second half) (exact GELU, as torch)."""
  dim_out: int
  bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = dense(2 * self.dim_out, name="proj", use_bias=self.bias, dtype=self.dtype,
              param_dtype=self.param_dtype)(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class GELU(nn.Module):
  """`proj` then GELU (exact, or the tanh form for diffusers' "gelu-approximate")."""
  dim_out: int
  approximate: bool = False
  bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = dense(self.dim_out, name="proj", use_bias=self.bias, dtype=self.dtype,
              param_dtype=self.param_dtype)(x)
    return jax.nn.gelu(h, approximate=self.approximate)


class FeedForward(nn.Module):
  """diffusers `FeedForward`: net_0 (GEGLU/GELU with `proj`), [dropout], net_2 (Linear)."""
  dim_out: Optional[int] = None
  mult: int = 4
  inner_dim: Optional[int] = None
  activation_fn: str = "geglu"
  bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    inner = self.inner_dim or dim * self.mult
    if self.activation_fn == "geglu":
      h = GEGLU(inner, bias=self.bias, name="net_0", **kw)(x)
    elif self.activation_fn in ("gelu", "gelu-approximate"):
      h = GELU(inner, approximate=self.activation_fn == "gelu-approximate", bias=self.bias,
               name="net_0", **kw)(x)
    else:
      raise ValueError(f"FeedForward: unsupported activation_fn {self.activation_fn!r}")
    return dense(self.dim_out or dim, name="net_2", use_bias=self.bias, **kw)(h)


class BasicTransformerBlock(nn.Module):
  """diffusers `BasicTransformerBlock` with norm_type="layer_norm" (pre-norm residuals).

  x + attn1(norm1(x)); x + attn2(norm2(x), context) when `cross_attention_dim` is set (attn2 is
  self-attention when the context is None); x + ff(norm3(x)).
  """
  heads: int
  dim_head: int
  cross_attention_dim: Optional[int] = None
  attention_bias: bool = False
  upcast_attention: bool = False
  norm_eps: float = 1e-5
  activation_fn: str = "geglu"
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, dim_head=self.dim_head, bias=self.attention_bias,
                upcast_attention=self.upcast_attention, attention_impl=self.attention_impl,
                **kw)
    h = layer_norm(name="norm1", epsilon=self.norm_eps, **kw)(x)
    x = x + Attention(name="attn1", **attn)(h)
    if self.cross_attention_dim is not None:
      h = layer_norm(name="norm2", epsilon=self.norm_eps, **kw)(x)
      x = x + Attention(name="attn2", **attn)(h, context)
    h = layer_norm(name="norm3", epsilon=self.norm_eps, **kw)(x)
    return x + FeedForward(activation_fn=self.activation_fn, name="ff", **kw)(h)


class Transformer2DModel(nn.Module):
  """diffusers `Transformer2DModel` on continuous NHWC input.

  GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or Dense when `use_linear_projection`; the two are
  the same map, but the parameter shapes differ, so the flag must match the checkpoint) ->
  transformer blocks over the H*W tokens -> proj_out -> + input.

  With the "cpu" attention impl the whole module runs over groups of samples in a scan (params
  broadcast, so paths and gradients are unchanged), each group's intermediates within
  `_CPU_TRANSFORMER_BYTES`.
  """
  heads: int
  dim_head: int
  num_layers: int = 1
  cross_attention_dim: Optional[int] = None
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  upcast_attention: bool = False
  attention_bias: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    batch, height, width, _ = x.shape
    inner = self.heads * self.dim_head
    chunk = batch
    if resolve_attention_impl(self.attention_impl) == "cpu":
      # Everything here acts on one sample at a time, so on a CPU the batch is processed in
      # groups whose intermediates (the GEGLU hidden layer, the attention scores) stay in
      # cache: 30% less time at 16x16 latents than one pass over the whole batch.
      tokens = height * width
      sources = max(tokens, context.shape[1] if context is not None else 0)
      per_item = 4 * max(8 * tokens * inner, self.heads * tokens * sources)
      chunk = batch_chunk(batch, per_item, _CPU_TRANSFORMER_BYTES)
    if chunk == batch:
      return self._forward(x, context)
    groups = lambda t: t.reshape((batch // chunk, chunk) + t.shape[1:])
    body = lambda module, carry, xs: (carry, module._forward(*xs))
    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
    _, out = scan(self, None, (groups(x), None if context is None else groups(context)))
    return out.reshape(x.shape)

  def _forward(self, x: Array, context: Optional[Array]) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, height, width, channels = x.shape
    inner = self.heads * self.dim_head
    h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      h = dense(inner, name="proj_in", **kw)(h.reshape(batch, height * width, channels))
    else:
      h = conv(inner, 1, name="proj_in", **kw)(h).reshape(batch, height * width, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, self.dim_head, self.cross_attention_dim,
                                attention_bias=self.attention_bias,
                                upcast_attention=self.upcast_attention,
                                attention_impl=self.attention_impl,
                                name=f"transformer_blocks_{i}", **kw)(h, context)
    if self.use_linear_projection:
      h = dense(channels, name="proj_out", **kw)(h).reshape(batch, height, width, channels)
    else:
      h = conv(channels, 1, name="proj_out", **kw)(h.reshape(batch, height, width, inner))
    return h + x.astype(h.dtype)


def timestep_embedding(timesteps: Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32 (diffusers' Timesteps).

  Frequencies exp(-log(max_period) * i / (dim/2 - freq_shift)); [sin, cos] or, flipped,
  [cos, sin]; an odd `dim` gets a zero last column.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_1 -> act -> linear_2 [-> post_act]."""
  time_embed_dim: int
  out_dim: Optional[int] = None
  act_fn: str = "silu"
  post_act_fn: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = get_activation(self.act_fn)(dense(self.time_embed_dim, name="linear_1", **kw)(x))
    h = dense(self.out_dim or self.time_embed_dim, name="linear_2", **kw)(h)
    if self.post_act_fn is not None:
      h = get_activation(self.post_act_fn)(h)
    return h


class AttentionPooling(nn.Module):
  """diffusers `AttentionPooling`: one query (the mean token plus a learnt offset) attends over
  [query; tokens] with multi-head attention, giving one vector per sequence (B, D)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, _, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"AttentionPooling: width {width} does not split into "
                       f"{self.num_heads} heads")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    offset = self.param("positional_embedding",
                        lambda key, shape, dtype: jax.random.normal(key, shape, dtype)
                        / math.sqrt(width), (1, width), self.param_dtype)
    query_token = jnp.mean(x, axis=1, keepdims=True) + offset.astype(x.dtype)  # (B, 1, D)
    tokens = jnp.concatenate([query_token, x], axis=1)                       # (B, 1 + L, D)
    q = dense(width, name="q_proj", **kw)(query_token)
    k = dense(width, name="k_proj", **kw)(tokens)
    v = dense(width, name="v_proj", **kw)(tokens)
    # The reference scales q and k by d^-1/4 each and takes the softmax in float32: the same
    # as scaled attention with float32 scores.
    return dot_product_attention(q, k, v, self.num_heads, upcast=True).reshape(batch, width)


class TextTimeEmbedding(nn.Module):
  """diffusers `TextTimeEmbedding` (UNet `addition_embed_type="text"`): the text states,
  layer-normed, attention-pooled, projected to the time-embedding width and layer-normed; the
  UNet adds it to the time embedding, so every resnet sees the prompt, not only the
  cross-attention layers."""
  time_embed_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, encoder_hidden_states: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(name="norm1", **kw)(encoder_hidden_states)
    h = AttentionPooling(self.num_heads, name="pool", **kw)(h)
    h = dense(self.time_embed_dim, name="proj", **kw)(h)
    return layer_norm(name="norm2", **kw)(h)
